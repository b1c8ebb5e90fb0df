"""Test support for the hub: stores, events as gates send them, hub.toml files, the hub as a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from postgres_server import session_server

from appliance.bench.daemon_process import end
from appliance.config import DatabaseConfig
from appliance.hub.store import Connection, Store

REPO = Path(__file__).resolve().parent.parent
ZONE = ZoneInfo("Asia/Ho_Chi_Minh")


def gate_event(device: str, seq: int, journal: str = "a" * 32, **fields: Any) -> dict[str, Any]:
    """An event exactly as a gate publishes it (valid against the event schema)."""
    event: dict[str, Any] = {
        "schema": 1,
        "id": uuid.uuid4().hex,
        "device": device,
        "journal": journal,
        "seq": seq,
        "ts": datetime.now(ZONE).isoformat(timespec="milliseconds"),
        "clock_ok": True,
        "kind": "unknown_card",
        "person": None,
        "method": "card",
        "reader": "lane",
        "card_uid": f"{seq:08X}",
    }
    event.update(fields)
    return event


def payload(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


@pytest.fixture(params=["sqlite", "postgresql"])
def hub_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A migrated hub database: every test using it runs on SQLite and on a fresh PostgreSQL database
    (of the session's private cluster, see postgres_server.py; the password comes from a file, as in production)."""
    if request.param == "sqlite":
        store = Store(DatabaseConfig(url=f"sqlite:///{tmp_path / 'hub.db'}"))
        store.migrate()
        yield store
        return
    server = session_server(request.config)
    name = server.create_database()
    store = Store(DatabaseConfig(url=server.url(name), password_file=server.password_file))
    store.migrate()
    yield store
    server.drop_database(name)


@pytest.fixture
def hub_conn(hub_store: Store) -> Iterator[Connection]:
    conn = hub_store.connect()
    yield conn
    conn.close()


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {_toml(v)}' for k, v in value.items()) + "}"
    return json.dumps(str(value), ensure_ascii=False)


def hub_mqtt(folder: Path, broker: Any, pki: Any) -> dict[str, Any]:
    """The ``[mqtt]`` table of a hub on the tests' broker (user ``hub``, its password in ``folder``)."""
    from mqtt_broker import BROKER_USERS

    password = folder / "hub.password"
    password.write_text(BROKER_USERS["hub"] + "\n")
    return {
        "host": broker.host,
        "port": broker.port,
        "tls": True,
        "ca_file": str(pki.ca),
        "username": "hub",
        "password_file": str(password),
        "keepalive": 5,
        "backoff_min": 0.2,
        "backoff_max": 1.0,
    }


def write_hub_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """A hub.toml from nested dicts (one level of sub-tables, e.g. notify.webhook)."""
    lines: list[str] = []
    for name, values in sections.items():
        flat = {k: v for k, v in values.items() if not isinstance(v, dict) or name in ("attendance",)}
        tables = {k: v for k, v in values.items() if k not in flat}
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in flat.items()]
        lines.append("")
        for sub, sub_values in tables.items():
            lines.append(f"[{name}.{sub}]")
            lines += [f"{k} = {_toml(v)}" for k, v in sub_values.items()]
            lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    tomllib.loads(path.read_text(encoding="utf-8"))
    return path


class HubProcess:
    """``edugate hub run`` as a child process."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc: subprocess.Popen[str] | None = None
        self.stderr_lines: list[str] = []
        self._thread: threading.Thread | None = None

    def start(self, wait_for: str = "edugate hub", timeout: float = 20.0) -> HubProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "hub", "run", "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()
        self.wait_log(wait_for, timeout)
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line.rstrip("\n"))

    def wait_log(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.stderr_lines):
            if self.proc is not None and self.proc.poll() is not None:
                time.sleep(0.2)
                raise AssertionError(f"hub exited ({self.proc.returncode}):\n" + "\n".join(self.stderr_lines[-20:]))
            if time.monotonic() > deadline:
                raise AssertionError(f"hub never logged {text!r}:\n" + "\n".join(self.stderr_lines[-20:]))
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        end(self.proc, timeout=15)


class RegisteredGate:
    """A gate's keys as the hub registers them (derived from its template key file, as on a real gate)."""

    def __init__(self, school: str, device: str, key_file: Path) -> None:
        from appliance.sync.sealed_transport import gate_private_key, gate_signing_key, public_text

        self.school, self.device, self.key_file = school, device, key_file
        self.template_key = public_text(gate_private_key(key_file))
        self.signing = gate_signing_key(key_file)

    @property
    def signing_key_text(self) -> str:
        from appliance.sync.gate_keys import signing_key_text

        return signing_key_text(self.signing)

    def status(self, data: dict[str, Any]) -> dict[str, Any]:
        """``data`` with this gate's template key, signed as the gate signs its status."""
        from appliance.sync.gate_keys import sign_status

        return sign_status(self.signing, {**data, "template_key": self.template_key})

    def status_payload(self, data: dict[str, Any]) -> bytes:
        return payload(self.status(data))


def register_gate(conn: Connection, school: str, device: str, key_file: Path | None = None) -> RegisteredGate:
    """Register a gate at the hub as IT does with `edugate hub gates add` (keys made when no file is given)."""
    from appliance.hub import gates

    if key_file is None:
        key_file = Path(tempfile.mkdtemp(prefix="edugate-test-keys-")) / f"{device}.key"
    gate = RegisteredGate(school, device, key_file)
    gates.add(conn, device, school, gate.template_key, gate.signing_key_text)
    return gate


def gate_identity(gate_config: Path) -> dict[str, Any]:
    """What `edugate identity --json` prints on the gate."""
    from click.testing import CliRunner

    from appliance.cli import main

    result = CliRunner().invoke(main, ["identity", "--json", "--config", str(gate_config)])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def register_with_cli(hub_config: Path, gate_config: Path) -> dict[str, Any]:
    """IT's provisioning step: `edugate identity --json` on the gate, `edugate hub gates add --identity` at the hub."""
    from click.testing import CliRunner

    from appliance.cli import main

    found = gate_identity(gate_config)
    identity = gate_config.with_name("identity.json")
    identity.write_text(json.dumps(found))
    result = CliRunner().invoke(main, ["hub", "gates", "add", "--identity", str(identity), "--config", str(hub_config)])
    assert result.exit_code == 0, result.output
    assert found["fingerprint"] in result.stdout
    return found


def ensure_registered(conn: Connection, school: str, *devices: str) -> None:
    """Register each of ``devices`` at ``school`` unless it is registered already (tests that feed the ingest)."""
    from appliance.hub import gates

    for device in devices:
        known = gates.get(conn, device)
        if known is None or not known.registered:
            register_gate(conn, school, device)


@pytest.fixture
def serve() -> Iterator[Callable[..., Any]]:
    """Start the hub's API server the way the hub does (``api_server(...).start()``, or ``ApiServer`` with
    ``kwargs``); every server started is stopped after the test."""
    from appliance.hub.api.server import ApiServer, api_server

    started: list[ApiServer] = []

    def start(store: Store, config: Any, **kwargs: Any) -> ApiServer:
        server = ApiServer(store, config, **kwargs) if kwargs else api_server(store, config)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
