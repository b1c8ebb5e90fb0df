"""The hub stores what gates send exactly once, acknowledges only after the commit, and sees gaps."""

from __future__ import annotations

import base64
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hub_support import RegisteredGate, gate_event, payload, register_gate, write_hub_config

from appliance.cli import main as cli_main
from appliance.config import parse_hub_config
from appliance.hub.ingest import Incoming, Ingest
from appliance.hub.resync import Resyncer, missing_ranges
from appliance.hub.service import REJECTED_RETENTION, HubService
from appliance.hub.store import Connection, Store
from appliance.sync.signing import canonical
from appliance.sync.status import online_status

TOPIC = "edugate/thcs-a/gate-01/events"


def incoming(data: dict[str, Any] | bytes, topic: str = TOPIC, acks: list[str] | None = None) -> Incoming:
    raw = data if isinstance(data, bytes) else payload(data)
    name = data["id"] if isinstance(data, dict) and "id" in data else "raw"
    return Incoming(topic, raw, (lambda: acks.append(name)) if acks is not None else (lambda: None))


@pytest.fixture(autouse=True)
def gate(request: pytest.FixtureRequest, tmp_path: Path) -> RegisteredGate | None:
    """gate-01 of thcs-a, registered at the hub as IT does at provisioning (the hub refuses unregistered gates)."""
    if "hub_conn" not in request.fixturenames:
        return None
    return register_gate(request.getfixturevalue("hub_conn"), "thcs-a", "gate-01", tmp_path / "gate-01.key")


def stream(conn: Connection, device: str = "gate-01") -> tuple[int, int, str | None]:
    row = conn.one("SELECT contiguous, highest, gap_since FROM streams WHERE device = ?", [device])
    assert row is not None
    return row  # type: ignore[return-value]


def test_each_event_is_stored_once_and_acknowledged_after_the_commit(hub_store: Store, hub_conn: Connection) -> None:
    observer = hub_store.connect()
    acks: list[str] = []
    seen_at_ack: list[int] = []

    def ack_after_commit(name: str) -> None:
        acks.append(name)
        seen_at_ack.append(observer.one("SELECT COUNT(*) FROM events")[0])  # another connection sees the rows

    events = [gate_event("gate-01", seq) for seq in range(1, 6)]
    ingest = Ingest(hub_conn, "edugate")
    batch = [Incoming(TOPIC, payload(e), lambda e=e: ack_after_commit(e["id"])) for e in events]
    ingest.store_batch([*batch, Incoming(TOPIC, payload(events[0]), lambda: ack_after_commit("dup"))])
    assert acks == [e["id"] for e in events] + ["dup"]
    assert all(count == 5 for count in seen_at_ack)
    ingest.store_batch([incoming(events[2])])  # redelivered later: still once
    assert hub_conn.one("SELECT COUNT(*) FROM events")[0] == 5
    assert ingest.stats.stored == 5 and ingest.stats.duplicates == 2
    stored = json.loads(hub_conn.one("SELECT payload FROM events WHERE seq = 3")[0])
    assert stored == events[2]
    assert stream(hub_conn)[:2] == (5, 5)
    observer.close()


def test_the_day_is_the_hubs_whatever_offset_the_gate_uses(hub_conn: Connection) -> None:
    """A gate whose clock runs in UTC stamps a 06:45 arrival as 23:45 the day before: it is still today's."""
    utc_gate = gate_event("gate-01", 1, ts="2024-10-20T23:45:00+00:00")
    local_gate = gate_event("gate-01", 2, ts="2024-10-21T06:50:00+07:00")
    Ingest(hub_conn, "edugate").store_batch([incoming(utc_gate), incoming(local_gate)])
    assert hub_conn.all("SELECT seq, day FROM events ORDER BY seq") == [(1, "2024-10-21"), (2, "2024-10-21")]


