"""When a request stops generating: the one owner of the stop rules.

EOS ids (unless `ignore_eos`), stop token ids, `min_tokens`, `max_tokens` and the context length
decide in the engine; stop strings decide in the frontend (they need text). Before `min_tokens`
the EOS and stop ids are blocked in the sampler rather than ignored after the fact. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from kestrel.request import FinishReason
from kestrel.sampling_params import SamplingParams


class Stop(NamedTuple):
    reason: FinishReason
    stop_token_id: int | None
    """The stop token id (from `stop_token_ids`) that ended the request; None for EOS and length."""


@dataclass(frozen=True, slots=True)
class StopRules:
    eos_token_ids: tuple[int, ...]
    """Every id that ends generation (config.json + generation_config.json)."""
    max_model_len: int

    def blocked_token_ids(self, params: SamplingParams, num_output_tokens: int) -> list[int]:
        """Ids the next token must not be: EOS and stop ids while fewer than min_tokens were generated."""
        if num_output_tokens >= params.min_tokens:
            return []
        eos = () if params.ignore_eos else self.eos_token_ids
        return [*eos, *params.stop_token_ids]

    def num_tokens_left(self, params: SamplingParams, num_output_tokens: int, num_tokens: int) -> int:
        """Tokens that may still be appended before max_tokens or the context length ends the request."""
        left = self.max_model_len - num_tokens
        if params.max_tokens is not None:
            left = min(left, params.max_tokens - num_output_tokens)
        return max(0, left)

    def check(self, params: SamplingParams, token_id: int, num_output_tokens: int, num_tokens: int) -> Stop | None:
        """Whether the request stops after appending `token_id` (now num_output_tokens / num_tokens long)."""
        if num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return Stop(FinishReason.STOP, None)
            if token_id in params.stop_token_ids:
                return Stop(FinishReason.STOP, token_id)
        if params.max_tokens is not None and num_output_tokens >= params.max_tokens:
            return Stop(FinishReason.LENGTH, None)
        if num_tokens >= self.max_model_len:
            return Stop(FinishReason.LENGTH, None)
        return None
