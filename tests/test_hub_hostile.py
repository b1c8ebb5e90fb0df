"""A gate login that sends what no gate sends: the hub bounds what it reads, keeps and logs, refuses what would
wedge it, acknowledges nothing it did not store, and never holds a school's absence notices back in silence.

Every test runs the real Ingest on SQLite and on PostgreSQL (hub_store), with gates registered as IT does.
"""

from __future__ import annotations

import json
import logging
import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hub_support import ZONE, RegisteredGate, gate_event, payload, register_gate

from appliance.config import parse_config, parse_hub_config
from appliance.events import EventDraft, Kind
from appliance.hub.ingest import KEPT_CHARS, KEPT_PER_HOUR, REASON_CHARS, SEQ_AHEAD, Incoming, Ingest, RefusalLog
from appliance.hub.jobs import DailyJobs, gates_behind, notice_holds
from appliance.hub.resync import MAX_ATTEMPTS, Resyncer
from appliance.hub.roster import import_people
from appliance.hub.store import Connection, Store
from appliance.journal.db import open_database
from appliance.journal.events import EventJournal
from appliance.roster.model import Person
from appliance.sync.downlink import Downlink, Hooks
from appliance.sync.status import online_status
from appliance.sync.topics import Topics

SCHOOL = "thcs-a"
JOURNAL = "a" * 32
MONDAY = date(2024, 10, 21)


def topic(kind: str = "events", device: str = "gate-01") -> str:
    return f"edugate/{SCHOOL}/{device}/{kind}"


def incoming(data: dict[str, Any] | bytes, acks: list[str], where: str | None = None) -> Incoming:
    raw = data if isinstance(data, bytes) else payload(data)
    return Incoming(where or topic(), raw, lambda: acks.append("ack"))


def status(gate: RegisteredGate, last_seq: int, journal: str = JOURNAL) -> Incoming:
    """The gate's retained status, signed with its registered key as the gate signs it."""
    data = online_status(gate.device, [], None, True, 0, None, last_seq, journal, signer=gate.status)
    return Incoming(topic("status", gate.device), data)


def stored_seqs(conn: Connection) -> list[int]:
    return [r[0] for r in conn.all("SELECT seq FROM events ORDER BY seq")]


def reasons(conn: Connection) -> list[str]:
    return sorted(r[0] for r in conn.all("SELECT reason FROM rejected_messages"))


def stream(conn: Connection, journal: str = JOURNAL) -> tuple[int, int, str | None, int]:
    row = conn.one(
        "SELECT contiguous, highest, gap_since, resync_attempts FROM streams WHERE device = 'gate-01' AND journal = ?",
        [journal],
    )
    assert row is not None
    return row  # type: ignore[return-value]


def test_an_event_larger_than_a_gate_sends_is_refused_before_it_is_read(hub_conn: Connection) -> None:
    """A schema-valid event with a 50 MB field, and one whose reader name is 15,000 characters: neither stored."""
    register_gate(hub_conn, SCHOOL, "gate-01")
    acks: list[str] = []
    huge = gate_event("gate-01", 1, kind="rejected", person="HS001", role="student", reason="x" * (50 * 1024 * 1024))
    wide = gate_event("gate-01", 2, reader="r" * 15_000)
    Ingest(hub_conn, "edugate").store_batch(
        [incoming(huge, acks), incoming(wide, acks), incoming(gate_event("gate-01", 3), acks)]
    )
    assert acks == ["ack"] * 3
    assert stored_seqs(hub_conn) == [3]
    too_wide, too_large = reasons(hub_conn)
    assert too_large == (
        f"events message of {len(payload(huge)):,} bytes is larger than the hub takes (16,384 bytes): no gate sends "
        "one; check what publishes with this gate's login"
    )
    assert too_wide == "event schema: reader: fails maxLength"
    kept = [r[0] for r in hub_conn.all("SELECT payload FROM rejected_messages")]
    assert max(len(p) for p in kept) == KEPT_CHARS  # the 50 MB are not kept either


