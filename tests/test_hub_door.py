"""The MQTT door, all real: the production Mosquitto config and ACL, `edugate hub run` as a process, its database on
SQLite and PostgreSQL. One gate login floods the hub, or sends 50 MB, or the hub runs out of file handles: another
gate's check-in is still stored, the hub's storage and log do not grow with the flood, and nothing valid is lost.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hub_support import HubProcess, gate_event, hub_mqtt, payload, register_gate, write_hub_config
from mqtt_broker import BROKER_USERS, Broker, MqttPeer, Pki, Subscriber

from appliance.hub.ingest import KEPT_CHARS, KEPT_PER_HOUR, LOG_PER_MINUTE
from appliance.hub.store import Connection, Store
from appliance.sync.downlink import new_message
from appliance.sync.sealed_transport import public_text, seal, sealed_context
from appliance.sync.signing import sign

SCHOOL = "thcs-a"
JUNK = 20_000


def events_topic(device: str) -> str:
    return f"edugate/{SCHOOL}/{device}/events"


def start_hub(tmp_path: Path, store: Store, broker: Broker, pki: Pki, *devices: str) -> HubProcess:
    """`edugate hub run` on the broker, with ``devices`` registered as IT does it."""
    conn = store.connect()
    try:
        for device in devices:
            register_gate(conn, SCHOOL, device, key_file=tmp_path / f"{device}.key")
    finally:
        conn.close()
    config = write_hub_config(
        tmp_path / "hub.toml",
        {
            "hub": {"id": "hub-test"},
            "database": store.config.model_dump(mode="json", exclude_none=True),
            "mqtt": hub_mqtt(tmp_path, broker, pki),
            "signing": {"key_file": str(tmp_path / "no-signing.key")},
            "api": {"enabled": False},
        },
    )
    return HubProcess(config).start(wait_for="sync: connected")


def wait(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.1)


def one(conn: Connection, sql: str, params: list[Any] | None = None) -> Any:
    row = conn.one(sql, params or [])
    return row[0] if row is not None else None


def gate_login(broker: Broker, device: str) -> MqttPeer:
    peer = MqttPeer(broker, device, BROKER_USERS[device])
    peer.client.max_inflight_messages_set(100)  # the broker's receive maximum: as fast as it takes them
    peer.connect()
    return peer


def junk(n: int) -> bytes:
    """What one stolen login sent: garbage, over-sized messages and JSON that is no event, about 10 KB each."""
    if n % 3 == 0:
        return os.urandom(10_000)
    if n % 3 == 1:
        return b"x" * 20_000
    return json.dumps({"schema": 1, "seq": n, "junk": "j" * 10_000}).encode()


def test_a_flood_from_one_login_neither_buries_another_gates_check_in_nor_grows_the_hub(
    tmp_path: Path, hub_store: Store, broker: Broker, pki: Pki
) -> None:
    """20,000 junk messages from gate-01's login (one once took +195 MB in rejected_messages, 20,000 log lines and
    delayed a good event 7.9 s), then gate-02's check-in: stored, with the refusals counted and not kept."""
    hub = start_hub(tmp_path, hub_store, broker, pki, "gate-01", "gate-02")
    thief = gate_login(broker, "gate-01")
    honest = gate_login(broker, "gate-02")
    conn = hub_store.connect()
    try:
        flood_start = time.monotonic()
        for chunk in range(0, JUNK, 1_000):  # as fast as the broker takes them, without 200 MB queued in paho
            sent = [thief.client.publish(events_topic("gate-01"), junk(n), qos=1) for n in range(chunk, chunk + 1_000)]
            for info in sent:
                info.wait_for_publish(60)
        good = gate_event("gate-02", 1)
        assert not honest.publish(events_topic("gate-02"), payload(good)).is_failure
        behind_the_flood = time.monotonic()
        # The broker hands the hub its queue in order: once this event is stored, so is every refusal before it.
        wait(lambda: one(conn, "SELECT COUNT(*) FROM events WHERE id = ?", [good["id"]]) == 1, "gate-02's event")
        stored = time.monotonic()
        print(
            f"{JUNK} junk messages published in {behind_the_flood - flood_start:.1f} s; gate-02's event published "
            f"behind them stored {stored - behind_the_flood:.1f} s later"
        )
        assert stored - behind_the_flood < 30  # generous for a busy 2-core machine: 0.3-1.1 s here, 4.3 s before
        assert one(conn, "SELECT COUNT(*) FROM events") == 1
        kept = conn.all("SELECT payload FROM rejected_messages")
        assert len(kept) <= 2 * KEPT_PER_HOUR  # per hour: twice only if the test ran across the hour's turn
        assert sum(len(p) for (p,) in kept) <= 2 * KEPT_PER_HOUR * KEPT_CHARS
        assert one(conn, "SELECT refused FROM rejected_counts WHERE device = 'gate-01'") == JUNK
        wait(lambda: any("more messages from gate-01 refused" in line for line in hub.stderr_lines), "the summary")
        refusal_lines = [line for line in hub.stderr_lines if "refused" in line]
        minutes = 1 + int((time.monotonic() - behind_the_flood) // 60)  # a flood longer than a minute logs again
        assert len(refusal_lines) <= minutes * (LOG_PER_MINUTE + 2), refusal_lines
    finally:
        conn.close()
        thief.close()
        honest.close()
        hub.stop()


def test_out_of_file_handles_the_hub_stores_every_valid_event_it_acknowledges(
    tmp_path: Path, hub_store: Store, broker: Broker, pki: Pki
) -> None:
    """The running hub's file handle limit lowered to what it holds (as when something leaks them): 50 valid events
    are stored, none refused. Before, the first event read the schema from disk, failed, and all 50 were kept as
    "cannot be stored: OSError" and acknowledged: the broker never sent them again."""
    hub = start_hub(tmp_path, hub_store, broker, pki, "gate-01")
    assert hub.proc is not None
    gate = gate_login(broker, "gate-01")
    conn = hub_store.connect()
    soft, hard = resource.prlimit(hub.proc.pid, resource.RLIMIT_NOFILE)
    try:
        held = {int(fd) for fd in os.listdir(f"/proc/{hub.proc.pid}/fd")}
        lowest_free = next(fd for fd in range(len(held) + 1) if fd not in held)
        resource.prlimit(hub.proc.pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
        for seq in range(1, 51):
            assert not gate.publish(events_topic("gate-01"), payload(gate_event("gate-01", seq))).is_failure
        wait(
            lambda: one(conn, "SELECT (SELECT COUNT(*) FROM events) + (SELECT COUNT(*) FROM rejected_messages)") == 50,
            "50 events answered",
        )
        refused = conn.all("SELECT reason FROM rejected_messages")
        assert refused == [], refused
        assert one(conn, "SELECT COUNT(*) FROM events") == 50
    finally:
        resource.prlimit(hub.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
        conn.close()
        gate.close()
        hub.stop()


def school_templates(hub_key: Ed25519PrivateKey, gate_key: str, people: int, per_person: int) -> bytes:
    """A templates message as the hub publishes it: SFace-sized templates sealed to the gate's key, signed."""
    vectors = np.random.default_rng(3).standard_normal((per_person, 128)).astype("<f4")
    texts = [base64.b64encode(v.tobytes()).decode("ascii") for v in vectors]
    body: dict[str, Any] = {"model": "sface-2021dec", "remove": []}
    message = new_message("templates", SCHOOL, "gate-01", body, version=1795437814)
    plain = json.dumps({f"HS{i:05d}": texts for i in range(people)}, separators=(",", ":")).encode()
    message["body"] = {**body, "sealed": seal(gate_key, plain, sealed_context(message))}
    return json.dumps(sign(hub_key, message), separators=(",", ":")).encode()


def test_the_broker_takes_a_schools_templates_and_drops_a_50_mb_event(
    tmp_path: Path, hub_store: Store, broker: Broker, pki: Pki
) -> None:
    """The shipped size limit (max_packet_size, one for the whole broker in Mosquitto 2.0) sits between the two: the
    hub's retained templates for 3,200 people with 5 SFace templates each reach the gate whole; a gate login's
    schema-valid event with a 50 MB field ends its connection and never reaches the hub's database."""
    hub = start_hub(tmp_path, hub_store, broker, pki, "gate-01")
    conn = hub_store.connect()
    publisher = MqttPeer(broker, "hub", BROKER_USERS["hub"])
    downlink = f"edugate/{SCHOOL}/gate-01/downlink/templates"
    receiver = Subscriber(broker, [downlink], username="gate-01", password=BROKER_USERS["gate-01"])
    gate = gate_login(broker, "gate-01")
    try:
        publisher.connect()
        assert publisher.connack_properties is not None
        limit = publisher.connack_properties.MaximumPacketSize
        assert limit == 33_619_968
        message = school_templates(Ed25519PrivateKey.generate(), public_text(X25519PrivateKey.generate()), 3_200, 5)
        assert 13_000_000 < len(message) < limit
        assert not publisher.publish(downlink, message, retain=True, timeout=60).is_failure
        received = receiver.wait_for(1, timeout=60)
        assert received[0].payload == message

        huge = gate_event("gate-01", 1, kind="rejected", person="HS001", role="student", reason="x" * 50_000_000)
        gate.client.publish(events_topic("gate-01"), payload(huge), qos=1)
        gate.wait_disconnected(30)
        again = gate_login(broker, "gate-01")
        try:
            good = gate_event("gate-01", 1)
            assert not again.publish(events_topic("gate-01"), payload(good)).is_failure
            wait(lambda: one(conn, "SELECT COUNT(*) FROM events") == 1, "the good event")
        finally:
            again.close()
        assert conn.all("SELECT id FROM events") == [(good["id"],)]
        assert one(conn, "SELECT COALESCE(MAX(LENGTH(payload)), 0) FROM rejected_messages") <= KEPT_CHARS
    finally:
        conn.close()
        gate.close()
        receiver.close()
        publisher.close()
        hub.stop()


def test_the_broker_keeps_a_message_too_big_for_the_hub_out_of_its_memory(
    tmp_path: Path, hub_store: Store, broker: Broker, pki: Pki
) -> None:
    """The hub announces its maximum packet size when it connects: a gate login's 1 MB event (under the broker's
    own limit, far over what an event may be) is discarded by the broker for the hub; it never reaches the hub's
    memory, so it is not even refused there, and the gate's next check-in is stored."""
    hub = start_hub(tmp_path, hub_store, broker, pki, "gate-01")
    conn = hub_store.connect()
    gate = gate_login(broker, "gate-01")
    try:
        big = gate_event("gate-01", 1, kind="rejected", person="HS001", role="student", reason="x" * 1_000_000)
        assert not gate.publish(events_topic("gate-01"), payload(big)).is_failure  # the broker took it
        good = gate_event("gate-01", 2)
        assert not gate.publish(events_topic("gate-01"), payload(good)).is_failure
        wait(lambda: one(conn, "SELECT COUNT(*) FROM events") == 1, "the good event")
        assert conn.all("SELECT id FROM events") == [(good["id"],)]
        assert one(conn, "SELECT COALESCE(SUM(refused), 0) FROM rejected_counts") == 0
    finally:
        conn.close()
        gate.close()
        hub.stop()
