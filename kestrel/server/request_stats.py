"""The API process's request figures: latency histograms, finish counts, recent TTFT percentiles.

`FrontendStats.observe(arrival)` gives each API call a `CallObserver`, which its `RequestGroup`
calls for every delta and at the end. Per engine request it records the time to the first token,
the gaps between tokens and the end-to-end latency (from the HTTP arrival), and counts how it
finished ("stop", "length", or "abort" when the client left or the request failed). The last
minute of first-token times stays in memory for /v1/stats and the dashboard (p50/p99).
No torch here.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from kestrel.messages import TextDelta
from kestrel.server.metrics import RequestMetrics

_WINDOW_KEEP_S = 60.0


@dataclass(slots=True)
class _Timing:
    first_token_at: float | None = None
    last_token_at: float | None = None


class CallObserver:
    """The timing of the engine requests of one API call."""

    def __init__(self, stats: FrontendStats, arrival: float) -> None:
        self._stats = stats
        self._arrival = arrival
        self._timings: dict[str, _Timing] = {}

    def on_delta(self, request_id: str, delta: TextDelta) -> None:
        now = time.monotonic()
        timing = self._timings.setdefault(request_id, _Timing())
        metrics = self._stats.metrics
        if delta.token_ids:
            if timing.first_token_at is None:
                timing.first_token_at = now
                self._stats.add_ttft(now, now - self._arrival)
            elif timing.last_token_at is not None:
                gap = (now - timing.last_token_at) / len(delta.token_ids)
                for _ in delta.token_ids:
                    metrics.inter_token_latency.observe(gap)
            timing.last_token_at = now
        if delta.finish_reason is not None:
            metrics.e2e_latency.observe(now - self._arrival)
            metrics.count_success(delta.finish_reason)

    def on_close(self, unfinished: set[str]) -> None:
        for _ in unfinished:
            self._stats.metrics.count_success("abort")


class FrontendStats:
    """Request metrics of the API process and a window of recent first-token times."""

    def __init__(self, model_name: str) -> None:
        self.metrics = RequestMetrics(model_name)
        self._ttfts: deque[tuple[float, float]] = deque()
        """(when, seconds) of recent first tokens, oldest first."""

    def observe(self, arrival: float) -> CallObserver:
        """An observer for one call that arrived at `arrival` (time.monotonic())."""
        return CallObserver(self, arrival)

    def add_ttft(self, now: float, seconds: float) -> None:
        self.metrics.time_to_first_token.observe(seconds)
        self._ttfts.append((now, seconds))
        while self._ttfts and self._ttfts[0][0] < now - _WINDOW_KEEP_S:
            self._ttfts.popleft()

    def ttft_percentiles(self, window_s: float, now: float | None = None) -> tuple[float | None, float | None, int]:
        """(p50, p99, count) of the first-token times of the last `window_s` seconds (None when none)."""
        now = time.monotonic() if now is None else now
        values = sorted(s for t, s in self._ttfts if t >= now - window_s)
        if not values:
            return None, None, 0
        return _percentile(values, 0.50), _percentile(values, 0.99), len(values)


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
