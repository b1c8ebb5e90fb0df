"""Roster import: what a school exports must come in whole, or not at all with every problem listed."""

from __future__ import annotations

import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from openpyxl import Workbook

from appliance.config import RosterConfig, parse_config
from appliance.journal import open_database
from appliance.journal.roster_store import RosterStore
from appliance.roster.importer import RosterFileError, load_roster_file, parse_roster
from appliance.roster.model import Role, fold

GOOD_CSV = """Mã học sinh,Họ và tên,Lớp,Vai trò,Trạng thái,Mã thẻ,SĐT phụ huynh,Email phụ huynh
HS001,Nguyễn Văn An,6A,Học sinh,Đang học,04:A1:B2:C3:D4:E5:F6,0912 345 678,me.an@example.vn
HS002,Trần Thị Bích Ngọc,6A,HS,đang học,0077705924; 11223344,0987654321,
GV001,Đặng Quốc Bảo,,Giáo viên,,9F8E7D6C,,
"""


def _csv(tmp_path: Path, text: str, name: str = "roster.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], capture_output=True, text=True)


def test_vietnamese_csv_parsed_and_normalised(tmp_path: Path) -> None:
    parsed = load_roster_file(_csv(tmp_path, GOOD_CSV), RosterConfig())
    assert parsed.errors == []
    an, ngoc, bao = parsed.people
    assert an.full_name == "Nguyễn Văn An" and an.class_name == "6A" and an.role is Role.STUDENT
    assert an.cards == ("04A1B2C3D4E5F6",)
    assert an.parent_phones == ("+84912345678",) and an.parent_emails == ("me.an@example.vn",)
    assert ngoc.cards == ("04A1B2C4", "11223344")  # 10 digits read as decimal, the other as hex
    assert bao.role is Role.STAFF and bao.class_name is None and bao.active


def test_decomposed_unicode_names_become_nfc(tmp_path: Path) -> None:
    decomposed = unicodedata.normalize("NFD", "Nguyễn  Thị   Đào")
    parsed = parse_roster([["id", "full_name", "class"], ["S1", decomposed, "6A"]], RosterConfig())
    assert parsed.people[0].full_name == "Nguyễn Thị Đào"
    assert unicodedata.is_normalized("NFC", parsed.people[0].full_name)
    assert fold(decomposed) == "nguyen thi dao"


def test_every_bad_row_reported_with_reason(tmp_path: Path) -> None:
    text = """id,full_name,class,role,active,card
S1,Ann,6A,student,yes,AABBCCDD
,No Id,6A,student,yes,
S3,Bad Uid,6A,student,yes,XYZ123
S4,Dup Card,6A,student,yes,aa:bb:cc:dd
S1,Dup Id,6A,student,yes,
S6,Bad Class,9Z,student,yes,
S7,Bad Role,6A,janitor,yes,
S8,Bad Status,6A,student,maybe,
S9,,6A,student,yes,
S10,No Class,,student,yes,
"""
    config = RosterConfig(classes=["6A", "6B"])
    parsed = load_roster_file(_csv(tmp_path, text), config)
    reasons = {(e.row, e.reason.split(":")[0].split(" (")[0]) for e in parsed.errors}
    assert (3, "missing person id") in reasons
    assert (4, "malformed card UID") in reasons
    assert (5, "duplicate card AABBCCDD") in reasons
    assert (6, "duplicate person id") in reasons
    assert (7, "unknown class '9Z'") in reasons
    assert (8, "unknown role 'janitor'") in reasons
    assert (9, "unknown status 'maybe'") in reasons
    assert (10, "missing full name") in reasons
    assert (11, "missing class") in reasons
    assert [p.id for p in parsed.people] == ["S1"]


def test_xlsx_with_split_name_columns_and_configured_headers(tmp_path: Path) -> None:
    book = Workbook()
    sheet = book.active
    sheet.append(["STT", "Mã định danh HS", "Họ đệm", "Tên", "Lớp", "Số thẻ"])
    sheet.append([1, "HS100", "Lê Hoàng", "Đức", "6B", 77705924])
    sheet.append([None, None, None, None, None, None])
    sheet.append([2, "HS101", "Phạm Minh", "Châu", "7A", "5E6F7A8B"])
    path = tmp_path / "export.xlsx"
    book.save(path)
    config = parse_config({"roster": {"columns": {"id": "Mã định danh HS"}}}).roster
    parsed = load_roster_file(path, config)
    assert parsed.errors == []
    assert [(p.id, p.full_name, p.class_name) for p in parsed.people] == [
        ("HS100", "Lê Hoàng Đức", "6B"),
        ("HS101", "Phạm Minh Châu", "7A"),
    ]
    assert parsed.people[0].cards == ("04A1B2C4",)


def test_configured_column_that_does_not_exist_is_a_clear_error(tmp_path: Path) -> None:
    config = parse_config({"roster": {"columns": {"id": "Mã số"}}}).roster
    with pytest.raises(RosterFileError, match=r"roster\.columns\.id = 'Mã số': no such column"):
        load_roster_file(_csv(tmp_path, GOOD_CSV), config)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(RosterFileError, match="not UTF-8"):
        legacy = tmp_path / "legacy.csv"
        legacy.write_bytes(unicodedata.normalize("NFD", GOOD_CSV).encode("cp1258", errors="replace"))
        load_roster_file(legacy, RosterConfig())
    with pytest.raises(RosterFileError, match="no person id column"):
        load_roster_file(_csv(tmp_path, "name,class\nAn,6A\n"), RosterConfig())
    with pytest.raises(RosterFileError, match=r"old \.xls"):
        load_roster_file(_csv(tmp_path, "x", name="r.xls"), RosterConfig())
    with pytest.raises(RosterFileError, match=r"not a readable \.xlsx"):
        load_roster_file(_csv(tmp_path, "not a zip", name="r.xlsx"), RosterConfig())


def test_utf16_and_semicolon_csv(tmp_path: Path) -> None:
    text = GOOD_CSV.replace(",", ";").replace("0077705924; 11223344", "0077705924| 11223344")
    parsed = load_roster_file(_csv(tmp_path, text, encoding="utf-16"), RosterConfig())
    assert parsed.errors == [] and len(parsed.people) == 3


def test_replace_deactivates_missing_people_and_moves_cards(tmp_path: Path) -> None:
    database = open_database(tmp_path / "j.db")
    store = RosterStore(database)
    first = load_roster_file(_csv(tmp_path, GOOD_CSV), RosterConfig()).people
    report = store.apply(first, replace=True)
    assert (report.added, report.version) == (3, 1)
    assert store.by_card("04A1B2C3D4E5F6").id == "HS001"

    second = parse_roster(
        [["id", "name", "class", "card"], ["HS002", "Trần Thị Bích Ngọc", "6A", "04A1B2C3D4E5F6"]], RosterConfig()
    ).people
    report = store.apply(second, replace=True)
    assert sorted(report.deactivated) == ["GV001", "HS001"]
    assert report.cards_moved == [("04A1B2C3D4E5F6", "HS001", "HS002")]
    assert store.by_card("04A1B2C3D4E5F6").id == "HS002"
    assert store.by_card("11223344") is None  # HS002's old cards were replaced by the file's
    assert not store.get("HS001").active
    assert store.version() == 2
    assert store.apply(second, replace=True).version == 2  # nothing changed, same version


def test_merge_refuses_a_card_held_by_someone_else_and_changes_nothing(tmp_path: Path) -> None:
    database = open_database(tmp_path / "j.db")
    store = RosterStore(database)
    store.apply(load_roster_file(_csv(tmp_path, GOOD_CSV), RosterConfig()).people, replace=True)
    thief = parse_roster(
        [["id", "name", "class", "card"], ["HS999", "Người Mới", "6A", "9F8E7D6C"]], RosterConfig()
    ).people
    with pytest.raises(ValueError, match="9F8E7D6C already belongs to GV001"):
        store.apply(thief, replace=False)
    assert store.get("HS999") is None and store.by_card("9F8E7D6C").id == "GV001"


def test_search_without_diacritics(tmp_path: Path) -> None:
    database = open_database(tmp_path / "j.db")
    store = RosterStore(database)
    store.apply(load_roster_file(_csv(tmp_path, GOOD_CSV), RosterConfig()).people, replace=True)
    assert [p.id for p in store.search("bich ngoc")] == ["HS002"]
    assert [p.id for p in store.search("ĐẶNG")] == ["GV001"]


def test_cli_import_is_all_or_nothing(tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    good = _csv(tmp_path, GOOD_CSV)
    result = _run("roster", "import", str(good), "--journal", str(journal), "--config", str(tmp_path / "none.toml"))
    assert result.returncode == 0, result.stderr
    assert "3 added" in result.stdout

    bad = _csv(tmp_path, GOOD_CSV + "HS004,Bad,6A,HS,,nothex!,,\n", name="bad.csv")
    result = _run("roster", "import", str(bad), "--journal", str(journal), "--config", str(tmp_path / "none.toml"))
    assert result.returncode == 1
    assert "rejected, nothing imported" in result.stderr
    assert "row 5 (HS004): malformed card UID" in result.stderr
    listing = _run("roster", "list", "--journal", str(journal), "--config", str(tmp_path / "none.toml"))
    assert "HS004" not in listing.stdout and listing.stdout.count("\n") == 3
