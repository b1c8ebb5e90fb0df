"""The daily report: XLSX and CSV files in the layout the education database (CSDL ngành) takes as uploads.

One row per student with ``Mã học sinh, Họ và tên, Lớp, Ngày, Trạng thái, Giờ đến, Giờ về, Lý do``,
dates as dd/mm/yyyy and times as HH:MM in the hub's time zone. The workbook has the school
summary first (per class counts, then the staff's first in and last out), then one sheet per
class; the CSV holds every student of the school in the same columns, UTF-8 with a BOM so Excel
shows Vietnamese as it is. Files are written to a temporary name and renamed, so a reader never
sees half a report.

Every text in them comes from outside (the school's roster, leave requests), so none may become a
formula: workbook cells holding text are stored as text whatever they begin with, and a CSV field
that Excel or LibreOffice would read as a formula (``= + - @``, tab, CR) gets OWASP's leading ``'``.
"""

from __future__ import annotations

import csv
import io
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.config import HubConfig
from appliance.hub.attendance import (
    ABSENT_PERMITTED,
    ABSENT_UNEXCUSED,
    LATE,
    NO_SCHOOL,
    PENDING,
    PRESENT,
    StaffDay,
    StudentDay,
    as_date,
    class_start,
    count,
    cutoff,
    local_time,
    school_day,
    staff_day,
)
from appliance.hub.store import Connection

if TYPE_CHECKING:
    from openpyxl.worksheet.worksheet import Worksheet

COLUMNS = ("Mã học sinh", "Họ và tên", "Lớp", "Ngày", "Trạng thái", "Giờ đến", "Giờ về", "Lý do")
STATUS_VI = {
    PRESENT: "Có mặt",
    LATE: "Đi muộn",
    ABSENT_PERMITTED: "Vắng có phép",
    ABSENT_UNEXCUSED: "Vắng không phép",
    PENDING: "Chưa xác định",
    NO_SCHOOL: "Ngày nghỉ",
}
SUMMARY_COLUMNS = ("Lớp", "Sĩ số", "Có mặt", "Đi muộn", "Vắng có phép", "Vắng không phép", "Chưa xác định")
STAFF_COLUMNS = ("Mã cán bộ", "Họ và tên", "Giờ vào", "Giờ ra", "Số phút muộn")
SUMMARY_SHEET = "Tổng hợp"
STAFF_SHEET = "Cán bộ, giáo viên"
DATE_FORMAT = "DD/MM/YYYY"
TIME_FORMAT = "HH:MM"


@dataclass(frozen=True)
class ReportFiles:
    xlsx: Path
    csv: Path


def report_paths(config: HubConfig, school: str, day: date | str) -> ReportFiles:
    folder = config.report.export_dir / school
    name = as_date(day).isoformat()
    return ReportFiles(folder / f"{name}.xlsx", folder / f"{name}.csv")


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n")


def csv_field(text: str) -> str:
    """A field a spreadsheet would run as a formula (``=HYPERLINK(...)`` as a name) gets a leading ``'``."""
    return f"'{text}" if text.startswith(FORMULA_STARTS) else text


def _hhmm(ts: str | None, config: HubConfig) -> str:
    moment = local_time(ts, config)
    return moment.strftime("%H:%M") if moment else ""


