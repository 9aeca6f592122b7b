"""GET /metrics (Prometheus), GET /v1/stats (JSON) and GET /dashboard (a page plotting /v1/stats).

/metrics merges the multi-process files of the engine and API processes (`metrics.render_latest`)
and is open, like /health. /v1/stats is built from the engine's latest `EngineHeartbeat` (one entry
per worker: tokens/s over the last interval, step time, batch size, KV use, prefix-cache hit rate)
and this process's recent first-token times; it needs the API key when one is set. /dashboard is
one static HTML file with its script inline (no build step, nothing fetched from elsewhere); the
page asks for the key when /v1/stats answers 401. No torch here.
"""

from __future__ import annotations

import functools
import importlib.resources
import time

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel

from kestrel.messages import WorkerStats
from kestrel.server.metrics import CONTENT_TYPE, render_latest
from kestrel.server.openapi import route_docs
from kestrel.server.serving import ServerState

TTFT_WINDOW_S = 30.0
"""/v1/stats reports the first-token percentiles of this many recent seconds."""


class WorkerStatsInfo(BaseModel):
    rank: int
    interval_s: float
    """Length of the interval the figures cover (about a second)."""
    num_steps: int
    tokens_per_s: float
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    mean_step_time_ms: float
    max_step_time_ms: float
    mean_batch_size: float
    """Requests per step."""
    kv_cache_usage: float
    """Fraction of the KV slots in use (0-1)."""
    prefix_cache_hit_rate: float | None
    """Prompt tokens found in the prefix cache / looked up, over the interval (None: no lookups)."""


class StatsResponse(BaseModel):
    model_name: str
    status: str
    """What GET /health says: ok, loading, draining, stalled, restarting or dead."""
    uptime_s: float
    num_requests_running: int
    num_requests_waiting: int
    num_requests_in_flight: int
    """Engine requests this API process waits on."""
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    ttft_window_s: float
    num_first_tokens: int
    """First tokens in the window the percentiles come from."""
    heartbeat_age_s: float | None
    """Seconds since the engine's figures arrived (None: none yet)."""
    workers: list[WorkerStatsInfo]


def observability_routes(state: ServerState) -> tuple[APIRouter, APIRouter]:
    """(open routes: /metrics and /dashboard; protected routes: /v1/stats)."""
    open_router, protected = APIRouter(), APIRouter()

    @open_router.get("/metrics", **route_docs(content_type=CONTENT_TYPE, description="Prometheus text format."))
    async def metrics() -> Response:
        return Response(render_latest(), media_type=CONTENT_TYPE)

    @open_router.get("/dashboard", **route_docs(content_type="text/html", description="A live dashboard page."))
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(_dashboard_html())

    @protected.get("/v1/stats", **route_docs(StatsResponse, errors=(401,)))
    async def stats() -> Response:
        return Response(build_stats(state).model_dump_json(), media_type="application/json")

    return open_router, protected


def build_stats(state: ServerState) -> StatsResponse:
    now = time.monotonic()
    client = state.client
    hb = client.heartbeat
    p50, p99, count = state.stats.ttft_percentiles(TTFT_WINDOW_S, now)
    return StatsResponse(
        model_name=state.config.model_name, status=state.health()[0], uptime_s=now - state.started_at,
        num_requests_running=hb.num_running if hb else 0, num_requests_waiting=hb.num_waiting if hb else 0,
        num_requests_in_flight=client.num_in_flight, ttft_p50_s=p50, ttft_p99_s=p99, ttft_window_s=TTFT_WINDOW_S,
        num_first_tokens=count, heartbeat_age_s=now - client.heartbeat_at if hb else None,
        workers=[_worker_info(w) for w in hb.workers] if hb else [])


def _worker_info(w: WorkerStats) -> WorkerStatsInfo:
    seconds = w.interval_s
    hit_rate = w.num_prefix_hit_tokens / w.num_prefix_queried_tokens if w.num_prefix_queried_tokens else None
    return WorkerStatsInfo(
        rank=w.rank, interval_s=seconds, num_steps=w.num_steps,
        tokens_per_s=(w.num_prompt_tokens + w.num_generation_tokens) / seconds,
        prompt_tokens_per_s=w.num_prompt_tokens / seconds, generation_tokens_per_s=w.num_generation_tokens / seconds,
        mean_step_time_ms=1000 * w.mean_step_time_s, max_step_time_ms=1000 * w.max_step_time_s,
        mean_batch_size=w.mean_batch_size, kv_cache_usage=w.kv_cache_usage, prefix_cache_hit_rate=hit_rate)


@functools.cache
def _dashboard_html() -> str:
    return importlib.resources.files("kestrel.server").joinpath("dashboard.html").read_text(encoding="utf-8")
