"""Calls into torch.compile'd functions with dynamo's guard evaluation skipped once they are warm.

The CPU's compiled decode steps and prefill pieces run 30+ compiled calls a step; evaluating their full
guards cost ~64 us a call on a 2-core Zen 4 (~2 ms of a ~20 ms batch-1 decode step). After `warmup()` has
compiled every graph a runner needs, its calls run under `skip_guard_eval_unsafe`, which keeps only the
guards that tell the graphs apart. A call no graph fits makes dynamo refuse (it will not recompile in that
stance): the call is then run again with full guards, and from then on every call is guarded (logged).
So the function must be safe to run twice (pure, or writing the same values again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")


class UnguardedCalls:
    def __init__(self, what: str) -> None:
        self.what = what
        """What the calls are, for the log line."""
        self.warm = False
        """Set once every graph is compiled: calls then skip guard evaluation."""

    def __call__(self, fn: Callable[..., T], *args) -> T:
        if self.warm:
            try:
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return fn(*args)
            except RuntimeError as e:  # a call no graph fits (dynamo refuses to recompile in this stance)
                if "skip_guard_eval_unsafe" not in str(e):
                    raise
                logger.warning("a compiled %s needs a new graph (%s); guards are evaluated from now on", self.what, e)
                self.warm = False
        return fn(*args)
