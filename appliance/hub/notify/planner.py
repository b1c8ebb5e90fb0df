"""Which parent messages an event (or an absence) causes: outbox rows, written in the caller's transaction.

Planning happens inside the ingest transaction of the event itself, so a message is planned
exactly when the event is stored, once, even if the hub is killed right after: either both are
in the database or neither is. The outbox ``key`` is the idempotency key: one per child, day,
kind and channel (for e-mail, per parent address), so a second arrival the same day, an event
delivered twice or an absence planned again inserts nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from appliance.config import HubConfig
from appliance.hub.ingest import EventHook, local_day
from appliance.hub.notify.templates import Facts, render
from appliance.hub.store import Connection

log = logging.getLogger(__name__)

NOTIFIED_KINDS = ("arrival", "departure")


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """Timestamps of the outbox: UTC ISO text, all of one width, so text order is time order."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def outbox_key(school: str, person: str, day: str, kind: str, channel: str) -> str:
    """The idempotency key of one message (also sent to the gateway, which may drop repeats by it)."""
    return hashlib.sha256("|".join((school, person, day, kind, channel)).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Student:
    id: str
    full_name: str
    class_name: str | None
    phones: tuple[str, ...]
    emails: tuple[str, ...]


def _contacts(raw: Any) -> tuple[str, ...]:
    """A JSON list of phone numbers or addresses from the people table; anything else counts as none."""
    try:
        values = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return ()
    if not isinstance(values, list):
        return ()
    cleaned = (v.strip() for v in values if isinstance(v, str))
    return tuple(dict.fromkeys(v for v in cleaned if v))


def find_student(conn: Connection, school: str, person: str) -> Student | None:
    """An active student of the school, or None (staff, unknown, inactive people notify nobody)."""
    row = conn.one(
        "SELECT full_name, role, class_name, active, parent_phones, parent_emails FROM people"
        " WHERE school = ? AND id = ?",
        [school, person],
    )
    if row is None or row[1] != "student" or not row[3]:
        return None
    return Student(person, row[0], row[2], _contacts(row[4]), _contacts(row[5]))


def _deliveries(config: HubConfig, student: Student) -> list[tuple[str, str, tuple[str, ...]]]:
    """(channel, channel part of the key, recipients) per message: the webhook gets the parents' phones in one
    message, e-mail one message per parent address (so a retry never mails a parent who already has it)."""
    out: list[tuple[str, str, tuple[str, ...]]] = []
    if config.notify.webhook is not None and student.phones:
        out.append(("webhook", "webhook", student.phones))
    if config.notify.smtp is not None:
        out += [("smtp", f"smtp:{email.lower()}", (email,)) for email in student.emails]
    return out


def _plan(
    conn: Connection,
    config: HubConfig,
    school: str,
    student: Student,
    day: str,
    kind: str,
    facts: Facts,
    late: bool,
    event_id: str | None,
    skip_reason: str | None,
) -> int:
    """Insert the rows of one message kind; returns how many were new."""
    template = "arrival_late" if late else kind
    subject, text = render(config, template, facts)
    body = json.dumps(
        {
            "subject": subject,
            "text": text,
            "time": facts.time,
            "late": late,
            "minutes_late": facts.minutes_late if late else 0,
            "language": config.hub.language,
        },
        ensure_ascii=False,
        sort_keys=True,
    )
    now = iso(utc_now())
    created = 0
    for channel, key_channel, recipients in _deliveries(config, student):
        cur = conn.execute(
            "INSERT INTO outbox(key, school, person, day, kind, channel, recipients, event_id, body, status, attempts,"
            " next_attempt_at, last_error, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)"
            " ON CONFLICT(key) DO NOTHING",
            [
                outbox_key(school, student.id, day, kind, key_channel),
                school,
                student.id,
                day,
                kind,
                channel,
                json.dumps(list(recipients), ensure_ascii=False),
                event_id,
                body,
                "skipped" if skip_reason else "pending",
                now,
                skip_reason,
                now,
            ],
        )
        created += max(cur.rowcount, 0)
    return created


def _staleness(ts: datetime, now: datetime, max_age_minutes: int) -> str | None:
    """Why an event is too old (or too far ahead) to tell parents about, or None."""
    age = (now - ts).total_seconds() / 60
    if age > max_age_minutes:
        return (
            f"event was {age:.0f} min old when it reached the hub (notify.max_age_minutes = {max_age_minutes}):"
            " not sent, so that a late backlog wakes nobody"
        )
    if -age > max_age_minutes:
        return f"event time is {-age:.0f} min ahead of the hub's clock (the gate's clock is wrong?): not sent"
    return None


def event_hook(config: HubConfig) -> EventHook:
    """The ingest hook: plans arrival/departure messages for newly stored events of students."""

    def hook(conn: Connection, school: str, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        person = event.get("person")
        if not config.notify.enabled or kind not in NOTIFIED_KINDS or not person or event.get("role") == "staff":
            return
        student = find_student(conn, school, person)
        if student is None:
            return
        raw_ts = str(event["ts"])
        reason = _staleness(datetime.fromisoformat(raw_ts), utc_now(), config.notify.max_age_minutes)
        late = kind == "arrival" and bool(event.get("late"))
        day = local_day(raw_ts, config.zone)  # as in the events table
        facts = Facts(
            name=student.full_name,
            class_name=student.class_name,
            school=school,
            day=day,
            time=datetime.fromisoformat(raw_ts).astimezone(config.zone).strftime("%H:%M"),
            minutes_late=int(event.get("minutes_late") or 0),
        )
        _plan(conn, config, school, student, day, str(kind), facts, late, str(event["id"]), reason)

    return hook


def plan_absent(conn: Connection, config: HubConfig, school: str, person_id: str, day: date | str) -> int:
    """Plan the 'absent without permission' message for one student and day; returns the rows created
    (0 when notifications are off, the student has no contacts, or it was planned before)."""
    if not config.notify.enabled:
        return 0
    day_text = day.isoformat() if isinstance(day, date) else date.fromisoformat(day).isoformat()
    with conn.transaction():
        student = find_student(conn, school, person_id)
        if student is None:
            return 0
        facts = Facts(
            name=student.full_name,
            class_name=student.class_name,
            school=school,
            day=day_text,
            time=datetime.now(config.zone).strftime("%H:%M"),
        )
        return _plan(conn, config, school, student, day_text, "absent", facts, False, None, None)
