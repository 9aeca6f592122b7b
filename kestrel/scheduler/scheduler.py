"""Continuous batching with chunked prefill under a per-step token budget.

One rule for every request (see `kestrel.request`): each step a request is
given `num_new_tokens` so that `num_computed_tokens` catches up to
`num_tokens`, within the step's token budget. Running requests go first
(FCFS), then waiting ones while the budget, the running cap and KV slots last.
When a running request cannot get a slot, the newest running request is
preempted: its slots are freed and it is requeued (at the front) to be
recomputed later. Nothing is ever dropped.

No torch.cuda and no model here: capacity is the KV manager's slot count,
so the scheduler runs on CPU in tests with any fake capacity.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from kestrel.kvcache.manager import KVCacheManager
from kestrel.request import FinishReason, Request, RequestStatus


class ScheduledRequest(NamedTuple):
    request: Request
    num_new_tokens: int
    """Tokens [num_computed_tokens, num_computed_tokens + num_new_tokens) run this step."""


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # ---- queue management -------------------------------------------------
    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Mark finished, take it out of the queues and free its KV slots."""
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        if request in self.running:
            self.running.remove(request)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        self.kv.free(request.request_id)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step --------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate(req.request_id, self._slots_needed(req, n)):
                victim = self.running.pop()  # newest running request
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    n = 0
                    break
            if n == 0:
                break  # req preempted itself: nothing older can be helped either
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
            i += 1

        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.allocate(req.request_id, self._slots_needed(req, n)):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n

    def _slots_needed(self, req: Request, num_new: int) -> int:
        """Slots to add so positions up to num_computed + num_new have one."""
        have = self.kv.num_slots_of(req.request_id)
        return max(0, req.num_computed_tokens + num_new - have)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        # Back to the front, keeping arrival order among requeued requests.
        self.waiting.appendleft(req)
        if len(self.waiting) > 1 and self.waiting[1].arrival_index < req.arrival_index:
            self.waiting = deque(sorted(self.waiting, key=lambda r: r.arrival_index))
