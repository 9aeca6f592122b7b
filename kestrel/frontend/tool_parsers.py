"""Tool calls in generated text: the formats models write them in, and one incremental parser.

Formats (`TOOL_FORMATS`, picked by `--tool-call-parser` or from the chat template by `detect_format`):

    hermes       <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>   (Hermes, Qwen 2/2.5/3)
    llama3_json  {"name": "f", "parameters": {...}}   (optionally after <|python_tag|>; Llama 3.x)
    mistral      [TOOL_CALLS][{"name": "f", "arguments": {...}}]

`ToolCallParser.feed(text)` takes the output as it streams and returns what a client may see now:
content outside the calls (text that could still become a call marker is held back) and tool-call
deltas (first the name, then the raw JSON text of the arguments, piece by piece). The whole output
fed at once gives the same calls, so streamed and non-streamed answers agree. Arguments are the
model's own JSON text (never re-serialized). No torch here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGS_KEY = re.compile(r'\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)')


@dataclass(frozen=True, slots=True)
class ToolFormat:
    """How one model family writes a tool call."""

    name: str
    marker: str
    """Text that opens the tool-call part of an output ("" for llama3_json: an output starting with `{`)."""
    call_begin: str
    """Text a call starts with, up to its name: `call_begin + name + args_begin + arguments + call_end`."""
    args_begin: str
    call_end: str

    def render(self, name: str, arguments: str) -> str:
        """One call as the model would write it (assistant messages of the history, grammars)."""
        return f"{self.call_begin}{json.dumps(name)}{self.args_begin}{arguments}{self.call_end}"


TOOL_FORMATS = {
    "hermes": ToolFormat("hermes", "<tool_call>", '<tool_call>\n{"name": ', ', "arguments": ', "}\n</tool_call>"),
    "llama3_json": ToolFormat("llama3_json", "", '{"name": ', ', "parameters": ', "}"),
    "mistral": ToolFormat("mistral", "[TOOL_CALLS]", '[TOOL_CALLS][{"name": ', ', "arguments": ', "}]"),
}


def detect_format(chat_template: str | None) -> ToolFormat:
    """The format a chat template teaches its model (hermes when it shows none)."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return TOOL_FORMATS["mistral"]
    if "<|python_tag|>" in template or "ipython" in template:
        return TOOL_FORMATS["llama3_json"]
    return TOOL_FORMATS["hermes"]


@dataclass(slots=True)
class CallDelta:
    """News about call `index`: its name (first delta only) and/or more argument text."""

    index: int
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class ParsedCall:
    name: str
    arguments: str


@dataclass(slots=True)
class _Call:
    start: int
    """Where the call's JSON object starts in the tool part."""
    name: str | None = None
    args_start: int | None = None
    args_sent: int = 0
    """Characters of the arguments already handed out."""
    args_done: bool = False
    done: bool = False


@dataclass(slots=True)
class ToolCallParser:
    """Incremental parser of one output in one `ToolFormat`."""

    fmt: ToolFormat
    _text: str = ""
    _content_sent: int = 0
    _tools_at: int | None = None
    """Where the tool part starts in the output, once known."""
    _calls: list[_Call] = field(default_factory=list)
    _scan: int = 0
    """Next character of the tool part to scan for the start of a call."""

    @property
    def calls(self) -> list[ParsedCall]:
        return [ParsedCall(c.name, self._args(c)) for c in self._calls if c.name is not None]

    def feed(self, text: str, is_last: bool = False) -> tuple[str, list[CallDelta]]:
        """(new content, new call deltas) after `text` more output; `is_last` flushes held-back content."""
        self._text += text
        if self._tools_at is None:
            self._find_tool_part(is_last)
        if self._tools_at is None:
            end = len(self._text) if is_last else self._safe_content_end()
            content, self._content_sent = self._text[self._content_sent:end], max(self._content_sent, end)
            return content, []
        content = self._text[self._content_sent:self._tools_at]
        self._content_sent = self._tools_at
        deltas = self._parse_calls()
        if is_last and not self._calls:  # a marker without a call: it was content after all
            content += self._text[self._tools_at:]
        return content, deltas

    # ---- helpers -------------------------------------------------------------
    def _find_tool_part(self, is_last: bool) -> None:
        if self.fmt.marker:
            at = self._text.find(self.fmt.marker)
            if at >= 0:
                self._tools_at = at
            return
        stripped = self._text.lstrip()
        if stripped.startswith(("{", "<|python_tag|>")):
            self._tools_at = len(self._text) - len(stripped)
        elif stripped or is_last:
            self._tools_at = None

    def _safe_content_end(self) -> int:
        """Content up to here cannot become part of a call marker any more."""
        if not self.fmt.marker:
            return len(self._text) if self._text.strip() else 0
        for keep in range(min(len(self.fmt.marker) - 1, len(self._text)), 0, -1):
            if self.fmt.marker.startswith(self._text[-keep:]):
                return len(self._text) - keep
        return len(self._text)

    def _parse_calls(self) -> list[CallDelta]:
        part = self._text[self._tools_at:]
        deltas: list[CallDelta] = []
        while True:
            if not self._calls or self._calls[-1].done:
                start = part.find("{", self._scan)
                if start < 0:
                    return deltas
                self._calls.append(_Call(start))
            call = self._calls[-1]
            index = len(self._calls) - 1
            if call.name is None:
                match = _NAME.match(part, call.start)
                if match is None:
                    if _ends_value(part, call.start) is not None:  # an object that is no call: skip it
                        self._scan = _ends_value(part, call.start)
                        self._calls.pop()
                        continue
                    return deltas
                call.name = json.loads(f'"{match.group(1)}"')
                deltas.append(CallDelta(index, name=call.name))
                args = _ARGS_KEY.match(part, match.end())
                call.args_start = args.end() if args else None
            if call.args_start is None:
                args = _ARGS_KEY.match(part, _NAME.match(part, call.start).end())
                if args is None:
                    return deltas
                call.args_start = args.end()
            value_end = _ends_value(part, call.args_start)
            available = (value_end if value_end is not None else len(part)) - call.args_start
            if available > call.args_sent:
                piece = part[call.args_start + call.args_sent: call.args_start + available]
                deltas.append(CallDelta(index, arguments=piece))
                call.args_sent = available
            if value_end is None:
                return deltas
            call.args_done = True
            end = _ends_value(part, call.start)
            if end is None:
                return deltas
            call.done = True
            self._scan = end

    def _args(self, call: _Call) -> str:
        if call.args_start is None:
            return "{}"
        part = self._text[self._tools_at:]
        return part[call.args_start: call.args_start + call.args_sent]


def _ends_value(text: str, start: int) -> int | None:
    """End (exclusive) of the JSON object or array starting at text[start], once it is complete."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        elif depth == 0 and not ch.isspace():
            return None if i == start else i  # a scalar argument value: not supported as a call
    return None


def parse_tool_calls(fmt: ToolFormat, text: str) -> tuple[str, list[ParsedCall]]:
    """(content, calls) of a whole output."""
    parser = ToolCallParser(fmt)
    content, _ = parser.feed(text, is_last=True)
    return content, parser.calls
