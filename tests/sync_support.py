"""Test support for sync: a configured gate (files, daemon, journal) against a test broker."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon_harness import DaemonProcess, write_config
from mqtt_broker import BROKER_USERS, Broker, MqttPeer, Pki

from appliance.events import EventDraft, Kind, Method
from appliance.journal import EventJournal, open_database
from appliance.journal.events import journal_stats
from appliance.status import read_status, status_path
from appliance.sync.downlink import new_message
from appliance.sync.signing import public_key_text, sign

DEVICE, SCHOOL = "gate-01", "test-school"
BASE = f"edugate/{SCHOOL}/{DEVICE}"
WINDOW = 200
ZONE = ZoneInfo("Asia/Ho_Chi_Minh")


class Gate:
    """A configured gate: its files, its daemon and what the hub stand-in received from it."""

    def __init__(
        self, tmp_path: Path, broker: Broker, pki: Pki, hub_key: Ed25519PrivateKey | None = None, **sync: Any
    ) -> None:
        self.dir = tmp_path
        self.journal = tmp_path / "journal.db"
        self.lane = tmp_path / "lane.sock"
        self.hub_key = hub_key or Ed25519PrivateKey.generate()
        self.face_key = tmp_path / "templates.key"  # seals templates in the journal; its X25519 twin in transit
        password = tmp_path / "mqtt.password"
        password.write_text(sync.pop("password", BROKER_USERS[DEVICE]) + "\n")
        password.chmod(0o600)
        settings: dict[str, Any] = {
            "enabled": True,
            "host": broker.host,
            "port": broker.port,
            "tls": True,
            "ca_file": str(pki.ca),
            "username": DEVICE,
            "password_file": str(password),
            "keepalive": 2,
            "status_interval": 1,
            "backoff_min": 0.2,
            "backoff_max": 1.0,
            "window": WINDOW,
            "hub_public_key": public_key_text(self.hub_key.public_key()),
        }
        settings.update(sync)
        self.config = write_config(
            tmp_path / "gate.toml",
            self.journal,
            [{"name": "lane", "type": "socket", "path": str(self.lane)}],
            sync=settings,
            vision={"key_file": str(self.face_key)},
        )
        self.config.write_text(self.config.read_text().replace('id = "gate-test"', f'id = "{DEVICE}"'))
        self.config.write_text(self.config.read_text().replace('school = "test-school"', f'school = "{SCHOOL}"'))
        self.daemon: DaemonProcess | None = None

    def start(self) -> DaemonProcess:
        self.daemon = DaemonProcess(self.config).start()
        return self.daemon

    def prefill(self, count: int) -> None:
        """``count`` journalled events, as if the gate had been offline for a long time."""
        database = open_database(self.journal, writer=True)
        journal = EventJournal(database, DEVICE)
        for i in range(count):
            ts = datetime.now(ZONE).isoformat(timespec="seconds")
            journal.append(EventDraft(Kind.UNKNOWN_CARD, ts, True, Method.CARD, reader="lane", card_uid=f"{i:08X}"))
        database.close()

    def stats(self) -> Any:
        database = open_database(self.journal, readonly=True)
        try:
            return journal_stats(database)
        finally:
            database.close()

    def sync_status(self) -> dict[str, Any]:
        status = read_status(status_path(self.journal)) or {}
        return status.get("sync") or {}

    def wait(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out: {what}; sync status {self.sync_status()}")
            time.sleep(0.05)

    def command(self, hub: MqttPeer, kind: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        message = sign(self.hub_key, new_message(kind, SCHOOL, DEVICE, body, **kw))
        hub.publish(f"{BASE}/downlink/{kind.split('.')[0]}", json.dumps(message).encode())
        return message

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()


@pytest.fixture
def gate_factory(tmp_path: Path, pki: Pki) -> Any:
    made: list[Gate] = []

    def make(broker: Broker, name: str = "gate", hub_key: Ed25519PrivateKey | None = None, **sync: Any) -> Gate:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)  # a test may have registered the gate's key file at the hub first
        gate = Gate(folder, broker, pki, hub_key, **sync)
        made.append(gate)
        return gate

    yield make
    for gate in made:
        gate.stop()
