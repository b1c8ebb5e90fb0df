"""Leave requests (đơn xin nghỉ): from the school office's CSV/XLSX or from the hub's API.

An approved request covering a day makes a student without an arrival "absent with permission".
A request is identified by (school, person, first day, last day): importing the same file again,
or the same request with ``duyệt`` changed, updates it instead of adding a second one. A file is
imported whole or not at all, with every bad row reported, like the roster.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

from appliance.hub.store import Connection
from appliance.roster.importer import RosterFileError, RowError, header_key, read_table
from appliance.roster.model import normalise_name

MAX_DAYS = 366

COLUMNS: dict[str, tuple[str, ...]] = {
    "person": (
        "ma hoc sinh",
        "ma hs",
        "ma dinh danh",
        "ma ca nhan",
        "ma nhan vien",
        "ma",
        "person id",
        "student id",
        "person",
        "id",
    ),
    "day_from": ("tu ngay", "ngay bat dau", "ngay nghi", "from", "from date", "start", "first day"),
    "day_to": ("den ngay", "ngay ket thuc", "to", "to date", "until", "end", "last day"),
    "reason": ("ly do", "ly do nghi", "reason"),
    "approved": ("duyet", "da duyet", "phe duyet", "trang thai", "approved", "status"),
}
_YES = {"1", "x", "yes", "y", "true", "co", "da duyet", "duyet", "dong y", "approved", "ok"}
_NO = {"", "0", "no", "n", "false", "khong", "chua duyet", "chua", "tu choi", "khong duyet", "pending", "rejected"}


class LeaveFileError(Exception):
    """The file as a whole cannot be used (format, encoding, missing columns)."""


class LeaveError(ValueError):
    """One leave request that cannot be stored (unknown person, dates in the wrong order)."""


@dataclass(frozen=True)
class LeaveRequest:
    person: str
    day_from: date
    day_to: date
    reason: str | None
    approved: bool


@dataclass
class ParsedLeave:
    requests: list[LeaveRequest] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    columns: dict[str, str] = field(default_factory=dict)


def request_id(school: str, person: str, day_from: date, day_to: date) -> str:
    """The same request (school, person, days) always has the same id: a repeat updates, never duplicates."""
    text = f"{school}\n{person}\n{day_from.isoformat()}\n{day_to.isoformat()}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def parse_day(value: str | int | date) -> date:
    """dd/mm/yyyy (how Vietnamese offices write dates), yyyy-mm-dd, or an Excel date cell."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    text = str(value).strip()
    for fmt in ("%d/%m/%Y", "%d-%m-%Y", "%d.%m.%Y", "%Y-%m-%d", "%Y-%m-%d %H:%M:%S"):
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise ValueError(f"not a date: {text!r} (use dd/mm/yyyy)")


def map_columns(header: list[str | int]) -> dict[str, int]:
    keys = [header_key(h) for h in header]
    mapping: dict[str, int] = {}
    for name, aliases in COLUMNS.items():
        for alias in aliases:
            if alias in keys and keys.index(alias) not in mapping.values():
                mapping[name] = keys.index(alias)
                break
    missing = [n for n in ("person", "day_from") if n not in mapping]
    if missing:
        wanted = {"person": "'Mã học sinh' (person id)", "day_from": "'Từ ngày' (from)"}
        raise LeaveFileError(
            f"no {' and no '.join(wanted[m] for m in missing)} column; "
            f"the file has: {', '.join(str(h) for h in header if h)}"
        )
    return mapping