def test_impossible_times_and_decimal_integers_are_refused_in_one_transaction(hub_conn: Connection) -> None:
    """Years 0001 and 9999, 30 February, seq 20.0: refused with a reason, and the batch's good event goes in with
    the same commit (each of them used to split the batch into one transaction per message)."""
    gate = register_gate(hub_conn, SCHOOL, "gate-01")
    acks: list[str] = []
    bad = [
        gate_event("gate-01", 1, ts="0001-01-01T00:00:00+07:00"),
        gate_event("gate-01", 2, ts="9999-12-31T23:59:59-12:00"),
        gate_event("gate-01", 3, ts="2024-02-30T07:00:00+07:00"),
        {**gate_event("gate-01", 4), "seq": 20.0},
        gate_event("gate-01", 5, kind="arrival", person="HS001", role="student", late=True, minutes_late=5.0),
    ]
    decimal_status = json.loads(online_status("gate-01", [], None, True, 0, None, 1, JOURNAL))
    decimal_status["last_seq"] = 20.0
    ingest = Ingest(hub_conn, "edugate")
    ingest.store_batch(
        [incoming(e, acks) for e in bad]
        + [incoming(gate.status(decimal_status), acks, topic("status")), incoming(gate_event("gate-01", 6), acks)]
    )
    assert acks == ["ack"] * 7
    assert stored_seqs(hub_conn) == [6]
    assert ingest.stats.batches == 1
    assert reasons(hub_conn) == sorted(
        [
            "event schema: ts: fails pattern ^(19[7-9]\\d|20\\d\\d)-\\d{2}-\\d{2}T\\d{2}:\\d{2}:\\d{2}(\\.\\d{1,6})?"
            "[+-]\\d{2}:\\d{2}$",
        ]
        * 2
        + [
            "event ts is not a real date and time (ISO 8601 with an offset)",
            "event schema: seq: fails type integer",
            "event schema: minutes_late: fails type integer",
            "status schema: last_seq: fails type integer",
        ]
    )
    assert hub_conn.one("SELECT COUNT(*) FROM devices") == (0,)