def test_invalid_messages_are_recorded_and_acknowledged_not_stored(hub_conn: Connection) -> None:
    acks: list[str] = []
    ingest = Ingest(hub_conn, "edugate")
    wrong_kind = gate_event("gate-01", 1, kind="teleported")
    other_device = gate_event("gate-02", 1)
    ingest.store_batch(
        [
            incoming(b"\x00garbage", acks=acks),
            incoming(wrong_kind, acks=acks),
            incoming(other_device, acks=acks),
            incoming(gate_event("gate-01", 1), topic="edugate/thcs-a/gate-01/whatever", acks=acks),
        ]
    )
    assert len(acks) == 4
    assert hub_conn.one("SELECT COUNT(*) FROM events")[0] == 0
    reasons = {r[0] for r in hub_conn.all("SELECT reason FROM rejected_messages")}
    assert {"not JSON", "event of gate-02 published on gate-01's topic", "not a gate topic"} < reasons
    assert any("event schema: kind" in r for r in reasons)


def test_gaps_open_close_and_the_tail_is_known_from_the_status(hub_conn: Connection, gate: RegisteredGate) -> None:
    ingest = Ingest(hub_conn, "edugate")
    events = {seq: gate_event("gate-01", seq) for seq in range(1, 11)}
    ingest.store_batch([incoming(events[s]) for s in (1, 2, 4, 5, 8)])
    contiguous, highest, gap_since = stream(hub_conn)
    assert (contiguous, highest) == (2, 8) and gap_since is not None
    assert missing_ranges(hub_conn, "gate-01", "a" * 32, 2, 8) == [(3, 3), (6, 7)]
    status = online_status(
        "gate-01", [], None, True, backlog=2, oldest_unsynced=None, last_seq=10, journal="a" * 32,
        template_key=gate.template_key, signer=gate.status,
    )  # fmt: skip
    ingest.store_batch([incoming(status, topic="edugate/thcs-a/gate-01/status")])
    assert stream(hub_conn)[1] == 10
    assert missing_ranges(hub_conn, "gate-01", "a" * 32, 2, 10) == [(3, 3), (6, 7), (9, 10)]
    ingest.store_batch([incoming(events[s]) for s in (3, 6, 7, 9, 10)])
    assert stream(hub_conn) == (10, 10, None)
    assert json.loads(hub_conn.one("SELECT status FROM devices WHERE device = 'gate-01'")[0])["last_seq"] == 10


def test_resync_asks_for_exactly_the_missing_ranges_once_per_period(hub_conn: Connection) -> None:
    ingest = Ingest(hub_conn, "edugate")
    ingest.store_batch([incoming(gate_event("gate-01", s)) for s in (1, 2, 5, 6, 9)])
    key = Ed25519PrivateKey.generate()
    sent: list[tuple[str, dict[str, Any]]] = []
    resyncer = Resyncer(hub_conn, "edugate", key, lambda t, d: sent.append((t, json.loads(d))), after=60)
    now = datetime.now(UTC)
    assert resyncer.run_once(now) == 0  # the gap is younger than resync_after: it may still fill by itself
    assert resyncer.run_once(now + timedelta(seconds=61)) == 2
    assert [m["body"] for _, m in sent] == [
        {"name": "resync", "from_seq": 3, "to_seq": 4, "journal": "a" * 32},
        {"name": "resync", "from_seq": 7, "to_seq": 8, "journal": "a" * 32},
    ]  # by journal: a gate that replaced its journal since refuses instead of resending other events
    topic, message = sent[0]
    assert topic == "edugate/thcs-a/gate-01/downlink/command"
    key.public_key().verify(base64.b64decode(message["sig"]), canonical(message))
    assert (message["school"], message["device"], message["type"]) == ("thcs-a", "gate-01", "command")
    assert resyncer.run_once(now + timedelta(seconds=90)) == 0  # asked 29 s ago
    assert resyncer.run_once(now + timedelta(seconds=200)) == 2  # still missing: ask again


