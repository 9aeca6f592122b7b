"""Where the time goes on the GPU: torch.profiler over decode steps (batch 1 and 64) and one prefill step.

    python benchmarks/gpu/gpu_profile.py --model benchmarks/gpu/llama-3.1-8b [--device cuda]

Builds the Llama-3.1-8B-shaped engine (dummy bf16 weights, CUDA graphs on), brings B requests to
decode, then profiles N decode steps and prints the top kernels by device time, the device time per
step against the wall time per step (the difference is host time the GPU waits for), and the same
for one 8192-token prefill step.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kestrel.bench.offline import random_prompts
from kestrel.config import EngineConfig
from kestrel.engine import Engine
from kestrel.sampling_params import SamplingParams


def _table(prof, steps: int, wall_s: float, label: str, device: str) -> None:
    events = prof.key_averages()
    attr = "device_time_total" if device != "cpu" else "cpu_time_total"
    kernels = [e for e in events if getattr(e, attr, 0) > 0 and (device == "cpu" or e.device_type.name == "CUDA")]
    total_us = sum(getattr(e, attr) for e in kernels)
    print(f"== {label}: {steps} steps, wall {wall_s / steps * 1e3:.3f} ms/step, "
          f"device {total_us / steps / 1e3:.3f} ms/step")
    for e in sorted(kernels, key=lambda e: -getattr(e, attr))[:14]:
        t = getattr(e, attr)
        print(f"  {t / steps:9.1f} us/step {100 * t / max(total_us, 1):5.1f}%  x{e.count // steps:<4} {e.key[:90]}")


def _timeline(prof, steps: int, device: str) -> None:
    """Device idle time inside the profiled window (gaps between kernels: the host work the GPU waits for)
    and the host ops that cost the most CPU time per step."""
    if device != "cpu":
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start)
        if spans:
            busy, gaps, (start, end) = 0.0, [], spans[0]
            for a, b in spans[1:]:
                if a > end:
                    busy += end - start
                    gaps.append(a - end)
                    start, end = a, b
                else:
                    end = max(end, b)
            busy += end - start
            window = spans[-1][1] - spans[0][0]
            big = [g for g in gaps if g > 20]
            print(f"  device timeline: {window / steps / 1e3:.3f} ms/step from first to last kernel, busy "
                  f"{busy / steps / 1e3:.3f}, idle {(window - busy) / steps / 1e3:.3f}; gaps > 20 us: "
                  f"{len(big) / steps:.1f}/step, {sum(big) / steps:.1f} us/step, largest "
                  + ", ".join(f"{g:.0f}" for g in sorted(big)[-5:]) + " us")
    host = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    print("  host ops by self CPU time:")
    for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"  {e.self_cpu_time_total / steps:9.1f} us/step  x{e.count / steps:<6.1f} {e.key[:90]}")


def _host_timers(engine: Engine) -> dict[str, float]:
    """Wall time of each host phase of Engine.step (wrapped on this engine only), accumulated in seconds."""
    acc: dict[str, float] = {}

    def wrap(obj, name: str, label: str) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                acc[label] = acc.get(label, 0.0) + time.perf_counter() - t
        setattr(obj, name, timed)

    wrap(engine.scheduler, "schedule", "schedule")
    wrap(engine, "_commit", "build batch + commit")
    wrap(engine.executor, "submit", "worker submit (stage, launch, sampler)")
    wrap(engine.executor, "execute", "worker execute (sync)")
    wrap(engine, "_apply_inflight", "apply result (wait + update)")
    wrap(engine.scheduler, "update", "update")
    return acc


def _mixed(engine: Engine, steps: int, phases: dict, activities, sync, device: str) -> None:
    """240 requests decoding (seq ~300) and, each step, one new 256-token prompt that ends after its prefill."""
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    for i, p in enumerate(random_prompts(240, 256, vocab, 3)):
        engine.add_request(f"m{i}", p, params)
    for _ in range(48):
        engine.step()
    new = iter(random_prompts(3 * steps + 8, 256, vocab, 4))
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def run(label: str) -> float:
        sync()
        t0 = time.perf_counter()
        for i in range(steps):
            engine.add_request(f"{label}{i}", next(new), one)
            engine.step()
        sync()
        return time.perf_counter() - t0

    plain = run("u")
    phases.clear()
    timed = run("t")
    timers = ", ".join(f"{k} {v / steps * 1e3:.3f}" for k, v in phases.items())
    print(f"== mixed 240 decodes + 1 x 256 prefill: unprofiled wall {plain / steps * 1e3:.3f} ms/step; with host "
          f"timers {timed / steps * 1e3:.3f} ms/step: {timers}")
    with profile(activities=activities) as prof:
        wall = run("p")
    _table(prof, steps, wall, "mixed 240 decodes + 1 x 256 prefill", device)
    _timeline(prof, steps, device)
    _abort_all(engine, "m", 240)


def _abort_all(engine: Engine, prefix: str, n: int) -> None:
    """Abort requests prefix0 .. prefix{n-1} and step until the engine is idle."""
    for i in range(n):
        engine.abort_request(f"{prefix}{i}")
    while engine.has_unfinished_requests():
        engine.step()


def _prefill_stream(engine: Engine, steps: int, activities, sync, device: str) -> None:
    """64 prompts of 2048 tokens, 16 outputs each, submitted together: after a few steps each 8192-token
    prefill step also carries the decodes of the prompts before it, as in the 200 x 2048/16 workload."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for i, p in enumerate(random_prompts(64, 2048, engine.model_config.vocab_size, 21)):
        engine.add_request(f"s{i}", p, params)
    for _ in range(6):
        engine.step()
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync()
        wall = time.perf_counter() - t0
    _table(prof, steps, wall, "prefill stream (8192-token steps + decodes)", device)
    _timeline(prof, steps, device)
    _abort_all(engine, "s", 64)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--cases", nargs="*", default=["b1", "b64", "mixed", "prefill"],
                        help="bN: N requests decoding at seq ~520 (b1, b64, b256, ...); prefill_stream: 2048-token "
                             "prompts with 16 outputs (n200's steady state: 8192-token prefill steps with the "
                             "earlier prompts' decodes); mixed: 240 decodes + one new 256-token prompt per step")
    args = parser.parse_args()
    config = EngineConfig(model=args.model, load_format="dummy", dtype="bfloat16", device=args.device,
                          max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=8192, show_progress=False)
    engine = Engine(config)
    print(f"async scheduling: {engine.async_scheduling}")
    phases = _host_timers(engine)
    vocab = engine.model_config.vocab_size
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device != "cpu" else [])
    sync = torch.cuda.synchronize if args.device != "cpu" else (lambda: None)
    for batch in [int(c[1:]) for c in args.cases if c[0] == "b" and c[1:].isdigit()]:
        params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
        for i, p in enumerate(random_prompts(batch, 512, vocab, batch)):
            engine.add_request(f"b{batch}-{i}", p, params)
        for _ in range(8 + batch * 512 // 8192):  # prefill and a few decode steps
            engine.step()
        sync()
        t0 = time.perf_counter()  # unprofiled first: the profiler's own host cost inflates wall time
        for _ in range(args.steps):
            engine.step()
        sync()
        plain = time.perf_counter() - t0
        phases.clear()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        sync()
        timed = time.perf_counter() - t0
        print(f"== decode batch {batch}: unprofiled wall {plain / args.steps * 1e3:.3f} ms/step; with host timers "
              f"{timed / args.steps * 1e3:.3f} ms/step: "
              + ", ".join(f"{k} {v / args.steps * 1e3:.3f}" for k, v in phases.items()))
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            sync()
            wall = time.perf_counter() - t0
        _table(prof, args.steps, wall, f"decode batch {batch}, seq ~520", args.device)
        _timeline(prof, args.steps, args.device)
        _abort_all(engine, f"b{batch}-", batch)
    if "prefill_stream" in args.cases:
        _prefill_stream(engine, min(args.steps, 8), activities, sync, args.device)
    if "mixed" in args.cases:
        _mixed(engine, args.steps, phases, activities, sync, args.device)
    if "prefill" not in args.cases:
        return 0
    for i, p in enumerate(random_prompts(4, 2048, vocab, 7)):
        engine.add_request(f"p{i}", p, SamplingParams(temperature=0, max_tokens=1))
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        engine.step()  # 4 x 2048 tokens in one step
        sync()
        wall = time.perf_counter() - t0
    _table(prof, 1, wall, "prefill 4 x 2048 tokens", args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
