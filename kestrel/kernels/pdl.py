"""Programmatic dependent launch (Hopper and later): a kernel may start while the one before it drains.

A CUDA graph step of batch 1 on the 8B shape runs ~440 kernels, most of them a few microseconds long,
and each boundary left the GPU idle for the next kernel's launch and ramp (~0.3 ms per step in
`benchmarks/gpu/README.md`'s device timeline). With PDL (`launch_pdl=True`), the next kernel is
scheduled as soon as every program of the current one has passed `gdc_launch_dependents`, and it
waits in `gdc_wait` until the current kernel has finished and its writes are visible.

The rule every kernel of this package keeps: `prologue(USE_PDL)` comes first, before any load or store,
so nothing is read before its producer finished and nothing is overwritten that a previous kernel still
reads; then it lets its own dependents launch. Kernels that are not ours (cuBLAS) are launched without
the attribute and so wait for full completion as always; ours after them wait in `gdc_wait`, which
returns at once when there was nothing to wait for.

`options(device)`: the launch keywords for a kernel on `device` (PDL on CUDA devices of compute
capability 9 and up, unless KESTREL_PDL=0; never under the CPU interpreter).
"""

from __future__ import annotations

import functools
import os

import torch

from kestrel.kernels.triton_compat import HAS_TRITON, tl, triton

ENABLED = os.environ.get("KESTREL_PDL", "1") != "0"


@triton.jit
def prologue(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@functools.cache
def _supported(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def options(device: torch.device) -> dict:
    """`USE_PDL` (the kernel's constexpr) and, where it is on, `launch_pdl` for the launcher."""
    if not (ENABLED and HAS_TRITON and device.type == "cuda" and _supported(device.index or 0)):
        return {"USE_PDL": False}
    return {"USE_PDL": True, "launch_pdl": True}
