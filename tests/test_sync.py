"""The gate daemon syncing to a real Mosquitto (TLS, passwords, the production ACL) through faults.

Every event journalled must reach the hub, in seq order, whatever the broker, the network or the
gate process does; duplicates are allowed only for what was in flight. Every published message is
checked against the JSON Schemas kept in the repository.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jsonschema
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon_harness import DaemonProcess, send_taps, write_config
from mqtt_broker import BROKER_USERS, Broker, MqttPeer, Pki, Received, Subscriber, TcpProxy
from sync_support import BASE, DEVICE, SCHOOL, WINDOW

from appliance.events import event_schema
from appliance.journal import open_database
from appliance.journal.events import journal_stats
from appliance.journal.roster_store import RosterStore
from appliance.sync.downlink import new_message
from appliance.sync.signing import sign

SCHEMAS = Path(__file__).resolve().parent.parent / "appliance" / "schema"
STATUS_SCHEMA = json.loads((SCHEMAS / "status.schema.json").read_text())
RESULT_SCHEMA = json.loads((SCHEMAS / "result.schema.json").read_text())
# A plain (not shared) subscription: Mosquitto queues it in a persistent session while the hub is away.
HUB = ("edugate/+/+/events", "edugate/+/+/status", "edugate/+/+/result")
ZONE = ZoneInfo("Asia/Ho_Chi_Minh")


def events_of(hub: Subscriber) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in hub.messages("/events")]


def seqs_of(hub: Subscriber) -> list[int]:
    return [e["seq"] for e in events_of(hub)]


def wait_all(hub: Subscriber, count: int, timeout: float) -> list[int]:
    """Wait until ``count`` distinct seqs arrived; each message is parsed once, not on every look."""
    seen: set[int] = set()
    looked = 0

    def ready(messages: list[Received]) -> bool:
        nonlocal looked
        for message in messages[looked:]:
            if message.topic.endswith("/events"):
                seen.add(json.loads(message.payload)["seq"])
        looked = len(messages)
        return len(seen) >= count

    hub.wait_for(ready, timeout)
    return seqs_of(hub)


def settled(hub: Subscriber, quiet: float = 1.0, timeout: float = 30.0) -> None:
    """Wait until no event has arrived for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    count = -1
    while time.monotonic() < deadline:
        now = len(hub.messages("/events"))
        if now == count:
            return
        count = now
        time.sleep(quiet)


def unsynced_seqs(journal: Path) -> set[int]:
    database = open_database(journal, readonly=True)
    try:
        return {row[0] for row in database.conn.execute("SELECT seq FROM events WHERE synced_at IS NULL")}
    finally:
        database.close()


def assert_valid(hub: Subscriber) -> None:
    for event in events_of(hub):
        jsonschema.validate(event, event_schema())
    for message in hub.messages("/status"):
        jsonschema.validate(json.loads(message.payload), STATUS_SCHEMA)
    for message in hub.messages("/result"):
        jsonschema.validate(json.loads(message.payload), RESULT_SCHEMA)


def in_order_per_delivery(seqs: list[int]) -> bool:
    """Seq order holds except where a resend restarts from an earlier seq (a duplicate run)."""
    seen: set[int] = set()
    highest = 0
    for seq in seqs:
        if seq not in seen and seq < highest:
            return False  # a new event overtook an older one that had not arrived yet
        seen.add(seq)
        highest = max(highest, seq)
    return True


def test_taps_made_offline_arrive_in_order_when_the_broker_returns(
    broker: Broker, subscriber_factory: Any, gate_factory: Any
) -> None:
    hub = subscriber_factory(HUB, persistent=True, session_expiry=600)
    gate = gate_factory(broker)
    broker.stop()  # clean stop: the hub's session is saved and waits for it
    daemon = gate.start()
    send_taps(gate.lane, [f"0A{i:06X}" for i in range(30)])
    gate.wait(lambda: gate.stats().events == 30, 20, "30 events journalled offline")
    gate.wait(lambda: "connection refused" in (gate.sync_status().get("last_error") or ""), 15, "link reported down")
    assert gate.sync_status()["state"] in ("offline", "connecting")
    assert gate.stats().unsynced == 30

    broker.start()
    seqs = wait_all(hub, 30, 30)
    assert seqs[:30] == list(range(1, 31)), seqs
    gate.wait(lambda: gate.stats().unsynced == 0, 10, "all marked synced")
    hub.wait_for(lambda _: any(json.loads(m.payload).get("backlog") == 0 for m in hub.messages("/status")), 10)
    assert_valid(hub)
    assert daemon.proc is not None and daemon.proc.poll() is None


