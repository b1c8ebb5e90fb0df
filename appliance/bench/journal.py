"""``edugate bench journal``: durable single-event commits/s through EventJournal vs a bare sqlite3 loop.

Each commit is fsynced (WAL, synchronous=FULL), so the disk sets the pace; what this benchmark
judges is how much the journal layer adds on top of the same commits done by hand. Both sides
run in alternating rounds in one process, each round on a fresh database in the same folder,
so disk and machine noise hit both; the medians are compared.
"""

from __future__ import annotations

import cProfile
import json
import pstats
import shutil
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from appliance.bench.stats import emit, machine_info, progress, summary
from appliance.events import Direction, Event, EventDraft, Kind, Method
from appliance.journal import EventJournal, open_database

DEVICE = "bench-gate"
ROUNDS = 3
TARGET_EVENTS_PER_S = 2000
TARGET_OVERHEAD_RATIO = 1.5
ZONE = ZoneInfo("Asia/Ho_Chi_Minh")
_INSERT = "INSERT INTO events(seq, id, ts, day, kind, person, card_uid, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"


@dataclass
class Round:
    """One timed run of ``events`` commits on one side (``journal`` or ``baseline``)."""

    side: str
    index: int
    events: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)
    rows: int = 0
    seq_contiguous: bool = False
    journal_mode: str = ""
    synchronous: int = -1

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds


def realistic_drafts(count: int, start: datetime | None = None) -> list[EventDraft]:
    """Morning arrivals as the policy makes them: one student each, some late, both lanes, ts a few ms apart."""
    start = start or datetime.now(ZONE).replace(hour=7, minute=0, second=0, microsecond=0)
    drafts = []
    for i in range(count):
        late = i % 9 == 0
        drafts.append(
            EventDraft(
                kind=Kind.ARRIVAL,
                ts=(start + timedelta(milliseconds=97 * i)).isoformat(timespec="milliseconds"),
                clock_ok=True,
                method=Method.CARD,
                person=f"HS{i % 1500:05d}",
                role="student",
                reader="lane-in" if i % 2 else "lane-out",
                direction=Direction.IN,
                card_uid=f"04{(0xA1B2C30000 + i) & 0xFFFFFFFFFFFF:012X}",
                late=late,
                minutes_late=3 + i % 20 if late else 0,
            )
        )
    return drafts


def events_ddl(scratch: Path) -> list[str]:
    """The journal's own CREATE statements for the events table and its indexes (never a copy that drifts)."""
    database = open_database(scratch / "template.db")
    try:
        rows = database.conn.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'events' AND sql IS NOT NULL ORDER BY type DESC, name"
        ).fetchall()
    finally:
        database.close()
    return [r[0] for r in rows]


def _durability(conn: sqlite3.Connection) -> tuple[str, int]:
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    sync = conn.execute("PRAGMA synchronous").fetchone()[0]
    return str(mode).lower(), int(sync)


def _check_rows(conn: sqlite3.Connection) -> tuple[int, bool]:
    rows, low, high = conn.execute("SELECT COUNT(*), MIN(seq), MAX(seq) FROM events").fetchone()
    return rows, rows > 0 and low == 1 and high == rows


def _timed(events: int, step: Callable[[int], None], offset: int) -> tuple[float, list[float]]:
    latencies = []
    clock = time.perf_counter
    began = clock()
    for i in range(offset, offset + events):
        t0 = clock()
        step(i)
        latencies.append((clock() - t0) * 1000.0)
    return clock() - began, latencies


def baseline_round(path: Path, ddl: list[str], drafts: list[EventDraft], warmup: int, index: int) -> Round:
    """The same commits written by hand: same pragmas, schema, columns and payload shape, nothing else."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        for statement in ddl:
            conn.execute(statement)
        journal_id = uuid.uuid4().hex
        # The draft part of each payload is prepared beforehand, as a hand-written gate would get it
        # from its decision code; per event only the identity, the JSON text and the INSERT remain.
        bases = []
        for draft in drafts:
            wire = Event("", DEVICE, journal_id, 0, draft).to_dict()
            del wire["id"], wire["seq"]
            bases.append((draft, wire))
        execute = conn.execute

        def step(i: int) -> None:
            draft, base = bases[i]
            event_id = uuid.uuid4().hex
            payload = dict(base, id=event_id, seq=i + 1)
            text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
            execute(
                _INSERT,
                (i + 1, event_id, draft.ts, draft.ts[:10], draft.kind.value, draft.person, draft.card_uid, text),
            )

        for i in range(warmup):
            step(i)
        measured = len(drafts) - warmup
        seconds, latencies = _timed(measured, step, warmup)
        rows, contiguous = _check_rows(conn)
        mode, sync = _durability(conn)
    finally:
        conn.close()
    return Round("baseline", index, measured, seconds, latencies, rows, contiguous, mode, sync)


def journal_round(path: Path, drafts: list[EventDraft], warmup: int, index: int) -> Round:
    """``EventJournal.append`` exactly as the gate's worker calls it, on a journal opened as the daemon does."""
    database = open_database(path, writer=True)
    try:
        journal = EventJournal(database, DEVICE)
        append = journal.append

        def step(i: int) -> None:
            append(drafts[i])

        for i in range(warmup):
            step(i)
        measured = len(drafts) - warmup
        seconds, latencies = _timed(measured, step, warmup)
        rows, contiguous = _check_rows(database.conn)
        mode, sync = _durability(database.conn)
    finally:
        database.close()
    return Round("journal", index, measured, seconds, latencies, rows, contiguous, mode, sync)


