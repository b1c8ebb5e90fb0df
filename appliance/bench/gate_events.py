"""Events as a school's gate makes them, for the MQTT benches to send: a backlog of days, and cards for live taps.

The figures only mean something for realistic payloads (sizes, kinds, the mix of late, unknown and
staff), so the backlog is journaled through the real EventJournal and checked against the event schema.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from datetime import time as dt_time
from pathlib import Path
from typing import Any

from appliance.bench.errors import BenchError
from appliance.events import Direction, EventDraft, Kind, Method

ZONE = timezone(timedelta(hours=7))
MORNING_RUSH = (dt_time(6, 30), dt_time(7, 45))  # the backlog's events: arrivals then departures, day after day
AFTERNOON_RUSH = (dt_time(16, 15), dt_time(17, 30))


def card_uid(rng: random.Random) -> str:
    """A random 7-byte NXP-style UID (the backlog's cards; live taps use :func:`live_uid`)."""
    return "04" + "".join(f"{rng.randrange(256):02X}" for _ in range(6))


def live_uid(index: int) -> str:
    """A distinct UID per live tap, outside the backlog's 04... range, so the debounce never merges two."""
    return f"08{0xB0_0000_0000 + index:012X}"


def realistic_drafts(count: int, seed: int = 4) -> Iterator[EventDraft]:
    """A school's days at the gate: 2,000 students and 120 staff arriving in the morning rush and
    leaving in the afternoon one, some late, a few unknown or withdrawn cards, staff by card and face;
    timestamps in ms with the +07:00 offset, as the policy writes them."""
    rng = random.Random(seed)
    students = [(f"HS{i:05d}", card_uid(rng)) for i in range(1, 2001)]
    staff = [(f"GV{i:04d}", card_uid(rng)) for i in range(1, 121)]
    moment = datetime.combine(date(2026, 11, 23), MORNING_RUSH[0], ZONE)
    for _ in range(count):
        moment += timedelta(milliseconds=rng.randint(50, 1500))
        if moment.time() > MORNING_RUSH[1] and moment.time() < AFTERNOON_RUSH[0]:
            moment = datetime.combine(moment.date(), AFTERNOON_RUSH[0], ZONE)
        elif moment.time() > AFTERNOON_RUSH[1]:
            moment = datetime.combine(moment.date() + timedelta(days=1), MORNING_RUSH[0], ZONE)
        arriving = moment.time() <= MORNING_RUSH[1]
        common: dict[str, Any] = {
            "ts": moment.isoformat(timespec="milliseconds"),
            "clock_ok": True,
            "reader": "lane-in" if arriving else "lane-out",
            "direction": Direction.IN if arriving else Direction.OUT,
        }
        roll = rng.random()
        if roll < 0.02:
            yield EventDraft(Kind.UNKNOWN_CARD, card_uid=card_uid(rng), **common)
            continue
        kind = Kind.ARRIVAL if arriving else Kind.DEPARTURE
        if roll < 0.03:
            person, uid = rng.choice(students)
            yield EventDraft(Kind.REJECTED, person=person, role="student", card_uid=uid, reason="inactive", **common)
        elif roll < 0.09:
            person, uid = rng.choice(staff)
            score = round(rng.uniform(0.45, 0.8), 4)
            yield EventDraft(
                kind, method=Method.CARD_FACE, person=person, role="staff", card_uid=uid, face_score=score, **common
            )
        else:
            person, uid = rng.choice(students)
            late = arriving and rng.random() < 0.08
            minutes = (rng.randint(1, 40) if late else 0) if arriving else None
            yield EventDraft(
                kind,
                person=person,
                role="student",
                card_uid=uid,
                late=late if arriving else None,
                minutes_late=minutes,
                **common,
            )


def prefill(path: Path, device: str, count: int) -> list[bytes]:
    """Journal ``count`` events in one transaction (setup, not measured); their wire payloads in seq order."""
    from appliance.journal import EventJournal, open_database

    database = open_database(path, writer=True)
    try:
        journal = EventJournal(database, device)
        database.conn.execute("BEGIN")
        for draft in realistic_drafts(count):
            journal.append(draft)
        database.conn.execute("COMMIT")
        rows = database.conn.execute("SELECT payload FROM events ORDER BY seq").fetchall()
    finally:
        database.close()
    return [payload.encode("utf-8") for (payload,) in rows]


def check_payloads(payloads: list[bytes], sample: int = 500) -> None:
    """The prefilled events must be ones a hub accepts: validate a spread sample against the event schema."""
    import jsonschema

    from appliance.events import event_schema

    validator = jsonschema.Draft202012Validator(event_schema())
    step = max(1, len(payloads) // sample)
    for payload in payloads[::step]:
        errors = sorted(validator.iter_errors(json.loads(payload)), key=str)
        if errors:
            raise BenchError(f"bench event does not match the event schema: {errors[0].message}")