def missing(seqs: list[int], total: int) -> list[tuple[int, int]]:
    """Ranges of seqs the hub has not received, as a hub computes them from its per-device record."""
    have = set(seqs)
    ranges: list[tuple[int, int]] = []
    for seq in range(1, total + 1):
        if seq in have:
            continue
        if ranges and ranges[-1][1] == seq - 1:
            ranges[-1] = (ranges[-1][0], seq)
        else:
            ranges.append((seq, seq))
    return ranges


def test_broker_killed_mid_drain_loses_nothing(broker_factory: Any, subscriber_factory: Any, gate_factory: Any) -> None:
    """A broker crash can drop what it had acknowledged but not yet delivered or saved; the hub sees the
    gap in seq and asks for exactly that range again, so in the end nothing is lost."""
    total = 10_000
    # Production autosaves every 60 s, long after the hub subscribed; 1 s gives the same state here.
    broker = broker_factory(settings={"autosave_interval": "1"}, verbose=False)
    hub = subscriber_factory(HUB, broker=broker, persistent=True, session_expiry=600)
    time.sleep(1.5)  # the hub's session is in the broker's last autosave, as it would be in a school
    gate = gate_factory(broker)
    gate.prefill(total)
    gate.start()
    hub.wait_for(lambda _: len(hub.messages("/events")) >= 2_000, 60)
    broker.kill()
    time.sleep(0.5)  # acknowledgements that arrived before the kill are marked by now; no new ones can come
    unsynced = sorted(unsynced_seqs(gate.journal))
    window, unsent = set(unsynced[:WINDOW]), set(unsynced[WINDOW:])  # sent in seq order, at most WINDOW unacked
    broker.start()
    gate.wait(lambda: gate.stats().unsynced == 0, 120, "every event acknowledged by the broker")
    settled(hub)  # what the broker still had on its way to the hub is in: the rest was lost in the crash
    seqs = seqs_of(hub)
    requested: set[int] = set()
    sender = MqttPeer(broker, "hub", BROKER_USERS["hub"])
    sender.connect()
    try:
        for first, last in missing(seqs, total):
            requested |= set(range(first, last + 1))
            gate.command(sender, "command", {"name": "resync", "from_seq": first, "to_seq": last})
    finally:
        sender.close()
    seqs = wait_all(hub, total, 60)
    assert set(seqs) == set(range(1, total + 1))
    # Duplicates come from three places: the gate resending its unacknowledged window (bounded by the window),
    # the hub's resync requests, and the broker itself, which restarts from its last autosave and so delivers
    # again what the hub's queue held then (the hub stores each event once by id). Only the first is the gate's.
    extra = Counter(seqs)
    gate_resent = sum(extra[seq] - 1 for seq in window - requested)
    assert gate_resent <= 2 * WINDOW, f"{gate_resent} duplicates: more than what was in flight"
    assert all(extra[seq] == 1 for seq in unsent - requested), "an event sent twice that was not in flight"
    replayed = sum(n - 1 for seq, n in extra.items() if seq not in window | unsent | requested)
    print(
        f"broker crash: {len(requested)} acknowledged events resent on the hub's request, {gate_resent} duplicates "
        f"of the window in flight, {replayed} delivered again by the broker from its autosave"
    )
    gate.wait(lambda: gate.stats().unsynced == 0, 20, "all marked synced")
    assert_valid(hub)


