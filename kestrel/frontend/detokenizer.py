"""Incremental, UTF-8-safe detokenization with stop strings, one instance per request.

Owns turning a request's stream of generated token ids into the text a client may see now.
Input: the tokenizer (a `transformers` fast tokenizer, from an HF folder or rebuilt from GGUF), the
prompt token ids (context for the first output token) and the request's stop strings. Output: a
`DetokenizerDelta` per `add_tokens()` call, and the text released by `flush()` at the end.

Two small parts, composed by `IncrementalDetokenizer`:

- `_TokenWindow` decodes only a bounded window of recent tokens (the vLLM prefix/read offset
  technique): the text of `ids[prefix:read]` was already shown, so the new text is the part of
  `decode(ids[prefix:])` after it. Keeping a few earlier tokens in the window gives decoders the
  context they need (SentencePiece's leading space, byte-fallback groups). When the text ends
  inside a multi-byte character (decode ends with U+FFFD), the characters before it are shown and
  the unfinished one waits until its last byte arrives.
- `_StopMatcher` scans that text for stop strings, holds back a tail that could still grow into one,
  and cuts the output at the stop string that completes first.

Invariant: the concatenation of all emitted text is a prefix of what
`tokenizer.decode(prompt_ids + output_ids)` adds after the prompt's text (for byte-level BPE that is
exactly `tokenizer.decode(output_ids)`), cut at the first stop string. One exception, for invalid
UTF-8 only: a byte-fallback decoder turns every byte of an invalid run into U+FFFD, even bytes
already shown as valid text, and shown text cannot be taken back. No torch here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

_REPLACEMENT_CHAR = "\ufffd"
_NUM_CONTEXT_TOKENS = 5
"""Prompt tokens decoded in front of the first output token, for leading-space context."""
_MAX_CONTEXT_LOOKBACK = 8
"""Extra prompt tokens tried so that the context does not start inside a character."""
_MAX_PENDING_TOKENS = 32
"""Tokens without a clean character boundary after which their bytes are taken to be invalid."""
_MAX_BOUNDARY_TRIES = 8
"""Token boundaries inside one `add_tokens()` batch tried for a clean end (4 suffice for UTF-8)."""
_NUM_PENDING_KEPT = 3
"""Tokens still held after giving up on the others: the bytes of one unfinished character."""


class DetokenizerDelta(NamedTuple):
    """What one `add_tokens()` call adds to the request's output."""

    text: str
    """New text that may be shown now: never part of a possible stop string, never a partial char."""
    stop_str: str | None
    """The stop string matched in this call, else None; once matched, the request is finished."""


