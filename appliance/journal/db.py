"""Opening the journal database: WAL, full durability, schema, single writer, corruption salvage.

Salvage (a damaged journal found by the writer at start) copies every row of every table that can
still be read into ``<journal>.salvage-tmp``, in one transaction, fsyncs it and renames it
``<journal>.salvaged``: only a complete copy ever has that name. Then the damaged file (with its
-wal and -shm) is moved aside as ``<journal>.corrupt-<time>`` and the copy takes the journal's
name. Killed at any point, the next start either throws the unfinished ``.salvage-tmp`` away and
salvages again from the damaged journal, still in place, or finishes the renames of a complete
``.salvaged``: no partial copy is ever taken as the journal, and nothing readable is lost.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import sqlite_utils

from appliance.durable import fsync_dir

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TABLES = ("events", "persons", "cards", "meta", "templates", "downlink_seen")
SALVAGE_TMP, SALVAGED = ".salvage-tmp", ".salvaged"
PROGRESS_SECONDS = 2.0  # how often a long salvage says it is alive (the daemon extends systemd's start timeout)
# Unreadable rowids probed one by one before a table's damaged stretch is given up (bounds a salvage's time
# when a table's end cannot be read and its rowids have no known upper bound).
FAILED_LOOKUPS_PER_TABLE = 200_000

Progress = Callable[[str], None]


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


def _side(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _make_private(path: Path) -> None:
    """The journal holds the roster and every check-in: 0600 whatever the umask. SQLite gives its -wal and -shm
    the main file's mode, so creating the main file 0600 before SQLite does covers them; an older journal (or a
    side file) that others may read is narrowed here too."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            _narrow(path, lambda: os.fchmod(fd, 0o600))
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        side = _side(path, suffix)
        with suppress(FileNotFoundError):
            if side.stat().st_mode & 0o077:
                _narrow(side, lambda side=side: side.chmod(0o600))


def _narrow(path: Path, chmod: Callable[[], None]) -> None:
    """Another user allowed to write the journal may not chmod it: say so, but use it."""
    try:
        chmod()
    except PermissionError:
        log.warning("%s: others may read it; make it private: chmod 600 %s", path, path)


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


@dataclass
class _Copied:
    """What a salvage got out of one table."""

    rows: int = 0
    unreadable: int = 0  # rowids whose lookup failed (not all of them held a row)
    top: bool = False  # the table's highest rowid was read, and its row copied


