"""The demo: scripted taps through the real pipeline, then taps typed at the keyboard, then a summary."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import TextIO

from appliance.clock import Clock
from appliance.config import GateConfig, parse_config
from appliance.events import Direction
from appliance.feedback import build_feedback
from appliance.journal import open_database
from appliance.journal.events import journal_stats
from appliance.journal.roster_store import RosterStore
from appliance.readers.simulated import SimulatedReader
from appliance.readers.uid import UidError, normalise_uid
from appliance.roster.importer import load_roster_file

# (lane, card UID, what the narrator says first)
SCRIPT: list[tuple[str, str, str]] = [
    ("in", "04A1B2C3D4E5F6", "An taps in on time"),
    ("in", "04A1B2C3D4E5F7", "Ngọc taps in"),
    ("in", "04A1B2C3D4E5F6", "An taps again at once: acknowledged, no second event"),
    ("in", "3A4B5C6D", "Đức (class 6B, which started 5 minutes ago) taps in late"),
    ("in", "DEADBEEF", "an unregistered card"),
    ("in", "5E6F7A8B", "Châu has left the school: card rejected"),
    ("in", "9F8E7D6C", "teacher Bảo clocks in"),
    ("out", "04A1B2C3D4E5F7", "Ngọc leaves through the out lane"),
]


def demo_config(journal: Path, now: datetime) -> GateConfig:
    """Start times placed around now, so the demo shows on-time and late arrivals at any hour."""

    def hhmm(delta_minutes: int) -> str:
        moment = now + timedelta(minutes=delta_minutes)
        if moment.date() != now.date():
            moment = now.replace(hour=23, minute=59) if delta_minutes > 0 else now.replace(hour=0, minute=0)
        return moment.strftime("%H:%M")

    whole_day = ["00:00", "23:59"]
    return parse_config(
        {
            "device": {"id": "demo-gate", "school": "demo-school"},
            "journal": {"path": str(journal), "min_free_mb": 1},
            "policy": {
                "debounce_seconds": 30,
                "student": {"arrival_window": whole_day, "departure_window": whole_day, "start": hhmm(10)},
                "staff": {"arrival_window": whole_day, "departure_window": whole_day, "start": hhmm(10)},
                "class_start": {"6B": hhmm(-5)},
            },
            "feedback": {"outputs": ["console"]},
        },
        "<demo>",
    )


def run_demo(
    interactive: bool,
    keep: Path | None = None,
    pause: float = 0.4,
    out: TextIO = sys.stdout,
    read_line: Callable[[], str] = sys.stdin.readline,
) -> int:
    workdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="edugate-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    journal_path = workdir / "journal.db"
    config = demo_config(journal_path, datetime.now(GateConfig().zone))
    database = open_database(journal_path, writer=True)
    roster_file = resources.files("appliance.demo").joinpath("roster.csv")
    with resources.as_file(roster_file) as path:
        parsed = load_roster_file(path, config.roster)
    RosterStore(database).apply(parsed.people, replace=True)

    from appliance.daemon import Gate

    lanes = {"in": SimulatedReader("lane-in", Direction.IN), "out": SimulatedReader("lane-out", Direction.OUT)}
    feedback = build_feedback(config.feedback, "vi", console=sys.stdout)  # the demo's screen: names show
    gate = Gate(config, database, feedback, Clock(config.zone), list(lanes.values()))
    gate.start()
    out.write(f"edugate demo: journal {journal_path}, {len(parsed.people)} people on the roster\n\n")
    for lane, uid, note in SCRIPT:
        out.write(f"  -- {note}\n")
        out.flush()
        lanes[lane].tap(uid)
        gate.wait_idle()
        time.sleep(pause)

    if interactive:
        out.write("\nYour turn: type a card UID (hex) and Enter to tap in; prefix with 'out ' to tap out.\n")
        out.write("Cards on the roster: " + ", ".join(p.cards[0] for p in parsed.people if p.cards) + "\n")
        out.write("Empty line or Ctrl-D to finish.\n")
        while True:
            out.write("> ")
            out.flush()
            line = read_line()
            if not line.strip():
                break
            words = line.split()
            lane = "out" if words[0].lower() == "out" and len(words) > 1 else "in"
            try:
                uid = normalise_uid(words[-1], "auto")
            except UidError as exc:
                out.write(f"  not a card UID: {exc}\n")
                continue
            lanes[lane].tap(uid)
            gate.wait_idle()
    gate.stop()

    stats = journal_stats(database)
    integrity = database.conn.execute("PRAGMA integrity_check").fetchone()[0]
    out.write("\nSummary\n")
    out.write(
        f"  taps: {gate.counters.taps}, events journalled: {gate.counters.events}, "
        f"repeats acknowledged without a new event: {gate.counters.repeats}\n"
    )
    for kind, count in sorted(gate.counters.by_kind.items()):
        out.write(f"  {kind}: {count}\n")
    out.write(f"  journal: seq 1..{stats.last_seq}, {stats.unsynced} waiting for sync, integrity {integrity}\n")
    database.close()
    if keep:
        out.write(f"  kept in {workdir} (try: edugate events --journal {journal_path})\n")
    else:
        for leftover in workdir.iterdir():
            leftover.unlink()
        workdir.rmdir()
    return 0 if integrity == "ok" and gate.counters.errors == 0 else 1
