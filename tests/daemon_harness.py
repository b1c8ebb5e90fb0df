"""Runs the real ``edugate run`` in a subprocess, fed through a socket lane, watched through sd_notify.

Used by the process-level and fault tests. Acknowledgements are read from the console feedback
on stdout: each OK/repeat line is printed only after the event was committed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def write_config(path: Path, journal: Path, readers: list[dict[str, Any]], **sections: dict[str, Any]) -> Path:
    """A gate.toml with whole-day windows (so tests do not depend on the hour) unless overridden."""
    whole_day = '["00:00", "23:59"]'
    lines = [
        "[device]",
        'id = "gate-test"',
        'school = "test-school"',
        "",
        "[journal]",
        f'path = "{journal}"',
        "min_free_mb = 1",
        "",
        "[policy]",
        "debounce_seconds = 30",
        "",
        "[policy.student]",
        f"arrival_window = {whole_day}",
        f"departure_window = {whole_day}",
        'start = "23:59"',
        "",
        "[policy.staff]",
        f"arrival_window = {whole_day}",
        f"departure_window = {whole_day}",
        'start = "23:59"',
        "",
        "[feedback]",
        'outputs = ["console"]',
        "show_names = false",
        "",
    ]
    for reader in readers:
        lines.append("[[readers]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in reader.items()]
        lines.append("")
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    tomllib.loads(path.read_text())
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class DaemonProcess:
    """``edugate run --config`` as a child process with NOTIFY_SOCKET pointing at the test."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = {**(env or os.environ)}
        self.notify_path = config.with_name(f"notify-{os.getpid()}-{time.monotonic_ns()}.sock")
        self.proc: subprocess.Popen[str] | None = None
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self.notifications: list[str] = []
        self._threads: list[threading.Thread] = []
        self._notify_sock: socket.socket | None = None

    def start(self, wait_ready: bool = True, timeout: float = 20.0) -> DaemonProcess:
        self.notify_path.unlink(missing_ok=True)
        self._notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify_sock.bind(str(self.notify_path))
        env = {**self.env, "NOTIFY_SOCKET": str(self.notify_path), "WATCHDOG_USEC": "2000000", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "run", "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for stream, sink in ((self.proc.stdout, self.stdout_lines), (self.proc.stderr, self.stderr_lines)):
            thread = threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
            thread.start()
            self._threads.append(thread)
        thread = threading.Thread(target=self._listen, daemon=True)
        thread.start()
        if wait_ready:
            self.wait_for(lambda: "READY=1" in self.notifications, timeout, "READY=1")
        return self

    def _pump(self, stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

    def _listen(self) -> None:
        assert self._notify_sock is not None
        while True:
            try:
                data = self._notify_sock.recv(4096)
            except OSError:
                return
            self.notifications.extend(data.decode().split("\n"))

    def wait_for(self, predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc is not None and self.proc.poll() is not None:
                time.sleep(0.2)
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}) waiting for {what}:\n" + "\n".join(self.stderr_lines[-20:])
                )
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; stderr:\n" + "\n".join(self.stderr_lines[-20:]))

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=20)
        for thread in self._threads:
            thread.join(timeout=5)
        if self._notify_sock is not None:
            self._notify_sock.close()
        self.notify_path.unlink(missing_ok=True)
        return code

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        return self.kill(signal.SIGTERM)


def send_taps(socket_path: Path, uids: list[str], timeout: float = 10.0) -> None:
    """Write UIDs to a socket lane, one per line (retries until the daemon listens)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(socket_path))
                sock.sendall("".join(f"{u}\n" for u in uids).encode())
            return
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
