"""Continuous batching with chunked prefill under a per-step token budget.

Owns the requests inside the engine, from `add` to finish. One rule for every request (see
`kestrel.request`): each step a request is given `num_new_tokens` so that `num_computed_tokens`
catches up to `num_tokens`, within the step's token budget. Running requests go first (FCFS), then
waiting ones (in the order of the schedule policy, `policy.py`) while the budget, the running cap
and KV slots last; a waiting request first takes the longest prefix the prefix cache holds for it.
A waiting request whose next tokens another request computes in this very step waits one step and
then finds them in the cache (the same prompt is computed once, not once per request). When a
running request cannot get a slot, the KV manager evicts unlocked cached prefixes first; only if
that is not enough is the newest running request preempted: its computed KV goes to the prefix
cache (where its readmission finds it) and it is requeued (at the front). Nothing is ever dropped.

Once the step batch is built, `commit` advances every scheduled request (its tokens are being
computed), hands the prompt tokens of this step to the prefix cache (`KVCacheManager.share_computed`,
so concurrent requests share them; a later step reads them only after this one wrote them) and marks
the sampled ones in flight; when the step's result is back, `update` appends the sampled tokens,
applies the stop rules and finishes requests (their computed tokens go to the cache). With async
scheduling the next step is scheduled and committed before the last one's update, so a request
stopped by EOS may run one step more, whose token `update` drops; a request certain to stop
(max_tokens, context length) is not scheduled again. No torch and no model here: capacity is the KV
manager's slot count, so the scheduler runs on CPU in tests with any fake capacity.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from kestrel.kvcache.manager import KVCacheManager
from kestrel.kvcache.prefix_cache import PrefixCacheStats
from kestrel.scheduler.grammar_hook import GrammarHook
from kestrel.outputs import EngineOutput, logprob_record
from kestrel.request import FinishReason, Request, RequestStatus
from kestrel.scheduler.policy import waiting_order
from kestrel.step_batch import StepResult
from kestrel.stop_rules import Stop, StopRules

MIN_SHARED_TOKENS_TO_WAIT = 32
"""A waiting request waits a step for another's computation when they share at least this many
of its next tokens (fewer are cheaper to compute twice than to wait for)."""


class ScheduledRequest(NamedTuple):
    request: Request
    num_new_tokens: int
    """Tokens [num_computed_tokens, num_computed_tokens + num_new_tokens) run this step."""


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    sampled: list[Request] = field(default_factory=list)
    """Requests whose computed tokens catch up with their target this step: they sample one, in this order."""

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def add(self, req: Request, n: int) -> None:
        self.scheduled.append(ScheduledRequest(req, n))
        if req.num_computed_tokens + n == req.target_num_tokens:
            self.sampled.append(req)


class Scheduler:
    def __init__(self, kv_manager: KVCacheManager, stop_rules: StopRules, max_num_seqs: int,
                 max_num_batched_tokens: int, schedule_policy: str = "fcfs",
                 grammar: GrammarHook | None = None) -> None:
        self.kv_manager = kv_manager
        self.grammar = grammar
        """Grammar-constrained decoding (structured outputs); None: no request may ask for it."""
        self.stop_rules = stop_rules
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.schedule_policy = schedule_policy
        self.prefix_stats = PrefixCacheStats()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []

    # ---- queue management -------------------------------------------------
    def add(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.params.structured_outputs is not None:
            if self.grammar is None:
                raise ValueError("structured_outputs is not available in this engine")
            self.grammar.add(request)
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> None:
        """Finish a request now and free its KV slots; unknown or finished ids are ignored."""
        request = self._requests.get(request_id)
        if request is not None:
            self._finish(request, FinishReason.ABORT)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    def needs_token_history(self) -> bool:
        """A running request with a token in flight reads its past tokens to sample (penalties, a grammar)."""
        return any(r.num_inflight_tokens and (r.params.has_penalties or r.params.structured_outputs is not None)
                   for r in self.running)

    def take_finished_ids(self) -> list[str]:
        """Requests that ended since the last call (the worker drops their state)."""
        ids, self._finished_ids = self._finished_ids, []
        return ids

    # ---- one step --------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if self._will_stop(req):
                i += 1  # its in-flight token ends it: nothing more to compute
                continue
            n = min(req.target_num_tokens - req.num_computed_tokens, budget)
            while not self.kv_manager.allocate(req.request_id, self._slots_needed(req, n)):
                victim = self.running.pop()  # newest running request
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    n = 0
                    break
            if n == 0:
                break  # req preempted itself: nothing older can be helped either
            out.add(req, n)
            budget -= n
            i += 1

        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def commit(self, out: SchedulerOutput) -> None:
        """The step is submitted: its tokens count as computed, its samples are in flight."""
        for req, n in out.scheduled:
            computed_prompt = req.num_computed_tokens < req.num_prompt_tokens
            req.num_computed_tokens += n
            if computed_prompt:  # share the prompt at once: requests arriving meanwhile reuse it
                self.kv_manager.share_computed(req.request_id, req.token_ids[: req.num_computed_tokens])
        for i, req in enumerate(out.sampled):
            req.num_inflight_tokens += 1
            req.inflight_sample_index = i

    def update(self, out: SchedulerOutput, result: StepResult) -> list[EngineOutput]:
        """Apply a committed step's result: append sampled tokens, stop and finish requests."""
        outputs = []
        for i, (req, token_id) in enumerate(zip(out.sampled, result.token_ids)):
            req.num_inflight_tokens -= 1
            if req.is_finished:
                continue  # stopped (or aborted) while this step ran: its token is dropped
            req.token_ids.append(token_id)
            logprobs = None
            if req.params.logprobs is not None and result.logprobs is not None:
                logprobs = logprob_record(result.logprobs[i], result.logprob_token_ids[i], result.ranks[i],
                                          req.params.logprobs)
                req.logprobs.append(logprobs)
            stop = self.stop_rules.check(req.params, token_id, req.num_output_tokens, req.num_tokens)
            new_token_ids = [token_id]
            if stop is None and self.grammar is not None and req.params.structured_outputs is not None:
                stop = self._jump_forward(req, token_id, new_token_ids)
            if stop is not None:
                req.stop_token_id = stop.stop_token_id
                self._finish(req, stop.reason)
            outputs.append(EngineOutput(req.request_id, new_token_ids, None if logprobs is None else [logprobs],
                                        None if stop is None else stop.reason.value, req.stop_token_id,
                                        req.num_cached_tokens or 0))
        return outputs

    # ---- helpers -----------------------------------------------------------
    def _jump_forward(self, req: Request, token_id: int, new_token_ids: list[int]) -> Stop | None:
        """Advance the request's grammar; append the tokens it forces (computed next step as a chunk)."""
        room = self.stop_rules.num_tokens_left(req.params, req.num_output_tokens, req.num_tokens)
        forced = self.grammar.advance(req, token_id, room)
        if self.grammar.is_terminated(req):
            return Stop(FinishReason.STOP, None)  # the grammar ended (EOS under ignore_eos): nothing may follow
        if not forced:
            return None
        req.token_ids.extend(forced)
        new_token_ids.extend(forced)
        return self.stop_rules.check(req.params, forced[-1], req.num_output_tokens, req.num_tokens)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        if not self.waiting or budget <= 0 or len(self.running) >= self.max_num_seqs:
            return
        admitted: list[Request] = []
        num_waiting_for_shared = 0
        order = waiting_order(self.waiting, self.schedule_policy, self.max_num_seqs - len(self.running),
                              lambda r: self.kv_manager.match(_cacheable(r)).num_tokens)
        for req in order:
            if budget <= 0 or len(self.running) >= self.max_num_seqs or num_waiting_for_shared >= self.max_num_seqs:
                break
            hit = self.kv_manager.match(_cacheable(req))
            if self._waits_for_shared_prefix(req, hit.num_tokens, out):
                num_waiting_for_shared += 1  # bounded: a long queue of one prompt is not scanned every step
                continue
            n = min(req.target_num_tokens - hit.num_tokens, budget)
            if not self.kv_manager.allocate(req.request_id, n, hit):
                break
            self.prefix_stats.record(req.num_tokens, hit.num_tokens)
            if req.num_cached_tokens is None:
                req.num_cached_tokens = min(hit.num_tokens, req.num_prompt_tokens)
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = hit.num_tokens
            self.running.append(req)
            out.add(req, n)
            admitted.append(req)
            budget -= n
        self._remove_waiting(admitted)

    def _waits_for_shared_prefix(self, req: Request, num_cached: int, out: SchedulerOutput) -> bool:
        """Another request scheduled this step computes the next tokens `req` needs: reuse them next step."""
        if not self.kv_manager.shares_prefixes:
            return False
        start, end = num_cached, num_cached + MIN_SHARED_TOKENS_TO_WAIT
        if end >= req.num_tokens:
            return False
        mine = req.token_ids[start:end]
        return any(other.num_computed_tokens <= start < other.num_computed_tokens + n
                   and other.token_ids[start:end] == mine for other, n in out.scheduled)

    def _remove_waiting(self, admitted: list[Request]) -> None:
        if not admitted:
            return
        if all(self.waiting[i] is req for i, req in enumerate(admitted)):  # FCFS: the front of the queue
            for _ in admitted:
                self.waiting.popleft()
            return
        ids = {req.request_id for req in admitted}
        self.waiting = deque(r for r in self.waiting if r.request_id not in ids)

    def _will_stop(self, req: Request) -> bool:
        """Its in-flight token ends it for sure (max_tokens or the context length)."""
        if not req.num_inflight_tokens:
            return False
        p, n = req.params, req.target_num_tokens
        return (p.max_tokens is not None and n - req.num_prompt_tokens >= p.max_tokens) or \
            n >= self.stop_rules.max_model_len

    def _slots_needed(self, req: Request, num_new: int) -> int:
        """Slots to add so positions up to num_computed + num_new have one."""
        have = self.kv_manager.num_slots_of(req.request_id)
        return max(0, req.num_computed_tokens + num_new - have)

    def _release_kv(self, req: Request) -> None:
        self.kv_manager.free(req.request_id, req.token_ids[: req.num_computed_tokens])

    def _finish(self, req: Request, reason: FinishReason) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        if req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self._release_kv(req)
        if self.grammar is not None:
            self.grammar.release(req.request_id)
        del self._requests[req.request_id]
        self._finished_ids.append(req.request_id)

    def _preempt(self, req: Request) -> None:
        """Free the request's slots (its computed KV goes to the prefix cache) and requeue it."""
        self._release_kv(req)
        if self.grammar is not None:
            self.grammar.release(req.request_id)  # rebuilt by replaying the output when it runs again
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        # Back to the front, keeping arrival order among requeued requests.
        self.waiting.appendleft(req)
        if len(self.waiting) > 1 and self.waiting[1].arrival_index < req.arrival_index:
            self.waiting = deque(sorted(self.waiting, key=lambda r: r.arrival_index))


def _cacheable(req: Request) -> list[int]:
    """The tokens a prefix hit may cover: all but the last, whose logits give the next token."""
    return req.token_ids[: req.num_tokens - 1]