def parse_leave(rows: list[list[str | int]], known: set[str]) -> ParsedLeave:
    """Check every row against the school's roster (``known`` person ids)."""
    if not rows:
        raise LeaveFileError("the file is empty")
    header, body = rows[0], rows[1:]
    if not body:
        raise LeaveFileError("the file has a header but no leave requests")
    mapping = map_columns(header)
    result = ParsedLeave(columns={n: str(header[i]) for n, i in mapping.items()})
    seen: dict[tuple[str, date, date], int] = {}
    for offset, row in enumerate(body):
        line = offset + 2
        cells = {n: str(row[i]).strip() if i < len(row) else "" for n, i in mapping.items()}
        problems: list[str] = []
        person = cells["person"]
        if not person:
            problems.append("missing person id")
        elif person not in known:
            problems.append("not on this school's roster")
        day_from = day_to = None
        try:
            day_from = parse_day(cells["day_from"]) if cells["day_from"] else None
            if day_from is None:
                problems.append("missing first day (từ ngày)")
        except ValueError as exc:
            problems.append(f"from: {exc}")
        try:
            day_to = parse_day(cells["day_to"]) if cells.get("day_to") else day_from
        except ValueError as exc:
            problems.append(f"to: {exc}")
        if day_from and day_to:
            if day_to < day_from:
                problems.append(f"last day {day_to:%d/%m/%Y} is before the first {day_from:%d/%m/%Y}")
            elif (day_to - day_from).days >= MAX_DAYS:
                problems.append(f"longer than {MAX_DAYS} days")
        approved = True  # without a column, the office imports the approved requests
        if "approved" in mapping:
            word = header_key(cells["approved"])
            if word in _YES:
                approved = True
            elif word in _NO:
                approved = False
            else:
                problems.append(f"approved: {cells['approved']!r} is not yes/no (có/không, đã duyệt/chưa duyệt)")
        if person and day_from and day_to and not problems:
            again = seen.get((person, day_from, day_to))
            if again is not None:
                problems.append(f"the same request as row {again}")
            seen[(person, day_from, day_to)] = line
        if problems:
            result.errors.extend(RowError(line, person or None, p) for p in problems)
            continue
        assert day_from is not None and day_to is not None
        reason = normalise_name(cells.get("reason", "")) or None
        result.requests.append(LeaveRequest(person, day_from, day_to, reason, approved))
    return result


def _known_people(conn: Connection, school: str) -> set[str]:
    return {r[0] for r in conn.all("SELECT id FROM people WHERE school = ?", [school])}


def _store(conn: Connection, school: str, request: LeaveRequest, source: str) -> str:
    ident = request_id(school, request.person, request.day_from, request.day_to)
    conn.execute(
        "INSERT INTO leave_requests(id, school, person, day_from, day_to, reason, approved, source, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET reason = excluded.reason, "
        "approved = excluded.approved, source = excluded.source, created_at = excluded.created_at",
        [
            ident,
            school,
            request.person,
            request.day_from.isoformat(),
            request.day_to.isoformat(),
            request.reason,
            int(request.approved),
            source,
            datetime.now(UTC).isoformat(timespec="seconds"),
        ],
    )
    return ident


def import_leave_file(conn: Connection, school: str, path: Path) -> ParsedLeave:
    """Read, check, and (only if every row is good) store all requests in one transaction."""
    try:
        rows = read_table(path)
    except RosterFileError as exc:
        raise LeaveFileError(str(exc)) from None
    try:
        parsed = parse_leave(rows, _known_people(conn, school))
    except LeaveFileError as exc:
        raise LeaveFileError(f"{path}: {exc}") from None
    if parsed.errors:
        return parsed
    with conn.transaction():
        for request in parsed.requests:
            _store(conn, school, request, f"file:{path.name}")
    return parsed


def add_leave(
    conn: Connection,
    school: str,
    person: str,
    day_from: date | str,
    day_to: date | str | None,
    reason: str | None,
    approved: bool,
    source: str,
) -> str:
    """Store one request (e.g. from the API) and return its id; the same person and days update it.

    Raises :class:`LeaveError` with a one-line reason for an unknown person or impossible dates.
    """
    try:
        first = parse_day(day_from)
        last = parse_day(day_to) if day_to else first
    except ValueError as exc:
        raise LeaveError(str(exc)) from None
    if last < first:
        raise LeaveError(f"last day {last.isoformat()} is before the first {first.isoformat()}")
    if (last - first).days >= MAX_DAYS:
        raise LeaveError(f"a leave request covers at most {MAX_DAYS} days")
    if conn.one("SELECT 1 FROM people WHERE school = ? AND id = ?", [school, person]) is None:
        raise LeaveError(f"{person} is not on the roster of {school}")
    clean_reason = normalise_name(reason or "") or None
    with conn.transaction():
        return _store(conn, school, LeaveRequest(person, first, last, clean_reason, bool(approved)), source)
