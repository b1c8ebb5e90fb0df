"""The routes of the hub's API (FastAPI): attendance, a person's history, gates, health, leave requests.

Handlers are plain functions, run by FastAPI in a bounded thread pool; each takes a database
connection from the pool for the length of the request. The token was checked at the door
(:mod:`appliance.hub.api.door`) before the request got here; every route checks its school against
the token's again and every query that lists gates is limited to the token's schools, so a mistake
in one place does not open another school's data. Every error is ``{"error": "..."}`` with the
status that fits (400, 401, 403, 404, 413, 422, 503), and JSON is UTF-8 with names as they are.
"""

import base64
import binascii
import json
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

import anyio.to_thread
from fastapi import Depends, FastAPI, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance import __version__
from appliance.config import HubConfig
from appliance.hub import attendance
from appliance.hub.api.auth import Caller, OutOfScope
from appliance.hub.api.door import CALLER, ApiError, body_too_large
from appliance.hub.api.models import (
    UTF8JSON,
    ClassAttendance,
    Counts,
    ErrorOut,
    EventOut,
    GateOut,
    Gates,
    Health,
    LeaveIn,
    LeaveOut,
    PersonEvents,
    SchoolAttendance,
    StreamOut,
    StudentOut,
)
from appliance.hub.api.pool import ConnectionPool
from appliance.hub.leave import LeaveError, add_leave, request_id
from appliance.hub.store import Connection, StoreError

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_CURSOR = 256  # characters; this API's cursors are about 100
EventKind = Literal["arrival", "departure", "tap", "unknown_card", "rejected", "card_face_mismatch", "unknown_face"]
_ISO_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> UTF8JSON:
    return UTF8JSON({"error": message}, status_code=status, headers=headers)


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "no token, or a token that is not in api.token_file"},
    403: {"model": ErrorOut, "description": "the token is not for this school, or lacks the right it needs"},
    422: {"model": ErrorOut, "description": "a parameter or the body is not valid (e.g. a date not YYYY-MM-DD)"},
    503: {"model": ErrorOut, "description": "no token file configured, or the database is unreachable"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "unknown school, class or person"}
}
BAD_CURSOR: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "a cursor that is not a 'next' of this API"}
}
TOO_LARGE: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorOut, "description": "a body over api.max_body_bytes (refused unread)"}
}


def parse_day(value: str | None, name: str, today: date) -> date:
    """A YYYY-MM-DD query value (``today`` when absent); anything else is a 422 naming the parameter."""
    if value is None:
        return today
    try:
        if not _ISO_DAY.match(value):
            raise ValueError
        return date.fromisoformat(value)
    except ValueError:
        raise ApiError(422, f"{name}: not a date (YYYY-MM-DD): {value!r}") from None


def _encode_cursor(ts: str, event_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([ts, event_id]).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, str]:
    """A cursor made by :func:`_encode_cursor`; anything else (too long, nested a thousand deep) is a 400."""
    try:
        if len(cursor) <= MAX_CURSOR:
            ts, event_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
            if isinstance(ts, str) and isinstance(event_id, str):
                return ts, event_id
    except (ValueError, TypeError, binascii.Error, RecursionError):
        pass
    raise ApiError(400, "cursor: not a cursor from this API's 'next' field; pass 'next' as it came, or no cursor")


def _age(iso: str | None, now: datetime) -> int | None:
    if not iso:
        return None
    try:
        return max(0, round((now - datetime.fromisoformat(iso)).total_seconds()))
    except ValueError:
        return None


def _is_database_error(exc: BaseException) -> bool:
    return isinstance(exc, StoreError | sqlite3.Error) or type(exc).__module__.startswith("psycopg")


