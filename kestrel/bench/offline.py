"""Offline throughput benchmark: fixed random prompts through the engine, timed per step.

`run_offline(config, spec)` builds an `Engine`, makes the workload's prompts (seeded):
`spec.num_prompts` prompts of `spec.input_len` random token ids, or a shared-prefix or multi-turn
workload (`workloads.py`), runs a short warm-up, then times runs in which every request generates
exactly `spec.output_len` tokens (ignore_eos), or, with `spec.json_schema`, a JSON value of that
schema (ended by EOS, at most output_len tokens; jump-forward tokens are counted). The prefix
cache is emptied before every run, so each run starts cold.
It drives `Engine.add_request` / `step` directly, so detokenizing is not
timed (Hugging Face `generate`, the baseline, returns ids too). The result is an `OfflineResult`:
elapsed time, throughputs, time to first token (per turn for multi-turn), the prefix-cache hit rate
and the time of each pure-decode step (the batch-level TPOT: in such a step every running sequence
gets one token).

The Hugging Face baseline (`kestrel.bench.hf_baseline`) fills the same
`RunTiming`, so both backends are reported by the same code.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from kestrel.bench.workloads import DATASETS, MultiTurn, SharedPrefix, multi_turn_new_tokens, shared_prefix_prompts
from kestrel.config import EngineConfig
from kestrel.engine import Engine
from kestrel.frontend.tokenizer import load_tokenizer
from kestrel.model_files import resolve_model_path
from kestrel.sampling_params import SamplingParams
from kestrel.structured_outputs import StructuredOutputsParams


@dataclass(frozen=True, slots=True)
class OfflineSpec:
    """The workload: what to generate and how to sample."""

    num_prompts: int
    input_len: int
    """Prompt length in tokens."""
    output_len: int
    """Generated tokens per prompt (EOS is ignored, so it is exact)."""
    batch_size: int
    """Most sequences decoded together (the engine's max_num_seqs; the HF batch size)."""
    temperature: float = 1.0
    seed: int = 0
    """Seed of the prompt token ids."""
    num_warmup_tokens: int = 8
    """Output length of the warm-up run (one batch of prompts, not timed); 0 skips it."""
    num_iters: int = 1
    """Timed runs; the figures are those of the fastest (all elapsed times are kept)."""
    wait_idle: bool = False
    """Before each timed run, wait until other processes leave the CPUs idle (shared machines)."""
    json_schema: str | None = None
    """JSON text of a schema every output must match (EOS then ends a request; output_len is a cap)."""
    shared_prefix: SharedPrefix | None = None
    """The shared-prefix workload (num_prompts = G x R, input_len = P + Q)."""
    multi_turn: MultiTurn | None = None
    """The multi-turn workload (num_prompts = conversations, input_len = new tokens per turn)."""

    @property
    def dataset(self) -> str:
        return "shared-prefix" if self.shared_prefix else "multi-turn" if self.multi_turn else "random"

    @property
    def max_len(self) -> int:
        """The longest prompt + output of the workload."""
        return self.multi_turn.max_len if self.multi_turn else self.input_len + self.output_len

    def __post_init__(self) -> None:
        assert self.dataset in DATASETS
        if self.shared_prefix and self.multi_turn:
            raise ValueError("give one workload: shared-prefix or multi-turn")
        for name in ("num_prompts", "input_len", "output_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.num_warmup_tokens < 0:
            raise ValueError(f"num-warmup-tokens must be >= 0, got {self.num_warmup_tokens}")
        if self.num_iters < 1:
            raise ValueError(f"num-iters must be >= 1, got {self.num_iters}")


@dataclass(slots=True)
class RunTiming:
    """What one timed run measured (seconds)."""

    elapsed_s: float
    num_output_tokens: int
    ttft_s: list[float] = field(default_factory=list)
    """Per request: from the start of the run (multi-turn: of its turn) to its first token."""
    decode_step_s: list[float] = field(default_factory=list)
    """Duration of each pure-decode step (every running sequence got one token, none its first)."""
    decode_step_batch: list[int] = field(default_factory=list)
    """Sequences decoded in each of those steps."""
    num_steps: int = 0
    """Engine steps (forward passes) of the run."""
    num_sampled_tokens: int = 0
    """Output tokens that took a forward pass of their own (the rest were jump-forward tokens)."""
    num_prompt_tokens: int = 0
    """Prompt tokens of every request (0: num_prompts x input_len)."""
    num_queried_tokens: int = 0
    """Tokens looked up in the prefix cache at admission during the run (engine only)."""
    num_hit_tokens: int = 0
    """Of those, tokens found there."""
    ttft_by_turn_s: list[list[float]] = field(default_factory=list)
    """Multi-turn: [turn] -> each conversation's time from submitting the turn to its first token."""


@dataclass(frozen=True, slots=True)
class OfflineResult:
    """The figures printed and saved by `kestrel bench offline`."""

    backend: str
    model: str
    dtype: str
    num_threads: int
    num_prompts: int
    input_len: int
    output_len: int
    batch_size: int
    temperature: float
    elapsed_s: float
    num_output_tokens: int
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    ms_per_output_token: float
    """Aggregate: elapsed time / all output tokens."""
    mean_ttft_ms: float
    mean_decode_step_ms: float
    """Batch-level TPOT: mean time of a pure-decode step = time per output token of each sequence."""
    median_decode_step_ms: float
    decode_tokens_per_s: float
    """Tokens per second over pure-decode steps only (no prefill)."""
    per_sequence_tokens_per_s: float
    """1000 / mean_decode_step_ms: the speed one sequence sees while decoding."""
    all_elapsed_s: list[float]
    """Elapsed time of every timed run (the figures above are the fastest one's)."""
    machine: dict
    json_schema: str | None = None
    """The schema outputs were constrained to (None: free text)."""
    num_steps: int = 0
    """Engine steps of the fastest run."""
    jump_forward_share: float = 0.0
    """Share of output tokens appended by jump-forward (no forward pass of their own)."""
    dataset: str = "random"
    workload: dict = field(default_factory=dict)
    """The shared-prefix or multi-turn parameters."""
    prefix_caching: bool | None = None
    """Whether the engine's prefix cache was on (None for the HF baseline)."""
    prefix_cache_hit_rate: float | None = None
    """Prompt tokens found in the prefix cache / prompt tokens admitted, in the fastest run."""
    mean_ttft_by_turn_ms: list[float] | None = None
    """Multi-turn: mean time to first token of each turn, from its submission."""


def run_offline(config: EngineConfig, spec: OfflineSpec, engine: Engine | None = None) -> OfflineResult:
    """Benchmark the Kestrel engine on `spec` (see the module docstring); `engine`: reuse one built from `config`."""
    if config.max_num_seqs != spec.batch_size:
        raise ValueError("spec.batch_size must equal config.max_num_seqs")
    engine = engine or Engine(config, tokenizer=lambda: load_tokenizer(config.tokenizer or resolve_model_path(
        config.model)))
    if spec.max_len > engine.max_model_len:
        raise ValueError(f"the workload needs {spec.max_len} tokens of context (prompt + output), more than "
                         f"the context length {engine.max_model_len}; lower its sizes or raise --max-model-len")
    vocab = engine.model_config.vocab_size
    if spec.num_warmup_tokens:  # one batch of the run's prompts; other workloads: prompts sharing nothing
        seed = spec.seed if spec.dataset == "random" else spec.seed + 1
        warm = random_prompts(spec.num_prompts, spec.input_len, vocab, seed)[:spec.batch_size]
        _time_engine_run(engine, warm, _params(spec, spec.num_warmup_tokens), "warmup")
    params = _params(spec, spec.output_len)
    if spec.multi_turn:
        w, new_tokens = spec.multi_turn, multi_turn_new_tokens(spec.multi_turn, vocab, spec.seed)

        def run(i: int) -> RunTiming:
            return _time_multi_turn(engine, w, new_tokens, params, f"bench{i}")
    else:
        prompts = (shared_prefix_prompts(spec.shared_prefix, vocab, spec.seed) if spec.shared_prefix
                   else random_prompts(spec.num_prompts, spec.input_len, vocab, spec.seed))

        def run(i: int) -> RunTiming:
            return _time_engine_run(engine, prompts, params, f"bench{i}")
    timings = time_runs(lambda i: _cold(engine, run, i), spec)
    return summarize("kestrel", engine.model_path, _dtype_name(engine.dtype), spec, timings,
                     config.enable_prefix_caching)


def _cold(engine: Engine, run, i: int) -> RunTiming:
    """One timed run on an empty prefix cache, with the run's hit counts."""
    engine.reset_prefix_cache()
    stats = engine.scheduler.prefix_stats
    queried, hit = stats.num_queried_tokens, stats.num_hit_tokens
    timing = run(i)
    timing.num_queried_tokens = stats.num_queried_tokens - queried
    timing.num_hit_tokens = stats.num_hit_tokens - hit
    return timing


def time_runs(run_once, spec: OfflineSpec) -> list[RunTiming]:
    """Call `run_once(i)` spec.num_iters times (waiting for idle CPUs first if asked)."""
    timings = []
    for i in range(spec.num_iters):
        if spec.wait_idle:
            wait_for_idle_cpu()
        timings.append(run_once(i))
    return timings


def wait_for_idle_cpu(max_busy: float = 0.08, window_s: float = 3.0, timeout_s: float = 900.0) -> float:
    """Block until the CPUs were at most `max_busy` busy over `window_s` (Linux /proc/stat), or timeout.

    Returns the last busy fraction seen. On other systems it returns at once (0.0)."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy = _cpu_busy(window_s)
        if busy is None or busy <= max_busy or time.monotonic() > deadline:
            return busy or 0.0


def _cpu_busy(window_s: float) -> float | None:
    def snapshot():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait

    try:
        total0, idle0 = snapshot()
        time.sleep(window_s)
        total1, idle1 = snapshot()
    except (OSError, IndexError, ValueError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def random_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`num_prompts` lists of `input_len` token ids drawn uniformly from [0, vocab_size)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_prompts, input_len), generator=gen).tolist()


def summarize(backend: str, model: str, dtype: str, spec: OfflineSpec, timings: list[RunTiming],
              prefix_caching: bool | None = None) -> OfflineResult:
    """The figures of the fastest run."""
    timing = min(timings, key=lambda t: t.elapsed_s)
    elapsed = timing.elapsed_s
    num_out = timing.num_output_tokens
    num_prompt_tokens = timing.num_prompt_tokens or spec.num_prompts * spec.input_len
    workload = spec.shared_prefix or spec.multi_turn
    steps_ms = [s * 1e3 for s in timing.decode_step_s]
    decode_time = sum(timing.decode_step_s)
    mean_step = statistics.fmean(steps_ms) if steps_ms else float("nan")
    return OfflineResult(
        backend=backend, model=model, dtype=dtype, num_threads=torch.get_num_threads(),
        num_prompts=spec.num_prompts, input_len=spec.input_len, output_len=spec.output_len,
        batch_size=spec.batch_size, temperature=spec.temperature,
        elapsed_s=elapsed, num_output_tokens=num_out,
        requests_per_s=spec.num_prompts / elapsed,
        output_tokens_per_s=num_out / elapsed,
        total_tokens_per_s=(num_out + num_prompt_tokens) / elapsed,
        ms_per_output_token=elapsed * 1e3 / num_out,
        mean_ttft_ms=statistics.fmean(timing.ttft_s) * 1e3 if timing.ttft_s else float("nan"),
        mean_decode_step_ms=mean_step,
        median_decode_step_ms=statistics.median(steps_ms) if steps_ms else float("nan"),
        decode_tokens_per_s=sum(timing.decode_step_batch) / decode_time if decode_time else float("nan"),
        per_sequence_tokens_per_s=1e3 / mean_step if steps_ms else float("nan"),
        all_elapsed_s=[t.elapsed_s for t in timings],
        machine=machine_info(),
        json_schema=spec.json_schema, num_steps=timing.num_steps,
        jump_forward_share=1 - timing.num_sampled_tokens / num_out if timing.num_sampled_tokens else 0.0,
        dataset=spec.dataset,
        workload=asdict(workload) if workload else {},
        prefix_caching=prefix_caching,
        prefix_cache_hit_rate=(timing.num_hit_tokens / timing.num_queried_tokens
                               if timing.num_queried_tokens else None),
        mean_ttft_by_turn_ms=[statistics.fmean(t) * 1e3 for t in timing.ttft_by_turn_s] or None,
    )


def print_result(r: OfflineResult) -> None:
    rows = [
        ("Backend:", r.backend), ("Model:", os.path.basename(r.model.rstrip("/")) or r.model),
        ("Dtype / threads:", f"{r.dtype} / {r.num_threads}"),
        ("Workload:", r.dataset + "".join(f", {k}={v}" for k, v in r.workload.items())),
        ("Prompts x (input, output) len:", f"{r.num_prompts} x ({r.input_len}, {r.output_len})"),
        ("Batch size (max-num-seqs):", r.batch_size),
        ("Elapsed (s):", f"{r.elapsed_s:.2f}" + (f" (fastest of {', '.join(f'{e:.2f}' for e in r.all_elapsed_s)})"
                                                    if len(r.all_elapsed_s) > 1 else "")),
        ("Output tokens:", r.num_output_tokens),
        ("Requests/s:", f"{r.requests_per_s:.3f}"),
        ("Output tokens/s:", f"{r.output_tokens_per_s:.2f}"),
        ("Total tokens/s:", f"{r.total_tokens_per_s:.2f}"),
        ("Mean TTFT (ms):", f"{r.mean_ttft_ms:.1f}"),
        ("Decode step = TPOT per seq (ms):", f"mean {r.mean_decode_step_ms:.2f}, median {r.median_decode_step_ms:.2f}"),
        ("Per-sequence decode tokens/s:", f"{r.per_sequence_tokens_per_s:.2f}"),
        ("Decode-only tokens/s (all seqs):", f"{r.decode_tokens_per_s:.2f}"),
        ("Aggregate ms per output token:", f"{r.ms_per_output_token:.2f}"),
    ]
    if r.json_schema is not None:
        rows += [("Constrained to a JSON schema:", "yes"), ("Engine steps (forward passes):", r.num_steps),
                 ("Jump-forward share of output tokens:", f"{r.jump_forward_share:.1%}")]
    if r.prefix_caching is not None:
        rate = "" if r.prefix_cache_hit_rate is None else f", hit rate {r.prefix_cache_hit_rate:.1%}"
        rows.append(("Prefix cache:", ("on" if r.prefix_caching else "off") + rate))
    if r.mean_ttft_by_turn_ms:
        by_turn = r.mean_ttft_by_turn_ms
        rows.append(("Mean TTFT by turn (ms):", ", ".join(f"{t:.0f}" for t in by_turn)))
        rows.append(("TTFT last turn / first turn:", f"{by_turn[-1] / by_turn[0]:.2f}"))
    print("{s:{c}^{n}}".format(s=" Offline Benchmark Result ", n=60, c="="))
    for label, value in rows:
        print(f"{label:<36} {value}")
    print("=" * 60)


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "num_cpus": os.cpu_count(), "torch": torch.__version__,
            "load_avg_1min": load, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


# ---- helpers -----------------------------------------------------------------
def _params(spec: OfflineSpec, max_tokens: int) -> SamplingParams:
    if spec.json_schema is None:
        return SamplingParams(temperature=spec.temperature, max_tokens=max_tokens, ignore_eos=True)
    return SamplingParams(temperature=spec.temperature, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(json=spec.json_schema))


def _time_engine_run(engine: Engine, prompts: list[list[int]], params: SamplingParams, tag: str) -> RunTiming:
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    num_tokens: dict[str, int] = {}
    timing = RunTiming(0.0, 0)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outputs = engine.step()
        t1 = time.perf_counter()
        is_pure_decode = bool(outputs)
        timing.num_steps += 1
        timing.num_sampled_tokens += len(outputs)
        for out in outputs:
            seen = num_tokens.get(out.request_id, 0)
            if seen == 0:
                timing.ttft_s.append(t1 - start)
                is_pure_decode = False
            num_tokens[out.request_id] = seen + len(out.new_token_ids)
        if is_pure_decode:
            timing.decode_step_s.append(t1 - t0)
            timing.decode_step_batch.append(len(outputs))
    timing.elapsed_s = time.perf_counter() - start
    timing.num_output_tokens = sum(num_tokens.values())
    timing.num_prompt_tokens = sum(len(p) for p in prompts)
    return timing


def _time_multi_turn(engine: Engine, w: MultiTurn, new_tokens: list[list[list[int]]], params: SamplingParams,
                     tag: str) -> RunTiming:
    """Every conversation submits its next turn (history + answer + new tokens) when its last one ends."""
    timing = RunTiming(0.0, 0)
    timing.ttft_by_turn_s = [[] for _ in range(w.num_turns)]
    prompt: dict[int, list[int]] = {}
    answer: dict[int, list[int]] = {}
    submitted: dict[int, float] = {}

    def submit(conv: int, turn: int) -> None:
        prompt[conv] = prompt.get(conv, []) + answer.get(conv, []) + new_tokens[conv][turn]
        answer[conv] = []
        engine.add_request(f"{tag}-c{conv}-t{turn}", prompt[conv], params)
        submitted[conv] = time.perf_counter()
        timing.num_prompt_tokens += len(prompt[conv])

    start = time.perf_counter()
    for conv in range(w.num_conversations):
        submit(conv, 0)
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        is_pure_decode = bool(outputs)
        for out in outputs:
            conv, turn = (int(part[1:]) for part in out.request_id.rsplit("-", 2)[1:])
            if not answer[conv]:
                timing.ttft_by_turn_s[turn].append(now - submitted[conv])
                timing.ttft_s.append(now - submitted[conv])
                is_pure_decode = False
            answer[conv] += out.new_token_ids
            timing.num_output_tokens += len(out.new_token_ids)
            if out.finish_reason is not None and turn + 1 < w.num_turns:
                submit(conv, turn + 1)
        if is_pure_decode:
            timing.decode_step_s.append(now - t0)
            timing.decode_step_batch.append(len(outputs))
    timing.elapsed_s = time.perf_counter() - start
    return timing


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
