"""Sampling parameters of one request: what to sample and when to stop.

Owns validation of every user-facing sampling knob. Invalid values raise
`ValueError` naming the parameter and the allowed range, so the offline API and
the server report the same message. No torch here (dependency layer 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from kestrel.structured_outputs import StructuredOutputsParams

_GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this are greedy: `SamplingParams.is_greedy` is the one definition."""
_SEED_SPAN = 2**64
MAX_TEMPERATURE = 2.0
"""OpenAI's range is [0, 2]; above it, sampling is noise."""
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
"""Characters; the detokenizer holds back this much text while a stop string could still match."""
MAX_STOP_TOKEN_IDS = 1024


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """vLLM-compatible sampling parameters (same names, same defaults)."""

    n: int = 1
    """Number of completions to return for the prompt."""
    temperature: float = 1.0
    """0 means greedy; higher is more random. [0, 2]."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p. (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's. [0, 1]."""
    presence_penalty: float = 0.0
    """OpenAI presence penalty on tokens already generated. [-2, 2]."""
    frequency_penalty: float = 0.0
    """OpenAI frequency penalty, scaled by how often a token was generated. [-2, 2]."""
    repetition_penalty: float = 1.0
    """HF/CTRL repetition penalty over prompt and output tokens; 1 disables. (0, 2]."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is in the batch."""
    max_tokens: int | None = 16
    """Most tokens to generate; None means up to the model's context length."""
    min_tokens: int = 0
    """Fewest tokens to generate before EOS or stop token ids may end the request."""
    stop: tuple[str, ...] = ()
    """Stop strings (at most 16, each at most 256 characters); the output is cut before the first one
    found (it never leaks)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (the token is kept in token_ids)."""
    ignore_eos: bool = False
    """Keep generating past EOS tokens."""
    logprobs: int | None = None
    """Return the log-probability of each chosen token and this many top alternatives. [0, 20]."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the output text."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the output text."""
    structured_outputs: StructuredOutputsParams | None = None
    """Constrain the output to a JSON schema, JSON object, regex, choice or grammar (see `kestrel.structured`)."""
    extra: dict = field(default_factory=dict, compare=False, repr=False)
    """Unused; reserved for front-end specific options."""

    def __post_init__(self) -> None:
        # Accept a single string / list for stop and any iterable for stop_token_ids.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.stop_token_ids is None:
            object.__setattr__(self, "stop_token_ids", ())
        else:
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        _check_int("n", self.n, lo=1, hi=128)
        _check_float("temperature", self.temperature, lo=0.0, hi=MAX_TEMPERATURE)
        _check_float("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _check_int("top_k", self.top_k, lo=0, hi=None, note=" (0 or -1 disables)")
        _check_float("min_p", self.min_p, lo=0.0, hi=1.0)
        _check_float("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        _check_float("repetition_penalty", self.repetition_penalty, lo=0.0, hi=2.0, lo_open=True)
        if self.seed is not None:
            _check_int("seed", self.seed, lo=-(2**63), hi=2**64 - 1)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, lo=1, hi=None)
        _check_int("min_tokens", self.min_tokens, lo=0, hi=self.max_tokens)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, lo=0, hi=20)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}.")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must contain non-empty strings, got {s!r}.")
            if len(s) > MAX_STOP_STRING_LEN:
                raise ValueError(f"stop strings may have at most {MAX_STOP_STRING_LEN} characters, got one of "
                                 f"{len(s)}.")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, got "
                             f"{len(self.stop_token_ids)}.")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, lo=0, hi=None)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}.")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams, "
                             f"got {type(self.structured_outputs).__name__}.")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0

    def with_seed(self, seed: int | None) -> SamplingParams:
        return replace(self, seed=seed)

    def for_completion(self, index: int) -> SamplingParams:
        """The params of completion `index` of the n: n=1 and, when seeded, seed + index.

        The one place `n` is expanded (offline `LLM` and server alike), so choice i of a seeded request
        is the same tokens as a request with seed + i. Seeds wrap to stay inside the accepted range.
        """
        if self.n == 1 and index == 0:
            return self
        seed = self.seed
        if seed is not None:
            seed += index
            if seed > _SEED_SPAN - 1:
                seed -= _SEED_SPAN
        return replace(self, n=1, seed=seed)


def _check_int(name: str, value, lo: int | None, hi: int | None, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in {_range(lo, hi, False)}{note}, got {value}.")


def _check_float(name: str, value, lo: float | None, hi: float | None, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if value != value:  # NaN
        raise ValueError(f"{name} must be a number, got NaN.")
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and value > hi
    if too_low or too_high:
        raise ValueError(f"{name} must be in {_range(lo, hi, lo_open)}, got {value}.")


def _range(lo, hi, lo_open: bool) -> str:
    left = "(" if lo_open or lo is None else "["
    right = "]" if hi is not None else ")"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
