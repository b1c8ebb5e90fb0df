"""Appending events durably and reading them back; the only code that writes the events table."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from appliance.events import Event, EventDraft
from appliance.journal.db import Database, JournalError, immediate

_INSERT = "INSERT INTO events(seq, id, ts, day, kind, person, card_uid, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"


class JournalWriteError(JournalError):
    """An event could not be committed (disk full, I/O error): the tap must not be acknowledged."""


@dataclass(frozen=True)
class JournalStats:
    events: int
    unsynced: int
    last_seq: int
    oldest_unsynced_ts: str | None
    file_bytes: int


class EventJournal:
    """Append-only events with a per-device ``seq`` contiguous from 1.

    One process writes (the open holds the writer lock), so the next seq is kept in memory
    and only advanced after the INSERT has been committed; a failed commit leaves no gap.
    """

    def __init__(self, database: Database, device: str) -> None:
        self.database = database
        self.device = device
        self._conn = database.conn
        self._lock = threading.Lock()
        row = self._conn.execute(
            "SELECT MAX(COALESCE((SELECT MAX(seq) FROM events), 0), "
            "COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'last_seq'), 0))"
        ).fetchone()
        self._next_seq = row[0] + 1

    @property
    def journal_id(self) -> str:
        return self.database.journal_id

    def append(self, draft: EventDraft) -> Event:
        """Commit one event (fsynced) and return it; raises JournalWriteError if it did not land."""
        with self._lock:
            event = Event(uuid.uuid4().hex, self.device, self.database.journal_id, self._next_seq, draft)
            try:
                # Autocommit: the single INSERT is its own transaction, durable when execute returns.
                self._conn.execute(
                    _INSERT,
                    (
                        event.seq,
                        event.id,
                        draft.ts,
                        draft.ts[:10],
                        draft.kind.value,
                        draft.person,
                        draft.card_uid,
                        event.to_json(),
                    ),
                )
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    self._conn.rollback()
                raise JournalWriteError(f"event not saved: {exc}") from exc
            self._next_seq += 1
            return event

    def last_seq(self) -> int:
        return self._next_seq - 1

    def day_rows(self, day: str) -> list[tuple[str, str | None, str | None, str, str | None]]:
        """(kind, person, card_uid, ts, direction) of a local day's events, oldest first (the policy's memory)."""
        return self._conn.execute(
            "SELECT kind, person, card_uid, ts, json_extract(payload, '$.direction') FROM events WHERE day = ? "
            "ORDER BY seq",
            [day],
        ).fetchall()

    def mark_synced(self, seqs: list[int], at: str) -> None:
        """Record the hub's acknowledgements, all in one transaction (one fsync per batch, not per event)."""
        with self._lock, immediate(self._conn):
            self._conn.executemany(
                "UPDATE events SET synced_at = ? WHERE seq = ? AND synced_at IS NULL", [(at, s) for s in seqs]
            )

    def mark_unsynced(self, from_seq: int, to_seq: int | None = None) -> int:
        """Send events ``from_seq``..``to_seq`` again (the hub asked for a resync); how many were reset."""
        with self._lock:
            cur = self._conn.execute(
                "UPDATE events SET synced_at = NULL WHERE seq BETWEEN ? AND ? AND synced_at IS NOT NULL",
                [from_seq, to_seq if to_seq is not None else 2**62],
            )
        return cur.rowcount

    def prune_synced(self, retention_days: int, now: datetime) -> int:
        """Delete synced events older than the retention; unsynced events are never deleted."""
        cutoff = (now - timedelta(days=retention_days)).isoformat()
        with self._lock, immediate(self._conn):
            # Pruning may empty the table (a long holiday): remember the last seq so it never restarts at 1.
            self._conn.execute(
                "INSERT INTO meta(key, value) VALUES ('last_seq', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [str(self._next_seq - 1)],
            )
            cur = self._conn.execute("DELETE FROM events WHERE synced_at IS NOT NULL AND ts < ?", [cutoff])
        return cur.rowcount


_SHOWN_FIELDS = ("seq", "ts", "kind", "clock_ok")


def read_events(
    database: Database, since: str | None = None, unsynced: bool = False, limit: int | None = None
) -> Iterator[dict]:
    """Events as wire dicts in seq order, optionally from a timestamp/day and only unsynced ones.

    A damaged journal (an unreadable page, a payload that is no event) ends the listing with a JournalError
    saying after which seq, once every event before it has been given: those are still worth reading.
    """
    clauses, params = [], []
    if since:
        clauses.append("ts >= ?")
        params.append(since)
    if unsynced:
        clauses.append("synced_at IS NULL")
    sql = "SELECT seq, payload, synced_at FROM events"
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += " ORDER BY seq"
    if limit:
        sql += f" LIMIT {int(limit)}"
    after = ""
    salvage = "the daemon salvages what is readable at its next start (systemctl restart edugate)"
    try:
        for seq, payload, synced_at in database.conn.execute(sql, params):
            try:
                data = json.loads(payload)
            except (TypeError, ValueError, RecursionError):
                data = None
            if not isinstance(data, dict) or any(key not in data for key in _SHOWN_FIELDS):
                raise JournalError(f"{database.path}: event seq {seq} is damaged (its payload is not an event)")
            data["synced_at"] = synced_at
            yield data
            after = f" after seq {seq}"
    except sqlite3.DatabaseError as exc:
        raise JournalError(f"{database.path}: the journal is damaged{after} ({exc}); {salvage}") from None


def journal_stats(database: Database) -> JournalStats:
    conn = database.conn
    events, last_seq = conn.execute("SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM events").fetchone()
    unsynced, oldest = conn.execute("SELECT COUNT(*), MIN(ts) FROM events WHERE synced_at IS NULL").fetchone()
    size = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            size += (database.path.parent / f"{database.path.name}{suffix}").stat().st_size
    return JournalStats(events, unsynced, last_seq, oldest, size)