def test_refusals_are_counted_per_sender_and_only_the_first_of_the_hour_kept(
    hub_conn: Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """300 junk messages from gate-01's login and 2 from gate-02's: every one counted, 20 of gate-01's kept (clipped),
    3 warnings for each and one line saying how many more of gate-01's were refused."""
    register_gate(hub_conn, SCHOOL, "gate-01")
    register_gate(hub_conn, SCHOOL, "gate-02")
    acks: list[str] = []
    junk = [incoming(b"\xff" * 10_000, acks) for _ in range(200)]
    long_key = b'{"schema":1,"' + b"k" * 9_000 + b'":1}'  # its schema error names the 9,000-character key
    junk += [incoming(long_key, acks) for _ in range(100)]
    other = [incoming(b"{}", acks, topic(device="gate-02")) for _ in range(2)]
    ingest = Ingest(hub_conn, "edugate")
    ingest.refusal_log = RefusalLog(quiet=0.0)  # summarise as soon as asked, instead of after a quiet second
    with caplog.at_level(logging.WARNING, logger="appliance.hub.ingest"):
        ingest.store_batch(junk[:150] + other)
        ingest.store_batch(junk[150:])  # a second batch: the hour's count goes on where the first left it
        ingest.flush_refusal_log()
    assert len(acks) == 302
    rows = hub_conn.all("SELECT device, refused, kept_in_hour, last_reason FROM rejected_counts")
    counts = {r[0]: r[1:] for r in rows}
    assert counts["gate-01"][:2] == (300, KEPT_PER_HOUR) and counts["gate-02"][:2] == (2, 2)
    assert counts["gate-01"][2].startswith("event schema: (event): Additional properties are not allowed ('kkkk")
    assert len(counts["gate-01"][2]) == REASON_CHARS
    kept = hub_conn.all("SELECT topic, reason, payload FROM rejected_messages")
    assert len(kept) == KEPT_PER_HOUR + 2
    assert all(len(r[1]) <= REASON_CHARS and len(r[2]) <= KEPT_CHARS for r in kept)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("refused a message on edugate/thcs-a/gate-01/" in line for line in lines) == 3
    assert sum("refused a message on edugate/thcs-a/gate-02/" in line for line in lines) == 2
    summaries = [line for line in lines if "more messages from" in line]
    assert len(summaries) == 1 and summaries[0].startswith("hub: 297 more messages from gate-01 refused")
    assert len(lines) == 6


def test_a_seq_far_beyond_what_the_gate_reported_is_refused(hub_conn: Connection) -> None:
    """One event of seq 2^53-1 once opened a gap no gate could fill; what the gate's status says bounds the seq."""
    gate = register_gate(hub_conn, SCHOOL, "gate-01")
    acks: list[str] = []
    ingest = Ingest(hub_conn, "edugate")
    ingest.store_batch([status(gate, 5)] + [incoming(gate_event("gate-01", s), acks) for s in range(1, 6)])
    edge, over, far = 5 + SEQ_AHEAD, 5 + SEQ_AHEAD + 1, 2**53 - 1
    ingest.store_batch([incoming(gate_event("gate-01", s), acks) for s in (far, over, edge)])
    assert acks == ["ack"] * 8
    assert stored_seqs(hub_conn) == [1, 2, 3, 4, 5, edge]
    assert reasons(hub_conn) == sorted(
        f"seq {s} is more than 10,000 beyond what gate-01 reported (seq 5); a real event this far ahead is asked "
        "for again once the gate's status reports it"
        for s in (far, over)
    )
    assert stream(hub_conn)[:2] == (5, edge)


def test_new_events_below_a_gap_the_gate_cannot_fill_do_not_keep_it_behind(hub_conn: Connection) -> None:
    """A stolen login's event 9,999 seqs ahead: the hub asks for the gap; the gate's live events keep arriving below
    it. Those used to reset the request count, so the gate stayed "behind" (holding every absence notice) for
    ever; now the hub gives up after MAX_ATTEMPTS requests."""
    gate = register_gate(hub_conn, SCHOOL, "gate-01")
    ingest = Ingest(hub_conn, "edugate")
    ingest.store_batch([status(gate, 5)] + [incoming(gate_event("gate-01", s), []) for s in range(1, 6)])
    ingest.store_batch([incoming(gate_event("gate-01", 5 + 9_999), [])])
    resyncer = Resyncer(hub_conn, "edugate", Ed25519PrivateKey.generate(), lambda t, d: None, after=60)
    now = datetime.now(UTC)
    requests = 0
    live = 5
    for n in range(MAX_ATTEMPTS + 4):
        requests += bool(resyncer.run_once(now + timedelta(seconds=61 + 60 * 2**n * 2)))
        live += 1
        ingest.store_batch([incoming(gate_event("gate-01", live), [])])  # the gate's next tap, below the gap
    assert requests == MAX_ATTEMPTS
    assert stream(hub_conn)[0] == live and stream(hub_conn)[3] == MAX_ATTEMPTS + 1  # given up
    assert gates_behind(hub_conn, SCHOOL, now) == []


def test_progress_on_the_range_asked_for_starts_the_count_again(hub_conn: Connection) -> None:
    """The other side: a gap that fills starts the requests anew, so a later loss gets all its requests."""
    gate = register_gate(hub_conn, SCHOOL, "gate-01")
    ingest = Ingest(hub_conn, "edugate")
    ingest.store_batch([status(gate, 5)] + [incoming(gate_event("gate-01", s), []) for s in (1, 2, 5)])
    resyncer = Resyncer(hub_conn, "edugate", Ed25519PrivateKey.generate(), lambda t, d: None, after=60)
    assert resyncer.run_once(datetime.now(UTC) + timedelta(seconds=61)) == 1  # seq 3-4
    ingest.store_batch([incoming(gate_event("gate-01", 3), [])])
    assert stream(hub_conn)[0] == 3 and stream(hub_conn)[3] == 1  # below what was asked for: still request 1
    ingest.store_batch([incoming(gate_event("gate-01", 4), [])])
    assert stream(hub_conn) == (5, 5, None, 0)


def test_a_resync_the_gate_answers_with_no_events_closes_the_gap(hub_conn: Connection, tmp_path: Path) -> None:
    """The real gate's side: its journal (5 events, all sent) and its downlink answering the hub's signed resync
    command. A stolen login's event 9,999 seqs ahead opened the gap; the gate has none of it, says so, and the
    hub stops waiting, instead of counting the gate behind for hours."""
    config = parse_config(
        {
            "device": {"id": "gate-01", "school": SCHOOL},
            "journal": {"path": str(tmp_path / "journal.db")},
            "vision": {"key_file": str(tmp_path / "templates.key")},
        }
    )
    database = open_database(config.journal.path, writer=True)
    try:
        journal = EventJournal(database, "gate-01")
        taps = [
            journal.append(EventDraft(Kind.UNKNOWN_CARD, datetime.now(ZONE).isoformat(timespec="milliseconds"), True))
            for _ in range(5)
        ]
        journal.mark_synced([e.seq for e in taps], datetime.now(UTC).isoformat())
        hub_key = Ed25519PrivateKey.generate()
        answers: list[bytes] = []
        downlink = Downlink(
            Topics("edugate", SCHOOL, "gate-01"),
            database,
            hub_key.public_key(),
            config,
            publish=lambda _topic, data: answers.append(data),
            hooks=Hooks(resync=journal.mark_unsynced),
        )
        gate = register_gate(hub_conn, SCHOOL, "gate-01", key_file=tmp_path / "templates.key")
        ingest = Ingest(hub_conn, "edugate")
        ingest.store_batch(
            [status(gate, journal.last_seq(), journal.journal_id)]
            + [Incoming(topic(), e.to_json().encode()) for e in taps]
        )
        forged = gate_event("gate-01", 5 + 9_999, journal=journal.journal_id)
        ingest.store_batch([incoming(forged, [])])
        assert gates_behind(hub_conn, SCHOOL, datetime.now(UTC)) == ["gate-01"]

        commands: list[tuple[str, bytes]] = []
        resyncer = Resyncer(hub_conn, "edugate", hub_key, lambda t, d: commands.append((t, d)), after=60)
        assert resyncer.run_once(datetime.now(UTC) + timedelta(seconds=61)) == 1
        for command_topic, command in commands:
            outcome = downlink.handle(command_topic, command)
            assert outcome.ok and outcome.detail["events"] == 0
        ingest.store_batch([Incoming(topic("result"), answer) for answer in answers])
        assert stream(hub_conn, journal.journal_id)[:3] == (5, 5, None)
        assert gates_behind(hub_conn, SCHOOL, datetime.now(UTC)) == []
    finally:
        database.close()


def test_an_unsigned_answer_cannot_close_a_gap_the_gates_signed_status_vouches_for(hub_conn: Connection) -> None:
    """Results are not signed, and a stolen login reads the hub's resync request on the gate's downlink: its "no
    events" answer, sent first, must not make the hub stop waiting for seqs the gate's signed status says it has."""
    gate = register_gate(hub_conn, SCHOOL, "gate-01")
    ingest = Ingest(hub_conn, "edugate")
    ingest.store_batch([status(gate, 10)] + [incoming(gate_event("gate-01", s), []) for s in range(1, 6)])
    commands: list[tuple[str, bytes]] = []
    resyncer = Resyncer(hub_conn, "edugate", Ed25519PrivateKey.generate(), lambda t, d: commands.append((t, d)), 60)
    assert resyncer.run_once(datetime.now(UTC) + timedelta(seconds=61)) == 1
    (request,) = [json.loads(data) for _, data in commands]
    now = datetime.now(UTC).isoformat(timespec="seconds")
    forged = {"schema": 1, "device": "gate-01", "ref": request["nonce"], "type": "command", "version": None,
              "ok": True, "reason": None, "detail": {"events": 0}, "ts": now}  # fmt: skip
    ingest.store_batch([incoming(forged, [], topic("result"))])
    assert stream(hub_conn)[:2] == (5, 10)  # still waiting for 6-10
    assert gates_behind(hub_conn, SCHOOL, datetime.now(UTC)) == ["gate-01"]


def test_a_gate_holding_absence_notices_back_says_so(
    hub_store: Store, hub_conn: Connection, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Which gate holds which school's absence notices, why and what: for `hub gates list`, the metrics and the
    log, from the cut-off on (waiting) and after the hold (recorded without notice)."""
    config = parse_hub_config(
        {
            "hub": {"schools": [SCHOOL]},
            "database": hub_store.config.model_dump(exclude_none=True),
            "attendance": {"class_start": "07:15", "absent_after_minutes": 15, "absent_hold_minutes": 60},
            "report": {"export_dir": str(tmp_path / "reports"), "send_at": "16:30"},
        }
    )
    import_people(hub_conn, SCHOOL, [Person("HS001", "Nguyễn Văn An", class_name="6A")])
    gate = register_gate(hub_conn, SCHOOL, "gate-01")
    ingest = Ingest(hub_conn, "edugate")
    ingest.store_batch([status(gate, 10)] + [incoming(gate_event("gate-01", s), []) for s in range(1, 6)])

    def at(hhmm: str) -> datetime:
        return datetime.combine(MONDAY, datetime.strptime(hhmm, "%H:%M").time(), tzinfo=ZONE)

    (before,) = notice_holds(hub_conn, config, at("07:00"))
    assert (before.school, before.gate, before.causes) == (SCHOOL, "gate-01", ("gap",))
    assert before.reason == "missing seq 6-10 of journal aaaaaaaa (not asked for yet)"
    assert not before.withholding  # nothing due yet: it would hold the 07:30 decision
    jobs = DailyJobs(hub_store, config)
    try:
        with caplog.at_level(logging.INFO, logger="appliance.hub.jobs"):
            jobs.run_once(at("07:31"))
            jobs.run_once(at("07:32"))  # said once, not every round
            (waiting,) = notice_holds(hub_conn, config, at("07:32"))
            assert (waiting.waiting, waiting.unnotified) == (("6A",), ())
            jobs.run_once(at("08:31"))
            (unnotified,) = notice_holds(hub_conn, config, at("08:31"))
            assert (unnotified.waiting, unnotified.unnotified) == ((), ("6A",))
            ingest.store_batch([incoming(gate_event("gate-01", s), []) for s in range(6, 11)])
            assert notice_holds(hub_conn, config, at("08:32")) == []
            jobs.run_once(at("08:32"))
    finally:
        jobs.stop()
    lines = [r.getMessage() for r in caplog.records if "absence notices of" in r.getMessage()]
    assert lines == [
        "absence notices of thcs-a 2024-10-21 held back by gate gate-01: missing seq 6-10 of journal aaaaaaaa "
        "(not asked for yet); waiting: 6A; recorded without notice: none (parents are not notified of a class "
        "decided while it is behind)",
        "absence notices of thcs-a: gate gate-01 no longer holds them back",
    ]


@contextmanager
def no_file_handles() -> Iterator[None]:
    """This process's file handle limit lowered to 3: opening any file fails with EMFILE, for real, while what is
    open stays usable. (A limit just above the handles held is not enough: a thread of an earlier test closing one
    of its sockets leaves a free number below it, and then every open succeeds. 0 is too low: poll() of one handle,
    as psycopg waits, is refused with EINVAL.) Any of 0-2 that is free is taken for the while."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (3, hard))
    taken: list[int] = []
    try:
        while True:
            taken.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    try:
        yield
    finally:
        for handle in taken:
            os.close(handle)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_out_of_file_handles_nothing_is_acknowledged_and_all_is_stored_after(
    hub_conn: Connection, tmp_path: Path
) -> None:
    """A hook that writes a file per event (as a notification channel might) meets a hub out of file handles: the
    batch is not stored, not acknowledged, and goes in whole, hooks included, once handles are free. It used to
    be stored without its hooks' work, or (for a schema read at the first event) refused, and acknowledged."""
    register_gate(hub_conn, SCHOOL, "gate-01")
    audit = tmp_path / "audit"
    audit.mkdir()

    def audit_hook(conn: Connection, school: str, event: dict[str, Any]) -> None:
        (audit / event["id"]).write_text(event["kind"])

    acks: list[str] = []
    events = [gate_event("gate-01", seq) for seq in range(1, 51)]
    batch = [Incoming(topic(), payload(e), lambda e=e: acks.append(e["id"])) for e in events]
    ingest = Ingest(hub_conn, "edugate", [audit_hook])
    with no_file_handles(), pytest.raises(OSError, match="Too many open files"):
        ingest.store_batch(batch)
    assert acks == []
    assert hub_conn.one("SELECT COUNT(*) FROM events") == (0,)
    assert hub_conn.one("SELECT COUNT(*) FROM rejected_messages") == (0,)
    ingest.store_batch(batch)  # what the ingest thread does next
    assert sorted(acks) == sorted(e["id"] for e in events)
    assert stored_seqs(hub_conn) == list(range(1, 51))
    assert len(list(audit.iterdir())) == 50 and ingest.stats.hook_failures == 0
