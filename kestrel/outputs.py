"""What the engine and the offline API hand back (vLLM-shaped). No torch here."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Logprob:
    logprob: float
    rank: int
    """1 = most likely token."""
    decoded_token: str | None = None


TokenLogprobs = dict[int, Logprob]
"""token id -> Logprob, for one generated position: the chosen token plus the top-k."""


@dataclass(frozen=True, slots=True)
class EngineOutput:
    """One step's news about one request, emitted by `Engine.step()`."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    """None while running; "stop", "length" or "abort" once finished."""
    stop_token_id: int | None = None
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (the same in every output of a request)."""


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprobs] | None = None
    stop_reason: int | str | None = None
    """The stop string or stop token id that ended generation (None for EOS / length)."""
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int | None = None
    """Prompt tokens whose KV came from the prefix cache (the fewest over the n completions)."""


def logprob_record(logprobs: list[float], token_ids: list[int], rank: int, num_top: int) -> TokenLogprobs:
    """One position's record from a sampler row: the chosen token (column 0, with its rank) and the top `num_top`.

    `logprobs` / `token_ids` hold the chosen token first, then the top-k best first (k >= num_top).
    """
    record = {token_ids[0]: Logprob(logprobs[0], rank)}
    for j in range(1, num_top + 1):
        record.setdefault(token_ids[j], Logprob(logprobs[j], j))
    return record
