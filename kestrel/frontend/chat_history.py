"""Conversations longer than the context: the one owner of which turns to drop.

A turn is a user message and everything after it up to the next user message (the assistant's
answer, tool calls and results). `fit_conversation` renders the conversation and, while it does not
fit, drops the oldest turn after the leading system (or developer) messages; the last turn is never
dropped. Used by the server's chat endpoint (when `--truncate-chat-history` is on) and the
terminal chat. No torch here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

_INSTRUCTION_ROLES = ("system", "developer")


class FittedConversation(NamedTuple):
    token_ids: list[int]
    """The rendered prompt (it may still not fit when only the last turn is left)."""
    num_dropped_messages: int


def without_oldest_turn(messages: list[dict]) -> list[dict] | None:
    """The messages less their oldest turn after the leading system messages; None if one turn is left."""
    start = 0
    while start < len(messages) and messages[start]["role"] in _INSTRUCTION_ROLES:
        start += 1
    next_turn = next((i for i in range(start + 1, len(messages)) if messages[i]["role"] == "user"), None)
    if next_turn is None:
        return None
    return messages[:start] + messages[next_turn:]


def fit_conversation(messages: list[dict], render: Callable[[list[dict]], list[int]],
                     fits: Callable[[int], bool]) -> FittedConversation:
    """Render `messages`, dropping the oldest turns until `fits(prompt_len)` or one turn is left."""
    ids = render(messages)
    num_dropped = 0
    while not fits(len(ids)):
        shorter = without_oldest_turn(messages)
        if shorter is None:
            break
        num_dropped += len(messages) - len(shorter)
        messages = shorter
        ids = render(messages)
    return FittedConversation(ids, num_dropped)