def test_gate_killed_mid_drain_resumes_where_it_stopped(
    broker: Broker, subscriber_factory: Any, gate_factory: Any
) -> None:
    total = 10_000
    hub = subscriber_factory(HUB, persistent=True, session_expiry=600)
    gate = gate_factory(broker)
    gate.prefill(total)
    daemon = gate.start()
    hub.wait_for(lambda _: len(hub.messages("/events")) >= 3_000, 60)
    daemon.kill()
    synced_before_restart = total - gate.stats().unsynced
    assert 0 < synced_before_restart < total
    gate.start()
    seqs = wait_all(hub, total, 120)
    assert set(seqs) == set(range(1, total + 1))
    duplicates = sum(n - 1 for n in Counter(seqs).values())
    assert duplicates <= 2 * WINDOW, f"{duplicates} duplicates after a restart"
    assert in_order_per_delivery(seqs)
    gate.wait(lambda: gate.stats().unsynced == 0, 20, "all marked synced")


def test_half_open_network_is_noticed_by_keepalive_and_recovered(
    broker: Broker, subscriber_factory: Any, gate_factory: Any
) -> None:
    hub = subscriber_factory(HUB, persistent=True, session_expiry=600)
    proxy = TcpProxy(broker.host, broker.port)
    try:
        host, port = proxy.address
        gate = gate_factory(broker, host=host, port=port)
        daemon = gate.start()
        send_taps(gate.lane, [f"0B{i:06X}" for i in range(5)])
        wait_all(hub, 5, 20)
        gate.wait(lambda: gate.sync_status().get("state") == "online", 10, "online")

        proxy.blackhole()  # packets vanish; no FIN, no RST: only keepalive can tell
        send_taps(gate.lane, [f"0C{i:06X}" for i in range(5)])
        gate.wait(lambda: gate.stats().events == 10, 10, "taps journalled during the partition")
        gate.wait(lambda: gate.sync_status().get("state") != "online", 15, "partition noticed")
        assert gate.stats().unsynced >= 5

        proxy.resume()
        seqs = wait_all(hub, 10, 40)
        assert set(seqs) == set(range(1, 11)) and in_order_per_delivery(seqs)
        gate.wait(lambda: gate.sync_status().get("connects", 0) >= 2, 10, "reconnected")
        assert daemon.proc is not None and daemon.proc.poll() is None  # no restart was needed
    finally:
        proxy.close()


@pytest.mark.parametrize("fault", ["wrong password", "wrong CA", "expired certificate"])
def test_bad_credentials_give_a_clear_status_and_the_journal_keeps_buffering(
    fault: str, broker_factory: Any, pki: Pki, gate_factory: Any
) -> None:
    if fault == "expired certificate":
        broker = broker_factory(require_certificate=True)
        cert, key = pki.client_cert(DEVICE, expired=True)
        gate = gate_factory(broker, cert_file=str(cert), key_file=str(key))
        expected = "expired"
    elif fault == "wrong CA":
        broker = broker_factory()
        gate = gate_factory(broker, ca_file=str(pki.wrong_ca))
        expected = "not trusted by sync.ca_file"
    else:
        broker = broker_factory()
        gate = gate_factory(broker, password="not-the-password")
        expected = "refused the login"
    daemon = gate.start()
    send_taps(gate.lane, [f"0D{i:06X}" for i in range(3)])
    gate.wait(lambda: gate.stats().events == 3, 10, "taps journalled")
    gate.wait(lambda: expected in (gate.sync_status().get("last_error") or ""), 15, f"status says {expected!r}")
    assert gate.sync_status()["state"] != "online"
    assert gate.stats().unsynced == 3
    time.sleep(1.5)  # several retries
    errors = [line for line in daemon.stderr_lines if expected in line]
    assert len(errors) == 1, "the cause is logged once, not at every retry"
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_status_is_retained_and_the_last_will_says_offline(
    broker: Broker, subscriber_factory: Any, gate_factory: Any
) -> None:
    gate = gate_factory(broker)
    daemon = gate.start()
    gate.wait(lambda: gate.sync_status().get("state") == "online", 15, "online")
    late = subscriber_factory(topics=[f"{BASE}/status"])  # subscribes after the fact: gets the retained one
    late.wait_for(lambda m: any(json.loads(x.payload)["online"] for x in m), 5)
    daemon.kill()
    late.wait_for(lambda m: json.loads(m[-1].payload).get("reason") == "connection lost", 15)
    assert_valid(late)