def student_row(student: StudentDay, day: date, config: HubConfig) -> list[str]:
    """The upload row as text (the CSV; the workbook stores the same as a date and times)."""
    return [
        student.person,
        student.full_name,
        student.class_name,
        day.strftime("%d/%m/%Y"),
        STATUS_VI[student.status],
        _hhmm(student.arrival_ts, config),
        _hhmm(student.departure_ts, config),
        student.leave_reason or "",
    ]


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` fills a temporary file beside ``path``; it replaces ``path`` only once complete and on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        tmp.chmod(0o640)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def csv_text(students: list[StudentDay], day: date, config: HubConfig) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for student in students:
        writer.writerow([csv_field(field) for field in student_row(student, day, config)])
    return buffer.getvalue()


def _append(sheet: Worksheet, values: list[Any]) -> None:
    """One row; its text cells stay text: openpyxl would store any string starting with '=' as a live formula,
    and refuses control characters (a roster may hold them), which are dropped here."""
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    sheet.append([ILLEGAL_CHARACTERS_RE.sub("", v) if isinstance(v, str) else v for v in values])
    if not values:
        return
    for cell in next(sheet.iter_rows(min_row=sheet.max_row, max_row=sheet.max_row, max_col=len(values))):
        if isinstance(cell.value, str):
            cell.data_type = "s"


_SHEET_JUNK = re.compile(r"[\[\]:*?/\\]")


def _sheet_title(class_name: str, taken: set[str]) -> str:
    """Excel sheet names: at most 31 characters, none of []:*?/\\ or control characters, unique without regard
    to case."""
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    base = _SHEET_JUNK.sub("-", ILLEGAL_CHARACTERS_RE.sub("", class_name)).strip("'")[:31] or "Lop"
    title, n = base, 2
    while title.casefold() in taken:
        suffix = f" ({n})"
        title, n = base[: 31 - len(suffix)] + suffix, n + 1
    taken.add(title.casefold())
    return title


def _workbook(
    path: Path,
    school: str,
    day: date,
    students: list[StudentDay],
    staff: list[StaffDay],
    config: HubConfig,
) -> None:
    from openpyxl import Workbook
    from openpyxl.styles import Font

    bold = Font(bold=True)
    book = Workbook()
    summary = book.active
    assert summary is not None
    summary.title = SUMMARY_SHEET
    _append(summary, ["Trường", school])
    _append(summary, ["Ngày", day])
    summary["B2"].number_format = DATE_FORMAT
    _append(summary, [])
    _append(summary, [*SUMMARY_COLUMNS, "Giờ vào học", "Giờ chốt vắng"])
    for cell in summary[4]:
        cell.font = bold
    by_class: dict[str, list[StudentDay]] = {}
    for student in students:
        by_class.setdefault(student.class_name, []).append(student)
    for name, members in by_class.items():
        counts = count(members)
        _append(
            summary,
            [
                name,
                counts["total"],
                counts[PRESENT],
                counts[LATE],
                counts[ABSENT_PERMITTED],
                counts[ABSENT_UNEXCUSED],
                counts[PENDING],
                class_start(config, name).strftime("%H:%M"),
                cutoff(config, day, name).strftime("%H:%M"),
            ],
        )
    totals = count(students)
    _append(
        summary,
        [
            "Toàn trường",
            totals["total"],
            totals[PRESENT],
            totals[LATE],
            totals[ABSENT_PERMITTED],
            totals[ABSENT_UNEXCUSED],
            totals[PENDING],
        ],
    )
    for cell in summary[summary.max_row]:
        cell.font = bold
    _widths(summary, [16, 10, 10, 10, 14, 16, 14, 12, 14])

    taken = {SUMMARY_SHEET.casefold(), STAFF_SHEET.casefold()}
    for name, members in by_class.items():
        sheet = book.create_sheet(_sheet_title(name, taken))
        _append(sheet, list(COLUMNS))
        for cell in sheet[1]:
            cell.font = bold
        for student in members:
            arrival = local_time(student.arrival_ts, config)
            departure = local_time(student.departure_ts, config)
            _append(
                sheet,
                [
                    student.person,
                    student.full_name,
                    student.class_name,
                    day,
                    STATUS_VI[student.status],
                    arrival.time().replace(second=0, microsecond=0) if arrival else None,
                    departure.time().replace(second=0, microsecond=0) if departure else None,
                    student.leave_reason,
                ],
            )
            row = sheet.max_row
            sheet.cell(row, 4).number_format = DATE_FORMAT
            sheet.cell(row, 6).number_format = TIME_FORMAT
            sheet.cell(row, 7).number_format = TIME_FORMAT
        sheet.freeze_panes = "A2"
        _widths(sheet, [16, 28, 8, 12, 16, 9, 9, 30])

    people = book.create_sheet(STAFF_SHEET)
    _append(people, list(STAFF_COLUMNS))
    for cell in people[1]:
        cell.font = bold
    for member in staff:
        first_in = local_time(member.first_in, config)
        last_out = local_time(member.last_out, config)
        _append(
            people,
            [
                member.person,
                member.full_name,
                first_in.time().replace(second=0, microsecond=0) if first_in else None,
                last_out.time().replace(second=0, microsecond=0) if last_out else None,
                member.minutes_late,
            ],
        )
        people.cell(people.max_row, 3).number_format = TIME_FORMAT
        people.cell(people.max_row, 4).number_format = TIME_FORMAT
    _widths(people, [16, 28, 9, 9, 12])
    book.save(path)


def _widths(sheet: Worksheet, widths: list[int]) -> None:
    from openpyxl.utils import get_column_letter

    for index, width in enumerate(widths, start=1):
        sheet.column_dimensions[get_column_letter(index)].width = width


def export_day(
    conn: Connection, config: HubConfig, school: str, day: date | str, *, now: datetime | None = None
) -> ReportFiles:
    """Write ``<export_dir>/<school>/<day>.xlsx`` and ``.csv`` (replacing earlier exports of the day)."""
    the_day = as_date(day)
    students = school_day(conn, config, school, the_day, now=now)
    staff = staff_day(conn, config, school, the_day)
    paths = report_paths(config, school, the_day)
    write_atomic(paths.xlsx, lambda tmp: _workbook(tmp, school, the_day, students, staff, config))
    text = csv_text(students, the_day, config)
    write_atomic(paths.csv, lambda tmp: tmp.write_text(text, encoding="utf-8-sig", newline=""))
    return paths
