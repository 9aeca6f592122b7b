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


def run_staggered(engine: Engine, prompts: list[list[int]], max_tokens: int, solo_steps: int = 0) -> list[list[int]]:
    """Greedy, EOS ignored; one prompt arrives per step, so steps mix prefills (and chunks) with decode
    batches of every size. The first request also runs `solo_steps` steps alone. Checks integrity at the
    end; returns each prompt's tokens, in order."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    got: dict[str, list[int]] = {}

    def step() -> None:
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)

    pending = [(f"r{i}", ids) for i, ids in enumerate(prompts)]
    while pending or engine.has_unfinished_requests():
        if pending:
            rid, ids = pending.pop(0)
            engine.add_request(rid, ids, params)
        step()
        if len(pending) == len(prompts) - 1:  # right after the first arrival
            for _ in range(solo_steps):
                step()
    engine.check_integrity()
    return [got[f"r{i}"] for i in range(len(prompts))]
