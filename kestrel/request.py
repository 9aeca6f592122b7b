"""A request's life inside the engine: its tokens, progress and finish reason.

The one invariant the scheduler builds on: a request has `num_tokens`
(prompt + generated so far) and `num_computed_tokens` (tokens whose KV is in
the cache, or is being computed by a step already submitted). Each step the
scheduler lets `num_computed_tokens` catch up by some amount; when it reaches
`num_tokens` the model's output at the last position is sampled and appended,
and `num_tokens` grows by one. Prefill, chunked prefill, decode, prefix-cache
hits (admission starts `num_computed_tokens` at the hit) and recompute after
preemption are all this one rule. With async scheduling a sampled token may
still be in flight (`num_inflight_tokens`, 0 or 1): the next step is built
before it is known, and computes it from the device's copy. No torch here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kestrel.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    """EOS, a stop token id or a stop string."""
    LENGTH = "length"
    """max_tokens or the context length."""
    ABORT = "abort"
    """Cancelled by the client."""


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    params: SamplingParams
    token_ids: list[int]
    """Prompt followed by generated tokens."""
    num_prompt_tokens: int
    arrival_index: int
    """Order of arrival (FCFS and 'newest' for preemption)."""
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    """The EOS / stop token id that finished the request, if any."""
    num_preemptions: int = 0
    num_inflight_tokens: int = 0
    """Tokens sampled by a submitted step whose result is not applied yet (0 or 1)."""
    inflight_sample_index: int = -1
    """Row of that step's sampled tokens holding the in-flight token (when num_inflight_tokens == 1)."""
    num_cached_tokens: int | None = None
    """Prompt tokens whose KV came from the prefix cache when the request was first admitted."""
    logprobs: list = field(default_factory=list)
    """Per generated token: the sampler's logprob record (only when params.logprobs is set)."""

    @classmethod
    def new(cls, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
            arrival_index: int) -> Request:
        return cls(request_id, params, list(prompt_token_ids), len(prompt_token_ids), arrival_index)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def target_num_tokens(self) -> int:
        """Tokens the KV must cover before the next sample: the known ones and the one in flight."""
        return len(self.token_ids) + self.num_inflight_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
