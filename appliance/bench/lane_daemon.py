"""A real gate daemon for the MQTT benches to tap on: its gate.toml, its roster, its socket lane, its console.

``bench sync`` and ``bench hub`` time a tap end to end, so the card UID goes in where a reader would
put it (a socket lane) and the daemon syncs to the bench's broker like a gate in a school.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.bench.daemon_process import daemon_command, end, notify_ready
from appliance.bench.errors import BenchError
from appliance.bench.mqtt_broker import SCHOOL, BenchBroker

READY_TIMEOUT = 60.0
_ACK_NAME = re.compile(r"Học sinh (\d{5})")  # the name ``show_names`` prints: bench sync's students are numbered


def _toml(value: Any) -> str:
    """TOML for the few value types of the bench's gate.toml (JSON strings are valid TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))


def daemon_toml(
    journal: Path,
    lane: Path,
    broker: BenchBroker,
    password: Path,
    device: str,
    school: str = SCHOOL,
    window: int = 100,
    show_names: bool = True,
) -> str:
    """A gate whose every tap of a known card is an arrival (windows all day), synced to the bench broker.

    ``show_names`` puts the student's name in the console acknowledgement (what ``bench sync`` reads).
    """
    whole_day = ["00:00", "23:59"]
    sections: dict[str, dict[str, Any]] = {
        "device": {"id": device, "school": school},
        "journal": {"path": str(journal), "min_free_mb": 1},
        "policy": {"debounce_seconds": 30},
        "policy.student": {"arrival_window": whole_day, "departure_window": whole_day, "start": "23:59"},
        "policy.staff": {"arrival_window": whole_day, "departure_window": whole_day, "start": "23:59"},
        "feedback": {"outputs": ["console"], "show_names": show_names},
        "logging": {"level": "WARNING"},
        "sync": broker.gate_sync(device, password, window),
        "vision": {"key_file": str(journal.parent / "templates.key")},  # not the machine's /var/lib/edugate
    }
    text = "".join(
        f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items()) + "\n"
        for name, keys in sections.items()
    )
    reader = {"name": "lane-in", "type": "socket", "path": str(lane), "direction": "in"}
    return text + "[[readers]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in reader.items())


def enroll(journal: Path, people: list[Any]) -> None:
    """The gate's roster, so each live tap is a real arrival (not an unknown card)."""
    from appliance.journal import open_database
    from appliance.journal.roster_store import RosterStore

    database = open_database(journal, writer=True)
    try:
        RosterStore(database).apply(people, replace=True)
    finally:
        database.close()


class DaemonRun:
    """``edugate run`` as a child: READY=1 over sd_notify, console acknowledgements timed as they are printed.

    Its stdout is a pseudo-terminal, as a gate's console is: the daemon shows names only on a terminal (a pipe
    may be the system journal), and the bench reads the names it acknowledges.
    """

    def __init__(self, config: Path, workdir: Path) -> None:
        self.log = workdir / "daemon.log"
        self.notify_path = workdir / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.acks: dict[int, float] = {}
        self.other_lines: list[str] = []
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(self.notify_path),
            "PYTHONUNBUFFERED": "1",
            "PYTHONIOENCODING": "utf-8",
        }
        for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)
        console, replica = pty.openpty()
        try:
            with self.log.open("wb") as err:
                self.proc = subprocess.Popen(
                    daemon_command(config),
                    stdin=subprocess.DEVNULL,
                    stdout=replica,
                    stderr=err,
                    env=env,
                    cwd=workdir,
                )
        finally:
            os.close(replica)
        self.console = os.fdopen(console, "rb", buffering=0)
        self._reader = threading.Thread(target=self._read_acks, name="bench-acks", daemon=True)
        self._reader.start()

    def _lines(self) -> Iterator[bytes]:
        """The console's lines until the daemon exits (a pty's reader gets EIO then, not an end of file)."""
        pending = b""
        while True:
            try:
                chunk = self.console.read(65536)
            except OSError:
                chunk = b""
            if not chunk:
                if pending:
                    yield pending
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            yield from lines

    def _read_acks(self) -> None:
        for raw in self._lines():
            now = time.monotonic()
            line = raw.decode("utf-8", errors="replace")
            found = _ACK_NAME.search(line)
            if found and line.startswith("✔"):
                self.acks.setdefault(int(found.group(1)), now)
            else:
                self.other_lines.append(line.rstrip())

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"edugate run exited with {self.proc.returncode}: {self.log_tail()}")
            if notify_ready(self.notify):
                return
        raise BenchError(f"edugate run was not ready within {READY_TIMEOUT:.0f} s: {self.log_tail()}")

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-1500:].strip() or "(empty log)"
        return "(no log)"

    def stop(self) -> int:
        end(self.proc)
        self._reader.join(5)
        self.console.close()
        self.notify.close()
        return self.proc.returncode


def connect_lane(path: Path, timeout: float = 10.0) -> socket.socket:
    """Connect to the daemon's socket lane, retrying until its reader listens there."""
    deadline = time.monotonic() + timeout
    while True:
        lane = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            lane.connect(str(path))
            return lane
        except (FileNotFoundError, ConnectionRefusedError):
            lane.close()
            if time.monotonic() > deadline:
                raise BenchError(f"the daemon's socket lane {path} never accepted a connection") from None
            time.sleep(0.05)
