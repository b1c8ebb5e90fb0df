"""Who was at school on a day: each active student's state and the staff's clock-in/out, from the stored events.

A student with an arrival is ``present`` or ``late`` (the gate's verdict, which applied its own start
time and grace; computed from the hub's class start only if the event carries none). A student the
gate saw only leaving or tapping was at school too: ``present``. Everyone else is absent once the
class's cut-off (class start + ``absent_after_minutes``) has passed: ``absent_permitted`` under an
approved leave request covering the day, ``absent_unexcused`` otherwise; before the cut-off they
are ``pending``. On a day that is not in ``attendance.school_days`` nobody is absent (``no_school``).
An arrival after the cut-off still makes the student ``late``: the report tells what happened, while
the absence decision taken at the cut-off (appliance/hub/jobs.py) stays on record.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any

from appliance.config import HubConfig
from appliance.hub.store import Connection
from appliance.roster.model import fold

PRESENT = "present"
LATE = "late"
ABSENT_PERMITTED = "absent_permitted"
ABSENT_UNEXCUSED = "absent_unexcused"
PENDING = "pending"
NO_SCHOOL = "no_school"
STATUSES = (PRESENT, LATE, ABSENT_PERMITTED, ABSENT_UNEXCUSED, PENDING, NO_SCHOOL)
COUNTED = (PRESENT, LATE, ABSENT_PERMITTED, ABSENT_UNEXCUSED, PENDING)

_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SEEN_KINDS = ("arrival", "departure", "tap")


@dataclass(frozen=True)
class StudentDay:
    """One student on one day; times are ISO 8601 with the gate's offset, as the events carry them."""

    person: str
    full_name: str
    class_name: str
    status: str
    arrival_ts: str | None
    departure_ts: str | None
    minutes_late: int | None
    leave_reason: str | None


@dataclass(frozen=True)
class StaffDay:
    person: str
    full_name: str
    first_in: str | None
    last_out: str | None
    minutes_late: int | None


@dataclass
class _Seen:
    arrival_ts: str | None = None
    arrival_late: bool | None = None
    minutes_late: int | None = None
    departure_ts: str | None = None
    other: bool = False


def as_date(day: date | str) -> date:
    """A day given as a ``date`` or as ``YYYY-MM-DD`` (what the API and the CLI pass)."""
    if isinstance(day, datetime):
        return day.date()
    if isinstance(day, date):
        return day
    try:
        return date.fromisoformat(day)
    except ValueError:
        raise ValueError(f"not a date (YYYY-MM-DD): {day!r}") from None


def is_school_day(config: HubConfig, day: date | str) -> bool:
    return _WEEKDAYS[as_date(day).weekday()] in config.attendance.school_days


def class_start(config: HubConfig, class_name: str | None) -> time:
    by_class = config.attendance.class_start_by_class
    return by_class.get(class_name or "", config.attendance.class_start)


def cutoff(config: HubConfig, day: date | str, class_name: str | None) -> datetime:
    """The moment (in the hub's time zone) after which a student of the class without an arrival is absent."""
    start = datetime.combine(as_date(day), class_start(config, class_name), tzinfo=config.zone)
    return start + timedelta(minutes=config.attendance.absent_after_minutes)


def local_time(ts: str | None, config: HubConfig) -> datetime | None:
    """An event's timestamp in the hub's time zone (a gate's offset may differ, e.g. a clock set to UTC)."""
    if ts is None:
        return None
    return datetime.fromisoformat(ts).astimezone(config.zone)


def name_key(full_name: str) -> tuple[str, str]:
    """Vietnamese class-list order: by given name (the last word), then by the whole name."""
    folded = fold(full_name)
    return (folded.rsplit(" ", 1)[-1], folded)


def class_key(class_name: str) -> tuple[Any, ...]:
    """Natural order of class names: 6A, 6B, 10A rather than 10A, 6A, 6B."""
    return tuple(int(part) if part.isdigit() else part.casefold() for part in re.split(r"(\d+)", class_name))


