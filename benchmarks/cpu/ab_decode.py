"""Decode step time of two engine configurations, interleaved in one process (A B A B ...).

    python benchmarks/cpu/ab_decode.py --batch-size 1 --b compile_decode=true [--a KEY=VALUE] [--rounds 8]

Both engines get the same `--batch-size` random prompts of `--input-len` tokens and decode in
steady state; then, for each round, A runs `--steps` decode steps and B as many, and the round's
ratio B/A of median step times is kept. On a shared machine the load drifts within seconds, so
alternating short blocks compares the two under the same load; the median of the rounds' ratios is
the figure to quote (with the load average, printed before and after).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

from kestrel.config import EngineConfig
from kestrel.engine import Engine
from kestrel.sampling_params import SamplingParams

from _emit import emit  # benchmarks/cpu/_emit.py (the script's folder is on sys.path)


def _fields(pairs: list[str]) -> dict:
    out = {}
    for kv in pairs:
        key, value = kv.split("=", 1)
        out[key] = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
    return out


def _steady(engine: Engine, batch_size: int, input_len: int) -> None:
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)
    for i in range(batch_size):
        engine.add_request(f"r{i}", [rng.randrange(vocab) for _ in range(input_len)], params)
    while sum(1 for r in engine.scheduler.running if r.num_output_tokens) < batch_size:
        engine.step()
    for _ in range(3):
        engine.step()


def _block(engine: Engine, steps: int) -> float:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--a", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--b", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    base = dict(dtype=args.dtype, num_threads=args.num_threads, max_num_seqs=max(args.batch_size, 1),
                show_progress=False, kv_cache_memory_gb=0.5)
    engines = {}
    init_s = {}
    for name, extra in (("a", args.a), ("b", args.b)):
        t0 = time.perf_counter()
        engines[name] = Engine(EngineConfig(**base, **_fields(extra)))
        init_s[name] = round(time.perf_counter() - t0, 1)
        _steady(engines[name], args.batch_size, args.input_len)
    load_before = os.getloadavg()[0]
    a_ms, b_ms, ratios = [], [], []
    for _ in range(args.rounds):
        a = _block(engines["a"], args.steps)
        b = _block(engines["b"], args.steps)
        a_ms.append(a)
        b_ms.append(b)
        ratios.append(b / a)
    result = {"dtype": args.dtype, "batch_size": args.batch_size, "input_len": args.input_len, "a": args.a,
              "b": args.b, "engine_init_s": init_s, "a_step_ms_median": round(statistics.median(a_ms), 2),
              "b_step_ms_median": round(statistics.median(b_ms), 2),
              "b_over_a_median": round(statistics.median(ratios), 3),
              "b_over_a_rounds": [round(r, 3) for r in ratios],
              "a_step_ms_min": round(min(a_ms), 2), "b_step_ms_min": round(min(b_ms), 2),
              "load_before": load_before, "load_after": os.getloadavg()[0]}
    emit(result, args.json)


if __name__ == "__main__":
    main()
