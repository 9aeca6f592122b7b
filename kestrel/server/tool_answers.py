"""Tool calls in chat answers: a finished choice -> message with `tool_calls`, or stream deltas.

Both go through `kestrel.frontend.tool_parsers.ToolCallParser`, so a streamed answer reassembles into
the same calls as the non-streamed one. A choice that made a call and stopped normally finishes with
`tool_calls` (OpenAI's finish reason); one cut by max_tokens keeps `length`. No torch here.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from kestrel.frontend.tool_parsers import ToolCallParser, ToolFormat, parse_tool_calls
from kestrel.server.protocol import ChatResponseMessage, FunctionCall, ToolCall, ToolCallDelta
from kestrel.server.serving import Choice
from kestrel.server.tools import ToolPlan


def chat_message(choice: Choice, plan: ToolPlan) -> tuple[ChatResponseMessage, str | None]:
    """The assistant message of a finished choice and its finish reason."""
    if plan.fmt is None:
        return ChatResponseMessage(content=choice.text), choice.finish_reason
    content, calls = parse_tool_calls(plan.fmt, choice.text)
    if not calls:
        return ChatResponseMessage(content=choice.text), choice.finish_reason
    tool_calls = [ToolCall(id=_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]
    return (ChatResponseMessage(content=content.strip() or None, tool_calls=tool_calls),
            _finish(choice.finish_reason, True))


@dataclass(slots=True)
class ToolStream:
    """One streamed choice: text deltas in, content and tool-call deltas out."""

    fmt: ToolFormat
    _parser: ToolCallParser | None = None
    _num_calls: int = 0
    _ids: dict[int, str] = field(default_factory=dict)

    def feed(self, text: str, finish_reason: str | None) -> tuple[str, list[ToolCallDelta] | None, str | None]:
        """(content, tool-call deltas or None, finish reason) to send for one delta."""
        if self._parser is None:
            self._parser = ToolCallParser(self.fmt)
        content, deltas = self._parser.feed(text, is_last=finish_reason is not None)
        calls = []
        for d in deltas:
            if d.name is not None:
                self._ids[d.index] = _call_id()
                calls.append(ToolCallDelta(index=d.index, id=self._ids[d.index], type="function",
                                           function=FunctionCall(name=d.name, arguments=d.arguments)))
            else:
                calls.append(ToolCallDelta(index=d.index, function=FunctionCall(arguments=d.arguments)))
        self._num_calls = max(self._num_calls, len(self._ids))
        if self._num_calls and content:
            content = content.strip()  # whitespace before a call is no answer
        return content, calls or None, _finish(finish_reason, self._num_calls > 0)


def _finish(reason: str | None, made_calls: bool) -> str | None:
    return "tool_calls" if made_calls and reason == "stop" else reason


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