@dataclass
class _Salvage:
    """Copies a damaged journal's readable rows into a fresh one, saying it is alive every PROGRESS_SECONDS."""

    old: sqlite3.Connection
    fresh: sqlite3.Connection
    progress: Progress | None
    copied: dict[str, _Copied] = field(default_factory=dict)
    _next_beat: float = 0.0

    def beat(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.progress is not None and (force or now >= self._next_beat):
            self._next_beat = now + PROGRESS_SECONDS
            self.progress(text)

    def tables(self) -> dict[str, str | None]:
        """Every table of the damaged journal (its schema may be unreadable: then the journal's own tables)."""
        try:
            rows = self.old.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            ).fetchall()
        except sqlite3.DatabaseError:
            rows = []
        found: dict[str, str | None] = dict.fromkeys(TABLES)
        found.update({name: sql for name, sql in rows if isinstance(name, str)})
        return found

    def copy(self, table: str, create: str | None) -> None:
        quoted = '"' + table.replace('"', '""') + '"'
        try:
            old_columns = [d[0] for d in self.old.execute(f"SELECT * FROM {quoted} LIMIT 0").description]
            if table not in TABLES and create:
                self.fresh.execute(create)  # a table of a later version: kept as it was
            new_columns = [row[1] for row in self.fresh.execute(f"PRAGMA table_info({quoted})")]
        except sqlite3.DatabaseError as exc:
            log.error("journal salvage: table %s cannot be read at all: %s", table, exc)
            self.copied[table] = _Copied(unreadable=1)
            return
        columns = [c for c in new_columns if c in old_columns]
        names = ", ".join('"' + c.replace('"', '""') + '"' for c in columns)
        insert = f"INSERT OR IGNORE INTO {quoted}({names}) VALUES ({', '.join('?' * len(columns))})"
        self.copied[table] = _Copied()
        self.beat(f"salvaging the journal: copying {table}", force=True)
        try:
            self.old.execute(f"SELECT rowid FROM {quoted} LIMIT 0")
        except sqlite3.DatabaseError:
            self._scan(table, f"SELECT {names} FROM {quoted}", insert)  # WITHOUT ROWID: no ranges to split
            return
        self._ranges(table, f"SELECT rowid, {names} FROM {quoted} WHERE rowid", insert)

    def _ranges(self, table: str, select: str, insert: str) -> None:
        """Divide and conquer over rowid ranges: a range that reads whole is copied at once, one that fails is
        split, so only rowids whose own lookup fails are lost (a plain scan stops at the first bad page).

        One rowid is looked up with ``=``: a range scan also steps to the row after its last one, so the last
        readable row before a bad page fails in any range, and only an exact lookup gets it out."""
        result = self.copied[table]
        quoted = '"' + table.replace('"', '""') + '"'
        low, high = self._bound(f"SELECT MIN(rowid) FROM {quoted}"), self._bound(f"SELECT MAX(rowid) FROM {quoted}")
        if low == () or high == ():
            result.top = True  # an empty table: nothing to lose
            return
        # An unreadable end: rowids start at 1 in every journal table, and the top is bounded by the failure budget.
        stack = [(low if isinstance(low, int) else 1, high if isinstance(high, int) else 2**63 - 1)]
        failures = 0
        between, exact = f"{select} BETWEEN ? AND ? ORDER BY rowid", f"{select} = ?"
        while stack:
            first, last = stack.pop()
            try:
                if first == last:
                    rows = self.old.execute(exact, [first]).fetchall()
                else:
                    rows = self.old.execute(between, [first, last]).fetchall()
            except sqlite3.DatabaseError:
                if first == last:
                    result.unreadable += 1
                    continue
                failures += 1
                if failures > FAILED_LOOKUPS_PER_TABLE:
                    log.error("journal salvage: %s: rowids %d..%d given up as unreadable", table, first, last)
                    result.unreadable += 1
                    continue
                middle = (first + last) // 2
                stack += [(middle + 1, last), (first, middle)]
                continue
            self.fresh.executemany(insert, [row[1:] for row in rows])
            result.rows += len(rows)
            if rows and rows[-1][0] == high:
                result.top = True
            self.beat(f"salvaging the journal: {table}: {result.rows} rows copied")

    def _scan(self, table: str, select: str, insert: str) -> None:
        result = self.copied[table]
        try:
            for row in self.old.execute(select):
                self.fresh.execute(insert, row)
                result.rows += 1
        except sqlite3.DatabaseError as exc:
            log.error("journal salvage: %s: read stopped after %d rows: %s", table, result.rows, exc)
            result.unreadable += 1
        else:
            result.top = True

    def _bound(self, sql: str) -> int | tuple[()] | None:
        """The lowest or highest rowid; ``()`` for an empty table, None when that end cannot be read."""
        try:
            value = self.old.execute(sql).fetchone()[0]
        except sqlite3.DatabaseError:
            return None
        return () if value is None else int(value)


