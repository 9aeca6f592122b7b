"""What a request's output must match: a JSON schema, any JSON object, a regex, a choice or a grammar.

`StructuredOutputsParams` is vLLM's object of the same name (one of `json`, `json_object`, `regex`,
`choice`, `grammar`, `structural_tag`), checked here for its shape only: exactly one constraint, of
the right type. Whether a schema, regex or grammar compiles is decided by the engine's grammar
backend (`kestrel.structured`), which raises a `GrammarError` naming `source`. No torch here.
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass, field

KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


class GrammarError(ValueError):
    """A constraint that cannot be honoured; `param` is the request field it came from."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class StructuredOutputsParams:
    """Exactly one constraint on the generated text (vLLM's names)."""

    json: str | dict | bool | None = None
    """A JSON schema (a dict, or its JSON text); stored as JSON text."""
    json_object: bool = False
    """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
    regex: str | None = None
    """The whole output fullmatches this regular expression."""
    choice: tuple[str, ...] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """An EBNF (GBNF) grammar whose `root` rule the output matches."""
    structural_tag: str | dict | None = None
    """An xgrammar structural tag (JSON text or dict), e.g. the tool-call grammar; stored as JSON text."""
    source: str = field(default="structured_outputs", compare=False)
    """The request field the constraint came from: the `param` of errors about it."""

    def __post_init__(self) -> None:
        if self.json is not None and not isinstance(self.json, str):
            if not isinstance(self.json, (dict, bool)):
                raise GrammarError(f"'{self.source}' must be a JSON schema (an object), got {self.json!r}",
                                   self.source)
            object.__setattr__(self, "json", _json.dumps(self.json))
        if isinstance(self.structural_tag, dict):
            object.__setattr__(self, "structural_tag", _json.dumps(self.structural_tag))
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) and c for c in self.choice):
                raise GrammarError(f"'{self.source}' must be a list of non-empty strings", self.source)
            object.__setattr__(self, "choice", tuple(self.choice))
            if not self.choice:
                raise GrammarError(f"'{self.source}' must hold at least one choice", self.source)
        given = [kind for kind in KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise GrammarError(f"'{self.source}' must set exactly one of {', '.join(KINDS)}; got "
                               f"{', '.join(given) or 'none'}", self.source)
        for kind in ("json", "structural_tag"):
            text = getattr(self, kind)
            if text is not None:
                try:
                    _json.loads(text)
                except ValueError as e:
                    raise GrammarError(f"'{self.source}' is not valid JSON: {e}", self.source) from None
        for kind in ("regex", "grammar"):
            if getattr(self, kind) is not None and not isinstance(getattr(self, kind), str):
                raise GrammarError(f"'{self.source}' must be a string", self.source)

    @property
    def kind(self) -> str:
        """Which constraint is set (one of `KINDS`)."""
        return next(kind for kind in KINDS if getattr(self, kind) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): what a compiled grammar is cached by."""
        kind = self.kind
        if kind == "json_object":
            return kind, ""
        if kind == "choice":
            return kind, _json.dumps(list(self.choice))
        return kind, getattr(self, kind)
