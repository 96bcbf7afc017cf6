"""Forked children that must not outlive their parent (Linux).

Two places fork helpers: the stream worker's checkpoint writer (an old snapshot must never land
after a restarted worker's newer one) and ``freshrec serve --workers``'s serving processes (no
orphans serving after the supervisor is gone). Both ask the kernel for a signal when the parent
dies, and then check that the parent did not die before the request took effect.
"""

from __future__ import annotations

import ctypes
import os
import signal

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, signum: signal.Signals) -> bool:
    """In a forked child: receive ``signum`` when the parent (pid ``parent``) dies. False when it
    already has (the child should exit at once)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signum)
    return os.getppid() == parent
