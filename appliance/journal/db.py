"""Opening the journal database: WAL, full durability, schema, single writer, corruption salvage."""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


class JournalError(Exception):
    """The journal cannot be used; the message says what to do."""


class JournalLocked(JournalError):
    """Another process already writes events to this journal."""


@dataclass
class Database:
    """An open journal: the sqlite-utils wrapper, its raw connection and the writer lock if held."""

    path: Path
    db: sqlite_utils.Database
    journal_id: str
    salvaged_from: Path | None = None
    _lock_fd: int | None = None

    @property
    def conn(self) -> sqlite3.Connection:
        return self.db.conn

    def close(self) -> None:
        self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction, its lock taken up front (BEGIN IMMEDIATE) so it never fails half-way on a busy
    journal; everything in it is rolled back on any error, committed otherwise."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # a failed COMMIT can leave it open; SQLite may have rolled back by itself
            conn.execute("ROLLBACK")
        raise


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    if not readonly:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise JournalError(f"{path}: could not switch to WAL mode (got {mode})")
        # FULL in WAL mode: every commit is fsynced, so a power cut cannot lose an acknowledged tap.
        conn.execute("PRAGMA synchronous = FULL")
    return conn


def _create_schema(db: sqlite_utils.Database) -> None:
    db.execute(
        """CREATE TABLE IF NOT EXISTS events (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            ts TEXT NOT NULL,
            day TEXT NOT NULL,
            kind TEXT NOT NULL,
            person TEXT,
            card_uid TEXT,
            payload TEXT NOT NULL,
            synced_at TEXT
        )"""
    )
    db.execute("CREATE INDEX IF NOT EXISTS events_day_person ON events(day, person)")
    db.execute("CREATE INDEX IF NOT EXISTS events_unsynced ON events(seq) WHERE synced_at IS NULL")
    db.execute("CREATE INDEX IF NOT EXISTS events_synced ON events(synced_at) WHERE synced_at IS NOT NULL")
    db.execute(
        """CREATE TABLE IF NOT EXISTS persons (
            id TEXT PRIMARY KEY,
            full_name TEXT NOT NULL,
            search_name TEXT NOT NULL,
            class_name TEXT,
            role TEXT NOT NULL,
            active INTEGER NOT NULL,
            parent_phones TEXT NOT NULL DEFAULT '[]',
            parent_emails TEXT NOT NULL DEFAULT '[]',
            updated_at TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX IF NOT EXISTS persons_search ON persons(search_name)")
    db.execute(
        """CREATE TABLE IF NOT EXISTS cards (
            uid TEXT PRIMARY KEY,
            person_id TEXT NOT NULL REFERENCES persons(id) ON DELETE CASCADE
        )"""
    )
    db.execute("CREATE INDEX IF NOT EXISTS cards_person ON cards(person_id)")
    db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute(
        """CREATE TABLE IF NOT EXISTS templates (
            id INTEGER PRIMARY KEY,
            person_id TEXT NOT NULL,
            model TEXT NOT NULL,
            sealed BLOB NOT NULL,
            created_at TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX IF NOT EXISTS templates_person ON templates(person_id, model)")
    # Hub -> gate messages already obeyed, so a replayed one is refused (pruned after 30 days).
    db.execute(
        """CREATE TABLE IF NOT EXISTS downlink_seen (
            nonce TEXT PRIMARY KEY,
            type TEXT NOT NULL,
            received_at TEXT NOT NULL
        )"""
    )


def _meta(db: sqlite_utils.Database, key: str, default: str) -> str:
    row = db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
    if row is not None:
        return row[0]
    db.execute("INSERT INTO meta(key, value) VALUES (?, ?)", [key, default])
    return default


def _acquire_writer_lock(path: Path) -> int:
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JournalLocked(
            f"{path}: another edugate process is writing to this journal (stop it first: systemctl stop edugate)"
        ) from None
    return fd


def _healthy(conn: sqlite3.Connection) -> bool:
    try:
        row = conn.execute("PRAGMA quick_check").fetchone()
    except sqlite3.DatabaseError:
        return False
    return row is not None and row[0] == "ok"


def _old_journal_id(corrupt: Path) -> str | None:
    try:
        old = sqlite3.connect(f"file:{corrupt}?mode=ro", uri=True)
        row = old.execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()
    except sqlite3.DatabaseError:
        return None
    return row[0] if row else None


def _salvage(corrupt: Path, fresh: sqlite_utils.Database) -> tuple[int, bool]:
    """Copy every event row still readable from a damaged journal, keeping seq and id.

    Rows are fetched one at a time by seq, so a damaged page loses only the rows stored on it:
    a plain scan stops at the first bad page and drops every readable row after it.
    Returns (rows copied, whether the highest seq ever issued was among them): only then can
    the old journal id be kept without new events reusing a seq the hub may already have.
    """
    columns = "seq, id, ts, day, kind, person, card_uid, payload, synced_at"
    try:
        old = sqlite3.connect(f"file:{corrupt}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        log.error("journal salvage: cannot open %s: %s", corrupt, exc)
        return 0, False

    def bound(sql: str) -> int | None:
        try:
            return old.execute(sql).fetchone()[0] or 0
        except sqlite3.DatabaseError:
            return None  # that end of the table is unreadable

    first, last = bound("SELECT MIN(seq) FROM events"), bound("SELECT MAX(seq) FROM events")
    copied = skipped = 0
    top_copied = False
    seq = first or 1
    try:
        while last is None or seq <= last:
            try:
                cursor = old.execute(f"SELECT {columns} FROM events WHERE seq >= ? ORDER BY seq LIMIT 1", [seq])
                row = cursor.fetchone()
            except sqlite3.DatabaseError as exc:
                if last is None:  # no known end to skip towards: stop at the first damaged page
                    log.error("journal salvage stopped at seq %d after %d events: %s", seq, copied, exc)
                    break
                skipped += 1
                seq += 1
                continue
            if row is None:
                break
            fresh.execute(f"INSERT OR IGNORE INTO events({columns}) VALUES (?,?,?,?,?,?,?,?,?)", list(row))
            copied += 1
            top_copied = row[0] == last
            seq = row[0] + 1
    finally:
        old.close()
    if skipped:
        log.error("journal salvage: %d seq numbers up to %s could not be read", skipped, last)
    return copied, top_copied or last == 0


def open_database(path: Path, *, writer: bool = False, readonly: bool = False) -> Database:
    """Open (creating if needed) the journal at ``path``.

    ``writer=True`` takes the exclusive event-writer lock and, if the file is damaged, moves
    it aside as ``<name>.corrupt-<time>`` and starts a fresh journal holding every event that
    could still be read, so the gate keeps working and nothing readable is lost.
    """
    path = Path(path)
    if readonly:
        if not path.exists():
            raise JournalError(f"{path}: no journal here yet (start the daemon once, or check journal.path)")
        try:
            conn = _connect(path, readonly=True)
            journal_id = conn.execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()[0]
        except (sqlite3.DatabaseError, TypeError) as exc:
            raise JournalError(f"{path}: cannot read the journal: {exc}") from None
        return Database(path, sqlite_utils.Database(conn), journal_id)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JournalError(f"{path.parent}: cannot create the journal directory: {exc.strerror}") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise JournalError(
            f"{path}: not writable by this user; fix ownership (chown edugate {path.parent}) or journal.path"
        )
    lock_fd = _acquire_writer_lock(path) if writer else None
    salvaged_from: Path | None = None
    try:
        conn: sqlite3.Connection | None = None
        try:
            conn = _connect(path, readonly=False)
            healthy = _healthy(conn)
        except sqlite3.DatabaseError:
            # e.g. "file is not a database" from _connect itself when the header is destroyed
            healthy = False
        if not healthy:
            if not writer:
                raise JournalError(f"{path}: the journal is damaged; start the daemon to salvage it")
            if conn is not None:
                conn.close()
            salvaged_from = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            path.rename(salvaged_from)
            for suffix in ("-wal", "-shm"):
                side = Path(f"{path}{suffix}")
                if side.exists():
                    side.rename(Path(f"{salvaged_from}{suffix}"))
            conn = _connect(path, readonly=False)
        db = sqlite_utils.Database(conn)
        _create_schema(db)
        _meta(db, "schema_version", str(SCHEMA_VERSION))
        old_id = None
        if salvaged_from is not None:
            copied, complete = _salvage(salvaged_from, db)
            old_id = _old_journal_id(salvaged_from) if complete else None
            log.error(
                "journal %s was damaged: moved to %s, %d events recovered into a new journal (%s)",
                path,
                salvaged_from,
                copied,
                "same journal id, seq continues" if old_id else "new journal id: the last seq could not be read",
            )
        journal_id = _meta(db, "journal_id", old_id or uuid.uuid4().hex)
        if salvaged_from is not None:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('salvaged_from', ?)", [str(salvaged_from)])
    except sqlite3.OperationalError as exc:
        if lock_fd is not None:
            os.close(lock_fd)
        raise JournalError(f"{path}: cannot open the journal: {exc}") from None
    return Database(path, db, journal_id, salvaged_from, lock_fd)