def classes(conn: Connection, school: str) -> list[str]:
    """The classes with at least one active student."""
    rows = conn.all(
        "SELECT DISTINCT class_name FROM people WHERE school = ? AND role = 'student' AND active = 1 "
        "AND class_name IS NOT NULL",
        [school],
    )
    return sorted((r[0] for r in rows), key=class_key)


def schools(conn: Connection, config: HubConfig) -> list[str]:
    """The configured schools, or every school on the roster when the hub serves all of them."""
    if config.hub.schools:
        return list(config.hub.schools)
    return sorted(r[0] for r in conn.all("SELECT DISTINCT school FROM people"))


def _sightings(conn: Connection, school: str, day: date, class_name: str | None, role: str) -> dict[str, _Seen]:
    """Per person: the earliest arrival (with the gate's late verdict), the latest departure, any other tap."""
    sql = (
        "SELECT e.person, e.kind, e.ts, e.late, e.payload FROM events e JOIN people p "
        "ON p.school = e.school AND p.id = e.person "
        "WHERE e.school = ? AND e.day = ? AND p.role = ? AND e.kind IN ('arrival', 'departure', 'tap')"
    )
    params: list[Any] = [school, day.isoformat(), role]
    if class_name is not None:
        sql += " AND p.class_name = ?"
        params.append(class_name)
    seen: dict[str, _Seen] = {}
    for person, kind, ts, late, payload in conn.all(sql, params):
        entry = seen.setdefault(person, _Seen())
        moment = datetime.fromisoformat(ts)
        if kind == "arrival":
            if entry.arrival_ts is None or moment < datetime.fromisoformat(entry.arrival_ts):
                entry.arrival_ts = ts
                entry.arrival_late = None if late is None else bool(late)
                entry.minutes_late = json.loads(payload).get("minutes_late")
        elif kind == "departure":
            if entry.departure_ts is None or moment > datetime.fromisoformat(entry.departure_ts):
                entry.departure_ts = ts
        else:
            entry.other = True
    return seen


def _approved_leave(conn: Connection, school: str, day: date) -> dict[str, str]:
    """Person -> reason of an approved leave request covering the day (the newest if several)."""
    rows = conn.all(
        "SELECT person, reason FROM leave_requests WHERE school = ? AND approved = 1 AND day_from <= ? "
        "AND day_to >= ? ORDER BY created_at",
        [school, day.isoformat(), day.isoformat()],
    )
    return {person: reason or "" for person, reason in rows}


def _arrival_verdict(config: HubConfig, seen: _Seen, class_name: str | None) -> tuple[str, int | None]:
    """``present``/``late`` and the minutes late: the gate's verdict, else the hub's class start."""
    assert seen.arrival_ts is not None
    if seen.arrival_late is not None:
        if not seen.arrival_late:
            return PRESENT, None
        return LATE, seen.minutes_late
    arrived = local_time(seen.arrival_ts, config)
    assert arrived is not None
    start = datetime.combine(arrived.date(), class_start(config, class_name), tzinfo=config.zone)
    minutes = (arrived - start).total_seconds() / 60
    return (LATE, int(minutes)) if minutes > 0 else (PRESENT, None)


