"""The hub's database: SQLite for one school, PostgreSQL for a district, behind one small API.

SQL is written once, with ``?`` placeholders and only what both engines understand
(``ON CONFLICT ... DO NOTHING/UPDATE``, TEXT/BIGINT/INTEGER columns, ISO timestamps as text);
:class:`Connection` turns the placeholders into psycopg's ``%s``. Every thread opens its own
connection; writes go through :meth:`Connection.transaction` so each change lands whole.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import lru_cache
from pathlib import Path
from typing import Any

from appliance.config import DatabaseConfig

SCHEMA_VERSION = 3
# Columns added to a table after it first shipped: a hub database made before gets them at the next start.
ADDED_COLUMNS = [
    ("published", "sealed_to", "TEXT"),  # 2: the gate key a roster or templates was sealed to
    ("streams", "resync_upto", "BIGINT"),  # top of the lowest range the last resync request asked for
]
MIGRATE_LOCK = 0x65647567617465  # PostgreSQL advisory lock key held while creating tables ("edugate")

TABLES = [
    """CREATE TABLE IF NOT EXISTS events (
        id TEXT PRIMARY KEY,
        school TEXT NOT NULL,
        device TEXT NOT NULL,
        journal TEXT NOT NULL,
        seq BIGINT NOT NULL,
        ts TEXT NOT NULL,
        day TEXT NOT NULL,
        kind TEXT NOT NULL,
        person TEXT,
        role TEXT,
        method TEXT NOT NULL,
        late INTEGER,
        payload TEXT NOT NULL,
        received_at TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS events_stream ON events(device, journal, seq)",
    "CREATE INDEX IF NOT EXISTS events_day ON events(school, day, person)",
    "CREATE INDEX IF NOT EXISTS events_person ON events(school, person, ts)",
    # One row per (device, journal): what the hub holds of that gate's seq numbers.
    """CREATE TABLE IF NOT EXISTS streams (
        device TEXT NOT NULL,
        journal TEXT NOT NULL,
        school TEXT NOT NULL,
        contiguous BIGINT NOT NULL,
        highest BIGINT NOT NULL,
        gap_since TEXT,
        progress_at TEXT,
        resync_requested_at TEXT,
        resync_attempts INTEGER NOT NULL DEFAULT 0,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (device, journal)
    )""",
    """CREATE TABLE IF NOT EXISTS devices (
        device TEXT PRIMARY KEY,
        school TEXT NOT NULL,
        online INTEGER NOT NULL,
        status TEXT NOT NULL,
        status_at TEXT NOT NULL
    )""",
    # The gates IT registered (appliance.hub.gates owns this table's SQL): a gate's school and keys are fixed
    # here, at provisioning; a key a gate presents later is held in pending_* until IT approves it.
    """CREATE TABLE IF NOT EXISTS gates (
        device TEXT PRIMARY KEY,
        school TEXT NOT NULL,
        template_key TEXT,
        signing_key TEXT,
        pending_template_key TEXT,
        pending_signing_key TEXT,
        pending_since TEXT,
        refused BIGINT NOT NULL DEFAULT 0,
        last_refusal TEXT,
        added_at TEXT NOT NULL,
        approved_at TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS downlink_results (
        ref TEXT NOT NULL,
        device TEXT NOT NULL,
        type TEXT,
        ok INTEGER NOT NULL,
        reason TEXT,
        payload TEXT NOT NULL,
        received_at TEXT NOT NULL,
        PRIMARY KEY (device, ref)
    )""",
    """CREATE TABLE IF NOT EXISTS rejected_messages (
        topic TEXT NOT NULL,
        reason TEXT NOT NULL,
        payload TEXT NOT NULL,
        received_at TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS people (
        school TEXT NOT NULL,
        id TEXT NOT NULL,
        full_name TEXT NOT NULL,
        role TEXT NOT NULL,
        class_name TEXT,
        active INTEGER NOT NULL,
        cards TEXT NOT NULL,
        parent_phones TEXT NOT NULL,
        parent_emails TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (school, id)
    )""",
    """CREATE TABLE IF NOT EXISTS templates (
        school TEXT NOT NULL,
        person TEXT NOT NULL,
        model TEXT NOT NULL,
        sealed TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (school, person, model)
    )""",
    # What was last published to each gate, per downlink stream (roster, templates, config).
    """CREATE TABLE IF NOT EXISTS published (
        device TEXT NOT NULL,
        stream TEXT NOT NULL,
        school TEXT NOT NULL,
        version BIGINT NOT NULL,
        digest TEXT NOT NULL,
        sealed_to TEXT,
        published_at TEXT NOT NULL,
        PRIMARY KEY (device, stream)
    )""",
    """CREATE TABLE IF NOT EXISTS leave_requests (
        id TEXT PRIMARY KEY,
        school TEXT NOT NULL,
        person TEXT NOT NULL,
        day_from TEXT NOT NULL,
        day_to TEXT NOT NULL,
        reason TEXT,
        approved INTEGER NOT NULL,
        source TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS leave_person ON leave_requests(school, person, day_from)",
    # Parent notifications: created in the same transaction as the event that causes them,
    # delivered later by the outbox worker; ``key`` is the idempotency key (one per child, kind, day, channel).
    """CREATE TABLE IF NOT EXISTS outbox (
        key TEXT PRIMARY KEY,
        school TEXT NOT NULL,
        person TEXT NOT NULL,
        day TEXT NOT NULL,
        kind TEXT NOT NULL,
        channel TEXT NOT NULL,
        recipients TEXT NOT NULL,
        event_id TEXT,
        body TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        next_attempt_at TEXT NOT NULL,
        last_error TEXT,
        created_at TEXT NOT NULL,
        sent_at TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS outbox_due ON outbox(status, next_attempt_at)",
    # Daily reports pushed to the city (idempotent per school, day and target).
    """CREATE TABLE IF NOT EXISTS reports (
        school TEXT NOT NULL,
        day TEXT NOT NULL,
        target TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        next_attempt_at TEXT NOT NULL,
        request TEXT NOT NULL,
        response_code INTEGER,
        response TEXT,
        sent_at TEXT,
        PRIMARY KEY (school, day, target)
    )""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # Refused messages counted per sender (the gate id of the topic, which the broker's ACL ties to the login): a
    # flood is counted here, while only the first payloads of each hour are kept in rejected_messages.
    """CREATE TABLE IF NOT EXISTS rejected_counts (
        device TEXT PRIMARY KEY,
        school TEXT NOT NULL,
        refused BIGINT NOT NULL,
        first_at TEXT NOT NULL,
        last_at TEXT NOT NULL,
        last_reason TEXT NOT NULL,
        hour TEXT NOT NULL,
        kept_in_hour INTEGER NOT NULL
    )""",
    # The resync commands sent to gates, so that a gate's answer (how many events it sent again) can close a gap
    # it has nothing for.
    """CREATE TABLE IF NOT EXISTS resync_requests (
        device TEXT NOT NULL,
        nonce TEXT NOT NULL,
        school TEXT NOT NULL,
        journal TEXT NOT NULL,
        from_seq BIGINT NOT NULL,
        to_seq BIGINT NOT NULL,
        sent_at TEXT NOT NULL,
        answered_at TEXT,
        events BIGINT,
        PRIMARY KEY (device, nonce)
    )""",
]


class StoreError(Exception):
    """The database cannot be opened or used; the message says which and why."""


def _sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite://"))


@lru_cache(maxsize=512)
def _to_pyformat(sql: str) -> str:
    """``?`` placeholders -> psycopg's ``%s``; a ``?`` inside a quoted literal or identifier stays as it is."""
    out: list[str] = []
    quote = ""
    for char in sql:
        if quote:
            if char == quote:
                quote = ""  # a doubled quote ('') closes and reopens: same result
        elif char in "'\"":
            quote = char
        elif char == "?":
            out.append("%s")
            continue
        out.append("%%" if char == "%" else char)
    return "".join(out)


class Connection:
    """One database connection (not shared between threads)."""

    def __init__(self, raw: Any, dialect: str) -> None:
        self.raw = raw
        self.dialect = dialect
        self._depth = 0

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; returns the cursor (``fetchall``, ``fetchone``, ``rowcount``)."""
        if self.dialect == "postgresql":
            cur = self.raw.cursor()
            cur.execute(_to_pyformat(sql), list(params))
            return cur
        return self.raw.execute(sql, list(params))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if self.dialect == "postgresql":
            with self.raw.cursor() as cur:
                cur.executemany(_to_pyformat(sql), [list(r) for r in rows])
        else:
            self.raw.executemany(sql, [list(r) for r in rows])

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.execute(sql, params).fetchall()]

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        row = self.execute(sql, params).fetchone()
        return tuple(row) if row is not None else None

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """All or nothing; SQLite takes the write lock at the start so two writers queue instead of failing.

        On PostgreSQL a statement that failed inside the transaction (even if the caller caught the
        error) aborts all of it, and a COMMIT then quietly rolls back: that is turned into an error
        here, so nothing is acknowledged as stored that was not.
        """
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        self._depth = 1
        try:
            self.execute("BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN")
            try:
                yield self
                if self.dialect == "postgresql" and self._pg_aborted():
                    raise StoreError("a statement failed inside the transaction; nothing of it was stored")
            except BaseException:
                self._rollback()
                raise
            self.execute("COMMIT")
        finally:
            self._depth = 0

    def _pg_aborted(self) -> bool:
        from psycopg.pq import TransactionStatus

        return bool(self.raw.info.transaction_status == TransactionStatus.INERROR)

    def _rollback(self) -> None:
        """Roll back what is open; a dead connection has nothing to roll back (keep the first error)."""
        if self.broken:
            return
        if self.dialect == "sqlite" and not self.raw.in_transaction:
            return  # SQLite already rolled back by itself (e.g. disk full)
        with suppress(Exception):
            self.execute("ROLLBACK")

    @property
    def broken(self) -> bool:
        """True once the connection is unusable (a PostgreSQL server restarted or the network dropped)."""
        return self.dialect == "postgresql" and bool(self.raw.closed or self.raw.broken)

    def close(self) -> None:
        self.raw.close()


class Store:
    """Opens connections to the configured database and creates its tables."""

    def __init__(self, config: DatabaseConfig) -> None:
        self.config = config
        self.url = config.url
        self.dialect = "sqlite" if self.url.startswith("sqlite:") else "postgresql"

    def describe(self) -> str:
        """The URL without a password, for logs and status."""
        if self.dialect == "sqlite":
            return self.url
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(self.url)
        host = parts.hostname or ""
        netloc = f"{parts.username + '@' if parts.username else ''}{host}{':' + str(parts.port) if parts.port else ''}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def connect(self) -> Connection:
        if self.dialect == "sqlite":
            path = _sqlite_path(self.url)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                raw = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                raw.execute("PRAGMA journal_mode = WAL")
                raw.execute("PRAGMA synchronous = FULL")
                raw.execute("PRAGMA busy_timeout = 10000")
            except (OSError, sqlite3.Error) as exc:
                raise StoreError(f"{path}: cannot open the hub database: {exc}") from None
            return Connection(raw, "sqlite")
        import psycopg

        password = None
        if self.config.password_file is not None:
            try:
                password = self.config.password_file.read_text("utf-8").strip()
            except OSError as exc:
                raise StoreError(f"database.password_file {self.config.password_file}: {exc.strerror}") from None
        try:
            kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": 10}
            if password is not None or os.environ.get("PGPASSWORD"):
                kwargs["password"] = password or os.environ["PGPASSWORD"]
            raw = psycopg.connect(self.url, **kwargs)
        except psycopg.Error as exc:
            raise StoreError(f"{self.describe()}: cannot connect: {str(exc).strip().splitlines()[0]}") from None
        return Connection(raw, "postgresql")

    def migrate(self) -> None:
        """Create what is missing (idempotent, safe with several hub instances starting together)."""
        conn = self.connect()
        try:
            with conn.transaction():
                if self.dialect == "postgresql":
                    # CREATE ... IF NOT EXISTS is not safe against a concurrent CREATE of the same name on
                    # PostgreSQL (a unique violation in the catalog): hub instances migrate one at a time.
                    conn.execute("SELECT pg_advisory_xact_lock(?)", [MIGRATE_LOCK])
                for statement in TABLES:
                    conn.execute(statement)
                for table, column, kind in ADDED_COLUMNS:
                    if column not in self._columns(conn, table):
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES ('schema_version', ?) ON CONFLICT(key) DO UPDATE SET "
                    "value = excluded.value",
                    [str(SCHEMA_VERSION)],
                )
        finally:
            conn.close()

    def _columns(self, conn: Connection, table: str) -> set[str]:
        if self.dialect == "sqlite":
            return {str(r[1]) for r in conn.all(f"PRAGMA table_info({table})")}
        rows = conn.all(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ?",
            [table],
        )
        return {str(r[0]) for r in rows}


@contextmanager
def migrated_connection(config: DatabaseConfig) -> Iterator[Connection]:
    """The hub's tables made or brought up to date, and one connection to them, closed after (CLI commands)."""
    store = Store(config)
    store.migrate()
    conn = store.connect()
    try:
        yield conn
    finally:
        conn.close()