def test_a_batch_retried_after_a_busy_database_acknowledges_each_message_once(hub_conn: Connection) -> None:
    """A poison message makes the batch go one by one; the database turns busy half-way; the ingest thread
    retries the whole batch. The messages stored before must not be acknowledged twice: the broker may
    already have given their packet ids to messages the hub has not stored yet."""
    acks: list[str] = []
    busy = [True]

    def hook(conn: Connection, school: str, event: dict[str, Any]) -> None:
        if event["card_uid"] == "0000BEEF":
            raise ValueError("hook cannot handle this event")
        if event["card_uid"] == "0000CAFE" and busy[0]:
            busy[0] = False
            raise sqlite3.OperationalError("database is locked")

    ingest = Ingest(hub_conn, "edugate", [hook])
    events = [gate_event("gate-01", 1), gate_event("gate-01", 2, card_uid="0000BEEF")]
    events += [gate_event("gate-01", 3), gate_event("gate-01", 4, card_uid="0000CAFE"), gate_event("gate-01", 5)]
    batch = [incoming(e, acks=acks) for e in events]
    with pytest.raises(sqlite3.OperationalError):
        ingest.store_batch(batch)
    assert acks == [events[0]["id"], events[1]["id"], events[2]["id"]]  # stored, stored without the hook, stored
    ingest.store_batch(batch)  # what the ingest thread does next
    assert sorted(acks) == sorted(e["id"] for e in events) and len(acks) == len(events)
    assert {r[0] for r in hub_conn.all("SELECT seq FROM events")} == {1, 2, 3, 4, 5}


def test_a_message_the_database_cannot_hold_never_blocks_the_others(hub_conn: Connection) -> None:
    """Poison: valid JSON that breaks storage (a lone surrogate, a number too large) is kept as rejected; an
    event a hook chokes on is kept without what the hook adds (the check-in counts); the rest goes in."""
    acks: list[str] = []

    def choking_hook(conn: Connection, school: str, event: dict[str, Any]) -> None:
        if event["card_uid"] == "0000BEEF":
            raise ValueError("hook cannot handle this event")

    ingest = Ingest(hub_conn, "edugate", [choking_hook])
    good = [gate_event("gate-01", seq) for seq in range(1, 11)]
    surrogate = b'{"schema":1,"device":"gate-01","online":true,"ts":"2026-11-23T07:00:00+07:00","reason":"\\ud800"}'
    hooked = gate_event("gate-01", 11, card_uid="0000BEEF")
    huge_status = {"schema": 1, "device": "gate-01", "online": True, "journal": "a" * 32, "last_seq": 2**63}
    batch = [incoming(e, acks=acks) for e in good[:5]]
    batch += [
        Incoming("edugate/thcs-a/gate-01/status", surrogate, lambda: acks.append("surrogate")),
        incoming(hooked, acks=acks),
        incoming(huge_status, topic="edugate/thcs-a/gate-01/status", acks=acks),
    ]
    batch += [incoming(e, acks=acks) for e in good[5:]]
    ingest.store_batch(batch)
    assert len(acks) == len(batch)  # every message answered, none left for redelivery
    stored = {r[0] for r in hub_conn.all("SELECT seq FROM events")}
    assert stored == set(range(1, 12))
    assert ingest.stats.hook_failures == 1
    assert hub_conn.one("SELECT COUNT(*) FROM rejected_messages")[0] == 2
    # Counted once each, as committed: the rolled-back whole batch counts nothing.
    assert (ingest.stats.stored, ingest.stats.rejected, ingest.stats.by_device) == (11, 2, {"gate-01": 11})
    assert stream(hub_conn)[:2] == (11, 11)


def test_resync_waits_while_the_gap_is_filling_and_gives_up_on_a_lost_one(hub_conn: Connection) -> None:
    ingest = Ingest(hub_conn, "edugate")
    ingest.store_batch([incoming(gate_event("gate-01", s)) for s in (1, 2, 3, 6)])
    long_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat(timespec="milliseconds")
    hub_conn.execute("UPDATE streams SET gap_since = ?", [long_ago])
    sent: list[dict[str, Any]] = []
    resyncer = Resyncer(hub_conn, "edugate", Ed25519PrivateKey.generate(), lambda t, d: sent.append(d), after=60)
    assert resyncer.run_once() == 0  # the stream moved forward a moment ago: the backlog is still arriving
    now = datetime.now(UTC)
    asked = [resyncer.run_once(now + timedelta(seconds=61 + 60 * 2**n * 2)) for n in range(12)]
    assert sum(asked) == 8  # 8 requests with growing pauses, then the hub gives up on the lost gap
    row = hub_conn.one("SELECT resync_attempts FROM streams WHERE device = 'gate-01'")
    assert row == (9,)


