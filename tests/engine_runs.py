"""Run requests through an `Engine` to the end and collect each one's tokens (shared by engine-level tests)."""

from __future__ import annotations

from kestrel.engine import Engine
from kestrel.sampling_params import SamplingParams


def run_tokens(engine: Engine, prompts: dict[str, list[int]], params: SamplingParams,
               check_integrity: bool = False) -> dict[str, list[int]]:
    """Add every prompt with `params`, step until all finish; request id -> generated token ids."""
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        if check_integrity:
            engine.check_integrity()
    return tokens
