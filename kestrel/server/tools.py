"""Tool calls of a chat request: `tools` and `tool_choice` -> what to render, constrain and parse.

    tool_choice none      tools are not rendered, output is plain content
    tool_choice auto      tools rendered; the output is parsed for calls in the model's format
    required / named      also constrained by a grammar (an xgrammar structural tag built from the
                          tool schemas): exactly one call that always parses

The format (`kestrel.frontend.tool_parsers`) is `--tool-call-parser`, or read from the chat template.
A template that does not render `tools` itself (SmolLM2's) gets them in a system message that
describes the format, and assistant `tool_calls` of the history are written into their content in
the same format. `tool` messages keep their role and `tool_call_id`. No torch here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from kestrel.frontend.tool_parsers import TOOL_FORMATS, ToolFormat, detect_format
from kestrel.server.errors import APIError
from kestrel.server.protocol import ChatCompletionRequest
from kestrel.structured_outputs import StructuredOutputsParams

PARSER_CHOICES = ("auto", *TOOL_FORMATS)


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a chat request's tools mean for rendering, decoding and the answer."""

    fmt: ToolFormat | None
    """The format to parse the output in; None: no tools (or tool_choice none)."""
    tools: list[dict] | None
    """The tools the chat template renders."""
    constraint: StructuredOutputsParams | None
    """The grammar of a required or named tool choice."""


def plan_tools(req: ChatCompletionRequest, parser: str, chat_template: str | None) -> ToolPlan:
    tools = [_check_tool(i, tool) for i, tool in enumerate(req.tools or [])]
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    names = [tool["function"]["name"] for tool in tools]
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if not isinstance(name, str):
            raise APIError("'tool_choice' must be 'none', 'auto', 'required' or "
                           '{"type": "function", "function": {"name": ...}}', param="tool_choice")
        if name not in names:
            raise APIError(f"'tool_choice' names the function {name!r}, which is not in 'tools' "
                           f"({', '.join(map(repr, names)) or 'none given'})", param="tool_choice")
        chosen = [tool for tool in tools if tool["function"]["name"] == name]
    elif choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise APIError("'tool_choice' is 'required' but no 'tools' were given", param="tool_choice")
        chosen = tools if choice == "required" else []
    else:
        raise APIError(f"'tool_choice' must be 'none', 'auto', 'required' or a function, got {choice!r}",
                       param="tool_choice")
    if choice == "none" or not tools:
        return ToolPlan(None, None, None)
    fmt = TOOL_FORMATS[parser] if parser != "auto" else detect_format(chat_template)
    constraint = _grammar(fmt, chosen) if chosen else None
    return ToolPlan(fmt, tools, constraint)


def template_messages(messages: list[dict], plan: ToolPlan, chat_template: str | None) -> list[dict]:
    """The messages as the chat template gets them (see the module docstring)."""
    out = [_with_dict_arguments(m) for m in messages]
    if plan.fmt is None or "tools" in (chat_template or ""):
        return out
    out = [_with_calls_in_content(m, plan.fmt) for m in out]
    listing = "\n".join(json.dumps(tool["function"]) for tool in plan.tools)
    example = plan.fmt.render("function_name", '{"argument": "value"}')
    note = (f"You can call these functions:\n{listing}\nTo call one, answer with exactly this and nothing "
            f"else:\n{example}")
    if out and out[0]["role"] == "system":
        return [dict(out[0], content=f"{out[0]['content']}\n\n{note}"), *out[1:]]
    return [{"role": "system", "content": note}, *out]


def _check_tool(i: int, tool: dict) -> dict:
    function = tool.get("function") if isinstance(tool, dict) else None
    if (not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict)
            or not isinstance(function.get("name"), str) or not function["name"]):
        raise APIError(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                       param="tools")
    parameters = function.get("parameters", {"type": "object"})
    if not isinstance(parameters, dict):
        raise APIError(f"'tools[{i}].function.parameters' must be a JSON schema object", param="tools")
    return {"type": "function", "function": dict(function, parameters=parameters)}


def _grammar(fmt: ToolFormat, tools: list[dict]) -> StructuredOutputsParams:
    """Exactly one call of one of `tools`, written in `fmt`."""
    tags = [{"type": "tag", "begin": f"{fmt.call_begin}{json.dumps(t['function']['name'])}{fmt.args_begin}",
             "content": {"type": "json_schema", "json_schema": t["function"]["parameters"]},
             "end": fmt.call_end} for t in tools]
    shape = tags[0] if len(tags) == 1 else {"type": "or", "elements": tags}
    return StructuredOutputsParams(structural_tag={"type": "structural_tag", "format": shape}, source="tools")


def _with_dict_arguments(message: dict) -> dict:
    """Chat templates expect a call's arguments as a mapping; OpenAI clients send JSON text."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    fixed = []
    for call in calls:
        function = dict(call.get("function") or {})
        if isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except ValueError:
                pass
        fixed.append(dict(call, function=function))
    return dict(message, tool_calls=fixed)


def _with_calls_in_content(message: dict, fmt: ToolFormat) -> dict:
    calls = message.get("tool_calls")
    if not calls:
        return message
    text = "\n".join(fmt.render(c["function"].get("name", ""), json.dumps(c["function"].get("arguments", {})))
                     for c in calls)
    content = f"{message['content']}\n{text}" if message.get("content") else text
    return {k: v for k, v in dict(message, content=content).items() if k != "tool_calls"}