def _students(
    conn: Connection, config: HubConfig, school: str, day: date, class_name: str | None, now: datetime | None
) -> list[StudentDay]:
    sql = (
        "SELECT id, full_name, class_name FROM people WHERE school = ? AND role = 'student' AND active = 1 "
        "AND class_name IS NOT NULL"
    )
    params: list[Any] = [school]
    if class_name is not None:
        sql += " AND class_name = ?"
        params.append(class_name)
    roster = conn.all(sql, params)
    seen = _sightings(conn, school, day, class_name, "student")
    leave = _approved_leave(conn, school, day)
    school_day = is_school_day(config, day)
    now = now or datetime.now(config.zone)
    out: list[StudentDay] = []
    for person, full_name, klass in roster:
        entry = seen.get(person, _Seen())
        minutes: int | None = None
        reason = leave.get(person)
        if entry.arrival_ts is not None:
            status, minutes = _arrival_verdict(config, entry, klass)
        elif entry.departure_ts is not None or entry.other:
            status = PRESENT
        elif not school_day:
            status = NO_SCHOOL
        elif reason is not None:
            status = ABSENT_PERMITTED
        elif now < cutoff(config, day, klass):
            status = PENDING
        else:
            status = ABSENT_UNEXCUSED
        out.append(
            StudentDay(
                person=person,
                full_name=full_name,
                class_name=klass,
                status=status,
                arrival_ts=entry.arrival_ts,
                departure_ts=entry.departure_ts,
                minutes_late=minutes,
                leave_reason=reason if status == ABSENT_PERMITTED else None,
            )
        )
    out.sort(key=lambda s: (class_key(s.class_name), name_key(s.full_name), s.person))
    return out


def class_day(
    conn: Connection,
    config: HubConfig,
    school: str,
    day: date | str,
    class_name: str,
    *,
    now: datetime | None = None,
) -> list[StudentDay]:
    """Every active student of the class on the day, in class-list order (``now`` decides pending vs absent)."""
    return _students(conn, config, school, as_date(day), class_name, now)


def school_day(
    conn: Connection, config: HubConfig, school: str, day: date | str, *, now: datetime | None = None
) -> list[StudentDay]:
    """Every active student of the school on the day, class by class."""
    return _students(conn, config, school, as_date(day), None, now)


def staff_day(conn: Connection, config: HubConfig, school: str, day: date | str) -> list[StaffDay]:
    """Every active staff member: first arrival and last departure of the day (None when not seen)."""
    the_day = as_date(day)
    seen = _sightings(conn, school, the_day, None, "staff")
    rows = conn.all("SELECT id, full_name FROM people WHERE school = ? AND role = 'staff' AND active = 1", [school])
    out = []
    for person, full_name in rows:
        entry = seen.get(person, _Seen())
        minutes = None
        if entry.arrival_ts is not None and entry.arrival_late:
            minutes = entry.minutes_late if entry.minutes_late is not None else 0
        out.append(StaffDay(person, full_name, entry.arrival_ts, entry.departure_ts, minutes))
    out.sort(key=lambda s: (name_key(s.full_name), s.person))
    return out


def count(students: list[StudentDay]) -> dict[str, int]:
    """Counts per status; ``total`` is every active student, so the counted statuses add up to it."""
    counts = dict.fromkeys(COUNTED, 0)
    for student in students:
        if student.status in counts:
            counts[student.status] += 1
    counts["total"] = len(students)
    return counts


def school_summary(
    conn: Connection, config: HubConfig, school: str, day: date | str, *, now: datetime | None = None
) -> dict[str, Any]:
    """Per class and school-wide counts, and the staff's first in / last out (JSON-ready).

    ``present`` counts those on time; ``late`` those who came late; with ``absent_permitted``,
    ``absent_unexcused`` and ``pending`` (before the cut-off) they add up to ``total``.
    """
    the_day = as_date(day)
    students = school_day(conn, config, school, the_day, now=now)
    by_class: dict[str, list[StudentDay]] = {}
    for student in students:
        by_class.setdefault(student.class_name, []).append(student)
    return {
        "school": school,
        "day": the_day.isoformat(),
        "school_day": is_school_day(config, the_day),
        "classes": {
            name: {
                **count(members),
                "class_start": class_start(config, name).strftime("%H:%M"),
                "cutoff": cutoff(config, the_day, name).strftime("%H:%M"),
            }
            for name, members in by_class.items()
        },
        "totals": count(students),
        "staff": [
            {
                "person": s.person,
                "full_name": s.full_name,
                "first_in": s.first_in,
                "last_out": s.last_out,
                "minutes_late": s.minutes_late,
            }
            for s in staff_day(conn, config, school, the_day)
        ],
    }
