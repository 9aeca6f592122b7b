"""The figures behind /metrics, /v1/stats and the log line, in-process (no server, no model)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from kestrel.messages import TextDelta
from kestrel.outputs import StepInfo
from kestrel.server.engine_stats import EngineStatsRecorder
from kestrel.server.request_stats import FrontendStats


def _recorder(clock: list[float], busy: bool = True) -> EngineStatsRecorder:
    engine = SimpleNamespace(has_unfinished_requests=lambda: busy, num_running_requests=2, num_waiting_requests=1,
                             kv_cache_usage=0.25)
    return EngineStatsRecorder(engine, "m", log_interval_s=2.0, clock=lambda: clock[0])


def test_heartbeat_covers_the_interval_and_the_log_line_follows(caplog):
    clock = [0.0]
    rec = _recorder(clock)
    assert rec.tick() is not None  # the first heartbeat goes out at once
    rec.on_step(StepInfo(2, 10, 8, 2, [0.1], 8, 3), 0.05)
    clock[0] = 0.5
    assert rec.tick() is None
    clock[0] = 1.0
    heartbeat = rec.tick()
    (worker,) = heartbeat.workers
    assert (worker.num_steps, worker.num_prompt_tokens, worker.num_generation_tokens) == (1, 8, 2)
    assert (worker.num_prefix_queried_tokens, worker.num_prefix_hit_tokens) == (8, 3)
    assert worker.interval_s == 1.0 and worker.mean_batch_size == 2 and worker.kv_cache_usage == 0.25
    assert (heartbeat.num_running, heartbeat.num_waiting, heartbeat.seconds_since_progress) == (2, 1, 1.0)
    with caplog.at_level(logging.INFO, logger="kestrel.server.engine_stats"):
        clock[0] = 2.0
        rec.tick()
    assert "generation 1.0 tokens/s, prompt 4.0 tokens/s, 2 running, 1 waiting, KV cache 25.0% used" in caplog.text


def test_no_progress_counts_only_while_busy():
    clock = [0.0]
    busy = _recorder(clock)
    idle = _recorder(clock, busy=False)
    busy.on_step(StepInfo(0, 0, 0, 0, [], 0, 0), 0.01)  # nothing scheduled: not progress
    clock[0] = 7.0
    assert busy.tick().seconds_since_progress == 7.0
    assert idle.tick().seconds_since_progress == 0.0


def test_ttft_window_percentiles():
    stats = FrontendStats("m")
    for i in range(100):
        stats.add_ttft(1000.0 + i * 0.1, i / 100)
    p50, p99, count = stats.ttft_percentiles(window_s=5.0, now=1010.0)
    assert count == 50 and abs(p50 - 0.745) < 1e-9 and abs(p99 - 0.9851) < 1e-9
    assert stats.ttft_percentiles(window_s=5.0, now=2000.0) == (None, None, 0)


def test_call_observer_times_tokens_and_counts_finishes():
    stats = FrontendStats("m")
    observer = stats.observe(arrival=0.0)
    observer.on_delta("a", TextDelta("a", "x", [5], None))
    observer.on_delta("a", TextDelta("a", "y", [6, 7], None, "length"))
    observer.on_close({"b"})
    m = stats.metrics
    assert m.time_to_first_token._sum.get() > 0 and m.inter_token_latency._sum.get() >= 0
    assert stats.ttft_percentiles(60.0)[2] == 1
    assert m._success.labels(model_name="m", finished_reason="length")._value.get() == 1
    assert m._success.labels(model_name="m", finished_reason="abort")._value.get() == 1