class IncrementalDetokenizer:
    """Streams one request's output text, token by token, cut at its stop strings.

    Contract: `add_tokens()` returns the text that became final with these tokens; the text of all
    deltas joined equals `output_text`. After a stop string matched (`is_stopped`) or after
    `flush()`, `add_tokens()` returns an empty delta and `flush()` returns "". Each call decodes a
    bounded window of recent tokens, so the cost per token does not grow with the output.

    `clean_up_tokenization_spaces` is not applied: `transformers` ignores it for BPE tokenizers,
    and for WordPiece/Unigram tokenizers that set it the text may differ from `decode()` in spaces
    before punctuation.
    """

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._decode = _make_decode(tokenizer, skip_special_tokens)
        self._skipped_ids = _special_token_ids(tokenizer) if skip_special_tokens else frozenset()
        context_ids = [t for t in prompt_token_ids if t not in self._skipped_ids]
        self._window = _TokenWindow(self._decode, context_ids)
        self._matcher = _StopMatcher(stop, include_stop_str_in_output)
        self._chunks: list[str] = []
        self._joined = ""
        self._stop_str: str | None = None
        self._is_finished = False

    def add_tokens(self, token_ids: Sequence[int]) -> DetokenizerDelta:
        """Add newly generated tokens; return the text that may be shown now and any stop match."""
        if self._is_finished:
            return DetokenizerDelta("", None)
        ids = [t for t in token_ids if t not in self._skipped_ids]
        text = self._window.push(ids)
        if not text:
            return DetokenizerDelta("", None)
        chunk, stop_str = self._matcher.feed(text)
        self._emit(chunk, stop_str)
        return DetokenizerDelta(chunk, stop_str)

    def flush(self) -> str:
        """The request finished for another reason (EOS, length): release and return held text.

        An unfinished character at the end comes out as `decode()` shows it (U+FFFD). The released
        text is still checked for stop strings; if one completes in it, the text is cut there and
        `is_stopped` becomes True.
        """
        if self._is_finished:
            return ""
        text = self._window.flush()
        chunk, stop_str = self._matcher.feed(text) if text else ("", None)
        if stop_str is None:
            chunk += self._matcher.release()
        self._emit(chunk, stop_str)
        self._is_finished = True
        return chunk

    @property
    def output_text(self) -> str:
        """All text emitted so far."""
        if self._chunks:
            self._joined += "".join(self._chunks)
            self._chunks.clear()
        return self._joined

    @property
    def is_stopped(self) -> bool:
        """Whether a stop string matched (the request is finished and its text is final)."""
        return self._stop_str is not None

    @property
    def stop_str(self) -> str | None:
        """The stop string that matched, else None (also set when it matched during `flush()`)."""
        return self._stop_str

    def _emit(self, chunk: str, stop_str: str | None) -> None:
        if chunk:
            self._chunks.append(chunk)
        if stop_str is not None:
            self._stop_str = stop_str
            self._is_finished = True


class _TokenWindow:
    """UTF-8-safe incremental decoding over a bounded window of token ids.

    `ids[prefix:read]` is context whose text was already shown (or belongs to the prompt);
    `ids[read:]` are newer tokens, of whose text the first `num_shown_after_read` characters were
    shown (the complete characters before an unfinished one). `read` only moves to a token
    boundary where the text ends on a complete character, so the text after it does not depend on
    where the window starts.
    """

    def __init__(self, decode: Callable[[list[int]], str], context_ids: list[int]) -> None:
        self._decode = decode
        start = _context_start(decode, context_ids)
        self._ids = list(context_ids[start:])
        self._prefix = 0
        self._read = len(self._ids)
        self._num_shown_after_read = 0

    def push(self, token_ids: list[int]) -> str:
        """Append tokens; return the newly completed text (without an unfinished last character)."""
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        num_ids = len(self._ids)
        prefix_len = len(self._decode(self._ids[self._prefix : self._read]))
        text = self._decode(self._ids[self._prefix :])
        if not text.endswith(_REPLACEMENT_CHAR):
            return self._commit(num_ids, text, prefix_len)
        # The text ends inside a character: show what comes before it.
        complete = text.rstrip(_REPLACEMENT_CHAR)
        num_shown = prefix_len + self._num_shown_after_read
        new_text = complete[num_shown:]
        self._num_shown_after_read = max(self._num_shown_after_read, len(complete) - prefix_len)
        # Move `read` to the last boundary in this batch (earlier ones were tried before) where
        # the text ends cleanly, so the window does not keep growing.
        lowest = max(self._read + 1, num_ids - len(token_ids) + 1, num_ids - _MAX_BOUNDARY_TRIES)
        for end in range(num_ids - 1, lowest - 1, -1):
            text = self._decode(self._ids[self._prefix : end])
            if not text.endswith(_REPLACEMENT_CHAR):
                return new_text + self._commit(end, text, prefix_len)
        if num_ids - self._read > _MAX_PENDING_TOKENS:
            # This long without a clean boundary, the bytes are invalid: show them as decode()
            # does, keeping the last few tokens back in case they start a real character.
            end = num_ids - _NUM_PENDING_KEPT
            new_text += self._commit(end, self._decode(self._ids[self._prefix : end]), prefix_len)
        return new_text

    def flush(self) -> str:
        """Return the held-back text as decode() shows it, trailing U+FFFD included."""
        if self._read == len(self._ids):
            return ""
        prefix_len = len(self._decode(self._ids[self._prefix : self._read]))
        return self._commit(len(self._ids), self._decode(self._ids[self._prefix :]), prefix_len)

    def _commit(self, end: int, text: str, prefix_len: int) -> str:
        """Move `read` to `end`; `text` decodes `ids[prefix:end]`. Returns its part not yet shown."""
        num_shown = prefix_len + self._num_shown_after_read
        new_text = text[num_shown:]
        self._num_shown_after_read = max(0, num_shown - len(text))
        if len(text) > prefix_len:
            # The tokens up to `end` become the context. Tokens that decode to nothing are added
            # to the old context instead, so that the context always holds visible text.
            self._prefix = self._read
        self._read = end
        if self._prefix:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return new_text


