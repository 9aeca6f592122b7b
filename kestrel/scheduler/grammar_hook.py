"""What the scheduler needs from grammar-constrained decoding, as a protocol (no torch, no xgrammar).

The engine passes an implementation (`kestrel.structured.StructuredOutputManager`) to the
`Scheduler` and to `build_step_batch`; tests pass fakes. Contract: `add` runs once per request
before it is queued and may raise `ValueError` (the request is refused); `bitmasks` is asked once
per step, for the requests that sample; `advance` once per sampled token, after it is appended;
`release` when the request finishes, is aborted or is preempted (state is rebuilt on demand).
"""

from __future__ import annotations

from typing import Protocol

from kestrel.request import Request


class GrammarHook(Protocol):
    def add(self, request: Request) -> None:
        """Check (compile) the request's constraint; ValueError naming the field when it cannot run."""
        ...

    def bitmasks(self, requests: list[Request]) -> list[bytes | None]:
        """Per request: packed int32 bitmask of the tokens allowed next; None when any token is."""
        ...

    def can_end(self, request: Request) -> bool:
        """The constraint is complete: the request may (and must) stop now."""
        ...

    def is_terminated(self, request: Request) -> bool:
        """The constraint accepted its end (an EOS token): nothing may follow, even with ignore_eos."""
        ...

    def advance(self, request: Request, token_id: int, max_new_tokens: int) -> list[int]:
        """Accept the appended `token_id`; return at most `max_new_tokens` jump-forward tokens to append."""
        ...

    def release(self, request_id: str) -> None:
        """Forget the request's grammar state."""
        ...
