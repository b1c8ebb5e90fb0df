"""Gate daemon -> Mosquitto -> `edugate hub run`, all real, through a broker crash and a hub crash.

What a school relies on: every check-in a gate journalled ends up in the hub's database exactly
once, without anyone stepping in, whatever crashed on the way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon_harness import send_taps
from hub_support import HubProcess, hub_mqtt, register_gate, write_hub_config
from mqtt_broker import Broker, Pki
from sync_support import SCHOOL

from appliance.config import DatabaseConfig
from appliance.hub.store import Store
from appliance.sync.signing import generate_private_key

DEVICE = "gate-01"


def hub_config(tmp_path: Path, broker: Broker, pki: Pki, key_file: Path, **signing: Any) -> Path:
    """hub.toml on a SQLite database where gate-01 is registered with the keys of the gate the test will make."""
    store = Store(DatabaseConfig(url=f"sqlite:///{tmp_path / 'hub.db'}"))
    store.migrate()
    conn = store.connect()
    register_gate(conn, SCHOOL, DEVICE, tmp_path / "gate" / "templates.key")  # gate_factory's gate folder
    conn.close()
    return write_hub_config(
        tmp_path / "hub.toml",
        {
            "hub": {"id": "hub-test"},
            "database": {"url": f"sqlite:///{tmp_path / 'hub.db'}"},
            "mqtt": hub_mqtt(tmp_path, broker, pki),
            "signing": {"key_file": str(key_file), **signing},
            "api": {"enabled": False},
        },
    )


def hub_counts(tmp_path: Path) -> tuple[int, int, int]:
    """(events, distinct seqs of gate-01, duplicates by id is impossible: the id is the key)."""
    conn = Store(DatabaseConfig(url=f"sqlite:///{tmp_path / 'hub.db'}")).connect()
    try:
        events = conn.one("SELECT COUNT(*) FROM events")[0]
        seqs = conn.one("SELECT COUNT(DISTINCT seq) FROM events WHERE device = ?", [DEVICE])[0]
        stored_max = conn.one("SELECT COALESCE(MAX(seq), 0) FROM events")[0]
        return events, seqs, stored_max
    finally:
        conn.close()


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        time.sleep(0.1)


def test_taps_reach_the_hub_once(tmp_path: Path, broker: Broker, pki: Pki, gate_factory: Any) -> None:
    key_file = tmp_path / "hub.key"
    key = generate_private_key(key_file)
    hub = HubProcess(hub_config(tmp_path, broker, pki, key_file)).start(wait_for="sync: connected")
    try:
        gate = gate_factory(broker, hub_key=key)
        gate.start()
        send_taps(gate.lane, [f"0A{i:06X}" for i in range(20)])
        wait(lambda: hub_counts(tmp_path)[:2] == (20, 20), 20, "20 events at the hub")
        gate.wait(lambda: gate.stats().unsynced == 0, 10, "gate marked them synced")
        conn = Store(DatabaseConfig(url=f"sqlite:///{tmp_path / 'hub.db'}")).connect()
        wait(lambda: conn.one("SELECT online FROM devices WHERE device = ?", [DEVICE]) == (1,), 10, "status")
        assert conn.one("SELECT contiguous, highest, gap_since FROM streams WHERE device = ?", [DEVICE]) == (
            20,
            20,
            None,
        )
        conn.close()
    finally:
        hub.stop()


def test_a_broker_crash_is_healed_by_the_hub_asking_for_the_gap(
    tmp_path: Path, broker_factory: Any, pki: Pki, gate_factory: Any
) -> None:
    total = 10_000
    broker = broker_factory(settings={"autosave_interval": "1"}, verbose=False)
    key_file = tmp_path / "hub.key"
    key = generate_private_key(key_file)
    hub = HubProcess(hub_config(tmp_path, broker, pki, key_file, resync_after=1)).start(wait_for="sync: connected")
    try:
        time.sleep(1.5)  # the hub's session is in the broker's last autosave, as in a running school
        gate = gate_factory(broker, hub_key=key)
        gate.prefill(total)
        gate.start()
        wait(lambda: hub_counts(tmp_path)[0] >= 2_000, 60, "the drain under way")
        broker.kill()
        time.sleep(0.5)
        broker.start()
        wait(lambda: hub_counts(tmp_path)[:2] == (total, total), 180, "every event at the hub, exactly once")
        assert hub_counts(tmp_path)[2] == total
        asked = [line for line in hub.stderr_lines if "asked the gate to send them again" in line]
        print(f"hub asked for missing ranges {len(asked)} time(s)")
    finally:
        hub.stop()


def test_hub_killed_mid_ingest_loses_nothing(tmp_path: Path, broker: Broker, pki: Pki, gate_factory: Any) -> None:
    total = 3_000
    key_file = tmp_path / "hub.key"
    key = generate_private_key(key_file)
    config = hub_config(tmp_path, broker, pki, key_file)
    hub = HubProcess(config).start(wait_for="sync: connected")
    gate = gate_factory(broker, hub_key=key)
    gate.prefill(total)
    gate.start()
    try:
        wait(lambda: hub_counts(tmp_path)[0] >= 300, 60, "ingest under way")
        hub.kill()
        gate.wait(lambda: gate.stats().unsynced == 0, 60, "the broker queued the rest for the hub's session")
        hub = HubProcess(config).start(wait_for="sync: connected")
        wait(lambda: hub_counts(tmp_path)[:2] == (total, total), 60, "every event once after the restart")
    finally:
        hub.stop()


def test_without_a_signing_key_the_hub_still_ingests_and_says_why_it_cannot_resync(
    tmp_path: Path, broker: Broker, pki: Pki, gate_factory: Any
) -> None:
    hub = HubProcess(hub_config(tmp_path, broker, pki, tmp_path / "missing.key")).start(wait_for="sync: connected")
    try:
        assert any("missing.key: cannot read the signing key" in line for line in hub.stderr_lines)
        gate = gate_factory(broker, hub_key=Ed25519PrivateKey.generate())
        gate.start()
        send_taps(gate.lane, ["0B000001"])
        wait(lambda: hub_counts(tmp_path)[0] == 1, 20, "ingested")
    finally:
        hub.stop()
