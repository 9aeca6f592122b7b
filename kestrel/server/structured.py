"""Request fields -> the one output constraint of a request (`StructuredOutputsParams`), or a 400.

OpenAI's `response_format` (json_object, json_schema), vLLM's `structured_outputs` object and its
older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`, SGLang's `regex` /
`json_schema` / `ebnf` in /generate, and the grammar a tool choice implies: at most one of them per
request. The shape is checked here; whether it compiles is the engine's call (its `GrammarError`
comes back as a 400 naming the same field). No torch here.
"""

from __future__ import annotations

from kestrel.server.errors import APIError
from kestrel.server.protocol import GenerateSamplingParams, StructuredFields
from kestrel.structured_outputs import GrammarError, StructuredOutputsParams

_BACKENDS = (None, "", "auto", "xgrammar")


def openai_constraint(req: StructuredFields, tool_constraint: StructuredOutputsParams | None = None
                      ) -> StructuredOutputsParams | None:
    """The constraint of a chat or completions request (None: free text)."""
    if req.guided_whitespace_pattern is not None:
        raise APIError("'guided_whitespace_pattern' is not supported (JSON output is compact)",
                       param="guided_whitespace_pattern")
    if req.guided_decoding_backend not in _BACKENDS:
        raise APIError(f"'guided_decoding_backend' {req.guided_decoding_backend!r} is not available; "
                       "the only backend is 'xgrammar'", param="guided_decoding_backend")
    given: list[tuple[str, dict]] = []
    if tool_constraint is not None:
        given.append(("tool_choice", {}))
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        given.append(("response_format", {"json_object": True}))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise APIError("'response_format' of type 'json_schema' needs 'json_schema.schema'",
                           param="response_format")
        given.append(("response_format", {"json": rf.json_schema.schema_}))
    so = req.structured_outputs
    if so is not None:
        fields = {"json": so.json_, "json_object": so.json_object or None, "regex": so.regex,
                  "choice": so.choice, "grammar": so.grammar, "structural_tag": so.structural_tag}
        given.append(("structured_outputs", {k: v for k, v in fields.items() if v is not None}))
    for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar")):
        if getattr(req, name) is not None:
            given.append((name, {kind: getattr(req, name)}))
    if not given:
        return None
    if len(given) > 1:
        names = ", ".join(f"'{name}'" for name, _ in given)
        raise APIError(f"give at most one output constraint; got {names}", param=given[1][0])
    if tool_constraint is not None:
        return tool_constraint
    return build(*given[0])


def generate_constraint(sp: GenerateSamplingParams) -> StructuredOutputsParams | None:
    """SGLang's `regex`, `json_schema` (JSON text) or `ebnf` in /generate's sampling_params."""
    given = [(f"sampling_params.{name}", {kind: getattr(sp, name)})
             for name, kind in (("regex", "regex"), ("json_schema", "json"), ("ebnf", "grammar"))
             if getattr(sp, name) is not None]
    if len(given) > 1:
        raise APIError("give at most one of 'regex', 'json_schema' and 'ebnf'", param=given[1][0])
    return build(*given[0]) if given else None


def build(source: str, fields: dict) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**fields, source=source)
    except GrammarError as e:
        raise APIError(str(e), param=e.param) from None
