"""Transparent huge pages for the heap of a `kestrel` process (Linux with glibc >= 2.35).

A CPU decode step streams every weight from memory, and the attention reads the KV pool through
scattered slots. With 4 KiB pages each page of those is a TLB miss, and the hardware prefetchers
stop at every page boundary. Where transparent huge pages are in `madvise` mode (the default of
many distributions), glibc asks the kernel for 2 MiB pages on its heap when the variable
`GLIBC_TUNABLES` holds `glibc.malloc.hugetlb=1`; glibc reads it once, when the process starts. So
the `kestrel` command re-executes itself once with it set (same PID, same command line), before it
imports torch; the engine and detokenizer processes inherit it.

Measured on a 2-core Xeon with AMX (4 KiB pages by default there; benchmarks/cpu/README.md): SmolLM2's
120 decode matmuls 21 -> 16 ms at 8 rows, a bf16 batch-16 decode step 52-55 -> 45 ms, prefill ~15%
faster. Results are unchanged (only where the memory lies).

`KESTREL_HUGE_PAGES=0` leaves the process as it is. An `LLM` in a program of your own: start that
program with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def wanted(environ: dict[str, str] | None = None) -> bool:
    """This process would gain from re-executing with `TUNABLE`: Linux, glibc, THP in madvise mode, not set yet."""
    env = os.environ if environ is None else environ
    if env.get("KESTREL_HUGE_PAGES") == "0" or "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", ""):
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        with open(_THP_MODE) as f:
            return "[madvise]" in f.read()  # [always]: every region has them already; [never]: none to have
    except OSError:
        return False


def environment(environ: dict[str, str]) -> dict[str, str]:
    """A copy of `environ` with `TUNABLE` added to GLIBC_TUNABLES (colon-separated, as glibc reads it)."""
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), TUNABLE) if t)
    return env


def reexec_if_wanted() -> None:
    """Replace this process by the same command line with `TUNABLE` set, where `wanted()`; else return."""
    if wanted() and getattr(sys, "orig_argv", None) and sys.executable:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execve(sys.executable, sys.orig_argv, environment(dict(os.environ)))
        except OSError:  # cannot exec (no such file, no permission): carry on with 4 KiB pages
            pass
