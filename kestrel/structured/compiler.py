"""Compiles a request's `StructuredOutputsParams` into an xgrammar `CompiledGrammar`, with an LRU cache.

Input: the constraint (JSON schema, JSON object, regex, choice, EBNF grammar or structural tag) and
the model's vocabulary (`xgrammar.TokenizerInfo`). Output: a compiled grammar shared by every request
with the same constraint text, or a `GrammarError` naming the request field and carrying xgrammar's
message. JSON is compact (`", "` and `": "` separators, no free whitespace): a small model given free
whitespace tends to loop on newlines, and fixed separators give jump-forward longer runs.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict

import xgrammar as xgr

from kestrel.structured_outputs import GrammarError, StructuredOutputsParams

_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
"""xgrammar prefixes its C++ errors with a time and a source location; users need neither."""
_WHAT = {"json": "JSON schema", "json_object": "JSON object", "regex": "regex", "choice": "choice",
         "grammar": "grammar", "structural_tag": "structural tag"}


class GrammarCompiler:
    """One per engine: compiles constraints for one vocabulary and keeps the last `cache_size`."""

    def __init__(self, tokenizer_info: xgr.TokenizerInfo, cache_size: int = 128, num_threads: int = 2) -> None:
        self._compiler = xgr.GrammarCompiler(tokenizer_info, max_threads=num_threads, cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self.cache_size = cache_size
        self.num_compiled = 0
        """Compilations done (cache misses), for tests and stats."""

    def compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """The compiled grammar of `spec` (from the cache when its text was seen recently)."""
        key = spec.key
        compiled = self._cache.get(key)
        if compiled is not None:
            self._cache.move_to_end(key)
            return compiled
        try:
            compiled = self._compile(*key)
        except (RuntimeError, ValueError, TypeError) as e:
            message = _LOG_PREFIX.sub("", str(e).strip()).strip()
            raise GrammarError(f"Invalid {_WHAT[key[0]]} in '{spec.source}': {message}", spec.source) from None
        self.num_compiled += 1
        self._cache[key] = compiled
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return compiled

    def _compile(self, kind: str, text: str) -> xgr.CompiledGrammar:
        if kind == "json":
            return self._compiler.compile_json_schema(text, any_whitespace=False)
        if kind == "json_object":
            return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return self._compiler.compile_regex(text)
        if kind == "choice":
            options = " | ".join(_ebnf_literal(c) for c in json.loads(text))
            return self._compiler.compile_grammar(f"root ::= {options}")
        if kind == "grammar":
            return self._compiler.compile_grammar(text)
        return self._compiler.compile_structural_tag(text)


def _ebnf_literal(text: str) -> str:
    """A string as an EBNF literal: JSON escapes (quotes, backslashes, control characters)."""
    return json.dumps(text, ensure_ascii=False)
