"""A gate's identity is fixed at provisioning: a stolen gate login gets no roster and no faces.

What a school relies on: only the gates IT registered (with the keys `edugate identity` shows on them)
are heard; a gate says nothing about itself that the hub believes unless it is signed with the key IT
registered; a new key is held, loudly, until IT approves it with the fingerprint read on the gate; and a
real gate heard before it was registered loses nothing. Real Mosquitto, the real hub process, real gate
daemons, SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import send_taps
from hub_support import (
    HubProcess,
    RegisteredGate,
    gate_event,
    gate_identity,
    payload,
    register_gate,
    register_with_cli,
)
from mqtt_broker import BROKER_USERS, Broker, MqttPeer, Pki
from roster_support import MODEL, ROWS, cli, hub_toml, vectors, write_csv
from sync_support import BASE, DEVICE, SCHOOL

from appliance.config import DatabaseConfig, load_hub_config
from appliance.hub import gates
from appliance.hub.ingest import Incoming, Ingest
from appliance.hub.roster import hub_sealer, import_templates
from appliance.hub.store import Connection, Store
from appliance.sync.gate_keys import fingerprint
from appliance.sync.sealed_transport import TransportSealError, gate_private_key, open_sealed, sealed_context
from appliance.sync.signing import load_private_key

OTHER_SCHOOL = "thcs-b"


def offline(device: str = DEVICE) -> dict[str, Any]:
    """The body of a gate's clean-stop status (signed by RegisteredGate.status)."""
    return {"schema": 1, "device": device, "online": False, "ts": datetime.now(UTC).isoformat(), "reason": "stopped"}


def feed(ingest: Ingest, topic: str, data: dict[str, Any] | bytes, acks: list[str] | None = None) -> None:
    body = data if isinstance(data, bytes) else payload(data)
    ingest.store_batch([Incoming(topic, body, lambda: acks.append(topic) if acks is not None else None)])


def stored_events(conn: Connection, device: str) -> int:
    return int(conn.one("SELECT COUNT(*) FROM events WHERE device = ?", [device])[0])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        time.sleep(0.05)


def refused(conn: Connection, device: str) -> int:
    gate = gates.get(conn, device)
    return gate.refused if gate is not None else 0


def believed_status(conn: Connection, device: str) -> dict[str, Any] | None:
    row = conn.one("SELECT status FROM devices WHERE device = ?", [device])
    return json.loads(row[0]) if row else None


# ------------------------------------------------------------------------------------------- the ingest


def test_an_unregistered_gate_is_refused_and_counted_until_it_is_registered(hub_conn: Connection) -> None:
    ingest = Ingest(hub_conn, "edugate")
    topic = f"edugate/{SCHOOL}/gate-09/events"
    acks: list[str] = []
    events = [gate_event("gate-09", seq) for seq in (1, 2, 3)]
    for event in events:
        feed(ingest, topic, event, acks)
    assert stored_events(hub_conn, "gate-09") == 0
    assert len(acks) == 3  # refused and acknowledged: the gate's journal keeps them for a resync
    heard = gates.get(hub_conn, "gate-09")
    assert heard is not None and not heard.registered and heard.refused == 3 and heard.school == SCHOOL
    reasons = [r[0] for r in hub_conn.all("SELECT reason FROM rejected_messages")]
    assert reasons and all("not a registered gate" in r for r in reasons)
    assert gates.sealing_keys(hub_conn, [SCHOOL]) == {}

    registered = register_gate(hub_conn, SCHOOL, "gate-09")
    for event in events:
        feed(ingest, topic, event)
    assert stored_events(hub_conn, "gate-09") == 3
    assert gates.sealing_keys(hub_conn, [SCHOOL]) == {(SCHOOL, "gate-09"): registered.template_key}


def test_a_gate_speaks_only_for_its_own_school(hub_conn: Connection) -> None:
    """On a district hub, gate-01 of school A cannot record arrivals at school B, nor be believed there."""
    gate = register_gate(hub_conn, SCHOOL, DEVICE)
    register_gate(hub_conn, SCHOOL, "gate-02")
    ingest = Ingest(hub_conn, "edugate")
    feed(ingest, f"edugate/{OTHER_SCHOOL}/{DEVICE}/events", gate_event(DEVICE, 1, kind="arrival", person="HS001"))
    feed(ingest, f"edugate/{OTHER_SCHOOL}/{DEVICE}/status", gate.status(offline()))
    feed(ingest, f"edugate/{SCHOOL}/gate-02/status", gate.status(offline()))  # gate-01's status replayed as gate-02's
    assert stored_events(hub_conn, DEVICE) == 0 and believed_status(hub_conn, DEVICE) is None
    second = gates.get(hub_conn, "gate-02")
    assert believed_status(hub_conn, "gate-02") is None and second is not None and not second.pending
    registered = gates.get(hub_conn, DEVICE)
    assert registered is not None and registered.school == SCHOOL and registered.refused == 2
    feed(ingest, f"edugate/{SCHOOL}/{DEVICE}/events", gate_event(DEVICE, 1))
    assert stored_events(hub_conn, DEVICE) == 1