def test_downlink_roster_delta_applies_and_forgeries_change_nothing(
    broker: Broker, subscriber_factory: Any, gate_factory: Any
) -> None:
    hub = subscriber_factory(HUB)
    sender = MqttPeer(broker, "hub", BROKER_USERS["hub"])
    sender.connect()
    try:
        gate = gate_factory(broker)
        gate.start()
        gate.wait(lambda: gate.sync_status().get("state") == "online", 15, "online")
        student = {
            "id": "HS1",
            "full_name": "Phạm Thu Hà",
            "role": "student",
            "class_name": "7B",
            "cards": ["04AABBCC"],
        }
        snapshot = gate.command(sender, "roster.snapshot", {"people": [student]}, version=1)
        hub.wait_for(lambda _: any(json.loads(m.payload)["ref"] == snapshot["nonce"] for m in hub.messages("/result")))

        forged = new_message("roster.delta", SCHOOL, DEVICE, {"deactivate": ["HS1"]}, version=2, base_version=1)
        forged = sign(Ed25519PrivateKey.generate(), forged)
        sender.publish(f"{BASE}/downlink/roster", json.dumps(forged).encode())
        stale = gate.command(sender, "roster.snapshot", {"people": []}, version=1)
        bad = gate.command(sender, "roster.delta", {"upsert": [{"id": "HS2"}]}, version=2, base_version=1)
        hub.wait_for(lambda _: len(hub.messages("/result")) >= 4, 10)
        results = {json.loads(m.payload)["ref"]: json.loads(m.payload) for m in hub.messages("/result")}
        assert results[snapshot["nonce"]]["ok"]
        assert not results[forged["nonce"]]["ok"] and "signature" in results[forged["nonce"]]["reason"]
        assert not results[stale["nonce"]]["ok"] and "stale" in results[stale["nonce"]]["reason"]
        assert not results[bad["nonce"]]["ok"] and "invalid" in results[bad["nonce"]]["reason"]

        database = open_database(gate.journal, readonly=True)
        people = RosterStore(database).all()
        database.close()
        assert [(p.id, p.active, p.cards) for p in people] == [("HS1", True, ("04AABBCC",))]

        send_taps(gate.lane, ["04AABBCC"])  # the card the hub sent now checks the student in
        hub.wait_for(lambda _: any(e["person"] == "HS1" for e in events_of(hub)), 10)
        assert_valid(hub)
    finally:
        sender.close()


def test_hub_config_change_applies_live_and_survives_a_restart(
    broker: Broker, subscriber_factory: Any, gate_factory: Any
) -> None:
    hub = subscriber_factory(HUB)
    sender = MqttPeer(broker, "hub", BROKER_USERS["hub"])
    sender.connect()
    try:
        gate = gate_factory(broker)
        daemon = gate.start()
        gate.wait(lambda: gate.sync_status().get("state") == "online", 15, "online")
        send_taps(gate.lane, ["0E000001", "0E000001"])  # debounce_seconds = 30 in gate.toml: one event
        gate.wait(lambda: gate.stats().events == 1 and gate.stats().unsynced == 0, 10, "one event")
        policy = {
            "debounce_seconds": 0,
            "student": {"arrival_window": ["00:00", "23:59"], "departure_window": ["00:00", "23:59"], "start": "23:59"},
            "staff": {"arrival_window": ["00:00", "23:59"], "departure_window": ["00:00", "23:59"], "start": "23:59"},
        }
        change = gate.command(sender, "config", {"policy": policy}, version=1)
        hub.wait_for(lambda _: any(json.loads(m.payload)["ref"] == change["nonce"] for m in hub.messages("/result")))
        send_taps(gate.lane, ["0E000002", "0E000002"])
        gate.wait(lambda: gate.stats().events == 3, 10, "no debounce any more: both taps recorded")

        daemon.stop()
        gate.start()  # the hub's section is laid over gate.toml again
        send_taps(gate.lane, ["0E000003", "0E000003"])
        gate.wait(lambda: gate.stats().events == 5, 10, "still no debounce after a restart")
    finally:
        sender.close()


