"""The engine process's figures: Prometheus metrics, the heartbeat, and the periodic log line.

`EngineStatsRecorder` is fed by the engine loop (`on_step` after each step, `tick` once per loop
iteration) and hands back, about once a second, an `EngineHeartbeat` for the API process (queue
sizes, time since the engine last made progress, one `WorkerStats` per worker over the interval).
Every `log_interval_s` it logs one line (throughput, running/waiting requests, KV use) while the
engine is busy. Prompt text never reaches this module. No torch here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kestrel.messages import EngineHeartbeat, WorkerStats
from kestrel.outputs import StepInfo
from kestrel.server.metrics import EngineMetrics

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0


class StepWindow:
    """The steps of one interval, summed until `take()`."""

    def __init__(self, start: float) -> None:
        self._start = start
        self.num_steps = 0
        self.num_requests = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_queried = 0
        self.num_hits = 0
        self.step_time_s = 0.0
        self.max_step_time_s = 0.0

    def add(self, info: StepInfo, duration_s: float) -> None:
        self.num_steps += 1
        self.num_requests += info.num_requests
        self.num_prompt_tokens += info.num_prompt_tokens
        self.num_generation_tokens += info.num_generated_tokens
        self.num_queried += info.num_prefix_queried_tokens
        self.num_hits += info.num_prefix_hit_tokens
        self.step_time_s += duration_s
        self.max_step_time_s = max(self.max_step_time_s, duration_s)

    def take(self, now: float, kv_cache_usage: float, rank: int = 0) -> WorkerStats:
        """The figures of the interval from the window's start to `now`."""
        steps = max(self.num_steps, 1)
        return WorkerStats(rank, max(now - self._start, 1e-9), self.num_steps, self.num_prompt_tokens,
                           self.num_generation_tokens, self.step_time_s / steps, self.max_step_time_s,
                           self.num_requests / steps, kv_cache_usage, self.num_queried, self.num_hits)


def log_line(stats: WorkerStats, num_running: int, num_waiting: int) -> str:
    """One line a person reads: throughput, queue, KV use, prefix hits, step time."""
    hits = f"{100 * stats.num_prefix_hit_tokens / stats.num_prefix_queried_tokens:.1f}%" \
        if stats.num_prefix_queried_tokens else "-"
    return (f"generation {stats.num_generation_tokens / stats.interval_s:.1f} tokens/s, "
            f"prompt {stats.num_prompt_tokens / stats.interval_s:.1f} tokens/s, "
            f"{num_running} running, {num_waiting} waiting, KV cache {100 * stats.kv_cache_usage:.1f}% used, "
            f"prefix cache hits {hits}, {stats.num_steps} steps of {1000 * stats.mean_step_time_s:.1f} ms mean")


class EngineStatsRecorder:
    """Metrics and windows of one engine; `engine` needs the queue and KV properties of `Engine`."""

    def __init__(self, engine, model_name: str, log_interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._clock = clock
        self._metrics = EngineMetrics(model_name)
        now = clock()
        self._heartbeat_window = StepWindow(now)
        self._log_window = StepWindow(now)
        self._next_heartbeat = now
        self._log_interval_s = log_interval_s
        self._next_log = now + log_interval_s
        self._last_progress = now

    def on_step(self, info: StepInfo, duration_s: float) -> None:
        if info.num_requests == 0:
            return  # nothing could be scheduled: not progress
        self._last_progress = self._clock()
        for window in (self._heartbeat_window, self._log_window):
            window.add(info, duration_s)
        m = self._metrics
        m.prompt_tokens.inc(info.num_prompt_tokens)
        m.generation_tokens.inc(info.num_generated_tokens)
        if info.num_prefix_queried_tokens:
            m.prefix_cache_queries.inc(info.num_prefix_queried_tokens)
            m.prefix_cache_hits.inc(info.num_prefix_hit_tokens)
        for seconds in info.queue_times_s:
            m.queue_time.observe(seconds)

    def tick(self) -> EngineHeartbeat | None:
        """Called once per loop iteration: a heartbeat when one is due (and the log line)."""
        now = self._clock()
        engine = self._engine
        if not engine.has_unfinished_requests():
            self._last_progress = now
        if now < self._next_heartbeat:
            return None
        self._next_heartbeat = now + HEARTBEAT_INTERVAL_S
        running, waiting, usage = engine.num_running_requests, engine.num_waiting_requests, engine.kv_cache_usage
        m = self._metrics
        m.num_requests_running.set(running)
        m.num_requests_waiting.set(waiting)
        m.kv_cache_usage.set(usage)
        if self._log_interval_s > 0 and now >= self._next_log:
            self._next_log = now + self._log_interval_s
            stats = self._log_window.take(now, usage)
            self._log_window = StepWindow(now)
            if stats.num_steps or running or waiting:
                logger.info("%s", log_line(stats, running, waiting))
        stats = self._heartbeat_window.take(now, usage)
        self._heartbeat_window = StepWindow(now)
        return EngineHeartbeat(running, waiting, now - self._last_progress, [stats])