def _finish_salvage(path: Path, progress: Progress | None) -> Path | None:
    """Before using the journal: an unfinished salvage copy is thrown away (the damaged journal it came from is
    still in place and is salvaged again); a complete one takes the journal's place. Returns where the damaged
    journal was put aside when this finished a salvage that a kill had interrupted."""
    for suffix in ("", "-journal", "-wal", "-shm"):
        _side(path, SALVAGE_TMP + suffix).unlink(missing_ok=True)
    done = _side(path, SALVAGED)
    if not done.exists():
        return None
    try:
        with closing(sqlite3.connect(f"file:{done}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'salvaged_from'").fetchone()
    except sqlite3.DatabaseError as exc:
        raise JournalError(
            f"{done}: a salvaged journal that cannot be read ({exc}); move it away and start again"
        ) from None
    aside = Path(row[0]) if row else _aside_name(path)
    _swap_in(path, done, aside, progress)
    log.error("journal salvage interrupted last time: finished; the damaged journal is kept at %s", aside)
    return aside


def _aside_name(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside, n = _side(path, f".corrupt-{stamp}"), 2
    while aside.exists():
        aside, n = _side(path, f".corrupt-{stamp}-{n}"), n + 1
    return aside


def _swap_in(path: Path, done: Path, aside: Path, progress: Progress | None = None) -> None:
    """The damaged journal goes aside (its -wal and -shm first: none may stay beside the new file, whose pages
    they do not describe), then the complete copy takes its name; each step on disk before the next."""
    for suffix in ("-wal", "-shm", ""):
        with suppress(FileNotFoundError):
            os.rename(f"{path}{suffix}", f"{aside}{suffix}")
    fsync_dir(path.parent)
    if progress is not None:
        progress("salvaging the journal: damaged journal moved aside")
    os.rename(done, path)
    fsync_dir(path.parent)


def _salvage_into_place(path: Path, progress: Progress | None) -> Path:
    """Copy every readable row of the damaged journal at ``path`` (left in place) into a complete new journal,
    then swap it in. Returns where the damaged file was put."""
    aside = _aside_name(path)
    tmp, done = _side(path, SALVAGE_TMP), _side(path, SALVAGED)
    started = time.monotonic()
    _make_private(tmp)
    fresh = sqlite3.connect(tmp, isolation_level=None)
    try:
        # No rollback journal and no fsync per page: a copy killed half way is thrown away whole at the next start.
        fresh.execute("PRAGMA journal_mode = OFF")
        fresh.execute("PRAGMA synchronous = OFF")
        fresh.execute("BEGIN")
        _create_schema(sqlite_utils.Database(fresh))
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as old:
            salvage = _Salvage(old, fresh, progress)
            for table, create in salvage.tables().items():
                salvage.copy(table, create)
        copied = salvage.copied
        events, meta = copied["events"], copied["meta"]
        # The old journal id may be kept only if no seq it gave out can be reused: its highest event, and the
        # last_seq that pruning keeps in meta, must both have been read.
        old_id = fresh.execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()
        kept = events.top and meta.unreadable == 0 and old_id is not None
        journal_id = old_id[0] if kept else uuid.uuid4().hex
        fresh.executemany(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
            [("journal_id", journal_id), ("salvaged_from", str(aside))],
        )
        fresh.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
        fresh.execute("COMMIT")
    finally:
        fresh.close()
    salvage.beat("salvaging the journal: copy complete", force=True)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.rename(tmp, done)
    fsync_dir(path.parent)
    salvage.beat("salvaging the journal: copy in place, moving the damaged journal aside", force=True)
    _swap_in(path, done, aside, progress)
    log.error(
        "journal %s was damaged: moved to %s; recovered into a new journal in %.1f s: %s (%s)",
        path,
        aside,
        time.monotonic() - started,
        ", ".join(
            f"{name} {c.rows}" + (f" ({c.unreadable} unreadable rowids)" if c.unreadable else "")
            for name, c in copied.items()
        ),
        "same journal id, seq continues" if kept else "new journal id: the last seq could not be read",
    )
    return aside


def open_database(
    path: Path, *, writer: bool = False, readonly: bool = False, progress: Progress | None = None
) -> Database:
    """Open (creating if needed) the journal at ``path``.

    ``writer=True`` takes the exclusive event-writer lock and, if the file is damaged, salvages it (see the
    module's docstring): every row of every table that can still be read is copied into a new journal, the
    damaged file is kept aside as ``<name>.corrupt-<time>``, and the gate keeps working. ``progress`` is told
    what a salvage is doing at least every PROGRESS_SECONDS (the daemon extends its start timeout with it).
    """
    path = Path(path)
    pending = _side(path, SALVAGED)
    if readonly:
        if not path.exists():
            if pending.exists():
                raise JournalError(f"{path}: a salvage of the damaged journal was interrupted; start the daemon")
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
        if writer:
            salvaged_from = _finish_salvage(path, progress)
        elif pending.exists():
            raise JournalError(f"{path}: a salvage of the damaged journal was interrupted; start the daemon first")
        _make_private(path)
        conn: sqlite3.Connection | None = None
        try:
            conn = _connect(path, readonly=False)
            healthy = _healthy(conn)
        except sqlite3.DatabaseError:
            # e.g. "file is not a database" from _connect itself when the header is destroyed
            healthy = False
        if not healthy:
            if conn is not None:
                conn.close()
            if not writer:
                raise JournalError(f"{path}: the journal is damaged; start the daemon to salvage it")
            salvaged_from = _salvage_into_place(path, progress)
            conn = _connect(path, readonly=False)
        db = sqlite_utils.Database(conn)
        _create_schema(db)
        _meta(db, "schema_version", str(SCHEMA_VERSION))
        journal_id = _meta(db, "journal_id", uuid.uuid4().hex)
    except (sqlite3.Error, OSError) as exc:
        if lock_fd is not None:
            os.close(lock_fd)
        raise JournalError(f"{path}: cannot open the journal: {exc}") from None
    except BaseException:
        if lock_fd is not None:
            os.close(lock_fd)
        raise
    return Database(path, db, journal_id, salvaged_from, lock_fd)
