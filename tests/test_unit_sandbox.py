"""The units' sandboxes against what the real processes do, traced with strace.

systemd cannot run here (no PID 1), so the sandbox is checked from the other side: the gate daemon and the
hub run their real work under ``strace -f`` (the gate: taps, sync over TLS, signed hub messages, faces on a
camera, sound through a player child; the hub: ingest, the API), and every system call they made must be one
their unit's SystemCallFilter allows, expanded with ``systemd-analyze syscall-filter``. The hub must never
map memory writable and executable (MemoryDenyWriteExecute) and read no /proc file but its own (ProcSubset=pid).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon_harness import REPO, send_taps
from hub_support import hub_mqtt, register_gate, write_hub_config
from mqtt_broker import BROKER_USERS, Broker, MqttPeer, Pki
from sync_support import SCHOOL
from test_ops_files import unit_directives

from appliance.config import DatabaseConfig
from appliance.hub.store import Store
from appliance.journal import open_database
from appliance.journal.roster_store import RosterStore
from appliance.roster.model import Person, Role

GATE_UNIT = REPO / "systemd" / "edugate.service"
HUB_UNIT = REPO / "systemd" / "edugate-hub.service"
FACE = REPO.parent / "shared" / "data" / "faces" / "faces" / "barack_obama" / "barack_obama_01.jpg"
# Calls only a process running as root makes: SQLite hands its -wal and -shm files to the database's owner.
# The units run as edugate and edugate-hub, where SQLite never calls them.
ROOT_ONLY = {"fchown", "fchownat", "chown", "lchown"}
# Groups no unit of ours may allow, whatever else changes in the filter.
NEVER = ("@mount", "@module", "@reboot", "@swap", "@raw-io", "@debug", "@cpu-emulation", "@obsolete", "@setuid")


@functools.cache
def expand(name: str) -> frozenset[str]:
    """A system call, or a systemd group of them with its nested groups, as systemd-analyze lists them."""
    if not name.startswith("@"):
        return frozenset([name])
    listed = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager", name], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    calls: set[str] = set()
    for line in listed[1:]:
        item = line.strip()
        if item and not item.startswith("#"):
            calls |= expand(item)
    return frozenset(calls)


def allowed_calls(unit: Path) -> frozenset[str]:
    """The calls a unit's SystemCallFilter= lines allow, in systemd's order: an allow-list, then each line
    taking calls away (~) or adding them back."""
    lines = unit_directives(unit)["Service"].get("SystemCallFilter", [])
    assert lines and not lines[0].startswith("~"), f"{unit.name}: no allow-list SystemCallFilter="
    allowed: set[str] = set()
    for line in lines:
        names = line.removeprefix("~").split()
        calls = frozenset().union(*(expand(n) for n in names))
        allowed = allowed - calls if line.startswith("~") else allowed | calls
    return frozenset(allowed)


@dataclass
class Trace:
    """What ``strace -f`` saw: the calls made, writable+executable mappings, /proc files opened."""

    calls: set[str] = field(default_factory=set)
    write_exec: list[str] = field(default_factory=list)
    proc_files: set[str] = field(default_factory=set)
    pids: set[str] = field(default_factory=set)


def read_trace(path: Path) -> Trace:
    trace = Trace()
    for line in path.read_text(errors="replace").splitlines():
        found = re.match(r"^(\d+)\s+(?:<\.\.\. )?(\w+)[( ]", line)
        if not found:
            continue
        pid, call = found.groups()
        trace.pids.add(pid)
        if "resumed>" in line and not line.startswith(f"{pid} <..."):
            continue
        trace.calls.add(call)
        if (call == "mmap" and "PROT_WRITE" in line and "PROT_EXEC" in line) or (
            call in ("mprotect", "pkey_mprotect") and "PROT_EXEC" in line
        ):
            trace.write_exec.append(line)
        if opened := re.search(r'open(?:at)?\((?:AT_FDCWD, )?"(/proc/[^"]*)"', line):
            trace.proc_files.add(opened.group(1))
    return trace


@pytest.fixture
def strace() -> str:
    found = shutil.which("strace")
    if found is None:
        pytest.skip("strace not installed (apt-get install strace)")
    if subprocess.run([found, "-f", "-o", os.devnull, "true"], capture_output=True, check=False).returncode:
        pytest.skip("strace cannot trace here (ptrace not permitted in this container)")
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    return found


def traced(strace: str, trace: Path, *args: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(name, None)
    with log.open("wb") as err:
        return subprocess.Popen(
            [strace, "-f", "-qq", "-s", "48", "-o", str(trace), sys.executable, "-m", "appliance.cli", *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=REPO,
        )


def wait(predicate: Any, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM to the traced process (strace itself would only detach); strace exits with its exit code."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    traced_pid = int(children.read_text().split()[0]) if proc.poll() is None and children.read_text().split() else None
    if traced_pid is not None:
        os.kill(traced_pid, signal.SIGTERM)
    try:
        return proc.wait(90)
    except subprocess.TimeoutExpired:
        if traced_pid is not None:
            os.kill(traced_pid, signal.SIGKILL)
        proc.kill()
        proc.wait(30)
        raise


def outside(trace: Trace, unit: Path) -> set[str]:
    root_only = ROOT_ONLY if os.geteuid() == 0 else set()
    return trace.calls - allowed_calls(unit) - root_only


def test_the_units_filters_allow_none_of_the_dangerous_groups(strace: str) -> None:
    for unit in (GATE_UNIT, HUB_UNIT):
        allowed = allowed_calls(unit)
        for group in NEVER:
            assert not allowed & expand(group), f"{unit.name} allows {sorted(allowed & expand(group))} of {group}"
    assert {"adjtimex", "clock_adjtime"} <= allowed_calls(GATE_UNIT)  # how the gate reads the NTP state


def test_the_gate_daemon_stays_inside_its_units_system_call_filter(
    tmp_path: Path, strace: str, broker: Broker, subscriber_factory: Any, gate_factory: Any, models_dir: Path
) -> None:
    video = tmp_path / "walk.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (640, 480))
    frame = cv2.resize(cv2.imread(str(FACE)), (640, 480))
    for _ in range(30):
        writer.write(frame)
    writer.release()
    hub_key = Ed25519PrivateKey.generate()
    gate = gate_factory(broker, hub_key=hub_key)
    text = gate.config.read_text()
    text = text.replace('outputs = ["console"]', 'outputs = ["console", "sound"]')
    text = text.replace("[vision]\n", f'[vision]\nenabled = true\ncamera = "{video}"\nmodels_dir = "{models_dir}"\n')
    gate.config.write_text(text + '\n[feedback.sound]\ncommand = ["sh", "-c", "cat > /dev/null"]\n')
    database = open_database(gate.journal, writer=True)
    RosterStore(database).apply([Person("HS1", "Phạm Thu Hà", Role.STUDENT, "6A", cards=("04AABBCC",))], replace=True)
    database.close()
    hub = subscriber_factory()  # the events are only marked synced once a hub is subscribed
    sender = MqttPeer(broker, "hub", BROKER_USERS["hub"])
    sender.connect()
    trace, log = tmp_path / "trace", tmp_path / "daemon.log"
    proc = traced(strace, trace, "run", "--config", str(gate.config), log=log)
    try:
        wait(lambda: gate.sync_status().get("state") == "online", 120, "the gate online", log)
        send_taps(gate.lane, ["04AABBCC", "0BADCAFE"])
        change = gate.command(sender, "config", {"feedback": {"show_names": False}}, version=1)
        hub.wait_for(
            lambda m: any(json.loads(x.payload)["ref"] == change["nonce"] for x in hub.messages("/result")), 60
        )

        def journalled() -> set[str]:
            return {kind for (kind,) in db.conn.execute("SELECT DISTINCT kind FROM events WHERE synced_at IS NOT NULL")}

        db = open_database(gate.journal, readonly=True)
        try:
            wait(lambda: {"arrival", "unknown_card", "unknown_face"} <= journalled(), 120, "events synced", log)
        finally:
            db.close()
    finally:
        sender.close()
        code = stop(proc)
    assert code == 0, log.read_text()[-3000:]
    seen = read_trace(trace)
    assert len(seen.pids) > 5 and "execve" in seen.calls  # threads and the player child were traced too
    assert not outside(seen, GATE_UNIT), f"calls the unit's filter refuses: {sorted(outside(seen, GATE_UNIT))}"


def test_the_hub_stays_inside_its_units_filter_and_never_maps_writable_executable_memory(
    tmp_path: Path, strace: str, broker: Broker, pki: Pki, gate_factory: Any
) -> None:
    store = Store(DatabaseConfig(url=f"sqlite:///{tmp_path / 'hub.db'}"))
    store.migrate()
    conn = store.connect()
    register_gate(conn, SCHOOL, "gate-01", tmp_path / "gate" / "templates.key")  # gate_factory's gate folder
    conn.close()
    port, token = free_port(), "sandbox-" + "a1b2c3d4" * 4
    tokens = tmp_path / "api.tokens"
    tokens.write_text(f"{token} schools=* rights=read\n")
    config = write_hub_config(
        tmp_path / "hub.toml",
        {
            "hub": {"id": "hub-test"},
            "database": {"url": f"sqlite:///{tmp_path / 'hub.db'}"},
            "mqtt": hub_mqtt(tmp_path, broker, pki),
            "api": {"enabled": True, "port": port, "token_file": str(tokens)},
        },
    )
    trace, log = tmp_path / "trace", tmp_path / "hub.log"
    proc = traced(strace, trace, "hub", "run", "--config", str(config), log=log)
    try:
        wait(lambda: "sync: connected" in log.read_text(errors="replace"), 120, "the hub connected", log)
        gate = gate_factory(broker)
        gate.start()
        send_taps(gate.lane, ["0B000001", "0B000002"])
        events = Store(DatabaseConfig(url=f"sqlite:///{tmp_path / 'hub.db'}"))

        def stored() -> int:
            with_conn = events.connect()
            try:
                return int(with_conn.one("SELECT COUNT(*) FROM events")[0])
            finally:
                with_conn.close()

        wait(lambda: stored() == 2, 60, "two events at the hub", log)
        asked = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/health", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(asked, timeout=30) as answer:
            assert json.loads(answer.read())["status"] == "ok"
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()[-3000:]
    seen = read_trace(trace)
    assert not outside(seen, HUB_UNIT), f"calls the unit's filter refuses: {sorted(outside(seen, HUB_UNIT))}"
    assert not seen.write_exec, "MemoryDenyWriteExecute would refuse:\n" + "\n".join(seen.write_exec[:5])
    others = {p for p in seen.proc_files if not re.match(rf"/proc/(self|thread-self|{'|'.join(seen.pids)})(/|$)", p)}
    assert not others, f"ProcSubset=pid hides {sorted(others)}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
