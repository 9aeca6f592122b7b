"""The order in which waiting requests are offered a place in the running batch.

    fcfs  arrival order (preempted requests are requeued at the front by arrival).
    lpm   longest cached prefix first (SGLang's "longest prefix match"), when the queue is longer
          than the free seats (otherwise everyone gets in and the order does not matter).
          Preempted requests still go first; ties keep arrival order. Only the first
          `LPM_MAX_SCORED` waiting requests are scored (a prefix match each); the rest follow FCFS.

No torch; `match_len` is the KV manager's lookup, so tests drive it with fake caches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import islice

from kestrel.request import Request

LPM_MAX_SCORED = 256


def waiting_order(waiting: Sequence[Request], policy: str, num_free_seats: int,
                  match_len: Callable[[Request], int]) -> Iterable[Request]:
    """The waiting requests in the order admission should try them (`waiting` is not modified)."""
    if policy == "fcfs" or len(waiting) <= num_free_seats:
        return waiting
    if policy != "lpm":
        raise ValueError(f"unknown schedule policy {policy!r}")
    scored = list(islice(waiting, LPM_MAX_SCORED))
    scored.sort(key=lambda r: (r.num_preemptions == 0, -match_len(r), r.arrival_index))
    return [*scored, *islice(waiting, LPM_MAX_SCORED, None)]
