"""Roster and face templates from the hub to the gates: real Mosquitto, real gate daemons, SQLite and PostgreSQL.

What a school relies on: the export it imports at the hub is what every gate knows, a gate that was
off (or is new) catches up by itself, nothing is sent twice for nothing, and nothing the gate obeys
can be forged or altered on the way. Parents' contacts never leave the hub.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon_harness import send_taps
from hub_support import HubProcess, RegisteredGate, gate_identity, register_gate, register_with_cli
from mqtt_broker import BROKER_USERS, Broker, MqttPeer, Pki
from roster_support import MODEL, ROWS, cli, hub_toml, vectors, write_csv
from sync_support import BASE, DEVICE, SCHOOL

from appliance.config import load_hub_config
from appliance.hub import gates
from appliance.hub.catch_up import CatchUpWorker, catch_up, gates_to_catch_up
from appliance.hub.publish import Item, _record, sign_items
from appliance.hub.publish_lease import PUBLISHED_MARK, mark_published, published_model
from appliance.hub.roster import hub_sealer, hub_templates, import_templates
from appliance.hub.store import Connection, Store
from appliance.journal import open_database
from appliance.journal.roster_store import RosterStore
from appliance.journal.sealing import Sealer, SealingError
from appliance.journal.template_store import TemplateStore
from appliance.sync.sealed_transport import (
    TransportSealError,
    gate_private_key,
    open_sealed,
    public_text,
    sealed_context,
)
from appliance.sync.signing import load_private_key
from appliance.sync.status import offline_status


def people_of(conn: Connection) -> dict[str, tuple[Any, ...]]:
    rows = conn.all(
        "SELECT id, full_name, role, class_name, active, cards, parent_phones, parent_emails FROM people "
        "WHERE school = ?",
        [SCHOOL],
    )
    return {r[0]: (r[1], r[2], r[3], bool(r[4]), json.loads(r[5]), json.loads(r[6]), json.loads(r[7])) for r in rows}


def enroll_on_a_gate(folder: Path, people: dict[str, np.ndarray]) -> tuple[Path, Path]:
    """A gate journal with sealed templates, as `edugate enroll` leaves it; returns (journal, key file)."""
    folder.mkdir(exist_ok=True)
    journal, key = folder / "journal.db", folder / "templates.key"
    database = open_database(journal, writer=True)
    try:
        store = TemplateStore(database, Sealer.from_file(key))
        for person, rows in people.items():
            store.add(person, MODEL, rows)
    finally:
        database.close()
    return journal, key


def gate_roster(journal: Path) -> dict[str, Any]:
    database = open_database(journal, readonly=True)
    try:
        return {p.id: p for p in RosterStore(database).all()}
    finally:
        database.close()


def gate_templates(journal: Path, key: Path) -> dict[str, np.ndarray]:
    database = open_database(journal, readonly=True)
    try:
        return TemplateStore(database, Sealer.from_file(key)).load(MODEL)
    finally:
        database.close()


def gate_meta(journal: Path, key: str) -> str | None:
    database = open_database(journal, readonly=True)
    try:
        row = database.conn.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return row[0] if row else None
    finally:
        database.close()


def published(conn: Connection) -> dict[tuple[str, str], tuple[int, str]]:
    return {(r[0], r[1]): (int(r[2]), r[3]) for r in conn.all("SELECT device, stream, version, digest FROM published")}


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        time.sleep(0.1)


def announce_key(broker: Broker, key_file: Path) -> None:
    """A gate's retained status with its template key, as a gate that was online once leaves it."""
    peer = MqttPeer(broker, DEVICE, BROKER_USERS[DEVICE])
    peer.connect()
    try:
        status = offline_status(DEVICE, "stopped", public_text(gate_private_key(key_file)))
        assert peer.publish(f"{BASE}/status", status, retain=True).value in (0, 16)  # 16: nobody listens now
    finally:
        peer.close()


def retained_templates(broker: Broker) -> dict[str, Any]:
    """The templates message the broker keeps for the gate (read with the gate's own login)."""
    reader = MqttPeer(broker, DEVICE, BROKER_USERS[DEVICE])
    reader.connect()
    try:
        reader.subscribe(f"{BASE}/downlink/templates")
        reader.wait_for(lambda m: len(m) == 1, 10)
        return dict(json.loads(reader.messages()[0].payload))
    finally:
        reader.close()


# ------------------------------------------------------------------------------------------------ import


