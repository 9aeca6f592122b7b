"""Where a throughput workload's wall time goes, step by step: decode-only steps vs steps with prefill.

    python3 benchmarks/gpu/step_log.py --model benchmarks/gpu/llama-3.1-8b --only n2000_256x256 n200_2048x16

Runs each workload (all prompts submitted at once, greedy, EOS ignored, as workloads.py does) by calling
`Engine.step()` and records each step's wall time with what it ran (`Engine.last_step`: requests,
prompt tokens). With async scheduling a step's wall time is the device time of the step before it
when the host keeps up, so the figures are sums over many steps. Prints, per workload, the time in
decode-only steps (by batch size) and in steps with prefill (by prompt tokens), and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kestrel.bench.offline import random_prompts  # noqa: E402
from kestrel.config import EngineConfig  # noqa: E402
from kestrel.engine import Engine  # noqa: E402
from kestrel.sampling_params import SamplingParams  # noqa: E402

WORKLOADS = {"n2000_256x256": (2000, 256, 256), "n200_2048x16": (200, 2048, 16), "n500_1024x1024": (500, 1024, 1024)}


def run(engine: Engine, name: str, n: int, inp: int, outp: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=outp, ignore_eos=True)
    engine.reset_prefix_cache()  # and a seed of its own: one seed's stream would repeat the last workload's
    for i, p in enumerate(random_prompts(n, inp, engine.model_config.vocab_size, 11 + list(WORKLOADS).index(name))):
        engine.add_request(f"{name}-{i}", p, params)
    steps = []
    t0 = last = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        now = time.perf_counter()
        info = engine.last_step
        steps.append((now - last, info.num_requests, info.num_prompt_tokens))
        last = now
    total = last - t0
    decode = defaultdict(lambda: [0, 0.0])
    prefill = defaultdict(lambda: [0, 0.0, 0])
    for dt, reqs, prompt in steps:
        if prompt == 0:
            bucket = decode[min(256, (reqs + 31) // 32 * 32)]
            bucket[0] += 1
            bucket[1] += dt
        else:
            bucket = prefill[(prompt + 2047) // 2048 * 2048]
            bucket[0] += 1
            bucket[1] += dt
            bucket[2] += reqs - prompt if reqs > prompt else 0
    print(f"== {name}: {len(steps)} steps, {total:.2f} s")
    for size, (count, secs) in sorted(decode.items()):
        print(f"  decode-only, <= {size:3d} requests: {count:5d} steps, {secs:7.2f} s, "
              f"{1e3 * secs / count:7.2f} ms/step")
    for size, (count, secs, _) in sorted(prefill.items()):
        print(f"  with prefill, <= {size:5d} prompt tokens: {count:5d} steps, {secs:7.2f} s, "
              f"{1e3 * secs / count:7.2f} ms/step")
    return {"total_s": total, "steps": steps}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--only", nargs="*", default=list(WORKLOADS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of each workload's prompts (CPU smoke runs)")
    args = ap.parse_args()
    config = EngineConfig(model=args.model, load_format="dummy", dtype="bfloat16", device=args.device,
                          max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=8192, show_progress=False)
    engine = Engine(config)
    engine.add_request("warm", random_prompts(1, 128, engine.model_config.vocab_size, 0)[0],
                       SamplingParams(temperature=0, max_tokens=4))
    while engine.has_unfinished_requests():
        engine.step()
    out = {}
    for name in args.only:
        n, inp, outp = WORKLOADS[name]
        out[name] = run(engine, name, max(1, int(n * args.scale)), inp, outp)
    if args.out:
        Path(args.out).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
