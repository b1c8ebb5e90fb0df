"""Where SQLite and PostgreSQL differ, the hub behaves the same: NUL characters, failed statements inside a
transaction, hub instances migrating together, a database connection lost under the ingest."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time

import psycopg
import pytest
from hub_support import gate_event, payload, register_gate
from postgres_server import session_server

from appliance.config import DatabaseConfig
from appliance.hub.ingest import Incoming, Ingest, IngestWorker
from appliance.hub.store import SCHEMA_VERSION, Connection, Store, StoreError

TOPIC = "edugate/thcs-a/gate-01/events"


@pytest.fixture(autouse=True)
def _registered(request: pytest.FixtureRequest) -> None:
    """gate-01 of thcs-a registered at the hub (it refuses unregistered gates) wherever a test has a database."""
    if "hub_conn" in request.fixturenames:
        register_gate(request.getfixturevalue("hub_conn"), "thcs-a", "gate-01")


def test_a_nul_character_is_refused_alone_on_both_databases(hub_conn: Connection) -> None:
    acks: list[int] = []
    nul_person = gate_event("gate-01", 2, kind="arrival", person="HS\u00000001", role="student")
    batch = [
        Incoming(TOPIC, payload(gate_event("gate-01", 1)), lambda: acks.append(1)),
        Incoming(TOPIC, payload(nul_person), lambda: acks.append(2)),
        Incoming(TOPIC, b"\x00\xff raw bytes", lambda: acks.append(3)),
        Incoming(TOPIC, payload(gate_event("gate-01", 3)), lambda: acks.append(4)),
    ]
    ingest = Ingest(hub_conn, "edugate")
    ingest.store_batch(batch)
    assert acks == [1, 2, 3, 4]
    assert [r[0] for r in hub_conn.all("SELECT seq FROM events ORDER BY seq")] == [1, 3]
    rejected = hub_conn.all("SELECT reason, payload FROM rejected_messages ORDER BY reason")
    assert [r[0] for r in rejected] == [
        "a string holds a NUL character (\\u0000), which a database text column cannot store",
        "not JSON",
    ]
    assert rejected[1][1] == "\ufffd\ufffd raw bytes"
    assert ingest.stats.stored == 2 and ingest.stats.rejected == 2


def test_a_swallowed_database_error_never_passes_for_a_stored_event(hub_store: Store, hub_conn: Connection) -> None:
    """A hook that swallows a database error: SQLite keeps the rest of the transaction; PostgreSQL has
    aborted all of it, so that first try must not look stored: the event is stored again without the hook."""
    hub_conn.execute("CREATE TABLE once (id TEXT PRIMARY KEY)")
    hub_conn.execute("INSERT INTO once(id) VALUES ('x')")

    def clumsy_hook(conn: Connection, school: str, event: dict[str, object]) -> None:
        with contextlib.suppress(Exception):  # the hook under test ignores the error on purpose
            conn.execute("INSERT INTO once(id) VALUES ('x')")

    acks: list[str] = []
    ingest = Ingest(hub_conn, "edugate", hooks=[clumsy_hook])
    event = gate_event("gate-01", 1)
    ingest.store_batch([Incoming(TOPIC, payload(event), lambda: acks.append(event["id"]))])
    assert acks == [event["id"]]
    stored = hub_conn.one("SELECT COUNT(*) FROM events")[0]
    rejected = [r[0] for r in hub_conn.all("SELECT reason FROM rejected_messages")]
    assert (stored, rejected) == (1, [])  # the check-in is kept either way
    # PostgreSQL rolled the first try back (the hook's error poisoned it): kept without the hook's work.
    assert ingest.stats.hook_failures == (1 if hub_store.dialect == "postgresql" else 0)


def test_a_commit_after_a_swallowed_error_is_an_error_on_postgresql(hub_store: Store, hub_conn: Connection) -> None:
    """PostgreSQL answers such a COMMIT with a silent ROLLBACK; the store says so instead."""
    hub_conn.execute("INSERT INTO meta(key, value) VALUES ('taken', '1')")
    if hub_store.dialect == "postgresql":
        with pytest.raises(StoreError, match="failed inside the transaction"), hub_conn.transaction():
            hub_conn.execute("INSERT INTO meta(key, value) VALUES ('kept', '1')")
            with pytest.raises(psycopg.errors.UniqueViolation):
                hub_conn.execute("INSERT INTO meta(key, value) VALUES ('taken', '2')")
        assert hub_conn.one("SELECT COUNT(*) FROM meta WHERE key = 'kept'") == (0,)
    else:
        with hub_conn.transaction():
            hub_conn.execute("INSERT INTO meta(key, value) VALUES ('kept', '1')")
            with pytest.raises(sqlite3.IntegrityError):
                hub_conn.execute("INSERT INTO meta(key, value) VALUES ('taken', '2')")
        assert hub_conn.one("SELECT COUNT(*) FROM meta WHERE key = 'kept'") == (1,)
    hub_conn.execute("INSERT INTO meta(key, value) VALUES ('after', '1')")  # the connection is usable again
    assert hub_conn.one("SELECT value FROM meta WHERE key = 'after'") == ("1",)


def test_question_marks_and_percent_signs_inside_literals_are_text(hub_conn: Connection) -> None:
    hub_conn.execute("INSERT INTO meta(key, value) VALUES ('why?', ?)", ["100% 'sure'?"])
    hub_conn.execute("INSERT INTO meta(key, value) VALUES (?, 'it''s ?%')", ["quoted"])
    assert hub_conn.one("SELECT value FROM meta WHERE key = 'why?'") == ("100% 'sure'?",)
    assert hub_conn.one("SELECT value FROM meta WHERE key = ? AND value LIKE '%?%'", ["quoted"]) == ("it's ?%",)


def test_executemany_and_rollback_behave_alike(hub_conn: Connection) -> None:
    rows = [(f"k{i}", str(i)) for i in range(50)]
    with pytest.raises(RuntimeError), hub_conn.transaction():
        hub_conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", rows)
        raise RuntimeError("changed my mind")
    assert hub_conn.one("SELECT COUNT(*) FROM meta WHERE key LIKE 'k%'")[0] == 0
    with hub_conn.transaction():
        hub_conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO NOTHING", rows + rows)
    assert hub_conn.one("SELECT COUNT(*) FROM meta WHERE key LIKE 'k%'")[0] == 50


def test_a_hub_database_made_before_a_column_was_added_gets_it_and_keeps_its_rows(
    hub_store: Store, hub_conn: Connection
) -> None:
    """A school's hub upgraded in place: `published` of schema 1 had no sealed_to; the next start adds it."""
    hub_conn.execute("DROP TABLE published")
    hub_conn.execute(
        "CREATE TABLE published (device TEXT NOT NULL, stream TEXT NOT NULL, school TEXT NOT NULL, version BIGINT "
        "NOT NULL, digest TEXT NOT NULL, published_at TEXT NOT NULL, PRIMARY KEY (device, stream))"
    )
    hub_conn.execute("INSERT INTO published VALUES ('gate-01', 'roster', 'thcs-a', 7, 'd', 'then')")
    hub_conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    hub_store.migrate()
    hub_store.migrate()  # and again: nothing to add the second time
    assert hub_conn.all("SELECT device, version, sealed_to FROM published") == [("gate-01", 7, None)]
    assert hub_conn.one("SELECT value FROM meta WHERE key = 'schema_version'") == (str(SCHEMA_VERSION),)