def create_app(config: HubConfig, pool: ConnectionPool) -> FastAPI:
    """The API as an ASGI application, to be served behind :class:`appliance.hub.api.door.Door`."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Handlers run in AnyIO's thread pool; bound it so at most ``workers`` database connections exist.
        anyio.to_thread.current_default_thread_limiter().total_tokens = config.api.workers
        yield

    app = FastAPI(
        title="edugate hub API",
        version=__version__,
        summary="Attendance, people's gate history and gate status of the schools this hub serves.",
        description=(
            "Every request needs `Authorization: Bearer <token>`, a token from the file named by "
            "`api.token_file` in hub.toml; its line there names the schools it may see and its rights "
            "(read; write to send leave requests; approve for them to count as approved). "
            'Errors are `{"error": "..."}`. Dates are YYYY-MM-DD; '
            "times are ISO 8601 with the gate's offset. JSON is UTF-8."
        ),
        openapi_url="/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
        default_response_class=UTF8JSON,
        lifespan=lifespan,
        max_body_size=config.api.max_body_bytes,  # a chunked body is counted as it comes, and refused past it
    )
    bearer = HTTPBearer(auto_error=False, description="a token from api.token_file")

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> UTF8JSON:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(OutOfScope)
    async def _out_of_scope(_: Request, exc: OutOfScope) -> UTF8JSON:
        return _error(403, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> UTF8JSON:
        if exc.status_code == 413:  # the rest of the body is not read: close rather than wait for it
            return _error(413, body_too_large(config.api.max_body_bytes), {"Connection": "close"})
        message = {404: f"no such endpoint: {request.url.path}", 405: f"{request.method} is not allowed here"}
        return _error(exc.status_code, message.get(exc.status_code, str(exc.detail)), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> UTF8JSON:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        where = ".".join(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc) or "body"
        return _error(422, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> UTF8JSON:
        # A bug: the answer is JSON like the rest; uvicorn logs the traceback after it.
        return _error(500, "internal error; the hub's log has the details")

    async def caller(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> Caller:
        """The caller the door checked (``Security`` is here for the OpenAPI document's security scheme)."""
        who = request.scope.get(CALLER)
        if not isinstance(who, Caller):
            raise ApiError(401, "send 'Authorization: Bearer <token>'")
        return who

    def today() -> date:
        return datetime.now(config.zone).date()

    def known_school(conn: Connection, school: str) -> None:
        """404 for a school the hub does not serve (asked only once the token was found to be for it)."""
        if config.hub.schools:
            if school in config.hub.schools:
                return
        elif any(
            conn.one(f"SELECT 1 FROM {table} WHERE school = ? LIMIT 1", [school]) is not None
            for table in ("people", "devices", "streams")
        ):
            return
        raise ApiError(404, f"no school {school!r} on this hub")

    def with_conn(work: Callable[[Connection], Any]) -> Any:
        """Run a request's database work on a pooled connection; a database that fails is a 503, not a 500.

        Every request's work may run twice (reads; add_leave updates the same request), so a connection
        that a database restart killed is replaced without the caller noticing.
        """
        try:
            return pool.run(work)
        except Exception as exc:
            if not _is_database_error(exc):
                raise
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log.error("hub API: database error: %s", first_line)
            raise ApiError(503, "the hub's database cannot be read right now; try again shortly") from None

    School = Annotated[str, Path(description="school id, as in hub.schools and the gates' topics")]
    Day = Annotated[str | None, Query(alias="date", description="YYYY-MM-DD (default: today)")]
    Authorized = Annotated[Caller, Depends(caller)]

    @app.get(
        "/v1/schools/{school}/classes/{class_name}/attendance",
        response_model=ClassAttendance,
        responses={**ERRORS, **NOT_FOUND},
        summary="A class's attendance on a day",
        tags=["attendance"],
    )
    def class_attendance(
        school: School,
        class_name: Annotated[str, Path(description="class name, e.g. 6A")],
        who: Authorized,
        day: Day = None,
    ) -> ClassAttendance:
        """Every active student of the class: state, arrival and departure, minutes late, leave reason."""
        school = who.school(school)
        the_day = parse_day(day, "date", today())

        def work(conn: Connection) -> ClassAttendance:
            known_school(conn, school)
            names = attendance.classes(conn, school)
            if class_name not in names:
                raise ApiError(404, f"no class {class_name!r} at {school}; classes: {', '.join(names) or 'none'}")
            students = attendance.class_day(conn, config, school, the_day, class_name)
            return ClassAttendance(
                school=school,
                class_name=class_name,
                day=the_day.isoformat(),
                school_day=attendance.is_school_day(config, the_day),
                class_start=attendance.class_start(config, class_name).strftime("%H:%M"),
                cutoff=attendance.cutoff(config, the_day, class_name).strftime("%H:%M"),
                counts=Counts(**attendance.count(students)),
                students=[
                    StudentOut(
                        person=s.person,
                        full_name=s.full_name,
                        status=s.status,
                        arrival=s.arrival_ts,
                        departure=s.departure_ts,
                        minutes_late=s.minutes_late,
                        leave_reason=s.leave_reason,
                    )
                    for s in students
                ],
            )

        return with_conn(work)

    @app.get(
        "/v1/schools/{school}/attendance",
        response_model=SchoolAttendance,
        responses={**ERRORS, **NOT_FOUND},
        summary="The school's attendance on a day",
        tags=["attendance"],
    )
    def school_attendance(
        school: School,
        who: Authorized,
        day: Day = None,
    ) -> SchoolAttendance:
        """Counts per class and for the school, and the staff's clock-in and clock-out."""
        school = who.school(school)
        the_day = parse_day(day, "date", today())

        def work(conn: Connection) -> SchoolAttendance:
            known_school(conn, school)
            return SchoolAttendance.model_validate(attendance.school_summary(conn, config, school, the_day))

        return with_conn(work)

    @app.get(
        "/v1/schools/{school}/people/{person}/events",
        response_model=PersonEvents,
        responses={**ERRORS, **NOT_FOUND, **BAD_CURSOR},
        summary="A person's gate history",
        tags=["people"],
    )
    def person_events(
        school: School,
        person: Annotated[str, Path(description="person id on the school's roster")],
        who: Authorized,
        day_from: Annotated[str | None, Query(alias="from", description="first day, YYYY-MM-DD")] = None,
        day_to: Annotated[str | None, Query(alias="to", description="last day, YYYY-MM-DD")] = None,
        kind: Annotated[EventKind | None, Query(description="only events of this kind")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="events per page")] = DEFAULT_LIMIT,
        cursor: Annotated[str | None, Query(description="the previous page's 'next'")] = None,
    ) -> PersonEvents:
        """The person's events, oldest first, a page at a time: time, kind, method, gate (no card numbers)."""
        school = who.school(school)
        first = parse_day(day_from, "from", date.min) if day_from else None
        last = parse_day(day_to, "to", date.max) if day_to else None
        if first and last and last < first:
            raise ApiError(422, f"to ({last.isoformat()}) is before from ({first.isoformat()})")
        after = _decode_cursor(cursor) if cursor else None

        def work(conn: Connection) -> PersonEvents:
            known_school(conn, school)
            row = conn.one(
                "SELECT full_name, role, class_name FROM people WHERE school = ? AND id = ?", [school, person]
            )
            if (
                row is None
                and conn.one("SELECT 1 FROM events WHERE school = ? AND person = ? LIMIT 1", [school, person]) is None
            ):
                raise ApiError(404, f"no person {person!r} at {school}")
            sql = "SELECT id, ts, kind, method, device, late, payload FROM events WHERE school = ? AND person = ?"
            params: list[Any] = [school, person]
            if first:
                sql += " AND day >= ?"
                params.append(first.isoformat())
            if last:
                sql += " AND day <= ?"
                params.append(last.isoformat())
            if kind:
                sql += " AND kind = ?"
                params.append(kind)
            if after:
                sql += " AND (ts > ? OR (ts = ? AND id > ?))"
                params += [after[0], after[0], after[1]]
            sql += " ORDER BY ts, id LIMIT ?"
            params.append(limit + 1)
            rows = conn.all(sql, params)
            events = []
            for event_id, ts, event_kind, method, device, late, raw in rows[:limit]:
                data = json.loads(raw)
                events.append(
                    EventOut(
                        id=event_id,
                        ts=ts,
                        kind=event_kind,
                        method=method,
                        gate=device,
                        direction=data.get("direction"),
                        late=None if late is None else bool(late),
                        minutes_late=data.get("minutes_late"),
                        clock_ok=bool(data.get("clock_ok", True)),
                        reason=data.get("reason"),
                    )
                )
            more = len(rows) > limit
            return PersonEvents(
                school=school,
                person=person,
                full_name=row[0] if row else None,
                role=row[1] if row else None,
                class_name=row[2] if row else None,
                events=events,
                next=_encode_cursor(events[-1].ts, events[-1].id) if more and events else None,
            )

        return with_conn(work)

    @app.get("/v1/gates", response_model=Gates, responses={**ERRORS, **NOT_FOUND}, summary="Gates", tags=["gates"])
    def gates(
        who: Authorized,
        school: Annotated[str | None, Query(description="only this school's gates")] = None,
    ) -> Gates:
        """The gates of the token's schools: online, last status, backlog on the gate, what the hub holds of them."""
        where, params = in_scope(who, school)
        return with_conn(lambda conn: Gates(gates=gate_list(conn, school, where, params)))

    def in_scope(who: Caller, school: str | None) -> tuple[str, list[Any]]:
        """The WHERE clause that keeps a listing to the token's schools (and to ``school`` when one is asked for)."""
        if school is not None:
            return "WHERE school = ?", [who.school(school)]
        if who.schools is None:
            return "", []
        names = sorted(who.schools)
        return f"WHERE school IN ({', '.join('?' * len(names))})", list(names)

    def gate_list(conn: Connection, school: str | None, where: str, params: list[Any]) -> list[GateOut]:
        now = datetime.now(UTC)
        if school:
            known_school(conn, school)
        devices = {
            r[0]: r for r in conn.all(f"SELECT device, school, online, status, status_at FROM devices {where}", params)
        }
        streams: dict[str, list[StreamOut]] = {}
        schools: dict[str, str] = {}
        for device, journal, where_school, contiguous, highest, gap_since, requested in conn.all(
            "SELECT device, journal, school, contiguous, highest, gap_since, resync_requested_at FROM streams "
            f"{where} ORDER BY device, updated_at",
            params,
        ):
            missing = 0
            if highest > contiguous:
                held = conn.one(
                    "SELECT COUNT(*) FROM events WHERE school = ? AND device = ? AND journal = ? AND seq > ?",
                    [where_school, device, journal, contiguous],
                )
                missing = highest - contiguous - (held[0] if held else 0)
            schools.setdefault(device, where_school)
            streams.setdefault(device, []).append(
                StreamOut(
                    journal=journal,
                    contiguous=contiguous,
                    highest=highest,
                    missing=missing,
                    gap_since=gap_since,
                    resync_requested_at=requested,
                )
            )
        out = []
        for device in sorted(set(devices) | set(streams)):
            status: dict[str, Any] = {}
            online = status_at = None
            if device in devices:
                _, schools[device], raw_online, raw_status, status_at = devices[device]
                online = bool(raw_online)
                try:
                    loaded = json.loads(raw_status)
                    status = loaded if isinstance(loaded, dict) else {}
                except ValueError:
                    status = {}
            its = streams.get(device, [])
            readers = status.get("readers")
            out.append(
                GateOut(
                    gate=device,
                    school=schools[device],
                    online=online,
                    status_at=status_at,
                    status_age_s=_age(status_at, now),
                    gate_clock_ok=status.get("clock_ok"),
                    version=status.get("version"),
                    backlog=status.get("backlog"),
                    oldest_unsynced_age_s=status.get("oldest_unsynced_age_s"),
                    last_seq=status.get("last_seq"),
                    offline_reason=status.get("reason") if online is False else None,
                    readers=[
                        {"name": str(r.get("name")), "state": str(r.get("state"))}
                        for r in (readers if isinstance(readers, list) else [])
                        if isinstance(r, dict)
                    ],
                    gap=any(s.missing > 0 for s in its),
                    missing=sum(s.missing for s in its),
                    resync_requested=any(s.resync_requested_at for s in its),
                    streams=its,
                )
            )
        return out

    @app.get("/v1/health", response_model=Health, responses=ERRORS, summary="Health", tags=["hub"])
    def health(who: Authorized) -> Health:
        """The hub answers and its database is readable; the token's schools' gates: how many, online, with gaps."""
        where, params = in_scope(who, None)

        def work(conn: Connection) -> Health:
            listed = gate_list(conn, None, where, params)
            return Health(
                status="ok",
                version=__version__,
                hub=config.hub.id,
                database="ok",
                time=datetime.now(UTC).isoformat(timespec="seconds"),
                gates={
                    "total": len(listed),
                    "online": sum(1 for g in listed if g.online),
                    "with_gap": sum(1 for g in listed if g.gap),
                },
            )

        return with_conn(work)

    @app.post(
        "/v1/schools/{school}/leave-requests",
        response_model=LeaveOut,
        status_code=201,
        responses={
            **ERRORS,
            **NOT_FOUND,
            **TOO_LARGE,
            200: {"model": LeaveOut, "description": "an existing request updated"},
        },
        summary="Send a leave request",
        tags=["leave"],
    )
    def post_leave(body: LeaveIn, school: School, who: Authorized) -> UTF8JSON:
        """Store a leave request (đơn xin nghỉ); approved ones make the days 'absent with permission'.

        Needs the write right. Without the approve right a request is stored pending (it excuses no one until
        the office approves it), asking for approval is refused and an approved request cannot be changed:
        otherwise any integration could excuse any child, which also silences the absence notice to the parents.
        The same person and days again update the request (200) instead of adding another (201).
        """
        school = who.school(school)
        who.need("write")
        approving = who.may("approve")
        if body.approved and not approving:
            try:
                who.need("approve")
            except OutOfScope as exc:
                raise OutOfScope(f"approved: {exc}; leave 'approved' out to send the request pending") from None
        approved = approving if body.approved is None else body.approved
        first = parse_day(body.day_from, "day_from", date.min)
        last = parse_day(body.day_to, "day_to", date.min) if body.day_to else first
        ident = request_id(school, body.person, first, last)

        def work(conn: Connection) -> UTF8JSON:
            known_school(conn, school)
            if conn.one("SELECT 1 FROM people WHERE school = ? AND id = ?", [school, body.person]) is None:
                raise ApiError(404, f"no person {body.person!r} on the roster of {school}")
            with conn.transaction():  # the approval seen is the one replaced: another request cannot slip between
                lock = " FOR UPDATE" if conn.dialect == "postgresql" else ""
                before = conn.one(f"SELECT approved FROM leave_requests WHERE id = ?{lock}", [ident])
                if before is not None and before[0] and not approving:
                    raise OutOfScope(
                        "this leave request is approved already; only a token with the 'approve' right may change it"
                    )
                try:
                    add_leave(conn, school, body.person, first, last, body.reason, approved, who.source)
                except LeaveError as exc:
                    raise ApiError(422, str(exc)) from None
            existed = before is not None
            stored = conn.one("SELECT reason FROM leave_requests WHERE id = ?", [ident])
            log.info(
                "hub API: leave request %s %s for %s (caller %s)",
                ident[:12],
                "updated" if existed else "stored",
                school,
                who.fingerprint,
            )
            out = LeaveOut(
                id=ident,
                school=school,
                person=body.person,
                day_from=first.isoformat(),
                day_to=last.isoformat(),
                reason=stored[0] if stored else body.reason,
                approved=approved,
                created=not existed,
            )
            return UTF8JSON(out.model_dump(), status_code=200 if existed else 201)

        return with_conn(work)

    return app
