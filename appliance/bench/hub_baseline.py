"""``bench hub``'s baseline: the backlog's rows written by bare ``executemany``, 500 to a transaction.

Same run, same rows, same events table as the ingest: the ratio is what validation, dedupe, the seq
streams and MQTT cost on top of writing the rows.
"""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.bench.mqtt_broker import SCHOOL
from appliance.bench.stats import emit, progress
from appliance.hub.ingest import DEFAULT_ZONE, event_row

BASELINE_BATCH = 500


def event_rows(events: dict[str, list[bytes]]) -> list[tuple[Any, ...]]:
    """The events table's rows for the payloads, as the ingest builds them (prepared outside the timing)."""
    received = datetime.now(UTC).isoformat(timespec="milliseconds")
    return [
        tuple(event_row(SCHOOL, device, json.loads(raw), received, DEFAULT_ZONE))
        for device, payloads in events.items()
        for raw in payloads
    ]


INSERT_EVENT = (
    "INSERT INTO events(id, school, device, journal, seq, ts, day, kind, person, role, method, late, payload,"
    " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def baseline_sqlite(rows: list[tuple[Any, ...]], path: Path) -> dict[str, Any]:
    """Bare sqlite3: the same schema and pragmas as the hub's store, executemany per 500, one transaction each."""
    from appliance.hub.store import TABLES

    progress(f"bench hub: baseline: bare sqlite3 executemany of {len(rows)} rows, {BASELINE_BATCH} per transaction")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        for statement in TABLES:
            conn.execute(statement)
        began = time.monotonic()
        for start in range(0, len(rows), BASELINE_BATCH):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(INSERT_EVENT, rows[start : start + BASELINE_BATCH])
            conn.execute("COMMIT")
        seconds = time.monotonic() - began
        stored = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    finally:
        conn.close()
    return _baseline_result("sqlite", rows, seconds, stored)


def baseline_postgres(rows: list[tuple[Any, ...]], url: str) -> dict[str, Any]:
    """Bare psycopg: executemany per 500 rows, one transaction each, into the same events table."""
    import psycopg

    from appliance.hub.store import TABLES

    progress(f"bench hub: baseline: bare psycopg executemany of {len(rows)} rows, {BASELINE_BATCH} per transaction")
    sql = INSERT_EVENT.replace("?", "%s")
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in TABLES:
            conn.execute(statement)
        began = time.monotonic()
        for start in range(0, len(rows), BASELINE_BATCH):
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(sql, rows[start : start + BASELINE_BATCH])
        seconds = time.monotonic() - began
        stored = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    return _baseline_result("postgresql", rows, seconds, stored)


def _baseline_result(label: str, rows: list[tuple[Any, ...]], seconds: float, stored: int) -> dict[str, Any]:
    result = {
        "bench": "hub",
        "measure": "baseline",
        "database": label,
        "events": len(rows),
        "batch": BASELINE_BATCH,
        "seconds": round(seconds, 3),
        "events_per_s": round(len(rows) / seconds, 1) if seconds else None,
        "stored": stored,
    }
    emit(**result)
    return result