def test_sighup_rereads_gate_toml_without_a_restart(tmp_path: Path) -> None:
    lane = tmp_path / "lane.sock"
    config = write_config(
        tmp_path / "gate.toml", tmp_path / "journal.db", [{"name": "lane", "type": "socket", "path": str(lane)}]
    )
    daemon = DaemonProcess(config).start()
    try:
        send_taps(lane, ["0F000001", "0F000001"])
        database_path = tmp_path / "journal.db"

        def events() -> int:
            database = open_database(database_path, readonly=True)
            try:
                return journal_stats(database).events
            finally:
                database.close()

        deadline = time.monotonic() + 10
        while events() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        config.write_text(config.read_text().replace("debounce_seconds = 30", "debounce_seconds = 0"))
        assert daemon.proc is not None
        pid = daemon.proc.pid
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for(lambda: any("SIGHUP: policy and feedback reloaded" in line for line in daemon.stderr_lines), 10)
        send_taps(lane, ["0F000002", "0F000002"])
        deadline = time.monotonic() + 10
        while events() < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert events() == 3
        assert daemon.proc.pid == pid and daemon.proc.poll() is None
        config.write_text(config.read_text().replace("debounce_seconds = 0", "debounce_seconds = -1"))
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for(
            lambda: any("reload refused, keeping the running config" in line for line in daemon.stderr_lines), 10
        )
        assert daemon.proc.poll() is None
    finally:
        daemon.stop()


def test_events_nobody_subscribed_to_stay_in_the_journal_until_the_hub_is_there(
    broker: Broker, subscriber_factory: Any, gate_factory: Any
) -> None:
    """Mosquitto answers PUBACK 16 "no matching subscribers" and drops the message: not delivered."""
    gate = gate_factory(broker)
    gate.start()
    send_taps(gate.lane, [f"10{i:06X}" for i in range(5)])
    gate.wait(lambda: "hub is not subscribed" in (gate.sync_status().get("uplink_error") or ""), 15, "told why")
    assert gate.stats().unsynced == 5
    hub = subscriber_factory(HUB, persistent=True, session_expiry=600)
    seqs = wait_all(hub, 5, 20)
    assert sorted(set(seqs)) == [1, 2, 3, 4, 5]
    gate.wait(lambda: gate.stats().unsynced == 0, 10, "synced once the hub is subscribed")
    gate.wait(lambda: not gate.sync_status().get("uplink_error"), 10, "error cleared")


def test_events_the_broker_acl_refuses_stay_in_the_journal_and_status_says_why(
    broker: Broker, subscriber_factory: Any, gate_factory: Any
) -> None:
    """A gate provisioned with the wrong topic prefix: the ACL refuses its events (PUBACK 135). They are not
    marked synced, status names the ACL, and once IT fixes gate.toml they all arrive."""
    hub = subscriber_factory(HUB, persistent=True, session_expiry=600)
    gate = gate_factory(broker, topic_prefix="edugate-typo")
    gate.start()
    send_taps(gate.lane, [f"11{i:06X}" for i in range(3)])
    gate.wait(lambda: "check the broker's ACL" in (gate.sync_status().get("uplink_error") or ""), 15, "told why")
    assert "Not authorized" in gate.sync_status()["uplink_error"]
    assert gate.stats().unsynced == 3 and not hub.messages()
    gate.stop()
    gate.config.write_text(gate.config.read_text().replace('topic_prefix = "edugate-typo"', 'topic_prefix = "edugate"'))
    gate.start()
    seqs = wait_all(hub, 3, 20)
    assert sorted(set(seqs)) == [1, 2, 3]
    gate.wait(lambda: gate.stats().unsynced == 0, 10, "synced once the prefix is right")