def test_refused_payloads_are_kept_30_days_for_diagnosis_then_deleted(hub_store: Store, tmp_path: Path) -> None:
    """A refused payload may hold a child's name: the hub's housekeeping deletes it after REJECTED_RETENTION."""
    config = parse_hub_config(
        {
            "hub": {"id": "hub-test"},
            "database": hub_store.config.model_dump(exclude_none=True),
            "signing": {"key_file": str(tmp_path / "absent.key")},
            "api": {"enabled": False},
        }
    )
    service = HubService(config)
    conn = hub_store.connect()
    try:
        now = datetime.now(UTC)
        for age, topic in ((REJECTED_RETENTION + timedelta(hours=1), "old"), (timedelta(days=29), "recent")):
            conn.execute(
                "INSERT INTO rejected_messages(topic, reason, payload, received_at) VALUES (?, 'x', 'x', ?)",
                [topic, (now - age).isoformat(timespec="milliseconds")],
            )
        service._housekeeping()
        assert [r[0] for r in conn.all("SELECT topic FROM rejected_messages")] == ["recent"]
    finally:
        conn.close()
        service.resyncer.conn.close()


def test_a_gate_belongs_to_the_school_it_was_registered_at(
    hub_store: Store, hub_conn: Connection, tmp_path: Path, gate: RegisteredGate
) -> None:
    """A district hub: a stolen gate-01 login of thcs-a speaking on thcs-b's topics is refused (it would be sent
    thcs-b's roster); IT moving the gate forgets it, then registers it at its new school."""
    ingest = Ingest(hub_conn, "edugate")

    def status(school: str) -> Incoming:
        data = online_status("gate-01", [], None, True, 0, None, 0, "a" * 32, gate.template_key, gate.status)
        return Incoming(f"edugate/{school}/gate-01/status", data, lambda: None)

    ingest.store_batch([status("thcs-a"), incoming(gate_event("gate-01", 1))])
    other_event = gate_event("gate-01", 2)
    ingest.store_batch([status("thcs-b"), incoming(other_event, topic="edugate/thcs-b/gate-01/events")])
    assert hub_conn.all("SELECT device, school FROM devices") == [("gate-01", "thcs-a")]
    assert hub_conn.all("SELECT school, seq FROM events") == [("thcs-a", 1)]
    reasons = [r[0] for r in hub_conn.all("SELECT reason FROM rejected_messages")]
    assert reasons == ["gate-01 is a gate of thcs-a, not of thcs-b (a gate moved to another school: "
                       "`edugate hub gates forget gate-01`, then add it again)"] * 2  # fmt: skip

    database = hub_store.config.model_dump(mode="json", exclude_none=True)
    config = write_hub_config(tmp_path / "hub.toml", {"database": database})
    listed = CliRunner().invoke(cli_main, ["hub", "gates", "list", "--config", str(config)])
    assert listed.exit_code == 0 and listed.output.startswith("thcs-a/gate-01: registered (")
    assert "online since " in listed.output and "! 2 message(s) refused" in listed.output
    forgot = CliRunner().invoke(cli_main, ["hub", "gates", "forget", "gate-01", "--config", str(config)])
    assert forgot.exit_code == 0, forgot.output
    ingest.store_batch([status("thcs-a"), incoming(gate_event("gate-01", 3))])  # the running hub forgot it too
    assert hub_conn.all("SELECT school, seq FROM events") == [("thcs-a", 1)]
    assert hub_conn.all("SELECT device FROM devices") == []
    add = ["hub", "gates", "add", "gate-01", "--school", "thcs-b", "--template-key", gate.template_key,
           "--signing-key", gate.signing_key_text, "--config", str(config)]  # fmt: skip
    assert CliRunner().invoke(cli_main, add).exit_code == 0
    ingest.store_batch([status("thcs-b"), incoming(other_event, topic="edugate/thcs-b/gate-01/events")])
    assert hub_conn.all("SELECT device, school FROM devices") == [("gate-01", "thcs-b")]
    assert hub_conn.all("SELECT school, seq FROM events ORDER BY seq") == [("thcs-a", 1), ("thcs-b", 2)]
    again = CliRunner().invoke(cli_main, ["hub", "gates", "forget", "gate-09", "--config", str(config)])
    assert again.exit_code == 1 and "no gate gate-09 at this hub" in again.stderr
