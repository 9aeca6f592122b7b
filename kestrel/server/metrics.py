"""Prometheus metrics of `kestrel serve`: every name in one place, recorded by two processes.

Names follow vLLM's, in the `kestrel:` namespace, each labelled `model_name`:

    engine process   kestrel:num_requests_running, kestrel:num_requests_waiting (gauges),
                     kestrel:kv_cache_usage_perc (gauge, a fraction 0-1 as in vLLM),
                     kestrel:prompt_tokens_total, kestrel:generation_tokens_total,
                     kestrel:prefix_cache_queries_total, kestrel:prefix_cache_hits_total (tokens),
                     kestrel:request_queue_time_seconds (histogram)
    API process      kestrel:time_to_first_token_seconds, kestrel:inter_token_latency_seconds,
                     kestrel:e2e_request_latency_seconds (histograms),
                     kestrel:request_success_total{finished_reason}

Both processes write prometheus-client's multi-process files (the supervisor points
PROMETHEUS_MULTIPROC_DIR at a private folder before it spawns them); `render_latest()` in the API
process merges them for GET /metrics. Outside a server (tests, no folder set) the metrics still
work, in memory. Metric objects are never registered globally, so building them twice is fine.
No torch here.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


class EngineMetrics:
    """What the engine process records: its queue, KV use, token counts and queue times."""

    def __init__(self, model_name: str) -> None:
        labels = {"model_name": model_name}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"kestrel:{name}", doc, list(labels), registry=None,
                         multiprocess_mode="livemostrecent").labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"kestrel:{name}", doc, list(labels), registry=None).labels(**labels)

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV slots in use (1 = full).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens computed (prefill).")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.queue_time = Histogram("kestrel:request_queue_time_seconds", "Arrival in the engine to first scheduled.",
                                    list(labels), registry=None, buckets=_LATENCY_BUCKETS).labels(**labels)


class RequestMetrics:
    """What the API process records per engine request: latencies and how it finished."""

    def __init__(self, model_name: str) -> None:
        labels = {"model_name": model_name}

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"kestrel:{name}", doc, list(labels), registry=None, buckets=buckets).labels(**labels)

        self.time_to_first_token = histogram("time_to_first_token_seconds",
                                             "HTTP arrival to the first generated token.", _LATENCY_BUCKETS)
        self.inter_token_latency = histogram("inter_token_latency_seconds",
                                             "Time between two generated tokens of a request.", _ITL_BUCKETS)
        self.e2e_latency = histogram("e2e_request_latency_seconds", "HTTP arrival to the last token.",
                                     _LATENCY_BUCKETS)
        self._success = Counter("kestrel:request_success", "Requests that finished, by finish reason.",
                                ["model_name", "finished_reason"], registry=None)
        self._model_name = model_name

    def count_success(self, finished_reason: str) -> None:
        self._success.labels(model_name=self._model_name, finished_reason=finished_reason).inc()


def render_latest() -> bytes:
    """The Prometheus text of every server process (multi-process mode); empty outside a server."""
    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        return b""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=folder)
    return generate_latest(registry)


def forget_process(pid: int) -> None:
    """Drop the live gauges of a server process that exited (its counters keep counting)."""
    if os.environ.get(MULTIPROC_ENV):
        mark_process_dead(pid)
