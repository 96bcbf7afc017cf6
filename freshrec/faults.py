"""Named crash points for the fault-injection tests: a process dies exactly where a test asks.

A crash-consistency argument ("a kill between these two writes loses nothing") is only as good as
the test that kills there. Code marks each such gap with ``fault_point("module.after_step")``; a
test sets ``FRESHREC_FAULT_POINT`` to that name in the child process's environment and the process
ends there with ``os._exit(137)``, the status of a ``kill -9``: no ``finally`` blocks, no atexit
hooks, no flushed buffers, just as if the kernel had killed it.

``FRESHREC_FAULT_SKIP=N`` lets the point pass ``N`` times first, so a seeded test can die at the
third batch rather than the first. Unset (the normal case), a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import sys

__all__ = ["FAULT_EXIT_STATUS", "fault_point"]

#: The exit status of a process killed at a fault point: that of ``kill -9`` in a shell (128 + 9).
FAULT_EXIT_STATUS = 137

_passed: dict[str, int] = {}


def fault_point(name: str) -> None:
    """End the process with ``os._exit(137)`` if ``FRESHREC_FAULT_POINT`` names this point.

    A no-op unless the environment variable equals ``name``. With ``FRESHREC_FAULT_SKIP=N`` the
    point is passed ``N`` times before the process dies at the next one.
    """
    if os.environ.get("FRESHREC_FAULT_POINT") != name:
        return
    try:
        skip = int(os.environ.get("FRESHREC_FAULT_SKIP", "0"))
    except ValueError:
        skip = 0
    seen = _passed.get(name, 0)
    if seen < skip:
        _passed[name] = seen + 1
        return
    sys.stderr.write(f"freshrec: fault point {name} reached, exiting with {FAULT_EXIT_STATUS}\n")
    sys.stderr.flush()
    os._exit(FAULT_EXIT_STATUS)
