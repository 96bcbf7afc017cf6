"""The named crash points: silent unless named, fatal with kill -9's status when named."""

from __future__ import annotations

import os
import subprocess
import sys

from freshrec.faults import FAULT_EXIT_STATUS

_SCRIPT = """
import sys
from freshrec.faults import fault_point
for i in range(5):
    fault_point("demo.step")
    print(i, flush=True)
"""


def _run(env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_FAULT")}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )


def test_an_unnamed_point_is_a_no_op() -> None:
    done = _run({"FRESHREC_FAULT_POINT": "other.step"})
    assert done.returncode == 0
    assert done.stdout.split() == ["0", "1", "2", "3", "4"]


def test_a_named_point_exits_like_kill_9_after_the_skips() -> None:
    done = _run({"FRESHREC_FAULT_POINT": "demo.step", "FRESHREC_FAULT_SKIP": "2"})
    assert done.returncode == FAULT_EXIT_STATUS
    assert done.stdout.split() == ["0", "1"]
    assert "demo.step" in done.stderr
