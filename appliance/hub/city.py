"""Push one school's day to the city data centre's API, once, with a record of what was sent and answered.

The city's specification is not public, so the endpoint, the bearer token and the field names
are configuration (``[report.city]``; ``field_mapping`` renames our fields, at any depth, to the
city's). One row of the ``reports`` table per (school, day) holds the status (``sending``,
``retrying``, ``sent``, ``failed``), the attempts, the exact request (the token masked) and the
server's last answer. A day the city accepted (2xx) is not sent again unless forced; a refusal
(4xx other than 408 and 429) is final; timeouts, connection errors, 408, 429 and 5xx are retried
with a doubling delay (or the server's Retry-After) up to ``max_attempts``. The row doubles as a
lease: while one hub instance is sending or waiting to retry, another one leaves the day alone.
Every request carries ``Idempotency-Key: <school>/<day>`` so that the city can drop a repeat the
hub could not know about (accepted, but the hub died before recording it).
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from appliance import __version__
from appliance.config import CityApiConfig, HubConfig
from appliance.config.hub import CITY_FIELDS
from appliance.hub.attendance import (
    StudentDay,
    as_date,
    class_start,
    count,
    cutoff,
    is_school_day,
    local_time,
    school_day,
    staff_day,
)
from appliance.hub.store import Connection

log = logging.getLogger(__name__)

TARGET = "city"
SENT, FAILED, SENDING, RETRYING = "sent", "failed", "sending", "retrying"
MAX_ANSWER = 10_000  # characters of the server's answer kept in the record
LEASE_MARGIN = 60.0  # seconds beyond the timeout before another instance may take over a send in flight


class CityError(Exception):
    """The push cannot be made at all (not configured); the message says what to set."""


@dataclass(frozen=True)
class PushResult:
    school: str
    day: str
    status: str  # sent | failed | retrying (interrupted by a stop) | skipped_sent | busy
    attempts: int
    response_code: int | None
    response: str | None

    @property
    def done(self) -> bool:
        """Finished one way or the other (not interrupted, not left to another instance)."""
        return self.status in (SENT, FAILED, "skipped_sent")


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def report_payload(conn: Connection, config: HubConfig, school: str, day: date | str) -> dict[str, Any]:
    """The day in our own field names (see ``CITY_FIELDS``): counts per class and school, students, staff."""
    the_day = as_date(day)
    students = school_day(conn, config, school, the_day)
    by_class: dict[str, list[StudentDay]] = {}
    for student in students:
        by_class.setdefault(student.class_name, []).append(student)
    keys = ("total", "present", "late", "absent_permitted", "absent_unexcused", "pending")

    def counts(members: list[StudentDay]) -> dict[str, int]:
        tally = count(members)
        return {k: tally[k] for k in keys}

    def iso(ts: str | None) -> str | None:
        moment = local_time(ts, config)
        return moment.isoformat(timespec="seconds") if moment else None

    return {
        "school": school,
        "date": the_day.isoformat(),
        "generated_at": datetime.now(config.zone).isoformat(timespec="seconds"),
        "school_day": is_school_day(config, the_day),
        "totals": counts(students),
        "classes": [
            {
                "class_name": name,
                "class_start": class_start(config, name).strftime("%H:%M"),
                "cutoff": cutoff(config, the_day, name).strftime("%H:%M"),
                **counts(members),
            }
            for name, members in by_class.items()
        ],
        "students": [
            {
                "person_id": s.person,
                "full_name": s.full_name,
                "class_name": s.class_name,
                "status": s.status,
                "arrival": iso(s.arrival_ts),
                "departure": iso(s.departure_ts),
                "minutes_late": s.minutes_late,
                "leave_reason": s.leave_reason,
            }
            for s in students
        ],
        "staff": [
            {
                "person_id": s.person,
                "full_name": s.full_name,
                "first_in": iso(s.first_in),
                "last_out": iso(s.last_out),
                "minutes_late": s.minutes_late,
            }
            for s in staff_day(conn, config, school, the_day)
        ],
    }


def apply_mapping(value: Any, mapping: dict[str, str]) -> Any:
    """Rename keys at every depth (our name -> the city's); a key mapped to "" is left out."""
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            assert key in CITY_FIELDS, key
            name = mapping.get(key, key)
            if name:
                out[name] = apply_mapping(inner, mapping)
        return out
    if isinstance(value, list):
        return [apply_mapping(v, mapping) for v in value]
    return value


def _token(city: CityApiConfig) -> str | None:
    if city.token_file is None:
        return None
    try:
        token = city.token_file.read_text("utf-8").strip()
    except OSError as exc:
        raise CityError(f"report.city.token_file {city.token_file}: {exc.strerror}") from None
    if not token:
        raise CityError(f"report.city.token_file {city.token_file} is empty")
    return token


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would turn the POST into a GET or resend the report elsewhere: treat it as an answer."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int | None, str, float | None]:
    """(HTTP status or None, answer text or error, Retry-After seconds if any)."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout) as reply:
            return reply.status, reply.read(MAX_ANSWER * 4).decode("utf-8", "replace")[:MAX_ANSWER], None
    except urllib.error.HTTPError as exc:
        text = exc.read(MAX_ANSWER * 4).decode("utf-8", "replace")[:MAX_ANSWER] if exc.fp else ""
        retry_after = exc.headers.get("Retry-After") if exc.headers else None
        wait = float(retry_after) if retry_after and retry_after.strip().isdigit() else None
        if 300 <= exc.code < 400:
            text = f"redirected to {exc.headers.get('Location')}; set report.city.url to the final address"
        return exc.code, text, wait
    except TimeoutError:
        return None, f"no answer within {timeout:g} s", None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            return None, f"no answer within {timeout:g} s", None
        return None, f"cannot connect: {reason}", None
    except (OSError, http.client.HTTPException) as exc:
        return None, f"connection failed: {exc.__class__.__name__}: {exc}", None


def _retryable(code: int | None) -> bool:
    return code is None or code in (408, 429) or code >= 500


def _settled(conn: Connection, school: str, day: str, force: bool) -> PushResult | None:
    """What a push would find without taking the day: sent (and not forced), or another attempt not due yet."""
    row = conn.one(
        "SELECT status, attempts, next_attempt_at FROM reports WHERE school = ? AND day = ? AND target = ?",
        [school, day, TARGET],
    )
    if row is None or force:
        return None
    status, attempts, next_at = row
    if status == SENT:
        return PushResult(school, day, "skipped_sent", attempts, None, None)
    if status in (SENDING, RETRYING) and datetime.fromisoformat(next_at) > _now():
        return PushResult(school, day, "busy", attempts, None, None)
    return None


def _claim(conn: Connection, school: str, day: str, force: bool, request: str, lease: float) -> tuple[str, int]:
    """Take the day for this instance: ('go', attempts so far), or ('skipped_sent'|'busy', attempts).

    The row is taken with a compare-and-set, so two hub instances (or the daemon and the CLI) racing
    for the same day on PostgreSQL end with one sender; the other sees ``busy``.
    """
    now = _now()
    until = _iso(now + timedelta(seconds=lease))
    with conn.transaction():
        inserted = conn.execute(
            "INSERT INTO reports(school, day, target, status, attempts, next_attempt_at, request) "
            "VALUES (?, ?, ?, ?, 0, ?, ?) ON CONFLICT(school, day, target) DO NOTHING",
            [school, day, TARGET, SENDING, until, request],
        ).rowcount
        if inserted == 1:
            return "go", 0
        row = conn.one(
            "SELECT status, attempts, next_attempt_at FROM reports WHERE school = ? AND day = ? AND target = ?",
            [school, day, TARGET],
        )
        assert row is not None
        status, attempts, next_at = row
        if status == SENT and not force:
            return "skipped_sent", attempts
        if status in (SENDING, RETRYING) and datetime.fromisoformat(next_at) > now and not force:
            return "busy", attempts
        kept = 0 if status in (SENT, FAILED) else attempts  # a new round: forced, or a failed day tried again
        taken = conn.execute(
            "UPDATE reports SET status = ?, attempts = ?, next_attempt_at = ? "
            "WHERE school = ? AND day = ? AND target = ? AND status = ? AND attempts = ? AND next_attempt_at = ?",
            [SENDING, kept, until, school, day, TARGET, status, attempts, next_at],
        ).rowcount
        return ("go", kept) if taken == 1 else ("busy", attempts)


def _record(conn: Connection, school: str, day: str, **values: Any) -> None:
    columns = ", ".join(f"{name} = ?" for name in values)
    with conn.transaction():
        conn.execute(
            f"UPDATE reports SET {columns} WHERE school = ? AND day = ? AND target = ?",
            [*values.values(), school, day, TARGET],
        )


def push_day(
    conn: Connection,
    config: HubConfig,
    school: str,
    day: date | str,
    *,
    force: bool = False,
    stop: threading.Event | None = None,
    wait: bool = True,
) -> PushResult:
    """Send the day; returns how it ended. Raises :class:`CityError` only when ``[report.city]`` is missing;
    an unreadable token is recorded as a failed push.

    With ``wait`` (the CLI) it blocks through the retries. Without (the hub's daily jobs, whose thread also
    decides the absences at the cut-offs) it makes the one attempt that is due and returns ``retrying``
    with the next attempt's time recorded; a later call sends it when that time has come.
    """
    city = config.report.city
    if city is None:
        raise CityError("report.city is not configured: set [report.city] url (and token_file) in hub.toml")
    the_day = as_date(day).isoformat()
    stop = stop or threading.Event()
    settled = _settled(conn, school, the_day, force)
    if settled is not None:  # sent already, or not due: the report is not even built
        return settled
    body_data = apply_mapping(report_payload(conn, config, school, the_day), city.field_mapping)
    body = json.dumps(body_data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "Accept": "application/json",
        "User-Agent": f"edugate-hub/{__version__}",
        "Idempotency-Key": f"{school}/{the_day}",
    }
    shown_headers = dict(headers)
    if city.token_file is not None:
        shown_headers["Authorization"] = f"Bearer <{city.token_file}>"
    request = json.dumps(
        {"method": "POST", "url": city.url, "headers": shown_headers, "body": body.decode("utf-8")},
        ensure_ascii=False,
    )
    verdict, attempts = _claim(conn, school, the_day, force, request, city.timeout + LEASE_MARGIN)
    if verdict != "go":
        return PushResult(school, the_day, verdict, attempts, None, None)
    try:
        token = _token(city)
    except CityError as exc:
        _record(conn, school, the_day, status=FAILED, request=request, response_code=None, response=f"not sent: {exc}")
        log.error("city: %s %s not sent: %s", school, the_day, exc)
        return PushResult(school, the_day, FAILED, attempts, None, f"not sent: {exc}")
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    code: int | None = None
    answer = ""
    while attempts < city.max_attempts:
        attempts += 1
        lease = _now() + timedelta(seconds=city.timeout + LEASE_MARGIN)
        _record(conn, school, the_day, status=SENDING, attempts=attempts, next_attempt_at=_iso(lease), request=request)
        code, answer, retry_after = _post(city.url, body, headers, city.timeout)
        if code is not None and 200 <= code < 300:
            _record(conn, school, the_day, status=SENT, response_code=code, response=answer, sent_at=_iso(_now()))
            log.info("city: %s %s accepted (HTTP %d, attempt %d)", school, the_day, code, attempts)
            return PushResult(school, the_day, SENT, attempts, code, answer)
        if not _retryable(code) or attempts >= city.max_attempts:
            break
        delay = min(city.retry_min * 2 ** (attempts - 1), city.retry_max)
        if retry_after is not None:
            delay = min(max(delay, retry_after), city.retry_max)
        due = _now() + timedelta(seconds=delay)
        _record(conn, school, the_day, status=RETRYING, next_attempt_at=_iso(due), response_code=code, response=answer)
        log.warning(
            "city: %s %s attempt %d: %s; next in %.0f s",
            school,
            the_day,
            attempts,
            f"HTTP {code}" if code is not None else answer,
            delay,
        )
        if not wait or stop.wait(delay):
            return PushResult(school, the_day, RETRYING, attempts, code, answer)
    _record(conn, school, the_day, status=FAILED, response_code=code, response=answer)
    log.error(
        "city: %s %s failed after %d attempt(s): %s",
        school,
        the_day,
        attempts,
        f"HTTP {code}" if code is not None else answer,
    )
    return PushResult(school, the_day, FAILED, attempts, code, answer)


def report_record(conn: Connection, school: str, day: date | str) -> dict[str, Any] | None:
    """The ``reports`` row of the day's push, for the CLI and the API."""
    row = conn.one(
        "SELECT status, attempts, next_attempt_at, request, response_code, response, sent_at FROM reports "
        "WHERE school = ? AND day = ? AND target = ?",
        [school, as_date(day).isoformat(), TARGET],
    )
    if row is None:
        return None
    keys = ("status", "attempts", "next_attempt_at", "request", "response_code", "response", "sent_at")
    return dict(zip(keys, row, strict=True))
