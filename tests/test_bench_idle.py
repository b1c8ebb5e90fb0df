"""``edugate bench idle``: an idle daemon with two PC/SC lanes must block, not poll.

The bench runs in its own process with its own private pcscd (its PCSCLITE_CSOCK_NAME differs
from this session's), on ports other than the session pcscd's, so the session one is untouched.
The bound here is loose (10 %): it catches a busy-polling loop (~100 % of a core), while the
real ≤ 2 % figure comes from a longer run on the target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import free_port_pair

from appliance.readers.virtual import PrivatePcscd

REPO = Path(__file__).resolve().parent.parent


def bench_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("edugate-bench-idle-*"))


def test_idle_daemon_uses_little_cpu() -> None:
    """Runs the bench end to end and checks its one JSON line: shape, a sane baseline, and an idle daemon."""
    why = PrivatePcscd.available()
    if why:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k not in {"NOTIFY_SOCKET", "WATCHDOG_USEC"}}
    before = bench_dirs()
    result = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "bench", "idle", "--seconds", "5", "--port", str(free_port_pair())],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    report = json.loads(lines[0])
    assert report["bench"] == "idle"
    assert report["readers"] == 2
    assert report["target_percent"] == 2.0
    assert 4.5 <= report["seconds"] < 30
    for key in ("cpu_percent", "baseline_cpu_percent"):
        assert isinstance(report[key], float | int) and report[key] >= 0, key
    assert report["baseline_cpu_percent"] < 5, "a sleeping process should use no CPU"
    assert report["cpu_percent"] < 10, f"idle daemon busy: {report}"
    assert bench_dirs() <= before, "bench left its work directory behind"
