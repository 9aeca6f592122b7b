"""The GPU workloads of issue 7 in one process: one engine, every workload, one table.

    python benchmarks/gpu/workloads.py --model benchmarks/gpu/llama-3.1-8b --out $OUT/workloads.json [--only NAME ...]

The model is the Llama-3.1-8B shape with dummy weights (bf16; speed does not depend on weight
values). One engine (max_num_seqs 256, max_model_len 4096) serves every workload, after its
construction is timed (start-up to first token). Random prompt ids, ignore EOS, greedy. Each
workload is run once untimed at a small size (warm-up) and then timed once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from kestrel.bench.offline import OfflineSpec, random_prompts, run_offline
from kestrel.bench.workloads import MultiTurn, SharedPrefix
from kestrel.config import EngineConfig
from kestrel.engine import Engine
from kestrel.sampling_params import SamplingParams

# name -> (num_prompts, input_len, output_len, figure)
WORKLOADS = {
    "b1_128x512": (1, 128, 512, "ms_per_token"),
    "b64_128x512": (64, 128, 512, "decode_tok_s"),
    "n2000_256x256": (2000, 256, 256, "output_tok_s"),
    "n500_1024x1024": (500, 1024, 1024, "output_tok_s"),
    "n200_2048x16": (200, 2048, 16, "prompt_tok_s"),
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--prefix-cache-workloads", action="store_true",
                        help="also issue 9's GPU workloads: shared prefix (G32 R16 P2048 Q128 O128) with the "
                             "cache on and off (a second engine), and a 10-turn chat")
    args = parser.parse_args()
    config = EngineConfig(model=args.model, load_format="dummy", dtype="bfloat16", device=args.device,
                          max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
                          show_progress=False)
    t0 = time.perf_counter()
    engine = Engine(config)
    init_s = time.perf_counter() - t0
    engine.add_request("first", random_prompts(1, 128, engine.model_config.vocab_size, 0)[0],
                       SamplingParams(temperature=0, max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()
    startup_s = time.perf_counter() - t0
    rows = [("startup_to_first_token_s", startup_s, f"engine init {init_s:.1f} s")]
    results: dict = {"startup_to_first_token_s": startup_s, "engine_init_s": init_s,
                     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
                     "num_kv_slots": engine.executor.info.num_kv_slots}
    for name, (n, inp, outp, figure) in WORKLOADS.items():
        if args.only and name not in args.only:
            continue
        spec = OfflineSpec(num_prompts=n, input_len=inp, output_len=outp, batch_size=args.max_num_seqs,
                           temperature=0.0, num_warmup_tokens=4)
        r = run_offline(config, spec, engine)
        value = {"ms_per_token": r.mean_decode_step_ms, "decode_tok_s": r.decode_tokens_per_s,
                 "output_tok_s": r.output_tokens_per_s,
                 "prompt_tok_s": n * inp / r.elapsed_s}[figure]
        results[name] = {"figure": figure, "value": value, "elapsed_s": r.elapsed_s,
                         "output_tok_s": r.output_tokens_per_s, "mean_ttft_ms": r.mean_ttft_ms,
                         "mean_decode_step_ms": r.mean_decode_step_ms, "decode_tok_s": r.decode_tokens_per_s}
        rows.append((name, value, figure))
        print(f"{name}: {figure} = {value:.2f} (elapsed {r.elapsed_s:.2f} s, "
              f"decode step {r.mean_decode_step_ms:.2f} ms)", flush=True)
    if args.prefix_cache_workloads:
        rows += _prefix_cache_workloads(config, engine, args.max_num_seqs, results)
    print("=" * 64)
    for name, value, note in rows:
        print(f"{name:<28} {value:>12.2f}   {note}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _prefix_cache_workloads(config: EngineConfig, engine: Engine, batch: int, results: dict) -> list:
    shared = SharedPrefix(num_groups=32, prompts_per_group=16, prefix_len=2048, question_len=128)
    spec = OfflineSpec(num_prompts=shared.num_prompts, input_len=shared.prefix_len + shared.question_len,
                       output_len=128, batch_size=batch, temperature=0.0, num_warmup_tokens=4, shared_prefix=shared)
    rows = []
    for label, eng in (("on", engine), ("off", None)):
        cfg = config if eng is not None else EngineConfig(**{**_fields(config), "enable_prefix_caching": False})
        r = run_offline(cfg, spec, eng)
        results[f"shared_prefix_cache_{label}"] = {"output_tok_s": r.output_tokens_per_s, "elapsed_s": r.elapsed_s,
                                                   "hit_rate": r.prefix_cache_hit_rate}
        rows.append((f"shared_prefix_cache_{label}", r.output_tokens_per_s, "output_tok_s"))
    turns = MultiTurn(num_conversations=1, num_turns=10, turn_len=100, output_len=32)
    spec = OfflineSpec(num_prompts=1, input_len=100, output_len=32, batch_size=batch, temperature=0.0,
                       num_warmup_tokens=4, multi_turn=turns)
    r = run_offline(config, spec, engine)
    ttft = r.mean_ttft_by_turn_ms
    results["multi_turn_ttft_by_turn_ms"] = ttft
    rows.append(("multi_turn_ttft_last_over_first", ttft[-1] / ttft[0], "ratio"))
    return rows


def _fields(config: EngineConfig) -> dict:
    return {f: getattr(config, f) for f in config.__dataclass_fields__}


if __name__ == "__main__":
    sys.exit(main())
