"""Calls into torch.compile'd functions without dynamo's per-call dispatch once they are warm.

The CPU's compiled decode steps and prefill pieces run 30+ compiled calls a step. Through
`torch.compile`'s wrapper each call costs dynamo's frame interception, cache lookup and guard
evaluation: ~100-190 us a call on a 2-core Xeon (4-6 ms of a ~28 ms batch-8 decode step), ~64 us
of guards alone on a 2-core Zen 4.

So while a runner compiles its graphs (`warm` False, full guards), the bytecode that dynamo writes for
each graph (input extraction, the compiled graph's call, output rebuild) is captured through
`torch._dynamo.convert_frame.register_bytecode_hook`, under the key the runner names for that kind of
call (the technique vLLM's compilation wrapper uses). Once warm, a call with a key that has a captured
graph runs the original function with that bytecode in place of its own: no dynamo on the way, the
runner's key choosing the graph its guards would have chosen. A key with no captured graph runs
through the wrapper with guard evaluation skipped except for the guards that tell the graphs apart
(`skip_guard_eval_unsafe`); a call no graph fits makes dynamo refuse (it will not recompile in that
stance), and is then run again with full guards, from then on for every call (logged). So the
function must be safe to run twice (pure, or writing the same values again).

`KESTREL_DIRECT_COMPILED_CALLS=0` turns the captured bytecode off (A/B runs): warm calls then go
through the wrapper with guards skipped, as before.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Hashable
from types import CodeType
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

_capture = threading.local()
"""`_capture.target`: (the `UnguardedCalls` compiling on this thread, the key naming the graph), or None."""
_hook_installed = False


def _bytecode_hook(old_code: CodeType, new_code: CodeType) -> None:
    target = getattr(_capture, "target", None)
    if target is not None:
        calls, key = target
        calls._codes[(old_code, key)] = new_code  # a recompile for the same key replaces it
    return None  # dynamo keeps its own code


def direct_calls_enabled() -> bool:
    return os.environ.get("KESTREL_DIRECT_COMPILED_CALLS", "1") != "0"


class UnguardedCalls:
    def __init__(self, what: str) -> None:
        global _hook_installed
        self.what = what
        """What the calls are, for the log line."""
        self.warm = False
        """Set once every graph is compiled: calls then skip dynamo (or, for an unknown key, its guards)."""
        self.direct = direct_calls_enabled()
        self._codes: dict[tuple[CodeType, Hashable], CodeType] = {}
        """(original function's code, key) -> dynamo's bytecode for that graph."""
        self.num_direct = 0
        """Calls run on captured bytecode (for tests and logs)."""
        if self.direct and not _hook_installed:
            torch._dynamo.convert_frame.register_bytecode_hook(_bytecode_hook)
            _hook_installed = True

    def __call__(self, compiled: Callable[..., T], *args, key: Hashable = None) -> T:
        """compiled(*args); `compiled` is a `torch.compile`d function, `key` names the graph it takes."""
        if self.warm:
            fn = getattr(compiled, "_torchdynamo_orig_callable", None)
            code = None if fn is None else self._codes.get((fn.__code__, key))
            if code is not None:
                self.num_direct += 1
                original, fn.__code__ = fn.__code__, code
                try:
                    return fn(*args)
                finally:
                    fn.__code__ = original
            try:
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return compiled(*args)
            except RuntimeError as e:  # a call no graph fits (dynamo refuses to recompile in this stance)
                if "skip_guard_eval_unsafe" not in str(e):
                    raise
                logger.warning("a compiled %s needs a new graph (%s); guards are evaluated from now on", self.what, e)
                self.warm = False
        if not self.direct:
            return compiled(*args)
        _capture.target = (self, key)
        try:
            return compiled(*args)
        finally:
            _capture.target = None
