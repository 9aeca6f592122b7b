"""Latency of one batch: start-up, prefill and per-step decode time (`kestrel bench latency`).

`run_latency(config, spec)` builds an `Engine` (timing its construction: weights, KV sizing,
CUDA-graph capture), then, per iteration, submits `batch_size` random prompts of `input_len`
tokens at once and generates exactly `output_len` tokens each (EOS ignored). It reports the time to
the first token of the first request ever served (start-up to first token), the prefill time (until
every request has its first token), the decode steps' times (mean and median) and the batch's
end-to-end latency, fastest iteration first.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from kestrel.bench.offline import OfflineSpec, machine_info, random_prompts
from kestrel.config import EngineConfig
from kestrel.engine import Engine
from kestrel.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class LatencyResult:
    model: str
    dtype: str
    device: str
    batch_size: int
    input_len: int
    output_len: int
    engine_init_s: float
    """Engine construction: weights, KV sizing, CUDA-graph capture."""
    startup_to_first_token_s: float
    """Engine construction plus the first request's time to its first token (cold)."""
    prefill_ms: float
    """Fastest iteration: until every request of the batch had its first token."""
    decode_step_ms_mean: float
    decode_step_ms_median: float
    """Fastest iteration: one step decodes one token of every request."""
    e2e_latency_s: float
    all_e2e_latency_s: list[float]
    machine: dict


def run_latency(config: EngineConfig, spec: OfflineSpec) -> LatencyResult:
    """`spec.batch_size` prompts at once, `spec.num_iters` times (num_prompts is not used)."""
    t0 = time.perf_counter()
    engine = Engine(config)
    init_s = time.perf_counter() - t0
    prompts = random_prompts(spec.batch_size * (spec.num_iters + 1), spec.input_len,
                             engine.model_config.vocab_size, spec.seed)
    params = SamplingParams(temperature=spec.temperature, max_tokens=spec.output_len, ignore_eos=True)
    # Cold: the very first request's first token.
    engine.add_request("cold", prompts[0], SamplingParams(temperature=spec.temperature, max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()
    startup_s = time.perf_counter() - t0
    runs = [_time_batch(engine, prompts[(i + 1) * spec.batch_size:(i + 2) * spec.batch_size], params, i)
            for i in range(spec.num_iters)]
    prefill_s, steps_s, e2e_s = min(runs, key=lambda r: r[2])
    steps_ms = [s * 1e3 for s in steps_s] or [float("nan")]
    return LatencyResult(engine.model_path, engine.dtype, engine.executor.info.device, spec.batch_size,
                         spec.input_len, spec.output_len, init_s, startup_s, prefill_s * 1e3,
                         statistics.fmean(steps_ms), statistics.median(steps_ms), e2e_s,
                         [r[2] for r in runs], machine_info())


def _time_batch(engine: Engine, prompts: list[list[int]], params: SamplingParams, i: int):
    for j, prompt in enumerate(prompts):
        engine.add_request(f"lat{i}-{j}", prompt, params)
    started: set[str] = set()
    steps: list[float] = []
    prefill_s = 0.0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        if len(started) == len(prompts):
            steps.append(now - t)
        else:
            started.update(o.request_id for o in outputs)
            prefill_s = now - start
    return prefill_s, steps, time.perf_counter() - start


def print_latency(r: LatencyResult) -> None:
    rows = [("Model / dtype / device:", f"{r.model} / {r.dtype} / {r.device}"),
            ("Batch x (input, output) len:", f"{r.batch_size} x ({r.input_len}, {r.output_len})"),
            ("Engine init (s):", f"{r.engine_init_s:.2f}"),
            ("Start-up to first token (s):", f"{r.startup_to_first_token_s:.2f}"),
            ("Prefill (ms):", f"{r.prefill_ms:.2f}"),
            ("Decode step (ms):", f"mean {r.decode_step_ms_mean:.3f}, median {r.decode_step_ms_median:.3f}"),
            ("End-to-end latency (s):",
             f"{r.e2e_latency_s:.3f} (all: {', '.join(f'{x:.3f}' for x in r.all_e2e_latency_s)})")]
    print("{s:{c}^{n}}".format(s=" Latency Benchmark Result ", n=60, c="="))
    for label, value in rows:
        print(f"{label:<32} {value}")
    print("=" * 60)
