"""What every child process of `kestrel serve` does first, and how it notices its parent is gone.

A child logs with its name in each line and leaves Ctrl-C to the supervisor (the terminal sends
SIGINT to the whole process group; the supervisor then stops each child in order). It exits
cleanly on SIGTERM (through SystemExit, so finalizers run) and dies with its parent: on Linux
through PR_SET_PDEATHSIG, elsewhere by polling `parent_is_alive()`. `open_sockets` makes its
inbox and outboxes. No torch here.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

import zmq

_PR_SET_PDEATHSIG = 1
_parent_pid: int | None = None


def init_child_process(name: str, log_level: str) -> None:
    """Configure logging and signals of a freshly spawned server process."""
    global _parent_pid
    _parent_pid = os.getppid()
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr, force=True,
                        format=f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass  # parent_is_alive() polling still covers it
    if not parent_is_alive():  # the parent died before prctl took effect
        sys.exit(1)


def _exit_on_sigterm(_signum: int, _frame) -> None:
    """Exit through SystemExit so that finalizers run (multiprocessing locks are released)."""
    raise SystemExit(0)


def open_sockets(inbox_addr: str, *outbox_addrs: str) -> tuple[zmq.Context, zmq.Socket, list[zmq.Socket]]:
    """A child's ZMQ context, its inbox (PULL, bound) and one PUSH socket per address (connected).

    Sockets do not linger: at exit, messages for a process that is already gone are dropped
    instead of holding the exit up forever.
    """
    ctx = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)
    inbox = ctx.socket(zmq.PULL)
    inbox.bind(inbox_addr)
    outboxes = []
    for addr in outbox_addrs:
        outboxes.append(ctx.socket(zmq.PUSH))
        outboxes[-1].connect(addr)
    return ctx, inbox, outboxes


def parent_is_alive() -> bool:
    """False once the process that spawned this one has exited (we were re-parented)."""
    return _parent_pid is None or os.getppid() == _parent_pid
