"""Per-request grammar state on the engine side: matchers, token bitmasks and jump-forward.

Owns one `xgrammar.GrammarMatcher` per constrained request while it runs. The scheduler calls it
(`kestrel.scheduler.grammar_hook.GrammarHook`): `add` compiles the constraint when the request
arrives (a `GrammarError` refuses it), `bitmasks` packs the tokens allowed next for all of a step's
constrained requests at once (xgrammar's batch fill, on several threads) into their `SampleRow`s,
`advance` accepts each sampled token and returns the jump-forward tokens to append,
`release` drops the matcher (finish, abort, preemption). A matcher that was dropped by preemption
is rebuilt by replaying the request's output tokens into a fresh one.

Jump-forward rule: when the grammar admits exactly one continuation string (JSON keys, separators,
constants), that string is tokenized on its own (the tokenizer's canonical split) and all but its
last token are appended at once; the next step computes them as one prefill chunk. The last token is
held back because it may merge with what the model writes next (` ` + `30` is one token, ` 30`).
The text of a forced run is what plain constrained decoding must produce too (the grammar admits
nothing else); what may differ is its split into tokens, so later free choices of the model can
differ. Requests that ask for logprobs are never jump-forwarded (forced tokens have none).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from kestrel.request import Request
from kestrel.structured_outputs import GrammarError

if TYPE_CHECKING:  # xgrammar is imported on first use: an engine without it serves unconstrained requests
    import xgrammar as xgr

    from kestrel.structured.compiler import GrammarCompiler

logger = logging.getLogger(__name__)

FILL_THREADS = 8
"""At most this many threads fill a step's bitmasks (and at most half the machine's cores)."""


class StructuredOutputManager:
    """Grammar matchers of the running constrained requests, for one model's vocabulary."""

    def __init__(self, load_tokenizer: Callable[[], object], vocab_size: int, eos_token_ids: tuple[int, ...],
                 jump_forward: bool = True, cache_size: int = 128) -> None:
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.jump_forward = jump_forward
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._compiler: GrammarCompiler | None = None
        self._encode: Callable[[str], list[int]] | None = None
        self._load_error: Exception | None = None
        self._matchers: dict[str, xgr.GrammarMatcher] = {}
        self._bitmask = None  # [rows, ceil(vocab / 32)] int32, grown to the largest step's constrained rows
        self._batch: xgr.BatchGrammarMatcher | None = None
        self.num_jump_forward_tokens = 0
        """Tokens appended by jump-forward since start (they took no forward pass of their own)."""

    # ---- start-up ------------------------------------------------------------
    def preload(self) -> None:
        """Load the tokenizer and vocabulary in a background thread (the first `add` waits for it)."""
        threading.Thread(target=self._build, name="grammar-tokenizer", daemon=True).start()

    @property
    def compiler(self) -> GrammarCompiler:
        self._build()
        if self._compiler is None:
            raise GrammarError(f"structured outputs are unavailable on this server: {self._load_error}",
                               "structured_outputs")
        return self._compiler

    def _build(self) -> None:
        with self._lock:
            if self._compiler is not None or self._load_error is not None:
                return
            try:
                import xgrammar as xgr

                from kestrel.structured.compiler import GrammarCompiler

                tokenizer = self._load_tokenizer()
                info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=list(self.eos_token_ids))
                backend = getattr(tokenizer, "backend_tokenizer", None)
                if backend is not None:
                    self._encode = lambda text: backend.encode(text, add_special_tokens=False).ids
                else:
                    self._encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
                self._bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
                self._batch = xgr.BatchGrammarMatcher(max(1, min(FILL_THREADS, (os.cpu_count() or 2) // 2)))
                self._compiler = GrammarCompiler(info, self.cache_size)
            except Exception as e:  # reported to each constrained request, never fatal to the engine
                logger.exception("cannot set up structured outputs")
                self._load_error = e

    # ---- the hook the scheduler calls ------------------------------------------
    def add(self, request: Request) -> None:
        """Compile the request's constraint (cached); GrammarError when it does not compile."""
        if request.params.structured_outputs is not None:
            self.compiler.compile(request.params.structured_outputs)

    def bitmasks(self, requests: list[Request]) -> list[bytes | None]:
        """The tokens each request may sample next, packed ([ceil(vocab / 32)] int32 each); None: any.

        One batch fill for the whole step (xgrammar spreads the matchers over its threads): filling
        one matcher at a time took 0.4 ms each for a JSON schema over a 128k vocabulary.
        """
        out: list[bytes | None] = [None] * len(requests)
        live = [(i, m) for i, m in ((i, self._matcher(r)) for i, r in enumerate(requests))
                if m is not None and not m.is_terminated()]
        if not live:
            return out
        if self._bitmask.shape[0] < len(live):
            import xgrammar as xgr

            self._bitmask = xgr.allocate_token_bitmask(len(live), self.vocab_size)
        self._batch.batch_fill_next_token_bitmask([m for _, m in live], self._bitmask)
        packed = self._bitmask[:len(live)].numpy()  # [live, words] int32
        for row, (i, _) in enumerate(live):
            out[i] = packed[row].tobytes()
        return out

    def can_end(self, request: Request) -> bool:
        """The grammar is complete: only an end-of-sequence token may come next."""
        matcher = self._matchers.get(request.request_id)
        return matcher is not None and matcher.is_completed()

    def is_terminated(self, request: Request) -> bool:
        matcher = self._matchers.get(request.request_id)
        return matcher is not None and matcher.is_terminated()

    def advance(self, request: Request, token_id: int, max_new_tokens: int) -> list[int]:
        """Accept the sampled `token_id` (already appended); return up to `max_new_tokens` forced tokens."""
        if request.params.structured_outputs is None:
            return []
        matcher = self._matchers.get(request.request_id)
        if matcher is None:  # rebuilt from the output so far, which holds token_id already
            self._matcher(request)
            return []
        if not matcher.accept_token(token_id):
            logger.warning("request %s sampled token %d outside its grammar; it is no longer constrained",
                           request.request_id, token_id)
            request.params = replace(request.params, structured_outputs=None)
            self.release(request.request_id)
            return []
        if not self.jump_forward or request.params.logprobs is not None or max_new_tokens < 1:
            return []
        return self._jump_forward(matcher, max_new_tokens)

    def release(self, request_id: str) -> None:
        """Drop a request's matcher (finished, aborted or preempted); unknown ids are ignored."""
        self._matchers.pop(request_id, None)

    # ---- helpers -------------------------------------------------------------
    def _matcher(self, request: Request) -> xgr.GrammarMatcher | None:
        spec = request.params.structured_outputs
        if spec is None:
            return None
        matcher = self._matchers.get(request.request_id)
        if matcher is None:
            import xgrammar as xgr  # loaded by `compiler` already

            matcher = xgr.GrammarMatcher(self.compiler.compile(spec))
            for token_id in request.output_token_ids:  # replay after preemption
                if not matcher.accept_token(token_id):
                    break
            self._matchers[request.request_id] = matcher
        return matcher

    def _jump_forward(self, matcher: xgr.GrammarMatcher, max_new_tokens: int) -> list[int]:
        if matcher.is_terminated():
            return []
        text = matcher.find_jump_forward_string()
        if not text:
            return []
        forced = []
        for token_id in self._encode(text)[:-1][:max_new_tokens]:  # the last one is held back
            if not matcher.accept_token(token_id):
                break
            forced.append(token_id)
        self.num_jump_forward_tokens += len(forced)
        return forced

