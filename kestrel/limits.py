"""What a prompt may be for this model: the one owner of the prompt checks.

Used by the engine (offline `LLM`, every request) and by the API server before it submits anything,
so both say the same thing. A failed check raises `PromptError` (a ValueError) naming the parameter
that is wrong; the server turns it into a 400. No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class PromptError(ValueError):
    """A prompt the model cannot take; `param` names the request field to fix."""

    def __init__(self, message: str, param: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True, slots=True)
class PromptLimits:
    max_model_len: int
    """Context length: prompt + generated tokens."""
    vocab_size: int | None = None
    """Token ids must lie in [0, vocab_size); None skips the check."""

    def check_len(self, prompt_len: int, max_tokens: int | None = None, prompt_param: str = "prompt",
                  max_tokens_param: str = "max_tokens") -> None:
        """A prompt of this length must leave room for one token (and for `max_tokens`, when given)."""
        limit = self.max_model_len
        if prompt_len == 0:
            raise PromptError(f"'{prompt_param}' is empty: give at least one token", prompt_param)
        if prompt_len >= limit:
            raise PromptError(
                f"This model's maximum context length (max_model_len) is {limit} tokens, but the {prompt_param} "
                f"has {prompt_len} tokens (at least one generated token must fit). Shorten the {prompt_param}.",
                prompt_param, "context_length_exceeded")
        if max_tokens is not None and prompt_len + max_tokens > limit:
            raise PromptError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {prompt_param}, {max_tokens} for the "
                f"completion). Reduce the length of the {prompt_param} or {max_tokens_param}.",
                max_tokens_param, "context_length_exceeded")

    def check_token_ids(self, ids: Sequence[int], param: str = "prompt") -> None:
        vocab = self.vocab_size
        bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or t < 0
                    or (vocab is not None and t >= vocab)), None)
        if bad is not None:
            raise PromptError(f"'{param}' has token id {bad!r}, out of range: outside the vocabulary [0, {vocab})",
                              param)

    def check(self, ids: Sequence[int], max_tokens: int | None = None, param: str = "prompt") -> None:
        """Length and token ids of one prompt."""
        self.check_len(len(ids), max_tokens, param)
        self.check_token_ids(ids, param)
