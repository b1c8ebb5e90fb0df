"""``edugate run`` as a bench's child process, started and stopped the way systemd does it.

The benches measure the real daemon, so they give it what the unit gives it: an sd_notify socket on
which it says READY=1, and SIGTERM to stop (SIGKILL only when it does not stop in time).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from appliance.bench.errors import BenchError

T = TypeVar("T")


def daemon_command(config: Path) -> list[str]:
    """The daemon from this interpreter, so it runs the code under test and not an installed copy."""
    return [sys.executable, "-m", "appliance.cli", "run", "--config", str(config)]


def start_daemon(config: Path, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """The daemon with its stdout and stderr together in ``log``, which the errors quote when it fails."""
    with log.open("wb") as out:
        return subprocess.Popen(
            daemon_command(config), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd
        )


def notify_ready(notify: socket.socket, wait: float = 0.2) -> bool:
    """One look at the notify socket: whether the daemon said READY=1 within ``wait`` seconds."""
    notify.settimeout(wait)
    with contextlib.suppress(TimeoutError):
        return b"READY=1" in notify.recv(4096).split(b"\n")
    return False


def wait_settled(
    proc: subprocess.Popen[bytes],
    notify: socket.socket,
    log: Path,
    timeout: float,
    settled: Callable[[], T],
    pause: float,
) -> T | None:
    """READY=1, then ``settled()`` every ``pause`` s until it is truthy, which is returned; None after ``timeout``.

    READY=1 comes before the readers or the camera are up, so each bench says what settled means (a
    status file or log half written may not parse yet: that counts as not yet). A daemon that exits
    raises BenchError with the end of its log.
    """
    deadline = time.monotonic() + timeout
    ready = False
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"edugate run exited with {proc.returncode}; log: {log.read_text()[-2000:]}")
        if not ready:
            ready = notify_ready(notify)
            continue
        with contextlib.suppress(OSError, ValueError):
            value = settled()
            if value:
                return value
        time.sleep(pause)
    return None


def end(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Stop the child with ``sig``, and kill it if it is still there ``timeout`` seconds later."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
