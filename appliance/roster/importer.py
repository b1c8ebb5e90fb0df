"""Import a roster from the CSV or XLSX a school's management software exports.

Headers may be Vietnamese or English (matched without diacritics or case) or set in the
config; every row is checked, and the import is all-or-nothing: one bad row rejects the
file, with a report of every rejected row and why.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config import RosterConfig
from appliance.readers.uid import UidError, normalise_uid
from appliance.roster.model import Person, Role, check_email, fold, normalise_name, normalise_phone


class RosterFileError(Exception):
    """The file as a whole cannot be read (format, encoding, missing columns)."""


FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "id": (
        "id",
        "person id",
        "student id",
        "staff id",
        "ma",
        "ma hoc sinh",
        "ma hs",
        "ma dinh danh",
        "ma ca nhan",
        "ma nhan vien",
        "ma gv",
        "ma so",
        "ma dinh danh ca nhan",
    ),
    "full_name": ("full name", "name", "ho va ten", "ho ten", "ho ten hoc sinh", "ho va ten hoc sinh", "ten day du"),
    "family_name": ("ho dem", "ho va ten dem", "ho va dem", "family name"),
    "given_name": ("ten", "given name", "first name"),
    "class_name": ("class", "class name", "lop", "lop hoc", "ten lop"),
    "role": ("role", "vai tro", "doi tuong", "loai"),
    "active": ("active", "status", "trang thai", "tinh trang"),
    "cards": ("card", "cards", "card uid", "card uids", "uid", "ma the", "so the", "the", "ma the rfid"),
    "parent_phone": (
        "parent phone",
        "parent phones",
        "sdt phu huynh",
        "so dien thoai phu huynh",
        "dien thoai phu huynh",
        "sdt ph",
        "sdt",
    ),
    "parent_email": ("parent email", "parent emails", "email phu huynh", "email"),
}

_ROLE_WORDS = {
    Role.STUDENT: {"student", "hoc sinh", "hs", "pupil"},
    Role.STAFF: {"staff", "teacher", "giao vien", "gv", "nhan vien", "nv", "can bo", "cb", "can bo giao vien"},
}
_ACTIVE_WORDS = {
    True: {"1", "yes", "y", "true", "active", "co", "x", "dang hoc", "con hoc", "hoat dong", "dang lam viec"},
    False: {
        "0",
        "no",
        "n",
        "false",
        "inactive",
        "khong",
        "nghi hoc",
        "da nghi",
        "thoi hoc",
        "chuyen truong",
        "da chuyen",
        "ngung",
        "ngung hoat dong",
        "nghi viec",
    },
}
_LIST_SEPARATORS = str.maketrans({",": ";", "|": ";", "/": ";"})


@dataclass(frozen=True)
class RowError:
    row: int
    person_id: str | None
    reason: str

    def __str__(self) -> str:
        who = f" ({self.person_id})" if self.person_id else ""
        return f"row {self.row}{who}: {self.reason}"


@dataclass
class ParsedRoster:
    people: list[Person] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    columns: dict[str, str] = field(default_factory=dict)


def header_key(text: object) -> str:
    """A header or keyword as compared: accents, case, '_' and '-' and extra spaces do not matter."""
    return " ".join(fold(str(text or "")).replace("_", " ").replace("-", " ").split())


def _read_csv(path: Path) -> list[list[str | int]]:
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = raw.decode("utf-16")
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise RosterFileError(
                f"{path}: not UTF-8; in Excel use Save As > 'CSV UTF-8', or import the .xlsx"
            ) from None
    sample = text[:4096]
    try:
        dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    return [list(row) for row in csv.reader(io.StringIO(text), dialect) if any(cell.strip() for cell in row)]


def _read_xlsx(path: Path, sheet: str | None) -> list[list[str | int]]:
    from openpyxl import load_workbook

    try:
        book = load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:
        raise RosterFileError(f"{path}: not a readable .xlsx workbook ({exc.__class__.__name__})") from None
    try:
        if sheet is not None and sheet not in book.sheetnames:
            raise RosterFileError(f"{path}: no sheet named {sheet!r}; sheets: {', '.join(book.sheetnames)}")
        ws = book[sheet] if sheet else book.worksheets[0]
        rows = []
        for values in ws.iter_rows(values_only=True):
            cells = ["" if v is None else _cell_value(v) for v in values]
            if any(str(c).strip() for c in cells):
                rows.append(cells)
        return rows
    finally:
        book.close()


def _cell_value(value: object) -> str | int:
    """Whole numbers stay numbers, because Excel drops leading zeros that only the column can restore."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    return str(value)


def _cell_text(fieldname: str, value: str | int) -> str:
    """Text of a cell; a card typed as a number is a 10-digit decimal card number, a phone lost its 0."""
    if isinstance(value, int):
        if fieldname == "cards":
            return f"{value:010d}"
        if fieldname == "parent_phone" and len(str(value)) == 9:
            return f"0{value}"
        return str(value)
    return value


def read_table(path: Path, sheet: str | None = None) -> list[list[str | int]]:
    """Rows of the file as text (header first), blank rows dropped."""
    if not path.exists():
        raise RosterFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in {".xlsx", ".xlsm"}:
        return _read_xlsx(path, sheet)
    if suffix in {".csv", ".txt", ".tsv"}:
        return _read_csv(path)
    if suffix == ".xls":
        raise RosterFileError(f"{path}: old .xls format; open it in Excel and save as .xlsx or CSV UTF-8")
    raise RosterFileError(f"{path}: unknown file type {suffix!r}; use .csv or .xlsx")


