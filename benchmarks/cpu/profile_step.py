"""Where the time of a CPU decode step goes: phases, op counts and op categories (torch.profiler).

    python benchmarks/cpu/profile_step.py --dtype float32 --batch-size 1 [--steps 20] [--json out.json]

Builds an in-process `Engine` (bundled SmolLM2-135M-Instruct unless a model is given), admits
`--batch-size` random prompts of `--input-len` tokens, runs them into steady decode, then:
1. times `--steps` decode steps with no profiler (the figure to quote: mean ms per step);
2. profiles as many steps with torch.profiler and reports, per step: wall time under the
   profiler, the number of aten/mkldnn ops the model forward issued (top-level ones: what each
   costs a Python-to-C++ dispatch), self CPU time by category (GEMM, attention gather, KV store,
   SDPA, norms/RoPE/elementwise, sampler), and the time of each engine phase (schedule, build
   batch, forward, LM head, sampler, update), so the Python between ops shows as phase time not
   covered by op time.
Extra engine flags go through `--engine KEY=VALUE` (EngineConfig field names).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from kestrel.config import EngineConfig
from kestrel.engine import Engine
from kestrel.sampling_params import SamplingParams

from _emit import emit  # benchmarks/cpu/_emit.py (the script's folder is on sys.path)

CATEGORIES = (
    ("gemm", ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear", "aten::matmul",
              "aten::bmm", "mkldnn_linear", "torch_ops_kestrel", "_weight_int4pack_mm",
              "_weight_int8pack_mm")),
    ("sdpa", ("scaled_dot_product", "_flash_attention", "aten::_softmax", "aten::baddbmm")),
    ("kv_gather", ("aten::index_select", "aten::index", "aten::gather")),
    ("kv_store", ("aten::index_put", "aten::_index_put_impl_")),
    ("sampler", ("aten::argmax", "aten::max", "aten::topk", "aten::log_softmax", "aten::softmax")),
    ("copy/convert", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone",
                      "aten::cat", "aten::expand", "aten::empty", "aten::where")),
)

PHASES = ("schedule", "build_batch", "stage_inputs", "attn_prepare", "forward", "lm_head", "compiled_decode",
          "sampler", "update")


def category(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other (norm, rope, elementwise, ...)"


def _wrap(obj, attr: str, label: str) -> None:
    fn = getattr(obj, attr)

    def wrapped(*a, **k):
        with record_function(label):
            return fn(*a, **k)

    setattr(obj, attr, wrapped)


def instrument(engine: Engine) -> None:
    """Label each phase of a step with a record_function range (in-process worker only)."""
    worker = engine.executor.worker
    _wrap(engine.scheduler, "schedule", "schedule")
    _wrap(engine.scheduler, "update", "update")
    _wrap(engine, "_commit", "build_batch")
    _wrap(worker.inputs, "stage", "stage_inputs")
    _wrap(worker.backend, "prepare", "attn_prepare")
    model = worker.model
    _wrap(model, "forward", "forward")
    _wrap(model, "compute_logits", "lm_head")
    if getattr(worker, "compiled", None) is not None:
        _wrap(worker.compiled, "run", "compiled_decode")
    _wrap(worker.sampler, "prepare", "sampler")
    _wrap(worker.sampler, "sample", "sampler")


def run(args) -> dict:
    extra = {}
    for kv in args.engine:
        key, value = kv.split("=", 1)
        extra[key] = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
    config = EngineConfig(model=args.model, dtype=args.dtype, num_threads=args.num_threads,
                          max_num_seqs=max(args.batch_size, 1), show_progress=False, **extra)
    t0 = time.perf_counter()
    engine = Engine(config)
    init_s = time.perf_counter() - t0
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)
    for i in range(args.batch_size):
        engine.add_request(f"r{i}", [rng.randrange(vocab) for _ in range(args.input_len)], params)
    t0 = time.perf_counter()
    while sum(1 for r in engine.scheduler.running if r.num_output_tokens) < args.batch_size:
        engine.step()
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    first = engine.step()  # the first decode step (a compiled forward compiles here)
    first_step_s = time.perf_counter() - t0
    assert len(first) == args.batch_size, "not a pure decode step"
    for _ in range(args.warmup):
        engine.step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    instrument(engine)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("step_total"):
            for _ in range(args.steps):
                with record_function("step"):
                    engine.step()
    return summarize(args, engine, prof, times, init_s, prefill_s, first_step_s)


def summarize(args, engine, prof, times, init_s, prefill_s, first_step_s) -> dict:
    n = args.steps
    events = prof.events()
    phase_us = defaultdict(float)
    step_us = 0.0
    cat_us = defaultdict(float)
    op_count = 0
    total_ops = 0
    forward_ops = 0
    for e in events:
        if e.name in PHASES:
            phase_us[e.name] += e.cpu_time_total
            continue
        if e.name == "step":
            step_us += e.cpu_time_total
            continue
        if e.name == "step_total" or e.device_type != torch.autograd.DeviceType.CPU:
            continue
        total_ops += 1
        cat_us[category(e.name)] += e.self_cpu_time_total
        parent = e.cpu_parent
        if parent is not None and (parent.name in PHASES or parent.name == "step"):
            op_count += 1  # a top-level op: one dispatch from Python
            if parent.name in ("forward", "compiled_decode"):
                forward_ops += 1
    op_self_us = sum(cat_us.values())
    per_step = lambda us: round(us / n / 1e3, 3)  # noqa: E731  ms per step
    result = {
        "model": engine.model_path.rsplit("/", 1)[-1], "dtype": engine.dtype, "batch_size": args.batch_size,
        "input_len": args.input_len, "num_threads": torch.get_num_threads(), "engine": args.engine,
        "engine_init_s": round(init_s, 2), "prefill_s": round(prefill_s, 3),
        "first_decode_step_s": round(first_step_s, 3),
        "step_ms_mean": round(statistics.fmean(times) * 1e3, 3),
        "step_ms_median": round(statistics.median(times) * 1e3, 3),
        "profiled_step_ms": per_step(step_us),
        "top_level_ops_per_step": round(op_count / n, 1),
        "forward_top_level_ops_per_step": round(forward_ops / n, 1),
        "all_ops_per_step": round(total_ops / n, 1),
        "op_self_ms_per_step": per_step(op_self_us),
        "not_in_ops_ms_per_step": per_step(step_us - op_self_us),
        "categories_ms_per_step": {k: per_step(v) for k, v in sorted(cat_us.items(), key=lambda kv: -kv[1])},
        "phases_ms_per_step": {p: per_step(phase_us[p]) for p in PHASES if p in phase_us},
        "load_avg_1min": __import__("os").getloadavg()[0],
    }
    if args.table:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.table))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--table", type=int, default=0, help="also print the profiler's top N ops")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    result = run(args)
    emit(result, args.json)


if __name__ == "__main__":
    main()
