"""Journal salvage: a real damaged journal with rows in every table, salvaged whole, and salvages killed with
SIGKILL at every step, then resumed: nothing that could be read is lost, and a partial copy is never the journal.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import REPO, DaemonProcess, write_config

from appliance.journal import JournalError, open_database

EVENTS, PEOPLE, TEMPLATES, SEEN = 20_000, 3_000, 600, 500
DAMAGED = ("events", "persons", "cards", "templates", "downlink_seen")  # one leaf page of each is overwritten
GARBAGE = b"\xde\xad\xbe\xef"

Rows = dict[str, set[tuple[Any, ...]]]


def fill(path: Path) -> str:
    """A journal as a gate that ran for months has it: events (half synced), roster, cards, face templates,
    meta, replay guard. Written in one transaction (the test is not about how fast taps are appended)."""
    rng = random.Random(9)
    database = open_database(path, writer=True)
    conn = database.conn
    events = []
    # The last four weeks, whatever today is: the daemon prunes synced events older than its retention (30 days).
    first_day = date.today() - timedelta(days=28)
    for seq in range(1, EVENTS + 1):
        day = first_day + timedelta(days=seq * 27 // EVENTS)
        ts = f"{day.isoformat()}T07:{seq % 60:02d}:00.000+07:00"
        person = f"HS{seq % PEOPLE:05d}"
        payload = {"schema": 1, "id": uuid.UUID(int=rng.getrandbits(128)).hex, "device": "gate-01", "seq": seq}
        payload |= {"ts": ts, "clock_ok": True, "kind": "arrival", "person": person, "method": "card"}
        synced = f"{date.today().isoformat()}T00:00:00+00:00" if seq % 2 else None
        events.append((seq, payload["id"], ts, ts[:10], "arrival", person, f"{seq:08X}", json.dumps(payload), synced))
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", events)
    conn.executemany(
        "INSERT INTO persons VALUES (?, ?, ?, ?, 'student', 1, '[]', '[]', '2026-09-01T00:00:00+00:00')",
        [(f"HS{i:05d}", f"Nguyễn Văn {i}", f"nguyen van {i}", f"{6 + i % 4}A") for i in range(PEOPLE)],
    )
    conn.executemany("INSERT INTO cards VALUES (?, ?)", [(f"04{i:012X}", f"HS{i:05d}") for i in range(PEOPLE)])
    conn.executemany(
        "INSERT INTO templates(person_id, model, sealed, created_at) VALUES (?, 'sface-2021dec', ?, '2026-09-02')",
        [(f"HS{i:05d}", rng.randbytes(600)) for i in range(TEMPLATES)],
    )
    conn.executemany(
        "INSERT INTO downlink_seen VALUES (?, 'roster', '2026-11-01T00:00:00+00:00')",
        [(uuid.UUID(int=rng.getrandbits(128)).hex,) for _ in range(SEEN)],
    )
    conn.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [("last_seq", str(EVENTS)), ("hub_config", '{"policy": {"debounce_seconds": 20}}')],
    )
    conn.execute("COMMIT")
    journal_id = database.journal_id
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    database.close()
    return journal_id


def damage(path: Path) -> None:
    """Overwrite a leaf page in the middle of each table of DAMAGED (interior pages stay intact)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = []
        for table in DAMAGED:
            leaves = conn.execute(
                "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY path", [table]
            ).fetchall()
            pages.append(leaves[len(leaves) // 2][0])
    with path.open("r+b") as handle:
        for page in pages:
            handle.seek((page - 1) * size)
            handle.write(GARBAGE * (size // len(GARBAGE)))


def readable(path: Path, work: Path) -> Rows:
    """Every row of every table that one lookup by rowid still reads (on a copy: the original stays untouched)."""
    probe = work / "probe.db"
    shutil.copyfile(path, probe)
    found: Rows = {}
    highest = {"events": EVENTS, "persons": PEOPLE, "cards": PEOPLE, "templates": TEMPLATES, "downlink_seen": SEEN}
    with contextlib.closing(sqlite3.connect(f"file:{probe}?mode=ro", uri=True)) as conn:
        for table in (*highest, "meta"):
            rows: set[tuple[Any, ...]] = set()
            for rowid in range(1, highest.get(table, 10) + 1):
                with contextlib.suppress(sqlite3.DatabaseError):
                    row = conn.execute(f"SELECT * FROM {table} WHERE rowid = ?", [rowid]).fetchone()
                    if row is not None:
                        rows.add(tuple(row))
            found[table] = rows
    probe.unlink()
    return found


def contents(path: Path) -> Rows:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return {table: {tuple(r) for r in conn.execute(f"SELECT * FROM {table}")} for table in (*DAMAGED, "meta")}


@pytest.fixture(scope="module")
def damaged_journal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Rows]:
    """Built once: the damaged journal, its journal id, and every row still readable from it."""
    folder = tmp_path_factory.mktemp("damaged")
    path = folder / "journal.db"
    journal_id = fill(path)
    complete = readable(path, folder)
    damage(path)
    rows = readable(path, folder)
    for table in DAMAGED:  # the damage must have cost rows, or this proves nothing
        assert 0 < len(rows[table]) < len(complete[table]), table
    assert rows["meta"] == complete["meta"]
    return path, journal_id, rows


@pytest.fixture
def journal(tmp_path: Path, damaged_journal: tuple[Path, str, Rows]) -> Path:
    path = tmp_path / "journal.db"
    shutil.copyfile(damaged_journal[0], path)
    return path


def assert_salvaged(path: Path, damaged_journal: tuple[Path, str, Rows]) -> None:
    """Every readable row is in the journal, nothing else but the salvage's own mark; the damaged file is kept aside,
    byte for byte, once; no salvage file is left behind."""
    original, journal_id, rows = damaged_journal
    got = contents(path)
    for table in DAMAGED:
        assert got[table] == rows[table], f"{table}: {len(rows[table] - got[table])} readable rows lost"
    meta = dict(got["meta"])
    assert meta.pop("journal_id") == journal_id, "the last seq was read: the journal id must stay"
    assert Path(meta.pop("salvaged_from")).name.startswith("journal.db.corrupt-")
    assert set(meta.items()) == {(k, v) for k, v in rows["meta"] if k != "journal_id"}
    aside = [p for p in path.parent.glob("journal.db.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and aside[0].read_bytes() == original.read_bytes(), sorted(path.parent.iterdir())
    left = sorted(p.name for p in path.parent.iterdir() if ".salvage" in p.name)
    assert left == [], left
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_salvage_keeps_every_readable_row_of_every_table(
    journal: Path, damaged_journal: tuple[Path, str, Rows]
) -> None:
    said: list[str] = []
    started = time.monotonic()
    database = open_database(journal, writer=True, progress=said.append)
    took = time.monotonic() - started
    database.close()
    print(f"salvage of {EVENTS} events and the rest: {took:.2f} s; progress: {said}")
    assert_salvaged(journal, damaged_journal)
    assert [s for s in said if s.startswith("salvaging the journal: copying ")] == [
        f"salvaging the journal: copying {t}"
        for t in ("events", "persons", "cards", "meta", "templates", "downlink_seen")
    ]
    assert journal.stat().st_mode & 0o777 == 0o600


CHILD = """
import sys
from pathlib import Path
from appliance.journal import open_database

stop = sys.argv[2]
def progress(text):
    print(text, flush=True)
    if stop and text.startswith(stop):
        sys.stdin.readline()  # held here until the test kills this process
open_database(Path(sys.argv[1]), writer=True, progress=progress).close()
print("opened", flush=True)
"""


def salvage_in_child(path: Path, stop: str = "") -> list[str]:
    """Run a salvage in a real process; with ``stop``, SIGKILL it once it reports that step. Its output lines."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), stop],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if stop and line.startswith(stop):
            proc.send_signal(signal.SIGKILL)
            break
    code = proc.wait(timeout=120)
    stderr = proc.stderr.read() if proc.stderr else ""
    if stop:
        assert code == -signal.SIGKILL, f"the salvage ended by itself before {stop!r}: {lines}\n{stderr}"
    else:
        assert code == 0 and lines[-1] == "opened", stderr
    return lines


@pytest.mark.parametrize(
    "stop",
    [
        "salvaging the journal: copying events",  # the temporary copy has just appeared
        "salvaging the journal: copying templates",  # it has grown half way
        "salvaging the journal: copy complete",  # complete, not yet renamed
        "salvaging the journal: copy in place",  # renamed, the damaged journal still in place
        "salvaging the journal: damaged journal moved aside",  # between the two renames
    ],
)
def test_a_salvage_killed_at_any_step_resumes_and_loses_nothing(
    journal: Path, damaged_journal: tuple[Path, str, Rows], stop: str
) -> None:
    damaged = damaged_journal[0].read_bytes()
    salvage_in_child(journal, stop)
    # What a kill left must not pass for the journal: the damaged file is still the journal, or there is none.
    if stop.endswith("moved aside"):
        assert not journal.exists()
        assert (journal.parent / "journal.db.salvaged").exists()
    else:
        assert journal.read_bytes() == damaged, "a partial salvage replaced the damaged journal"
    with pytest.raises(JournalError, match=r"damaged; start the daemon|salvage of the damaged journal was interrupted"):
        open_database(journal)  # e.g. `edugate roster import`: refused, not given a partial journal
    lines = salvage_in_child(journal)
    if stop.startswith(("salvaging the journal: copy in place", "salvaging the journal: damaged")):
        assert not [line for line in lines if "copying" in line], "a complete copy was made again"
    assert_salvaged(journal, damaged_journal)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="eg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_daemon_asks_systemd_for_time_while_it_salvages(
    journal: Path, damaged_journal: tuple[Path, str, Rows], short_dir: Path
) -> None:
    """Salvage runs before READY=1, within TimeoutStartSec: each step extends it (EXTEND_TIMEOUT_USEC)."""
    lane = {"name": "lane", "type": "socket", "path": str(short_dir / "lane.sock")}
    config = write_config(short_dir / "gate.toml", journal, [lane], clock={"assume_synced": True})
    daemon = DaemonProcess(config)
    try:
        daemon.start(timeout=120)
        ready = daemon.notifications.index("READY=1")
        before = daemon.notifications[:ready]
        assert "EXTEND_TIMEOUT_USEC=30000000" in before, daemon.notifications
        assert "STATUS=salvaging the journal: copying events" in before, daemon.notifications
    finally:
        assert daemon.stop() == 0
    assert_salvaged(journal, damaged_journal)


def test_journal_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """journal.db, -wal and -shm are 0600 under umask 022 (a real process); an older 0644 journal is narrowed."""
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "os.umask(0o022)\n"
        "from appliance.journal import open_database\n"
        "path = Path(sys.argv[1])\n"
        "database = open_database(path, writer=True)\n"
        "database.conn.execute(\"INSERT INTO meta VALUES ('x', 'y')\")\n"
        "print(' '.join(f'{p.name}={p.stat().st_mode & 0o777:o}' for p in sorted(path.parent.iterdir())))\n"
    )
    new = tmp_path / "new" / "journal.db"
    old = tmp_path / "old" / "journal.db"
    old.parent.mkdir()
    with contextlib.closing(sqlite3.connect(old)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE t(x)")
        os.chmod(old, 0o644)
        for suffix in ("-wal", "-shm"):
            os.chmod(f"{old}{suffix}", 0o644)
        modes = [
            subprocess.run(
                [sys.executable, "-c", script, str(path)], capture_output=True, text=True, cwd=REPO, check=True
            ).stdout.split()
            for path in (new, old)
        ]
    for listing in modes:
        journal_files = [entry for entry in listing if entry.split("=")[0].startswith("journal.db")]
        assert {entry.split("=")[0] for entry in journal_files} >= {"journal.db", "journal.db-wal", "journal.db-shm"}
        assert all(entry.endswith("=600") for entry in journal_files), listing