def test_a_status_is_believed_only_when_signed_with_the_registered_key(
    hub_conn: Connection, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gate = register_gate(hub_conn, SCHOOL, DEVICE, tmp_path / "gate.key")
    ingest = Ingest(hub_conn, "edugate")
    topic = f"edugate/{SCHOOL}/{DEVICE}/status"

    feed(ingest, topic, {**offline(), "template_key": gate.template_key})  # unsigned (a gate older than the hub)
    tampered = gate.status(offline())
    tampered["reason"] = "connection lost"  # changed after signing
    feed(ingest, topic, tampered)
    thief = RegisteredGate(SCHOOL, DEVICE, tmp_path / "thief.key")
    forged = thief.status(offline())
    forged["signing_key"] = gate.signing_key_text  # claims the registered key, signed with another
    feed(ingest, topic, forged)
    assert believed_status(hub_conn, DEVICE) is None
    assert ingest.stats.statuses == 0 and ingest.stats.rejected == 3

    feed(ingest, topic, gate.status(offline()))
    assert believed_status(hub_conn, DEVICE) is not None and ingest.stats.statuses == 1

    # A thief with the gate's MQTT password presents its own keys: held, logged loudly once (also when it keeps
    # switching between keys: at most a line a minute), never sealed to.
    other = RegisteredGate(SCHOOL, DEVICE, tmp_path / "other-thief.key")
    with caplog.at_level(logging.WARNING, logger="appliance.hub.gates"):
        feed(ingest, topic, thief.status(offline()))
        feed(ingest, topic, thief.status(offline()))
        for _ in range(10):
            feed(ingest, topic, other.status(offline()))
            feed(ingest, topic, thief.status(offline()))
    presented = fingerprint(thief.template_key, thief.signing_key_text)
    held = gates.get(hub_conn, DEVICE)
    assert held is not None and held.pending_fingerprint == presented and held.fingerprint != presented
    assert [r.levelname for r in caplog.records if "NEW KEY" in r.getMessage()] == ["ERROR"]
    assert gates.sealing_keys(hub_conn, [SCHOOL]) == {(SCHOOL, DEVICE): gate.template_key}
    assert ingest.stats.statuses == 1  # the thief's statuses were not believed

    with pytest.raises(gates.RegistryError, match="not the one the gate presents"):
        gates.approve(hub_conn, DEVICE, held.fingerprint or "")
    gates.approve(hub_conn, DEVICE, presented)  # IT read this fingerprint on the gate: it was a new SD card
    assert gates.sealing_keys(hub_conn, [SCHOOL]) == {(SCHOOL, DEVICE): thief.template_key}
    feed(ingest, topic, gate.status(offline()))  # the old key is not believed any more
    assert ingest.stats.statuses == 1


def test_a_forgotten_gate_is_refused_by_the_running_ingest(hub_conn: Connection) -> None:
    register_gate(hub_conn, SCHOOL, DEVICE)
    ingest = Ingest(hub_conn, "edugate")
    topic = f"edugate/{SCHOOL}/{DEVICE}/events"
    feed(ingest, topic, gate_event(DEVICE, 1))
    assert gates.forget(hub_conn, DEVICE)
    feed(ingest, topic, gate_event(DEVICE, 2))
    assert stored_events(hub_conn, DEVICE) == 1
    assert gates.sealing_keys(hub_conn, [SCHOOL]) == {}


def test_hub_gates_commands_say_what_is_wrong(hub_store: Store, tmp_path: Path) -> None:
    config = hub_toml(tmp_path, hub_store, schools=(SCHOOL, OTHER_SCHOOL))
    stranger = cli("hub", "gates", "add", "--identity", str(tmp_path / "none.json"), "--config", str(config))
    assert stranger.exit_code == 1 and "not the output of `edugate identity --json`" in stranger.stderr
    bad = cli("hub", "gates", "add", DEVICE, "--school", SCHOOL, "--template-key", "abc", "--signing-key", "abc",
              "--config", str(config))  # fmt: skip
    assert bad.exit_code == 1 and "template key is not base64" in bad.stderr
    key = RegisteredGate(SCHOOL, DEVICE, tmp_path / "gate.key")
    args = ["--template-key", key.template_key, "--signing-key", key.signing_key_text, "--config", str(config)]
    assert cli("hub", "gates", "add", DEVICE, "--school", SCHOOL, *args).exit_code == 0
    assert cli("hub", "gates", "add", DEVICE, "--school", SCHOOL, *args).exit_code == 0  # the same again: fine
    moved = cli("hub", "gates", "add", DEVICE, "--school", OTHER_SCHOOL, *args)
    assert moved.exit_code == 1 and f"registered to school {SCHOOL}" in moved.stderr
    other = RegisteredGate(SCHOOL, DEVICE, tmp_path / "other.key")
    rekey = ["--template-key", other.template_key, "--signing-key", other.signing_key_text, "--config", str(config)]
    replaced = cli("hub", "gates", "add", DEVICE, "--school", SCHOOL, *rekey)
    assert replaced.exit_code == 1 and "--replace" in replaced.stderr
    nothing = cli("hub", "gates", "approve", DEVICE, "--fingerprint", "0000", "--config", str(config))
    assert nothing.exit_code == 1 and "presents no new key" in nothing.stderr
    assert cli("hub", "gates", "forget", DEVICE, "--config", str(config)).exit_code == 0
    gone = cli("hub", "gates", "forget", DEVICE, "--config", str(config))
    assert gone.exit_code == 1 and "no gate gate-01" in gone.stderr


# ------------------------------------------------------------------------------------------ real parts


def test_a_stolen_gate_login_gets_no_roster_and_no_faces(
    hub_store: Store, tmp_path: Path, broker: Broker, pki: Pki
) -> None:
    """With only gate-01's MQTT password, a thief publishes a status with a key of its own and listens on the
    gate's downlink. The hub holds the key (IT sees it in `hub gates list`) and seals nothing to it, through
    catch-up rounds that serve another gate meanwhile; only IT's approval would change that."""
    config_path = hub_toml(tmp_path, hub_store, broker, pki, catch_up_every=1)
    assert cli("hub", "roster", "import", str(write_csv(tmp_path / "ds.csv", list(ROWS.values()))), "--school",
               SCHOOL, "--config", str(config_path)).exit_code == 0  # fmt: skip
    conn = hub_store.connect()
    import_templates(
        conn, hub_sealer(load_hub_config(config_path), create=True), SCHOOL, {MODEL: {"HS001": vectors(1)}}
    )
    real = register_gate(conn, SCHOOL, DEVICE, tmp_path / "real-gate.key")
    published = cli("hub", "roster", "publish", "--config", str(config_path))
    assert published.exit_code == 0, published.output  # sealed to the real gate's key, retained

    thief_key = tmp_path / "thief.key"
    thief = RegisteredGate(SCHOOL, DEVICE, thief_key)
    listener = MqttPeer(broker, DEVICE, BROKER_USERS[DEVICE])
    hub = HubProcess(config_path)
    try:
        hub.start(wait_for="sync: connected")
        listener.connect()
        listener.subscribe(f"{BASE}/downlink/#")
        listener.wait_for(lambda m: len(m) >= 2, 10)  # the retained roster and templates: sealed to the real gate
        assert listener.publish(f"{BASE}/status", thief.status_payload(offline()), retain=True).value in (0, 16)
        hub.wait_log("presents a NEW KEY", 30)

        # Another gate registered now is caught up by the next round: a round ran since the thief's status.
        second = register_gate(conn, SCHOOL, "gate-02", tmp_path / "gate-02.key")
        rows = "SELECT sealed_to FROM published WHERE device = 'gate-02' AND stream = 'roster' AND digest <> ''"
        wait_until(lambda: conn.all(rows) == [(second.template_key,)], 30, "the catch-up serving gate-02")

        def opened_by_thief() -> list[str]:
            found = []
            for message in listener.messages():
                body = json.loads(message.payload).get("body", {})
                if "sealed" not in body:
                    continue
                envelope = json.loads(message.payload)
                try:
                    found.append(open_sealed(gate_private_key(thief_key), body["sealed"], sealed_context(envelope)))
                except TransportSealError:
                    continue
            return [m.decode() for m in found]

        assert opened_by_thief() == []
        sealed_to = {r[0] for r in conn.all("SELECT sealed_to FROM published WHERE device = ?", [DEVICE])}
        assert sealed_to == {real.template_key}
        listing = cli("hub", "gates", "list", "--config", str(config_path))
        presented = fingerprint(thief.template_key, thief.signing_key_text)
        assert "KEY CHANGE" in listing.stdout and presented in listing.stdout

        # The control: had IT approved the key, the thief would read the roster — so the check above can fail.
        assert cli("hub", "gates", "approve", DEVICE, "--fingerprint", presented, "--config",
                   str(config_path)).exit_code == 0  # fmt: skip
        listener.wait_for(lambda m: bool(opened_by_thief()), 30)
        assert any("Nguyễn Văn An" in text for text in opened_by_thief())
    finally:
        hub.stop()
        listener.close()
        conn.close()


def test_a_gate_heard_before_it_was_registered_loses_nothing(
    tmp_path: Path, broker: Broker, pki: Pki, gate_factory: Any
) -> None:
    """A gate installed before IT registered it: its taps are refused (and counted) at first; `hub gates list`
    shows the key it presents; once IT approves it with the fingerprint `edugate identity` shows on the gate,
    the hub asks for the missing seqs and every tap arrives once."""
    store = Store(DatabaseConfig(url=f"sqlite:///{tmp_path / 'hub.db'}"))
    store.migrate()
    key_file = tmp_path / "hub-signing.key"
    config_path = hub_toml(tmp_path, store, broker, pki)
    text = config_path.read_text().replace("catch_up_every = 0", "catch_up_every = 0\nresync_after = 1")
    config_path.write_text(text)
    hub = HubProcess(config_path).start(wait_for="sync: connected")
    try:
        gate = gate_factory(broker, hub_key=load_private_key(key_file))
        gate.start()
        send_taps(gate.lane, [f"0C{i:06X}" for i in range(10)])
        hub.wait_log("is not registered; it presents fingerprint", 30)
        conn = store.connect()
        try:
            wait_until(lambda: refused(conn, DEVICE) >= 10, 30, "the taps refused and counted")
            assert stored_events(conn, DEVICE) == 0
            found = gate_identity(gate.config)
            listing = cli("hub", "gates", "list", "--config", str(config_path))
            assert "NOT REGISTERED" in listing.stdout and found["fingerprint"] in listing.stdout
            approved = cli("hub", "gates", "approve", DEVICE, "--fingerprint", found["fingerprint"], "--config",
                           str(config_path))  # fmt: skip
            assert approved.exit_code == 0, approved.output
            send_taps(gate.lane, [f"0D{i:06X}" for i in range(5)])
            wait_until(lambda: stored_events(conn, DEVICE) == 15, 60, "every tap at the hub after the approval")
            seqs = [r[0] for r in conn.all("SELECT seq FROM events WHERE device = ? ORDER BY seq", [DEVICE])]
            assert seqs == list(range(1, 16))
            assert believed_status(conn, DEVICE) is not None
        finally:
            conn.close()
    finally:
        hub.stop()


def test_provisioning_registers_the_gate_with_the_keys_it_shows(hub_store: Store, tmp_path: Path) -> None:
    """`edugate identity` on the gate and `edugate hub gates add --identity` at the hub agree on the fingerprint,
    and a key file the command makes is the gate's own (0600)."""
    gate_toml = tmp_path / "gate.toml"
    gate_toml.write_text(
        f'[device]\nid = "{DEVICE}"\nschool = "{SCHOOL}"\n[journal]\npath = "{tmp_path / "journal.db"}"\n'
        f'[vision]\nkey_file = "{tmp_path / "state" / "templates.key"}"\n'
    )
    config = hub_toml(tmp_path, hub_store)
    shown = cli("identity", "--config", str(gate_toml))
    assert shown.exit_code == 0 and "edugate hub gates add gate-01 --school" in shown.stdout
    found = register_with_cli(config, gate_toml)
    assert found["fingerprint"] in shown.stdout
    assert (tmp_path / "state" / "templates.key").stat().st_mode & 0o077 == 0
    conn = hub_store.connect()
    try:
        gate = gates.get(conn, DEVICE)
        assert gate is not None and gate.fingerprint == found["fingerprint"] and gate.school == SCHOOL
    finally:
        conn.close()


def test_hub_gates_list_flags_a_gate_that_holds_absence_notices_back(hub_store: Store, tmp_path: Path) -> None:
    """A registered gate with a gap in its seqs holds its school's absence notices: IT sees it next to the gate."""
    config = hub_toml(tmp_path, hub_store)
    conn = hub_store.connect()
    try:
        gate = register_gate(conn, SCHOOL, DEVICE, tmp_path / "gate.key")
        ingest = Ingest(conn, "edugate")
        status = {**offline(), "online": True, "version": "test", "readers": [], "camera": None, "clock_ok": True,
                  "backlog": 0, "oldest_unsynced_age_s": None, "last_seq": 10, "journal": "a" * 32}  # fmt: skip
        del status["reason"]
        feed(ingest, f"edugate/{SCHOOL}/{DEVICE}/status", gate.status(status))
        for seq in range(1, 6):
            feed(ingest, f"edugate/{SCHOOL}/{DEVICE}/events", gate_event(DEVICE, seq))
        assert ingest.stats.statuses == 1 and stored_events(conn, DEVICE) == 5
    finally:
        conn.close()
    listing = cli("hub", "gates", "list", "--config", str(config))
    assert listing.exit_code == 0, listing.output
    flagged = [line for line in listing.stdout.splitlines() if line.startswith("  ! behind")]
    assert len(flagged) == 1 and "(gap" in flagged[0] and "missing seq 6-10" in flagged[0], listing.stdout


def test_a_gates_signed_status_names_its_school_and_is_refused_on_another(hub_conn: Connection, tmp_path: Path) -> None:
    """A gate not yet registered presents its key for IT to approve at the school it names inside its signature: the
    same status replayed on another school's topic is refused, so a first approval cannot land in the wrong school."""
    ingest = Ingest(hub_conn, "edugate")
    gate = RegisteredGate(SCHOOL, "gate-09", tmp_path / "gate-09.key")
    signed = gate.status({**offline("gate-09"), "school": SCHOOL})
    feed(ingest, f"edugate/{OTHER_SCHOOL}/gate-09/status", signed)
    heard = gates.get(hub_conn, "gate-09")
    assert heard is not None and not heard.pending and heard.refused == 1
    feed(ingest, f"edugate/{SCHOOL}/gate-09/status", signed)  # where it belongs: the key waits for IT
    heard = gates.get(hub_conn, "gate-09")
    assert heard is not None and heard.pending and heard.school == SCHOOL


def test_a_forgotten_gate_leaves_nothing_retained_for_its_login(
    hub_store: Store, tmp_path: Path, broker: Broker, pki: Pki
) -> None:
    """A gate moved to another school keeps its login: after `hub gates forget`, the broker holds no roster or
    templates for it on its old school's topics (they were sealed to its key: it could open them)."""
    config_path = hub_toml(tmp_path, hub_store, broker, pki)
    assert cli("hub", "roster", "import", str(write_csv(tmp_path / "ds.csv", list(ROWS.values()))), "--school",
               SCHOOL, "--config", str(config_path)).exit_code == 0  # fmt: skip
    conn = hub_store.connect()
    register_gate(conn, SCHOOL, DEVICE, tmp_path / "gate.key")
    conn.close()
    assert cli("hub", "roster", "publish", "--config", str(config_path)).exit_code == 0

    def retained_roster() -> list[bytes]:
        """What a subscriber with the gate's login is handed on its roster topic, then a marker the hub's login
        left on another topic: the broker answers subscriptions in order, so the roster came first if it was there."""
        hub = MqttPeer(broker, "hub", BROKER_USERS["hub"])
        hub.connect()
        marker = f"{BASE}/downlink/config"
        assert not hub.publish(marker, b"marker", retain=True).is_failure
        hub.close()
        peer = MqttPeer(broker, DEVICE, BROKER_USERS[DEVICE])
        peer.connect()
        try:
            peer.subscribe(f"{BASE}/downlink/roster")
            peer.subscribe(marker)
            peer.wait_for(lambda m: any(r.topic == marker for r in m), 10)
            return [r.payload for r in peer.messages() if r.topic.endswith("/roster")]
        finally:
            peer.close()

    assert len(retained_roster()) == 1  # the control: published, retained
    forgot = cli("hub", "gates", "forget", DEVICE, "--config", str(config_path))
    assert forgot.exit_code == 0, forgot.output
    assert "no longer keeps its roster and templates" in forgot.stdout
    assert retained_roster() == []
