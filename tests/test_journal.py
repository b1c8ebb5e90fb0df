"""The journal: durable, append-only, seq contiguous from 1, unsynced events never pruned."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import jsonschema
import pytest

from appliance.events import Event, EventDraft, Kind, event_schema
from appliance.journal import EventJournal, JournalError, JournalLocked, open_database
from appliance.journal.events import JournalWriteError, journal_stats, read_events

VN = ZoneInfo("Asia/Ho_Chi_Minh")


def draft(ts: datetime, kind: Kind = Kind.ARRIVAL, person: str | None = "HS001") -> EventDraft:
    return EventDraft(
        kind=kind,
        ts=ts.isoformat(timespec="milliseconds"),
        clock_ok=False,
        person=person,
        card_uid="04A1B2C3",
        reader="lane-in",
    )


def test_wal_full_sync_and_schema_valid_events(tmp_path: Path) -> None:
    database = open_database(tmp_path / "j.db", writer=True)
    assert database.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert database.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    journal = EventJournal(database, "gate-01")
    now = datetime(2026, 11, 23, 7, 5, tzinfo=VN)
    events = [journal.append(draft(now + timedelta(seconds=i))) for i in range(3)]
    assert [e.seq for e in events] == [1, 2, 3]
    assert len({e.id for e in events}) == 3
    validator = jsonschema.Draft202012Validator(event_schema(), format_checker=jsonschema.FormatChecker())
    for row in read_events(database):
        row.pop("synced_at")
        validator.validate(row)
        assert Event.from_dict(row).to_dict() == row


def test_seq_continues_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    database = open_database(path, writer=True)
    EventJournal(database, "g").append(draft(datetime.now(VN)))
    database.close()
    database = open_database(path, writer=True)
    assert EventJournal(database, "g").append(draft(datetime.now(VN))).seq == 2


def test_single_writer_lock(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    first = open_database(path, writer=True)
    with pytest.raises(JournalLocked, match="another edugate process"):
        open_database(path, writer=True)
    reader = open_database(path, readonly=True)
    assert reader.journal_id == first.journal_id


def test_failed_commit_leaves_no_gap(tmp_path: Path) -> None:
    database = open_database(tmp_path / "j.db", writer=True)
    journal = EventJournal(database, "g")
    journal.append(draft(datetime.now(VN)))
    database.conn.execute("CREATE TRIGGER fail BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")
    with pytest.raises(JournalWriteError, match="disk on fire"):
        journal.append(draft(datetime.now(VN)))
    database.conn.execute("DROP TRIGGER fail")
    assert journal.append(draft(datetime.now(VN))).seq == 2


def test_prune_only_synced_and_old(tmp_path: Path) -> None:
    database = open_database(tmp_path / "j.db", writer=True)
    journal = EventJournal(database, "g")
    now = datetime(2026, 11, 23, 8, 0, tzinfo=VN)
    old_synced = journal.append(draft(now - timedelta(days=40)))
    old_unsynced = journal.append(draft(now - timedelta(days=40)))
    new_synced = journal.append(draft(now - timedelta(days=1)))
    journal.mark_synced([old_synced.seq, new_synced.seq], now.isoformat())
    assert journal.prune_synced(30, now) == 1
    remaining = [e["seq"] for e in read_events(database)]
    assert remaining == [old_unsynced.seq, new_synced.seq]
    stats = journal_stats(database)
    assert (stats.events, stats.unsynced, stats.last_seq) == (2, 1, 3)
    assert [e["seq"] for e in read_events(database, unsynced=True)] == [old_unsynced.seq]


def test_readonly_open_of_missing_journal_is_clear(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="no journal here yet"):
        open_database(tmp_path / "nothing.db", readonly=True)


def test_damaged_journal_is_salvaged_keeping_readable_events(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    database = open_database(path, writer=True)
    journal = EventJournal(database, "g")
    for i in range(5):
        journal.append(draft(datetime.now(VN) + timedelta(seconds=i)))
    journal_id = database.journal_id
    database.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    database.close()
    with sqlite3.connect(path) as conn:  # break an index page: quick_check fails, the table stays readable
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'events_day_person'").fetchone()[0]
    with path.open("r+b") as f:
        f.seek((root - 1) * 4096 + 8)
        f.write(b"\xff" * 64)
    database = open_database(path, writer=True)
    assert database.salvaged_from is not None and database.salvaged_from.exists()
    assert database.journal_id == journal_id
    journal = EventJournal(database, "g")
    assert journal.last_seq() == 5
    assert journal.append(draft(datetime.now(VN))).seq == 6
    assert database.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_seq_never_restarts_after_pruning_empties_the_journal(tmp_path: Path) -> None:
    """A summer holiday can prune every synced event; the next event must not reuse seq 1."""
    from datetime import datetime

    from appliance.events import EventDraft, Kind, Method
    from appliance.journal import EventJournal, open_database

    database = open_database(tmp_path / "journal.db", writer=True)
    journal = EventJournal(database, "gate-01")
    old = "2026-05-20T07:00:00+07:00"
    for i in range(3):
        journal.append(EventDraft(Kind.UNKNOWN_CARD, old, True, Method.CARD, reader="lane", card_uid=f"0A{i:06X}"))
    journal.mark_synced([1, 2, 3], "2026-05-20T00:10:00+00:00")
    assert journal.prune_synced(30, datetime.fromisoformat("2026-09-05T07:00:00+07:00")) == 3
    journal_id = database.journal_id
    database.close()
    database = open_database(tmp_path / "journal.db", writer=True)
    journal = EventJournal(database, "gate-01")
    # The hourly prune runs on the empty journal too (it failed there once, every hour).
    assert journal.prune_synced(30, datetime.fromisoformat("2026-09-05T08:00:00+07:00")) == 0
    event = journal.append(EventDraft(Kind.UNKNOWN_CARD, "2026-09-05T07:00:00+07:00", True, Method.CARD, card_uid="0B"))
    assert event.seq == 4 and database.journal_id == journal_id
    database.close()
    fresh = EventJournal(open_database(tmp_path / "fresh.db", writer=True), "gate-02")
    assert fresh.prune_synced(30, datetime.fromisoformat("2026-09-05T08:00:00+07:00")) == 0
    event = fresh.append(EventDraft(Kind.UNKNOWN_CARD, "2026-09-05T07:00:00+07:00", True, Method.CARD, card_uid="0C"))
    assert event.seq == 1