def _emit_round(result: Round) -> None:
    emit(
        bench="journal",
        measure=result.side,
        round=result.index,
        events=result.events,
        seconds=round(result.seconds, 4),
        events_per_s=round(result.events_per_s, 1),
        rows=result.rows,
        seq_contiguous=result.seq_contiguous,
        journal_mode=result.journal_mode,
        synchronous=result.synchronous,
        **summary(result.latencies_ms, "ms"),
    )


def _per_call_us(func: Callable[[], object], repeat: int = 3000) -> float:
    began = time.perf_counter()
    for _ in range(repeat):
        func()
    return (time.perf_counter() - began) / repeat * 1e6


def cpu_breakdown(drafts: list[EventDraft]) -> dict[str, float]:
    """What the journal layer does per event besides the commit, each timed alone without I/O."""
    draft = drafts[0]
    event = Event(uuid.uuid4().hex, DEVICE, "j" * 32, 1, draft)
    base = event.to_dict()
    return {
        "uuid4_us": round(_per_call_us(lambda: uuid.uuid4().hex), 2),
        "event_to_dict_us": round(_per_call_us(event.to_dict), 2),
        "event_to_json_us": round(_per_call_us(event.to_json), 2),
        "bare_json_dumps_us": round(
            _per_call_us(lambda: json.dumps(base, ensure_ascii=False, separators=(",", ":"), sort_keys=True)), 2
        ),
    }


def profile_journal(path: Path, drafts: list[EventDraft], top: int = 8) -> list[dict[str, object]]:
    """cProfile of appends: the functions that take the most own time, as shares of the total."""
    database = open_database(path, writer=True)
    profiler = cProfile.Profile()
    try:
        journal = EventJournal(database, DEVICE)
        profiler.enable()
        for draft in drafts:
            journal.append(draft)
        profiler.disable()
    finally:
        database.close()
    stats = pstats.Stats(profiler)
    table: dict[tuple[str, int, str], tuple[Any, ...]] = getattr(stats, "stats", {})
    total = sum(entry[2] for entry in table.values()) or 1.0
    ranked = sorted(table.items(), key=lambda item: -item[1][2])[:top]
    return [
        {
            "function": f"{Path(filename).name}:{line}({name})" if line else name,
            "calls": entry[1],
            "tottime_ms": round(entry[2] * 1000, 2),
            "share": round(entry[2] / total, 3),
        }
        for (filename, line, name), entry in ranked
    ]


def run(count: int, workdir: Path | None) -> None:
    """Alternate baseline and journal rounds on fresh databases under ``workdir``; print JSON lines."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="edugate-bench-journal-", dir=workdir))
    try:
        warmup = min(50, max(1, count // 10))
        drafts = realistic_drafts(count + warmup)
        ddl = events_ddl(scratch)
        emit(
            bench="journal",
            measure="setup",
            events=count,
            warmup=warmup,
            rounds=ROUNDS,
            dir=str(scratch),
            **machine_info(),
        )
        results: dict[str, list[Round]] = {"baseline": [], "journal": []}
        for index in range(ROUNDS):
            order = ("baseline", "journal") if index % 2 == 0 else ("journal", "baseline")
            for side in order:
                path = scratch / f"{side}-{index}.db"
                progress(f"bench journal: round {index + 1}/{ROUNDS} {side} ({count} events)")
                if side == "baseline":
                    result = baseline_round(path, ddl, drafts, warmup, index)
                else:
                    result = journal_round(path, drafts, warmup, index)
                _emit_round(result)
                results[side].append(result)
                for leftover in scratch.glob(f"{side}-{index}.db*"):
                    leftover.unlink()

        ours = statistics.median(r.events_per_s for r in results["journal"])
        base = statistics.median(r.events_per_s for r in results["baseline"])
        ratio = base / ours
        breakdown = cpu_breakdown(drafts)
        emit(
            bench="journal",
            measure="cpu_breakdown",
            **breakdown,
            commit_us=round(1e6 / base, 1),
            overhead_us_per_event=round(1e6 / ours - 1e6 / base, 1),
        )
        if ratio > TARGET_OVERHEAD_RATIO:
            progress("bench journal: overhead above target, profiling the journal layer")
            top = profile_journal(scratch / "profile.db", drafts[: min(len(drafts), 1000)])
            emit(bench="journal", measure="profile", top=top)
        our_latencies = [x for r in results["journal"] for x in r.latencies_ms]
        base_latencies = [x for r in results["baseline"] for x in r.latencies_ms]
        emit(
            bench="journal",
            events=count,
            rounds=ROUNDS,
            events_per_s=round(ours, 1),
            baseline_events_per_s=round(base, 1),
            overhead_ratio=round(ratio, 3),
            target_events_per_s=TARGET_EVENTS_PER_S,
            target_overhead_ratio=TARGET_OVERHEAD_RATIO,
            meets_targets=ours >= TARGET_EVENTS_PER_S and ratio <= TARGET_OVERHEAD_RATIO,
            all_rows_ok=all(r.seq_contiguous and r.rows == count + warmup for rs in results.values() for r in rs),
            **{k.replace("ms_", "") + "_ms": v for k, v in summary(our_latencies, "ms").items()},
            **{"baseline_" + k.replace("ms_", "") + "_ms": v for k, v in summary(base_latencies, "ms").items()},
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