def test_hub_instances_starting_together_create_the_tables_once(pytestconfig: pytest.Config) -> None:
    """Without the advisory lock, three concurrent CREATE TABLE IF NOT EXISTS fail on PostgreSQL every time."""
    server = session_server(pytestconfig)
    for _ in range(5):
        name = server.create_database("migrate")
        try:
            store = Store(DatabaseConfig(url=server.url(name), password_file=server.password_file))
            barrier = threading.Barrier(3)
            errors: list[str] = []

            def start_hub(
                store: Store = store, barrier: threading.Barrier = barrier, errors: list[str] = errors
            ) -> None:
                barrier.wait()
                try:
                    store.migrate()
                except Exception as exc:
                    errors.append(str(exc))

            threads = [threading.Thread(target=start_hub) for _ in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert errors == []
            conn = store.connect()
            assert conn.one("SELECT value FROM meta WHERE key = 'schema_version'") == (str(SCHEMA_VERSION),)
            conn.close()
        finally:
            server.drop_database(name)


def test_the_ingest_reconnects_after_the_database_connection_is_lost(pytestconfig: pytest.Config) -> None:
    """A PostgreSQL restart ends every session; the ingest must open a new one and store what it holds."""
    server = session_server(pytestconfig)
    name = server.create_database("reconnect")
    worker: IngestWorker | None = None
    try:
        store = Store(DatabaseConfig(url=server.url(name), password_file=server.password_file))
        store.migrate()
        conn = store.connect()
        register_gate(conn, "thcs-a", "gate-01")
        conn.close()
        worker = IngestWorker(store, "edugate")
        worker.start()
        acked: list[int] = []
        lock = threading.Lock()

        def ack(seq: int) -> None:
            with lock:
                acked.append(seq)

        worker.submit(TOPIC, payload(gate_event("gate-01", 1)), lambda: ack(1))
        _wait(lambda: acked == [1], "first event stored")
        with server.admin(name) as admin:
            ended = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND usename = 'edugate'",
                [name],
            ).fetchall()
        assert ended and all(row[0] for row in ended)
        for seq in (2, 3, 4):
            worker.submit(TOPIC, payload(gate_event("gate-01", seq)), lambda seq=seq: ack(seq))
        _wait(lambda: sorted(acked) == [1, 2, 3, 4], "events stored after the reconnect", timeout=20)
        check = store.connect()
        assert check.one("SELECT COUNT(*), MAX(seq) FROM events") == (4, 4)
        check.close()
        assert worker.ingest is not None and worker.ingest.stats.last_error is None
    finally:
        if worker is not None:
            worker.stop()
        server.drop_database(name)


def _wait(condition: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.05)