def test_roster_import_with_vietnamese_headers_is_all_or_nothing(hub_store: Store, tmp_path: Path) -> None:
    config = hub_toml(tmp_path, hub_store)
    first = write_csv(tmp_path / "ds.csv", list(ROWS.values()))
    result = cli("hub", "roster", "import", str(first), "--school", SCHOOL, "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "4 added" in result.stdout
    conn = hub_store.connect()
    try:
        people = people_of(conn)
        assert people["HS001"] == (
            "Nguyễn Văn An",
            "student",
            "6A",
            True,
            ["04A1B2C3"],
            ["+84912345678"],
            ["me.an@example.vn"],
        )
        assert people["HS003"][4] == ["04A1B2C5"]  # "04:a1:b2:c5" normalised
        assert people["GV001"][1:4] == ("staff", None, True)

        # A row with a problem: nothing changes, every problem is named with its row.
        broken = write_csv(
            tmp_path / "broken.csv",
            [ROWS["HS001"], "2,HS002,Trần Thị Bình,,Học sinh,04A1B2C4,,,\n", ROWS["HS001"].replace("HS001", "HS004")],
        )
        result = cli("hub", "roster", "import", str(broken), "--school", SCHOOL, "--config", str(config))
        assert result.exit_code == 1
        assert "rejected, nothing imported" in result.stderr
        assert "row 3 (HS002): missing class" in result.stderr
        assert "row 4 (HS004): duplicate card 04A1B2C3 (also on row 2, HS001)" in result.stderr
        assert people_of(conn) == people

        # The next export: HS002 left the school and her card went to a new student; HS001 changed class.
        moved = ROWS["HS002"].replace("HS002", "HS005").replace("Trần Thị Bình", "Đỗ Minh Em")
        second = write_csv(
            tmp_path / "ds2.csv", [ROWS["HS001"].replace(",6A,", ",7A,"), ROWS["HS003"], ROWS["GV001"], moved]
        )
        result = cli("hub", "roster", "import", str(second), "--school", SCHOOL, "--config", str(config))
        assert result.exit_code == 0, result.output
        assert "1 added, 1 updated, 2 unchanged, 1 deactivated" in result.stdout
        assert "card 04A1B2C4 moved from HS002 to HS005" in result.stdout
        after = people_of(conn)
        assert after["HS002"][3] is False and after["HS002"][4] == []  # kept (history), inactive, card gone
        assert after["HS005"][4] == ["04A1B2C4"] and after["HS001"][2] == "7A"

        # Another school's roster is its own.
        other = write_csv(tmp_path / "other.csv", [ROWS["HS001"]])
        assert cli("hub", "roster", "import", str(other), "--school", "thcs-b", "--config", str(config)).exit_code == 0
        assert people_of(conn) == after
    finally:
        conn.close()


def test_templates_import_reseals_a_gates_templates_with_the_hubs_key(hub_store: Store, tmp_path: Path) -> None:
    config_path = hub_toml(tmp_path, hub_store)
    enrolled = {"HS001": vectors(1), "GV001": vectors(2, count=2)}
    journal, key = enroll_on_a_gate(tmp_path / "gate", enrolled)
    args = ["hub", "templates", "import", "--school", SCHOOL, "--journal", str(journal), "--config", str(config_path)]

    wrong = tmp_path / "other.key"
    Sealer.from_file(wrong)  # a real key of another gate
    result = cli(*args, "--key-file", str(wrong))
    assert result.exit_code == 1 and "do not open with this key" in result.stderr
    result = cli(*args, "--key-file", str(tmp_path / "typo.key"))
    assert result.exit_code == 1 and "no such key file" in result.stderr
    assert not (tmp_path / "typo.key").exists()  # a mistyped path creates no key

    result = cli(*args, "--key-file", str(key))
    assert result.exit_code == 0, result.output
    assert "imported 5 templates of 2 people" in result.stdout
    assert "2 people are not on the hub's roster" in result.stdout
    config = load_hub_config(config_path)
    assert stat.S_IMODE(os.stat(config.signing.template_key_file).st_mode) == 0o600

    conn = hub_store.connect()
    try:
        stored = conn.all("SELECT person, model, sealed FROM templates WHERE school = ?", [SCHOOL])
        assert sorted((p, m) for p, m, _ in stored) == [("GV001", MODEL), ("HS001", MODEL)]
        clear = base64.b64encode(enrolled["HS001"][0].astype("<f4").tobytes()).decode()
        assert all(clear[:40] not in sealed for _, _, sealed in stored)  # sealed, not plain
        opened = hub_templates(conn, hub_sealer(config, create=False), SCHOOL, MODEL)
        for person, rows in enrolled.items():
            back = np.vstack([np.frombuffer(base64.b64decode(t), dtype="<f4") for t in opened[person]])
            assert np.array_equal(back, rows)

        # A blob moved to another person does not open: it is bound to (school, person, model).
        conn.execute(
            "UPDATE templates SET sealed = (SELECT sealed FROM templates WHERE person = 'GV001') WHERE person = 'HS001'"
        )
        with pytest.raises(Exception, match="does not open"):
            hub_templates(conn, hub_sealer(config, create=False), SCHOOL, MODEL)

        result = cli("hub", "templates", "remove", "HS001", "GV001", "--school", SCHOOL, "--config", str(config_path))
        assert result.exit_code == 0, result.output
        assert conn.all("SELECT person FROM templates WHERE school = ?", [SCHOOL]) == []
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------------- publish


def test_publish_reaches_a_real_gate_and_only_changes_are_sent_again(
    hub_store: Store, tmp_path: Path, broker: Broker, pki: Pki, gate_factory: Any
) -> None:
    config = hub_toml(tmp_path, hub_store, broker, pki)
    key = load_private_key(tmp_path / "hub-signing.key")
    assert cli("hub", "roster", "import", str(write_csv(tmp_path / "ds.csv", list(ROWS.values()))), "--school",
               SCHOOL, "--config", str(config)).exit_code == 0  # fmt: skip
    enrolled = {"HS001": vectors(1), "HS002": vectors(2), "GV001": vectors(3, count=2)}
    journal, gate_key = enroll_on_a_gate(tmp_path / "office-gate", enrolled)
    result = cli("hub", "templates", "import", "--school", SCHOOL, "--journal", str(journal), "--key-file",
                 str(gate_key), "--config", str(config))  # fmt: skip
    assert result.exit_code == 0, result.output

    hub = HubProcess(config).start(wait_for="sync: connected")
    try:
        gate = gate_factory(broker, hub_key=key)
        face_key = gate.face_key
        conn = hub_store.connect()
        register_gate(conn, SCHOOL, DEVICE, face_key)  # as IT does at provisioning
        gate.start()
        try:
            # The hub believes the gate's signed status.
            wait(lambda: conn.one("SELECT 1 FROM devices WHERE device = ?", [DEVICE]), 20, "gate-01's status")

            result = cli("hub", "roster", "publish", "--wait", "20", "--config", str(config))
            assert result.exit_code == 0, result.output
            assert f"{SCHOOL}/{DEVICE} roster: version" in result.stdout
            assert "4 people, 4 active" in result.stdout
            assert "applied by the gate (added 4, deactivated 0, updated 0)" in result.stdout
            assert "applied by the gate (people_erased 0, templates 8)" in result.stdout
            first = published(conn)
            assert all(digest for _, digest in first.values())
            # On the broker (and so in mosquitto.db) the templates are ciphertext sealed to this gate's key.
            kept = retained_templates(broker)
            assert "set" not in kept["body"] and set(kept["body"]["sealed"]) == {"to", "epk", "nonce", "data"}
            assert kept["body"]["sealed"]["to"] == public_text(gate_private_key(face_key))
            clear = base64.b64encode(enrolled["HS001"][0].astype("<f4").tobytes()).decode()
            assert clear[:40] not in json.dumps(kept)

            people = gate_roster(gate.journal)
            assert sorted(people) == sorted(ROWS)
            assert people["HS001"].full_name == "Nguyễn Văn An" and people["HS001"].cards == ("04A1B2C3",)
            assert all(p.parent_phones == () and p.parent_emails == () for p in people.values())  # privacy
            held = gate_templates(gate.journal, face_key)
            assert sorted(held) == sorted(enrolled)
            assert all(np.array_equal(held[p], enrolled[p]) for p in enrolled)

            # A tap of an imported card is an arrival of that person, all the way into the hub.
            send_taps(gate.lane, ["04A1B2C3"])
            wait(
                lambda: conn.one("SELECT kind FROM events WHERE person = 'HS001' AND kind = 'arrival'"),
                20,
                "HS001's arrival at the hub",
            )
            # The hub recorded the gate's answers too.
            answers = "SELECT type, ok FROM downlink_results WHERE device = ? ORDER BY type"
            wait(lambda: len(conn.all(answers, [DEVICE])) == 2, 10, "the gate's answers at the hub")
            assert conn.all(answers, [DEVICE]) == [("roster.snapshot", 1), ("templates", 1)]

            # Nothing changed: nothing is sent.
            result = cli("hub", "roster", "publish", "--config", str(config))
            assert result.exit_code == 0, result.output
            assert result.stdout.count("unchanged") == 2 and "sent" not in result.stdout.replace("not sent", "")
            assert published(conn) == first

            # HS002 leaves the school: a newer roster version deactivates her and erases her face on the gate.
            rows = [ROWS["HS001"].replace("Nguyễn Văn An", "Nguyễn Văn Anh"), ROWS["HS003"], ROWS["GV001"]]
            assert cli("hub", "roster", "import", str(write_csv(tmp_path / "ds2.csv", rows)), "--school", SCHOOL,
                       "--config", str(config)).exit_code == 0  # fmt: skip
            result = cli("hub", "roster", "publish", "--wait", "20", "--config", str(config))
            assert result.exit_code == 0, result.output
            assert "applied by the gate (added 0, deactivated 0, updated 2)" in result.stdout  # HS002: now inactive
            assert "applied by the gate (people_erased 1, templates 5)" in result.stdout
            second = published(conn)
            for stream in ("roster", "templates"):
                assert second[(DEVICE, stream)][0] > first[(DEVICE, stream)][0]
            assert gate_meta(gate.journal, "downlink.roster") == str(second[(DEVICE, "roster")][0])
            people = gate_roster(gate.journal)
            assert not people["HS002"].active and people["HS001"].full_name == "Nguyễn Văn Anh"
            assert sorted(gate_templates(gate.journal, face_key)) == ["GV001", "HS001"]
        finally:
            conn.close()
    finally:
        hub.stop()


def test_an_offline_gate_gets_the_retained_roster_when_it_starts(
    hub_store: Store, tmp_path: Path, broker: Broker, pki: Pki, gate_factory: Any, subscriber_factory: Any
) -> None:
    config = hub_toml(tmp_path, hub_store, broker, pki)
    key = load_private_key(tmp_path / "hub-signing.key")
    assert cli("hub", "roster", "import", str(write_csv(tmp_path / "ds.csv", list(ROWS.values()))), "--school",
               SCHOOL, "--config", str(config)).exit_code == 0  # fmt: skip
    results = subscriber_factory(topics=[f"{BASE}/result"])

    # No gate is registered: the hub sends to none, and says so.
    result = cli("hub", "roster", "publish", "--config", str(config))
    assert result.exit_code == 0 and "no registered gates" in result.stdout
    # A gate IT never registered is sent nothing, even when named.
    result = cli("hub", "roster", "publish", "--device", DEVICE, "--config", str(config))
    assert result.exit_code == 1 and f"not registered gates of {SCHOOL}: {DEVICE}" in result.stderr
    # Registered (with the keys `edugate identity` shows on it), it is sent the roster while away.
    gate = gate_factory(broker, hub_key=key)
    register_with_cli(config, gate.config)
    result = cli("hub", "roster", "publish", "--device", DEVICE, "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "roster: version" in result.stdout and "gate offline: it gets it when it connects" in result.stdout
    assert "no face templates at the hub" in result.stdout

    gate.start()
    wait(lambda: len(gate_roster(gate.journal)) == 4, 20, "the retained roster applied at start")
    version = gate_meta(gate.journal, "downlink.roster")
    results.wait_for(lambda m: len(m) >= 1, 10)
    applied = json.loads(results.messages()[0].payload)
    assert applied["ok"] and applied["type"] == "roster.snapshot"

    # A restart into the kept session is not sent the retained snapshot again (retain handling), and were it
    # sent, the gate would ignore the very message it applied last: no refusal, no answer, nothing changed.
    gate.stop()
    gate.start()
    gate.wait(lambda: gate.sync_status().get("state") == "online", 20, "back online")
    time.sleep(2)
    assert len(results.messages()) == 1
    assert gate_meta(gate.journal, "downlink.roster") == version
    assert len(gate_roster(gate.journal)) == 4


def test_a_tampered_retained_roster_is_refused_and_force_restores_it(
    hub_store: Store, tmp_path: Path, broker: Broker, pki: Pki, gate_factory: Any, subscriber_factory: Any
) -> None:
    config = hub_toml(tmp_path, hub_store, broker, pki)
    key = load_private_key(tmp_path / "hub-signing.key")
    assert cli("hub", "roster", "import", str(write_csv(tmp_path / "ds.csv", list(ROWS.values()))), "--school",
               SCHOOL, "--config", str(config)).exit_code == 0  # fmt: skip
    gate = gate_factory(broker, hub_key=key)
    register_with_cli(config, gate.config)
    assert cli("hub", "roster", "publish", "--device", DEVICE, "--config", str(config)).exit_code == 0
    gate.start()
    wait(lambda: len(gate_roster(gate.journal)) == 4, 20, "roster applied")
    gate.stop()

    # Anyone holding the gate's login can read the retained message: ciphertext, no name or card in it.
    reader = MqttPeer(broker, DEVICE, BROKER_USERS[DEVICE])
    reader.connect()
    reader.subscribe(f"{BASE}/downlink/roster")
    reader.wait_for(lambda m: len(m) == 1, 10)
    raw = reader.messages()[0].payload
    original = json.loads(raw)
    reader.close()
    assert set(original["body"]) == {"sealed"} and b"04A1B2C5" not in raw and "Lê Hoàng".encode() not in raw
    # The hub's login can overwrite it: with a roster of its own making, HS003 holding someone else's card.
    people = [{"id": "HS003", "full_name": "Lê Hoàng Cường", "role": "student", "cards": ["04A1B2C5", "0BADCAFE"]}]
    altered = {**original, "body": {"people": people}, "version": original["version"] + 1}
    hub_peer = MqttPeer(broker, "hub", BROKER_USERS["hub"])
    hub_peer.connect()
    hub_peer.publish(f"{BASE}/downlink/roster", json.dumps(altered).encode(), retain=True)
    hub_peer.close()

    results = subscriber_factory(topics=[f"{BASE}/result"])
    gate.start()
    results.wait_for(lambda m: len(m) >= 1, 20)
    refusal = json.loads(results.messages()[0].payload)
    assert not refusal["ok"] and "signature" in refusal["reason"]
    assert "0BADCAFE" not in gate_roster(gate.journal)["HS003"].cards

    # The hub believes the gate is up to date; --force replaces the altered retained message.
    result = cli("hub", "roster", "publish", "--device", DEVICE, "--force", "--wait", "20", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "applied by the gate" in result.stdout


def test_a_school_sized_templates_message_passes_the_production_broker(
    hub_store: Store, tmp_path: Path, broker: Broker, pki: Pki, gate_factory: Any
) -> None:
    """2,000 students with 3 SFace-sized templates each: one message of about 4 MB, applied whole."""
    config_path = hub_toml(tmp_path, hub_store, broker, pki)
    config = load_hub_config(config_path)
    count = 2000
    lines = [f"{i},HS{i:05d},Học Sinh {i},6A,Học sinh,{0x04000000 + i:08X},,,\n" for i in range(count)]
    assert cli("hub", "roster", "import", str(write_csv(tmp_path / "ds.csv", lines)), "--school", SCHOOL,
               "--config", str(config_path)).exit_code == 0  # fmt: skip
    rng = np.random.default_rng(7)
    faces = {f"HS{i:05d}": rng.standard_normal((3, 128)).astype(np.float32) for i in range(count)}
    conn = hub_store.connect()
    try:
        import_templates(conn, hub_sealer(config, create=True), SCHOOL, {MODEL: faces})
    finally:
        conn.close()
    gate = gate_factory(broker, hub_key=load_private_key(tmp_path / "hub-signing.key"))
    face_key = gate.face_key
    register_with_cli(config_path, gate.config)
    gate.start()
    gate.wait(lambda: gate.sync_status().get("state") == "online", 15, "online")

    result = cli("hub", "roster", "publish", "--device", DEVICE, "--wait", "60", "--config", str(config_path))
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if " templates: " in x)
    assert "2000 people, 6000 templates" in line and "applied by the gate" in line
    size = float(line.split("; ")[1].split(" MB")[0])
    assert 3.5 < size < 6, line
    held = gate_templates(gate.journal, face_key)
    assert len(held) == count and np.array_equal(held["HS01999"], faces["HS01999"])


@pytest.mark.parametrize(
    ("setting", "says"),
    [("message_size_limit", "over message_size_limit"), ("max_packet_size", "more than the broker accepts")],
)
def test_a_broker_limit_below_the_message_is_reported_and_retried(
    hub_store: Store, tmp_path: Path, broker_factory: Any, pki: Pki, setting: str, says: str
) -> None:
    small = broker_factory(settings={setting: "60000"})
    config_path = hub_toml(tmp_path, hub_store, small, pki)
    assert cli("hub", "roster", "import", str(write_csv(tmp_path / "ds.csv", list(ROWS.values()))), "--school",
               SCHOOL, "--config", str(config_path)).exit_code == 0  # fmt: skip
    conn = hub_store.connect()
    try:
        faces = {person: vectors(i, count=30) for i, person in enumerate(ROWS)}  # 120 x ~700 bytes of base64
        import_templates(conn, hub_sealer(load_hub_config(config_path), create=True), SCHOOL, {MODEL: faces})
        register_gate(conn, SCHOOL, DEVICE, tmp_path / "gate-templates.key")
        result = cli("hub", "roster", "publish", "--device", DEVICE, "--config", str(config_path))
        assert result.exit_code == 1
        assert f"{SCHOOL}/{DEVICE} templates: NOT SENT" in result.stderr and says in result.stderr
        assert "roster: version" in result.stdout  # the small roster went
        rows = published(conn)
        assert rows[(DEVICE, "roster")][1] != ""
        assert rows.get((DEVICE, "templates"), (0, ""))[1] == ""  # not confirmed: tried again next time
        again = cli("hub", "roster", "publish", "--device", DEVICE, "--config", str(config_path))
        assert again.exit_code == 1 and "roster: unchanged" in again.stdout and "NOT SENT" in again.stderr
    finally:
        conn.close()


def test_publish_refuses_without_a_roster_or_a_signing_key(hub_store: Store, tmp_path: Path) -> None:
    config = hub_toml(tmp_path, hub_store)
    conn = hub_store.connect()
    register_gate(conn, SCHOOL, DEVICE, tmp_path / "gate.key")
    conn.close()
    result = cli("hub", "roster", "publish", "--device", DEVICE, "--config", str(config))
    assert result.exit_code == 1 and "no roster at the hub" in result.stderr
    (tmp_path / "hub-signing.key").unlink()
    result = cli("hub", "roster", "publish", "--config", str(config))
    assert result.exit_code == 1 and "cannot read the signing key" in result.stderr
    result = cli("hub", "roster", "publish", "--device", "gate 1", "--config", str(config))
    assert result.exit_code == 2 and "letters, digits" in result.stderr
    # A gate can read any school's downlink under its own name: it gets its own school's roster only.
    two = hub_toml(tmp_path, hub_store, schools=(SCHOOL, "thcs-b"))
    result = cli("hub", "roster", "publish", "--device", DEVICE, "--config", str(two))
    assert result.exit_code == 1 and "name the gate's school with --school" in result.stderr


def test_templates_go_sealed_to_the_registered_key_only_and_never_in_clear(
    hub_store: Store, tmp_path: Path, broker: Broker, pki: Pki
) -> None:
    """A gate IT has not registered gets neither roster nor templates, whatever its status says; once registered,
    both go, sealed to its registered key, and open only with that gate's key."""
    config_path = hub_toml(tmp_path, hub_store, broker, pki)
    assert cli("hub", "roster", "import", str(write_csv(tmp_path / "ds.csv", list(ROWS.values()))), "--school",
               SCHOOL, "--config", str(config_path)).exit_code == 0  # fmt: skip
    conn = hub_store.connect()
    try:
        faces = {"HS001": vectors(1)}
        import_templates(conn, hub_sealer(load_hub_config(config_path), create=True), SCHOOL, {MODEL: faces})
        key_file = tmp_path / "gate-templates.key"
        announce_key(broker, key_file)  # a status claiming a key registers nothing
        result = cli("hub", "roster", "publish", "--device", DEVICE, "--config", str(config_path))
        assert result.exit_code == 1 and "not registered gates" in result.stderr
        assert published(conn) == {}

        register_gate(conn, SCHOOL, DEVICE, key_file)
        result = cli("hub", "roster", "publish", "--device", DEVICE, "--config", str(config_path))
        assert result.exit_code == 0, result.output
        assert "templates: version" in result.stdout and "roster: version" in result.stdout
        message = retained_templates(broker)
        context = sealed_context(message)
        opened = json.loads(open_sealed(gate_private_key(key_file), message["body"]["sealed"], context))
        assert list(opened) == ["HS001"]
        vector = np.frombuffer(base64.b64decode(opened["HS001"][0]), dtype="<f4")
        assert np.array_equal(vector, faces["HS001"][0])
        with pytest.raises(TransportSealError):
            open_sealed(gate_private_key(tmp_path / "another-gate.key"), message["body"]["sealed"], context)
    finally:
        conn.close()


def test_the_hub_catches_up_a_gate_registered_late_and_one_whose_new_key_it_approved(
    hub_store: Store, tmp_path: Path, broker: Broker, pki: Pki, gate_factory: Any
) -> None:
    """IT published before the gate was registered (so nothing was sent to it), then registered it: `edugate hub
    run` sends it roster and templates without another publish. Later the gate's template key file is replaced:
    the new key is held (logged loudly, nothing sealed to it) until IT approves it with the fingerprint
    `edugate identity` shows on the gate; then both go again, sealed to the new key."""
    config_path = hub_toml(tmp_path, hub_store, broker, pki, catch_up_every=1)
    key = load_private_key(tmp_path / "hub-signing.key")
    assert cli("hub", "roster", "import", str(write_csv(tmp_path / "ds.csv", list(ROWS.values()))), "--school",
               SCHOOL, "--config", str(config_path)).exit_code == 0  # fmt: skip
    faces = {"HS001": vectors(1), "GV001": vectors(3, count=2)}
    conn = hub_store.connect()
    hub = HubProcess(config_path)
    try:
        import_templates(conn, hub_sealer(load_hub_config(config_path), create=True), SCHOOL, {MODEL: faces})
        result = cli("hub", "roster", "publish", "--config", str(config_path))
        assert result.exit_code == 0 and "no registered gates" in result.stdout

        hub.start(wait_for="sync: connected")
        gate = gate_factory(broker, hub_key=key)
        register_with_cli(config_path, gate.config)
        gate.start()

        def templates_held() -> list[str]:
            try:
                return sorted(gate_templates(gate.journal, gate.face_key))
            except SealingError:
                return []

        def sealed_to() -> set[str]:
            return {r[0] for r in conn.all("SELECT sealed_to FROM published WHERE device = ?", [DEVICE])}

        wait(lambda: templates_held() == ["GV001", "HS001"], 30, "templates caught up on the new gate")
        wait(lambda: sorted(gate_roster(gate.journal)) == sorted(ROWS), 10, "roster caught up on the new gate")
        first = public_text(gate_private_key(gate.face_key))
        assert sealed_to() == {first}
        roster_version = published(conn)[(DEVICE, "roster")][0]

        # The gate's key file is replaced (a new SD card, say): the hub holds the key it now presents.
        gate.stop()
        gate.face_key.unlink()
        gate.start()
        hub.wait_log("presents a NEW KEY", 30)
        second = gate_identity(gate.config)
        assert second["template_key"] != first
        listing = cli("hub", "gates", "list", "--config", str(config_path))
        assert "KEY CHANGE" in listing.stdout and second["fingerprint"] in listing.stdout
        assert sealed_to() == {first}  # nothing sealed to a key IT has not approved
        wrong = cli("hub", "gates", "approve", DEVICE, "--fingerprint", "0000-0000-0000-0000", "--config",
                    str(config_path))  # fmt: skip
        assert wrong.exit_code == 1 and "not the one the gate presents" in wrong.stderr

        approved = cli("hub", "gates", "approve", DEVICE, "--fingerprint", second["fingerprint"], "--config",
                       str(config_path))  # fmt: skip
        assert approved.exit_code == 0, approved.output
        wait(lambda: templates_held() == ["GV001", "HS001"], 30, "templates sealed again to the new key")
        held = gate_templates(gate.journal, gate.face_key)
        assert all(np.array_equal(held[p], faces[p]) for p in faces)
        wait(lambda: sealed_to() == {second["template_key"]}, 10, "roster sealed again to the new key")
        version = published(conn)[(DEVICE, "roster")][0]
        assert version > roster_version
        wait(lambda: gate_meta(gate.journal, "downlink.roster") == str(version), 10, "the new roster version applied")
        assert any("catch-up" in line and "templates" in line for line in hub.stderr_lines)
        assert not any("HS001" in line or "Nguyễn" in line for line in hub.stderr_lines)  # counts, never people
    finally:
        hub.stop()
        conn.close()


def test_catch_up_picks_registered_gates_that_miss_a_stream_or_got_an_approved_key_never_an_unregistered_one(
    hub_store: Store, tmp_path: Path
) -> None:
    config = load_hub_config(hub_toml(tmp_path, hub_store))
    conn = hub_store.connect()
    try:

        def sent(device: str, stream: str, sealed_to: str | None = None, digest: str = "d") -> None:
            conn.execute(
                "INSERT INTO published(device, stream, school, version, digest, sealed_to, published_at) "
                "VALUES (?, ?, ?, 1, ?, ?, 'now') ON CONFLICT(device, stream) DO UPDATE SET sealed_to = "
                "excluded.sealed_to, digest = excluded.digest",
                [device, stream, SCHOOL, digest, sealed_to],
            )

        k1 = register_gate(conn, SCHOOL, "gate-01", tmp_path / "gate-01.key").template_key
        gates.refuse(conn, SCHOOL, "gate-02", "heard from, not registered")
        assert gates_to_catch_up(conn, config) == {}  # IT has not published to the school: nothing is due
        conn.execute("INSERT INTO meta(key, value) VALUES (?, '{}')", [PUBLISHED_MARK + SCHOOL])
        assert gates_to_catch_up(conn, config) == {SCHOOL: ["gate-01"]}  # gate-02 is not registered
        sent("gate-01", "roster", k1)
        assert gates_to_catch_up(conn, config) == {}
        conn.execute(
            "INSERT INTO templates(school, person, model, sealed, updated_at) VALUES (?, 'HS1', 'm', 'x', 'n')",
            [SCHOOL],
        )
        assert gates_to_catch_up(conn, config) == {SCHOOL: ["gate-01"]}  # the hub has templates it never sent
        sent("gate-01", "templates", k1)
        assert gates_to_catch_up(conn, config) == {}
        k2 = register_gate(conn, SCHOOL, "gate-02", tmp_path / "gate-02.key").template_key  # IT registered it
        assert gates_to_catch_up(conn, config) == {SCHOOL: ["gate-02"]}
        sent("gate-02", "roster", k2)
        sent("gate-02", "templates", k2)
        assert gates_to_catch_up(conn, config) == {}

        # gate-01 presents a new key (its key file was replaced, or someone has its login): nothing is due
        new = RegisteredGate(SCHOOL, "gate-01", tmp_path / "gate-01-new.key")
        status = new.status({"schema": 1, "device": "gate-01", "online": False, "ts": "2026-12-01T07:00:00+07:00",
                             "reason": "stopped"})  # fmt: skip
        with conn.transaction(), pytest.raises(gates.GateRefused):  # refused, the key kept (as the ingest does)
            gates.check_status(conn, gates.get(conn, "gate-01"), SCHOOL, "gate-01", status)
        assert gates_to_catch_up(conn, config) == {}
        pending = gates.get(conn, "gate-01")
        assert pending is not None and pending.pending_fingerprint is not None
        gates.approve(conn, "gate-01", pending.pending_fingerprint)  # IT read the same fingerprint on the gate
        assert gates_to_catch_up(conn, config) == {SCHOOL: ["gate-01"]}
        conn.execute("UPDATE published SET sealed_to = ?, digest = '' WHERE device = 'gate-01'", [new.template_key])
        assert gates_to_catch_up(conn, config) == {SCHOOL: ["gate-01"]}  # a send not acknowledged is not held
    finally:
        conn.close()


def test_one_publish_per_school_at_a_time_and_versions_only_move_forward(
    hub_store: Store, tmp_path: Path, broker: Broker, pki: Pki
) -> None:
    """A publish (IT's, the catch-up's, another hub instance's) holds a lease on the school while it plans and
    sends; another one is told, and the catch-up waits for its next round. A lease of a killed publish runs out."""
    config_path = hub_toml(tmp_path, hub_store, broker, pki)
    config = load_hub_config(config_path)
    assert cli("hub", "roster", "import", str(write_csv(tmp_path / "ds.csv", list(ROWS.values()))), "--school",
               SCHOOL, "--config", str(config_path)).exit_code == 0  # fmt: skip
    conn = hub_store.connect()
    try:
        register_gate(conn, SCHOOL, DEVICE, tmp_path / "gate-templates.key")
        conn.execute("INSERT INTO meta(key, value) VALUES (?, '{}')", [PUBLISHED_MARK + SCHOOL])
        lock = "publish-lock/" + SCHOOL
        soon = (datetime.now(UTC) + timedelta(minutes=5)).isoformat(timespec="seconds")
        conn.execute("INSERT INTO meta(key, value) VALUES (?, ?)", [lock, f"office-pc:4242:ab12|{soon}"])

        result = cli("hub", "roster", "publish", "--config", str(config_path))
        assert result.exit_code == 1
        assert "another publish to this school is under way (office-pc:4242:ab12" in result.stderr
        report = catch_up(conn, config, load_private_key(tmp_path / "hub-signing.key"))
        assert (report.busy, report.errors, report.items) == ([SCHOOL], [], [])  # quietly, next round
        assert published(conn) == {}

        conn.execute("UPDATE meta SET value = ? WHERE key = ?", ["office-pc:4242:ab12|2000-01-01T00:00:00+00:00", lock])
        result = cli("hub", "roster", "publish", "--config", str(config_path))  # the holder died: its lease ran out
        assert result.exit_code == 0, result.output
        assert published(conn)[(DEVICE, "roster")][1] != ""
        assert conn.one("SELECT 1 FROM meta WHERE key = ?", [lock]) is None  # given back

        version = published(conn)[(DEVICE, "roster")][0]
        older = Item(SCHOOL, DEVICE, "roster", "", "other-digest", version=version - 1)
        assert not _record(conn, older, confirmed=False)  # a reservation never goes back
        assert not _record(conn, older, confirmed=True)  # nor does a late confirmation of an older send
        newer = Item(SCHOOL, DEVICE, "roster", "", "new-digest", version=version + 1)
        assert _record(conn, newer, confirmed=False) and published(conn)[(DEVICE, "roster")] == (version + 1, "")
    finally:
        conn.close()


def test_catch_up_sends_the_model_of_the_last_publish_and_rests_a_failing_school(
    hub_store: Store, tmp_path: Path, broker: Broker, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    config_path = hub_toml(tmp_path, hub_store, broker, pki)
    config = load_hub_config(config_path)
    key = load_private_key(tmp_path / "hub-signing.key")
    assert cli("hub", "roster", "import", str(write_csv(tmp_path / "ds.csv", list(ROWS.values()))), "--school",
               SCHOOL, "--config", str(config_path)).exit_code == 0  # fmt: skip
    conn = hub_store.connect()
    worker = CatchUpWorker(hub_store, config, key, every=60)
    try:
        sealer = hub_sealer(config, create=True)
        import_templates(conn, sealer, SCHOOL, {MODEL: {"HS001": vectors(1)}, "other-model": {"HS002": vectors(2)}})
        gate_key_file = tmp_path / "gate-templates.key"
        register_gate(conn, SCHOOL, DEVICE, gate_key_file)
        conn.execute("INSERT INTO meta(key, value) VALUES (?, '{}')", [PUBLISHED_MARK + SCHOOL])  # no model known

        first = worker.run_once()  # which model's templates? The gate gets its roster meanwhile
        assert len(first.errors) == 1 and first.errors[0].startswith(f"{SCHOOL}: templates of several models")
        assert [(i.stream, i.state) for i in first.items] == [("roster", "offline")]
        second = worker.run_once()  # the school rests: no new try, no new log line
        assert (second.errors, second.items) == ([], [])
        assert sum("several models" in r.getMessage() for r in caplog.records) == 1

        conn.execute("UPDATE meta SET value = ? WHERE key = ?", [json.dumps({"model": MODEL}), PUBLISHED_MARK + SCHOOL])
        worker._failed.clear()  # ten minutes later
        third = worker.run_once()
        assert third.errors == []
        assert {(i.stream, i.state) for i in third.items} == {("roster", "unchanged"), ("templates", "offline")}
        assert published_model(conn, SCHOOL) == MODEL
        mark_published(conn, SCHOOL, None)  # a publish that sent no templates
        assert published_model(conn, SCHOOL) == MODEL
        message = retained_templates(broker)
        assert message["body"]["model"] == MODEL
        sealed = message["body"]["sealed"]
        opened = json.loads(open_sealed(gate_private_key(gate_key_file), sealed, sealed_context(message)))
        assert list(opened) == ["HS001"]
    finally:
        worker.stop()
        conn.close()


def test_a_malformed_key_in_one_gates_status_fails_that_gate_only(tmp_path: Path) -> None:
    good = public_text(gate_private_key(tmp_path / "gate.key"))
    items = [
        Item(SCHOOL, "gate-01", "roster", "", "d", version=1, sealed_to="not a key", state="pending"),
        Item(SCHOOL, "gate-02", "roster", "", "d", version=1, sealed_to=good, state="pending"),
    ]
    for item in items:
        item.body = {"people": []}
    sign_items(items, Ed25519PrivateKey.generate())
    assert [(i.device, i.state) for i in items] == [("gate-01", "failed"), ("gate-02", "pending")]
    assert items[0].error is not None and items[0].error.startswith("cannot seal to the gate's template key")
    assert items[1].payload and b"sealed" in items[1].payload
