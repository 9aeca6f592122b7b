"""Which turns a conversation longer than the context loses (frontend/chat_history.py)."""

from __future__ import annotations

from kestrel.frontend.chat_history import fit_conversation, without_oldest_turn


def _msg(role: str, content: str = "x") -> dict:
    return {"role": role, "content": content}


def test_drops_whole_turns_after_the_system_messages():
    conv = [_msg("system"), _msg("user", "1"), _msg("assistant"), _msg("tool"), _msg("user", "2"), _msg("assistant"),
            _msg("user", "3")]
    shorter = without_oldest_turn(conv)
    assert [m["content"] for m in shorter] == ["x", "2", "x", "3"] and shorter[0]["role"] == "system"
    assert [m["content"] for m in without_oldest_turn(shorter)] == ["x", "3"]
    assert without_oldest_turn(without_oldest_turn(shorter)) is None  # the last turn stays


def test_fit_renders_until_it_fits_or_one_turn_is_left():
    conv = [_msg("system")] + [_msg(r) for _ in range(5) for r in ("user", "assistant")] + [_msg("user")]
    render = lambda messages: [0] * (10 * len(messages))  # noqa: E731
    fitted = fit_conversation(conv, render, lambda n: n <= 50)
    assert fitted.num_dropped_messages == 8 and len(fitted.token_ids) == 40
    assert fit_conversation(conv, render, lambda n: True).num_dropped_messages == 0
    stuck = fit_conversation(conv, render, lambda n: n < 20)
    assert stuck.num_dropped_messages == 10 and len(stuck.token_ids) == 20  # system + last turn: still too long
