"""Serving benchmark: a streaming load generator for any OpenAI-compatible server.

`run_serve(spec, prompts)` sends `len(prompts)` streaming requests to
`spec.base_url + spec.endpoint` (/v1/completions or /v1/chat/completions),
arriving as a Poisson process of rate `spec.request_rate` (inf = all at once)
and capped at `spec.max_concurrency` in flight. Each request asks for
`max_tokens` = its output length with `ignore_eos` (Kestrel, vLLM and
llama.cpp honour it) and `stream_options.include_usage`. Per request it
records the time to the first content chunk (TTFT), the gaps between content
chunks (ITL) and the end-to-end latency; output tokens come from the final
chunk's `usage` when the server sends it, else one per content chunk.
`ServeMetrics` aggregates them (mean / median / p99) and `print_metrics`
prints them in the layout of `vllm bench serve`, with the prompt tokens the
server reports as cached (`usage.prompt_tokens_details.cached_tokens`).

Prompts: random text (`random_prompts`), a file (`file_prompts`), or the
shared-prefix workload (`shared_prefix_prompts`: G groups of R requests, a
P-token system prompt per group, Q tokens each of their own). Warm-up requests
use prompts that share nothing with the timed ones, so a prefix cache starts cold.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np

from kestrel.bench.workloads import SharedPrefix

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


@dataclass(frozen=True, slots=True)
class ServeSpec:
    """How to load the server (the prompts come separately)."""

    base_url: str
    endpoint: str = "/v1/completions"
    model: str | None = None
    """Model name sent in each request; None asks the server's /v1/models."""
    request_rate: float = float("inf")
    """Mean requests per second of a Poisson arrival process; inf sends them all at once."""
    max_concurrency: int | None = None
    """Most requests in flight at once; None means no cap."""
    temperature: float = 0.0
    top_p: float | None = None
    """Sent only when given (vLLM's --top-p)."""
    ignore_eos: bool = True
    seed: int = 0
    """Seed of the arrival times (and of random prompts)."""
    num_warmups: int = 1
    """Requests sent one by one before the timed run (not counted); the run stops if all fail."""
    request_timeout_s: float = 600.0
    api_key: str | None = None
    json_schema: dict | None = None
    """Sent as `response_format` json_schema: every output must match it."""

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if not self.request_rate > 0:
            raise ValueError(f"request-rate must be > 0 (inf sends all requests at once), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.num_warmups < 0:
            raise ValueError(f"num-warmups must be >= 0, got {self.num_warmups}")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint


@dataclass(frozen=True, slots=True)
class BenchPrompt:
    text: str
    prompt_len: int | None
    """Prompt tokens as we counted them (None if unknown); the server's usage wins when sent."""
    output_len: int
    system: str | None = None
    """Chat: a system message before `text`; completions: text put before it."""


@dataclass(slots=True)
class RequestResult:
    """One request's measurements (seconds)."""

    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_len: int = 0
    cached_len: int = 0
    """Prompt tokens the server's prefix cache supplied (0 when it does not say)."""
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start: float = 0.0
    """Send time relative to the benchmark start."""


# ---- the run -------------------------------------------------------------------
async def run_serve(spec: ServeSpec, prompts: list[BenchPrompt],
                    warmup_prompts: list[BenchPrompt] | None = None) -> tuple[list[RequestResult], float, str]:
    """Send all prompts (after the warm-up ones; default: the first prompts); return (per-request results in
    prompt order, duration in seconds, model name)."""
    if not prompts:
        raise ValueError("no prompts to send")
    timeout = httpx.Timeout(spec.request_timeout_s, connect=30.0)
    limits = httpx.Limits(max_connections=spec.max_concurrency, max_keepalive_connections=spec.max_concurrency)
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:
        model = spec.model or await _server_model(client, spec.base_url)
        await _warm_up(client, spec, model, warmup_prompts or prompts)
        semaphore = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
        tasks = []
        start = time.perf_counter()
        async for prompt in _arrivals(prompts, spec.request_rate, spec.seed):
            tasks.append(asyncio.create_task(_limited(semaphore, client, spec, model, prompt, start)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return list(results), duration, model


async def _arrivals(prompts: list[BenchPrompt], rate: float, seed: int):
    """Yield prompts with exponential gaps (a Poisson process of `rate` per second)."""
    rng = random.Random(seed)
    for i, prompt in enumerate(prompts):
        if i and rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
        yield prompt


async def _limited(semaphore, client, spec, model, prompt, t0) -> RequestResult:
    if semaphore is None:
        return await send_request(client, spec, model, prompt, t0)
    async with semaphore:
        return await send_request(client, spec, model, prompt, t0)


async def _warm_up(client, spec: ServeSpec, model: str, prompts: list[BenchPrompt]) -> None:
    if not spec.num_warmups:
        return
    results = [await send_request(client, spec, model, prompts[i % len(prompts)], time.perf_counter())
               for i in range(spec.num_warmups)]
    if not any(r.success for r in results):
        raise ConnectionError(f"warm-up request to {spec.url} failed: {results[-1].error}")


async def _server_model(client: httpx.AsyncClient, base_url: str) -> str:
    url = base_url.rstrip("/") + "/v1/models"
    try:
        resp = await client.get(url)
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise ConnectionError(f"cannot get a model name from {url} ({e}); pass --model") from e


def request_body(spec: ServeSpec, model: str, prompt: BenchPrompt) -> dict:
    body: dict = {"model": model, "max_tokens": prompt.output_len, "temperature": spec.temperature,
                  "stream": True, "stream_options": {"include_usage": True}}
    if spec.top_p is not None:
        body["top_p"] = spec.top_p
    if spec.ignore_eos:
        body["ignore_eos"] = True
    if spec.json_schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "bench", "schema": spec.json_schema}}
    if spec.endpoint == "/v1/chat/completions":
        system = [{"role": "system", "content": prompt.system}] if prompt.system is not None else []
        body["messages"] = [*system, {"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = (prompt.system or "") + prompt.text
    return body


async def send_request(client: httpx.AsyncClient, spec: ServeSpec, model: str, prompt: BenchPrompt,
                       t0: float) -> RequestResult:
    """Stream one request; never raises (failures are recorded in the result)."""
    result = RequestResult(prompt_len=prompt.prompt_len or 0)
    sent = time.perf_counter()
    result.start = sent - t0
    last = sent
    num_chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", spec.url, json=request_body(spec, model, prompt)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {body[:300]}"
                return result
            async for data in _sse_data(resp):
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = f"error in stream: {chunk['error']}"
                    return result
                usage = chunk.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens", usage_tokens)
                    result.prompt_len = usage.get("prompt_tokens") or result.prompt_len
                    result.cached_len = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                if not _chunk_text(chunk):
                    continue
                now = time.perf_counter()
                if num_chunks == 0:
                    result.ttft = now - sent
                else:
                    result.itl.append(now - last)
                last = now
                num_chunks += 1
        result.latency = time.perf_counter() - sent
        result.output_len = usage_tokens if usage_tokens is not None else num_chunks
        result.success = num_chunks > 0
        if not result.success:
            result.error = "the stream held no generated text"
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def _sse_data(resp: httpx.Response):
    """The payloads of a server-sent-event stream's `data:` lines."""
    async for line in resp.aiter_lines():
        if line.startswith("data:"):
            yield line[5:].strip()


def _chunk_text(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        delta = choice["delta"] or {}
        return delta.get("content") or delta.get("reasoning_content") or ""
    return choice.get("text") or ""


# ---- metrics -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ServeMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    total_cached_tokens: int
    """Prompt tokens the server reported as coming from its prefix cache."""
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    mean_ttft_ms: float
    median_ttft_ms: float
    p99_ttft_ms: float
    mean_tpot_ms: float
    """Per request: (latency - TTFT) / (output tokens - 1), then averaged over requests."""
    median_tpot_ms: float
    p99_tpot_ms: float
    mean_itl_ms: float
    """Over all gaps between content chunks of all requests."""
    median_itl_ms: float
    p99_itl_ms: float
    mean_e2el_ms: float
    median_e2el_ms: float
    p99_e2el_ms: float


def compute_metrics(results: list[RequestResult], duration_s: float) -> ServeMetrics:
    ok = [r for r in results if r.success]
    ttfts = [r.ttft for r in ok]
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    itls = [gap for r in ok for gap in r.itl]
    e2els = [r.latency for r in ok]
    num_in = sum(r.prompt_len for r in ok)
    num_out = sum(r.output_len for r in ok)
    return ServeMetrics(
        completed=len(ok), failed=len(results) - len(ok), duration_s=duration_s,
        total_input_tokens=num_in, total_output_tokens=num_out,
        total_cached_tokens=sum(r.cached_len for r in ok),
        request_throughput=len(ok) / duration_s, output_throughput=num_out / duration_s,
        total_token_throughput=(num_in + num_out) / duration_s,
        **_stats("ttft", ttfts), **_stats("tpot", tpots), **_stats("itl", itls), **_stats("e2el", e2els),
    )


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    if ms.size == 0:
        return {f"mean_{name}_ms": 0.0, f"median_{name}_ms": 0.0, f"p99_{name}_ms": 0.0}
    return {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
            f"p99_{name}_ms": float(np.percentile(ms, 99))}


def print_metrics(m: ServeMetrics, spec: ServeSpec) -> None:
    def line(label: str, value) -> None:
        print(f"{label:<40} {value:<10.2f}" if isinstance(value, float) else f"{label:<40} {value:<10}")

    def section(title: str) -> None:
        print("{s:{c}^{n}}".format(s=title, n=50, c="-"))

    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="))
    line("Successful requests:", m.completed)
    line("Failed requests:", m.failed)
    if spec.max_concurrency is not None:
        line("Maximum request concurrency:", spec.max_concurrency)
    line("Request rate configured (RPS):", spec.request_rate)
    line("Benchmark duration (s):", m.duration_s)
    line("Total input tokens:", m.total_input_tokens)
    line("Total generated tokens:", m.total_output_tokens)
    line("Total cached prompt tokens:", m.total_cached_tokens)
    line("Request throughput (req/s):", m.request_throughput)
    line("Output token throughput (tok/s):", m.output_throughput)
    line("Total Token throughput (tok/s):", m.total_token_throughput)
    for key, title, label in (("ttft", "Time to First Token", "TTFT"),
                              ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                              ("itl", "Inter-token Latency", "ITL"),
                              ("e2el", "End-to-end Latency", "E2EL")):
        section(title)
        line(f"Mean {label} (ms):", getattr(m, f"mean_{key}_ms"))
        line(f"Median {label} (ms):", getattr(m, f"median_{key}_ms"))
        line(f"P99 {label} (ms):", getattr(m, f"p99_{key}_ms"))
    print("=" * 50)


def result_json(m: ServeMetrics, spec: ServeSpec, model: str, results: list[RequestResult],
                workload: dict | None = None) -> dict:
    """Everything worth keeping: the config, the workload, the metrics and the per-request measurements."""
    config = asdict(spec)
    config.pop("api_key", None)
    config["request_rate"] = str(spec.request_rate) if spec.request_rate == float("inf") else spec.request_rate
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "model": model, "config": config,
        "workload": workload or {}, **asdict(m),
        "input_lens": [r.prompt_len for r in results], "output_lens": [r.output_len for r in results],
        "cached_lens": [r.cached_len for r in results],
        "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
        "latencies": [r.latency for r in results], "errors": [r.error for r in results],
    }


# ---- prompts -------------------------------------------------------------------
def random_prompts(tokenizer, num_prompts: int, input_len: int, output_len: int, seed: int) -> list[BenchPrompt]:
    """Texts decoded from `input_len` random (non-special) token ids each, like vLLM's random dataset.

    Decoded text re-tokenizes to a few more tokens; one encode-truncate-decode round brings it close."""
    rng = random.Random(seed)
    vocab = _plain_vocab(tokenizer)
    prompts = []
    for _ in range(num_prompts):
        text = _random_text(tokenizer, vocab, input_len, rng)
        prompts.append(BenchPrompt(text, len(tokenizer.encode(text, add_special_tokens=False)), output_len))
    return prompts


def shared_prefix_prompts(tokenizer, w: SharedPrefix, output_len: int, seed: int) -> list[BenchPrompt]:
    """G x R prompts: each group's random P-token system prompt, then each request's own Q tokens; shuffled."""
    rng = random.Random(seed)
    vocab = _plain_vocab(tokenizer)
    prompts = []
    for _ in range(w.num_groups):
        system = _random_text(tokenizer, vocab, w.prefix_len, rng)
        for _ in range(w.prompts_per_group):
            question = _random_text(tokenizer, vocab, w.question_len, rng)
            prompts.append(BenchPrompt(question, len(tokenizer.encode(system + question, add_special_tokens=False)),
                                       output_len, system))
    rng.shuffle(prompts)
    return prompts


def _plain_vocab(tokenizer) -> list[int]:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return [i for i in range(len(tokenizer)) if i not in special]


def _random_text(tokenizer, vocab: list[int], num_tokens: int, rng: random.Random) -> str:
    """Text decoded from random ids, re-encoded and cut to `num_tokens` (decoding merges a few)."""
    text = tokenizer.decode([rng.choice(vocab) for _ in range(num_tokens)])
    return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:num_tokens])


def file_prompts(path: str, num_prompts: int, output_len: int) -> list[BenchPrompt]:
    """Prompts from a text file (one per line) or JSONL ({"prompt": ..., "output_len": ...} per line),
    cycled to `num_prompts`."""
    items = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            raw = raw.rstrip("\n")
            if not raw.strip():
                continue
            if path.endswith(".jsonl"):
                obj = json.loads(raw)
                items.append(BenchPrompt(obj["prompt"], None, int(obj.get("output_len", output_len))))
            else:
                items.append(BenchPrompt(raw.replace("\\n", "\n"), None, output_len))
    if not items:
        raise ValueError(f"prompt file {path!r} holds no prompts")
    return [items[i % len(items)] for i in range(num_prompts)]
