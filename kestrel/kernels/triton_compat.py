"""Triton when it is installed, else stand-ins so that the GPU kernel modules still import.

The Triton kernel modules of this package import `triton` and `tl` from here. On a
machine without Triton (a CPU-only torch install) `triton.jit` returns a stand-in
kernel, and launching it, or calling any other `triton` function, raises a
RuntimeError that says Triton is needed. Nothing else changes, so code that only
imports a kernel module (to look up a launcher, say) works everywhere.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only install
    HAS_TRITON = False

    def _missing(*_args, **_kwargs):
        raise RuntimeError("this kernel needs Triton (pip install triton, on a machine with a GPU)")

    class _MissingKernel:
        def __init__(self, fn) -> None:
            self.fn = fn

        def __getitem__(self, _grid):
            return _missing

        __call__ = _missing

    class _MissingTriton:
        @staticmethod
        def jit(fn=None, **_kwargs):
            return _MissingKernel(fn) if fn is not None else _MissingKernel

        def __getattr__(self, _name):
            return _missing

    triton = _MissingTriton()
    tl = None

__all__ = ["HAS_TRITON", "tl", "triton"]
