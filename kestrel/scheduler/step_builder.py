"""Turns the scheduler's decision into a `StepBatch`: the one place requests become plain step data.

Reads each scheduled request's tokens and slots (from the KV manager), the slot-table entries that
changed since the last step, and what each sampling request needs this step (its params, the ids
the stop rules block, its token history only when a penalty reads it, its grammar's token bitmask).
A token still in flight
(async scheduling: sampled by the previous step, not yet known here) goes in as the placeholder
-(1 + its row in the previous step's sampled tokens); the worker fills it in on the device.
"""

from __future__ import annotations

from kestrel.kvcache.manager import KVCacheManager
from kestrel.request import Request
from kestrel.scheduler.grammar_hook import GrammarHook
from kestrel.scheduler.scheduler import SchedulerOutput
from kestrel.step_batch import SampleRow, StepBatch
from kestrel.stop_rules import StopRules


def build_step_batch(out: SchedulerOutput, kv_manager: KVCacheManager, stop_rules: StopRules,
                     finished_request_ids: list[str], grammar: GrammarHook | None = None) -> StepBatch:
    token_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    query_start_loc = [0]
    seq_lens: list[int] = []
    req_rows: list[int] = []
    sample_indices: list[int] = []
    sampling: list[Request] = []
    uses_previous = False
    for req, n in out.scheduled:
        start = req.num_computed_tokens
        end = start + n
        token_ids.extend(req.token_ids[start:end])
        if end > req.num_tokens:  # the in-flight token
            token_ids.append(-1 - req.inflight_sample_index)
            uses_previous = True
        positions.extend(range(start, end))
        slot_mapping.extend(kv_manager.slots_of(req.request_id)[start:end])
        query_start_loc.append(len(token_ids))
        seq_lens.append(end)
        req_rows.append(kv_manager.row_of(req.request_id))
        if end == req.target_num_tokens:  # the rule of SchedulerOutput.add: same rows, same order as out.sampled
            sample_indices.append(len(token_ids) - 1)
            sampling.append(req)
    sample_rows = _sample_rows(sampling, stop_rules, grammar)
    return StepBatch(token_ids, positions, slot_mapping, query_start_loc, seq_lens, req_rows,
                     kv_manager.take_table_writes(), sample_indices, sample_rows, finished_request_ids,
                     uses_previous)


def _sample_rows(requests: list[Request], stop_rules: StopRules, grammar: GrammarHook | None) -> list[SampleRow]:
    constrained = [r for r in requests if r.params.structured_outputs is not None] if grammar is not None else []
    bitmasks = iter(grammar.bitmasks(constrained) if constrained else ())  # one per constrained request, in order
    rows = []
    for req in requests:
        p = req.params
        blocked = stop_rules.blocked_token_ids(p, req.num_output_tokens + req.num_inflight_tokens)
        prompt = req.prompt_token_ids if p.repetition_penalty != 1 else None
        output = req.output_token_ids if p.has_penalties else None
        bitmask = None
        if grammar is not None and p.structured_outputs is not None:
            bitmask = next(bitmasks)
            if blocked and grammar.can_end(req):
                blocked = []  # a complete grammar allows only EOS: it wins over min_tokens
        rows.append(SampleRow(req.request_id, p, blocked, prompt, output, bitmask))
    return rows