def map_columns(header: list[str | int], config: RosterConfig) -> dict[str, int]:
    """Field name -> column index, from the config's explicit names first, then the aliases."""
    keys = [header_key(h) for h in header]
    mapping: dict[str, int] = {}
    explicit = config.columns.model_dump()
    for fieldname, wanted in explicit.items():
        if wanted is None:
            continue
        try:
            mapping[fieldname] = keys.index(header_key(wanted))
        except ValueError:
            raise RosterFileError(
                f"roster.columns.{'class' if fieldname == 'class_name' else fieldname} = {wanted!r}: "
                f"no such column; the file has: {', '.join(str(h) for h in header if h)}"
            ) from None
    for fieldname, aliases in FIELD_ALIASES.items():
        if fieldname in mapping:
            continue
        for index, key in enumerate(keys):
            if key in aliases and index not in mapping.values():
                mapping[fieldname] = index
                break
    if "id" not in mapping:
        raise RosterFileError(
            "no person id column found (looked for e.g. 'Mã học sinh', 'Mã định danh', 'id'); "
            'name it in [roster.columns] id = "..."'
        )
    if "full_name" not in mapping and "given_name" not in mapping:
        raise RosterFileError("no name column found (e.g. 'Họ và tên', 'full_name'); set [roster.columns] full_name")
    return mapping


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.translate(_LIST_SEPARATORS).split(";") if part.strip()]


def _parse_row(cells: dict[str, str], config: RosterConfig) -> tuple[Person | None, list[str]]:
    problems: list[str] = []
    person_id = cells.get("id", "").strip()
    if not person_id:
        problems.append("missing person id")
    name = cells.get("full_name", "")
    if not name.strip() and (cells.get("given_name") or cells.get("family_name")):
        name = f"{cells.get('family_name', '')} {cells.get('given_name', '')}"
    name = normalise_name(name)
    if not name:
        problems.append("missing full name")

    role = Role.STUDENT
    role_text = header_key(cells.get("role", ""))
    if role_text:
        matched = [r for r, words in _ROLE_WORDS.items() if role_text in words]
        if matched:
            role = matched[0]
        else:
            problems.append(f"unknown role {cells['role']!r} (use student/học sinh or staff/giáo viên)")

    active = True
    active_text = header_key(cells.get("active", ""))
    if active_text:
        if active_text in _ACTIVE_WORDS[True]:
            active = True
        elif active_text in _ACTIVE_WORDS[False]:
            active = False
        else:
            problems.append(f"unknown status {cells['active']!r} (use yes/no, đang học/nghỉ học)")

    class_name = normalise_name(cells.get("class_name", "")) or None
    if role is Role.STUDENT and class_name is None:
        problems.append("missing class")
    elif class_name and config.classes and class_name not in config.classes:
        problems.append(f"unknown class {class_name!r} (known: {', '.join(config.classes)})")

    cards: list[str] = []
    for raw in _split(cells.get("cards", "")):
        try:
            cards.append(normalise_uid(raw, config.card_format))
        except UidError as exc:
            problems.append(f"malformed card UID: {exc}")
    phones, emails = [], []
    for raw in _split(cells.get("parent_phone", "")):
        try:
            phones.append(normalise_phone(raw))
        except ValueError as exc:
            problems.append(str(exc))
    for raw in _split(cells.get("parent_email", "")):
        try:
            emails.append(check_email(raw))
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        return None, problems
    person = Person(
        person_id, name, role, class_name, active, tuple(dict.fromkeys(cards)), tuple(phones), tuple(emails)
    )
    return person, []


def parse_roster(rows: list[list[str | int]], config: RosterConfig) -> ParsedRoster:
    """Check every row; duplicates of ids and cards are reported on each later row that repeats them."""
    if not rows:
        raise RosterFileError("the file is empty")
    header, body = rows[0], rows[1:]
    mapping = map_columns(header, config)
    result = ParsedRoster(columns={f: str(header[i]) for f, i in mapping.items()})
    seen_ids: dict[str, int] = {}
    seen_cards: dict[str, tuple[int, str]] = {}
    for offset, row in enumerate(body):
        line = offset + 2
        cells = {f: _cell_text(f, row[i]) if i < len(row) else "" for f, i in mapping.items()}
        person, problems = _parse_row(cells, config)
        pid = cells.get("id", "").strip() or None
        if pid and pid in seen_ids:
            problems.append(f"duplicate person id (also on row {seen_ids[pid]})")
        if person is not None:
            for uid in person.cards:
                if uid in seen_cards:
                    other_row, other_id = seen_cards[uid]
                    problems.append(f"duplicate card {uid} (also on row {other_row}, {other_id})")
        if problems:
            result.errors.extend(RowError(line, pid, p) for p in problems)
            continue
        assert person is not None
        seen_ids[person.id] = line
        for uid in person.cards:
            seen_cards[uid] = (line, person.id)
        result.people.append(person)
    if not body:
        raise RosterFileError("the file has a header but no people")
    return result


def load_roster_file(path: Path, config: RosterConfig) -> ParsedRoster:
    return parse_roster(read_table(path, config.sheet), config)