class _StopMatcher:
    """Finds stop strings in a stream of text and holds back what could still become one.

    The stop string that completes first wins (as if the text came one character at a time); among
    those completing at the same place, the longest. Without `include_stop_str_in_output`, a tail
    that is a proper prefix of a stop string is held back; with it, nothing needs holding back,
    since a stop string would be shown anyway. Empty stop strings are ignored.
    """

    def __init__(self, stop: Sequence[str], include_stop_str: bool) -> None:
        self._stop = tuple(s for s in stop if s)
        self._include = include_stop_str
        self._recent_len = max((len(s) for s in self._stop), default=1) - 1
        self._recent = ""
        """The last `_recent_len` characters seen, shown or held: where a stop string may begin."""
        self._num_held = 0
        """How many characters at the end of `_recent` are held back."""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Add text; return (the part that may be shown now, the stop string matched or None)."""
        if not self._stop:
            return text, None
        window = self._recent + text
        shown_end = len(self._recent) - self._num_held
        match = self._first_match(window)
        if match is not None:
            start, stop_str = match
            cut = start + len(stop_str) if self._include else start
            self._recent, self._num_held = "", 0
            return window[shown_end:cut], stop_str
        hold_start = len(window) if self._include else self._hold_start(window, shown_end)
        self._recent = window[-self._recent_len :] if self._recent_len else ""
        self._num_held = len(window) - hold_start
        return window[shown_end:hold_start], None

    def release(self) -> str:
        """Return the held-back text (the request ends without a stop string)."""
        held = self._recent[len(self._recent) - self._num_held :] if self._num_held else ""
        self._num_held = 0
        return held

    def _first_match(self, window: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop_str in self._stop:
            start = window.find(stop_str)
            if start < 0:
                continue
            candidate = (start + len(stop_str), start, stop_str)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        return None if best is None else (best[1], best[2])

    def _hold_start(self, window: str, shown_end: int) -> int:
        """The earliest index from which `window` ends with a proper prefix of a stop string."""
        first = max(shown_end, len(window) - self._recent_len)
        for start in range(first, len(window)):
            tail = window[start:]
            if any(s.startswith(tail) for s in self._stop):
                return start
        return len(window)


def _make_decode(tokenizer, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """A decode function for id lists: the `tokenizers` backend when there is one (no overhead)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _special_token_ids(tokenizer) -> frozenset[int]:
    """Ids that `decode(skip_special_tokens=True)` drops; dropping them early changes nothing."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        added = backend.get_added_tokens_decoder()
        return frozenset(i for i, token in added.items() if token.special)
    return frozenset(getattr(tokenizer, "all_special_ids", ()))


def _context_start(decode: Callable[[list[int]], str], ids: list[int]) -> int:
    """Where the prompt context starts: the last few tokens, not starting inside a character."""
    start = max(0, len(ids) - _NUM_CONTEXT_TOKENS)
    lowest = max(0, start - _MAX_CONTEXT_LOOKBACK)
    while start > lowest and decode(ids[start:]).startswith(_REPLACEMENT_CHAR):
        start -= 1
    return start
