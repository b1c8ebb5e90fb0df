"""Import a roster from the CSV or XLSX a school's management software exports.

Headers may be Vietnamese or English (matched without diacritics or case) or set in the
config; every row is checked, and the import is all-or-nothing: one bad row rejects the
file, with a report of every rejected row and why.

The file comes from outside and may be anything (damaged, truncated, not a roster at all, made
to hurt): whatever it holds, reading it ends in a RosterFileError whose one line says what is
wrong and what to do, never in a traceback, and the limits below keep a hostile file from taking
the machine's memory or time.
"""

from __future__ import annotations

import csv
import io
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config import RosterConfig
from appliance.readers.uid import UidError, normalise_uid
from appliance.roster.model import Person, Role, check_email, fold, normalise_name, normalise_phone


class RosterFileError(Exception):
    """The file as a whole cannot be read (format, encoding, missing columns)."""


# A school's roster is a few thousand rows of a few short cells: anything far beyond is not a roster.
MAX_FILE_BYTES = 50 * 1024 * 1024
MAX_UNPACKED_BYTES = 200 * 1024 * 1024  # what an .xlsx may unpack to (a zip bomb is refused before reading)
MAX_ROWS = 100_000
MAX_COLUMNS = 200
MAX_CELL_CHARS = 10_000
# What the hub may publish to gates (downlink.schema.json): longer values would be refused there, later.
MAX_ID_CHARS, MAX_NAME_CHARS, MAX_CLASS_CHARS = 64, 200, 50
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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
        """One line, of a readable length even when the file holds a page of text in a cell."""
        who = f" ({_shown(self.person_id)})" if self.person_id else ""
        return f"row {self.row}{who}: {_shown(self.reason)}"


def _shown(text: str, limit: int = 200) -> str:
    if _CONTROL.search(text):
        text = repr(text)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


@dataclass
class ParsedRoster:
    people: list[Person] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    columns: dict[str, str] = field(default_factory=dict)


def header_key(text: object) -> str:
    """A header or keyword as compared: accents, case, '_' and '-' and extra spaces do not matter."""
    return " ".join(fold(str(text or "")).replace("_", " ").replace("-", " ").split())


def _decode(path: Path, raw: bytes) -> str:
    """UTF-16 with its BOM, else UTF-8 (BOM or not); anything else is refused with the way to save it right."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text = raw.decode("utf-16")
        except UnicodeDecodeError:
            raise RosterFileError(
                f"{path}: damaged UTF-16 text (cut short or not text); in Excel use Save As > 'CSV UTF-8'"
            ) from None
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise RosterFileError(
                f"{path}: not UTF-8; in Excel use Save As > 'CSV UTF-8', or import the .xlsx"
            ) from None
    if "\x00" in text:
        raise RosterFileError(
            f"{path}: holds NUL bytes, so it is not CSV text (UTF-16 without its BOM?); "
            "in Excel use Save As > 'CSV UTF-8'"
        )
    return text


def _read_csv(path: Path) -> list[list[str | int]]:
    text = _decode(path, _read_bytes(path))
    sample = text[:4096]
    try:
        dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text), dialect)
    rows: list[list[str | int]] = []
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                _check_size(path, len(rows), reader.line_num, row)
                rows.append(list(row))
    except csv.Error as exc:
        problem = f"a cell of more than {MAX_CELL_CHARS} characters" if "field limit" in str(exc) else str(exc)
        raise RosterFileError(
            f"{path}: line {reader.line_num} is not valid CSV ({problem}); export the roster again as 'CSV UTF-8'"
        ) from None
    return rows


def _check_file_size(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise RosterFileError(f"{path}: cannot read: {exc.strerror}") from None
    if size > MAX_FILE_BYTES:
        raise RosterFileError(
            f"{path}: {size // (1024 * 1024)} MB is too large for a roster "
            f"(at most {MAX_FILE_BYTES // (1024 * 1024)} MB); is it the right file?"
        )


def _read_bytes(path: Path) -> bytes:
    _check_file_size(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RosterFileError(f"{path}: cannot read: {exc.strerror}") from None


def _check_size(path: Path, kept: int, line: int, cells: list[str] | list[str | int]) -> None:
    """Refuse what no roster holds before it is kept: too many rows, or a cell of a whole page's text."""
    if kept >= MAX_ROWS:
        raise RosterFileError(f"{path}: more than {MAX_ROWS} rows; is it the right file?")
    longest = max((len(cell) for cell in cells if isinstance(cell, str)), default=0)
    if longest > MAX_CELL_CHARS:
        raise RosterFileError(
            f"{path}: row {line} has a cell of {longest} characters (at most {MAX_CELL_CHARS}); is it the right file?"
        )


def _check_zip(path: Path) -> None:
    """An .xlsx is a zip: refuse a non-zip or one that would unpack to far more than any roster."""
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, ValueError, EOFError):
        raise RosterFileError(
            f"{path}: not a readable .xlsx workbook (damaged, cut short or another format); "
            "open it in Excel and save it again as .xlsx"
        ) from None
    except OSError as exc:
        raise RosterFileError(f"{path}: cannot read: {exc.strerror}") from None
    if unpacked > MAX_UNPACKED_BYTES:
        raise RosterFileError(
            f"{path}: unpacks to {unpacked // (1024 * 1024)} MB, far more than a roster; is it the right file?"
        )


def _read_xlsx(path: Path, sheet: str | None) -> list[list[str | int]]:
    from openpyxl import load_workbook

    _check_file_size(path)
    _check_zip(path)
    damaged = f"{path}: not a readable .xlsx workbook"
    save_again = "open it in Excel and save it again as .xlsx"
    # openpyxl warns on stderr about every oddity of a damaged file; the one line below says what matters.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            book = load_workbook(path, read_only=True, data_only=True)
        except Exception as exc:  # openpyxl, zipfile and the XML parser each raise their own on a damaged file
            raise RosterFileError(f"{damaged} ({exc.__class__.__name__}); {save_again}") from None
        try:
            sheets = {ws.title: ws for ws in book.worksheets}
            if sheet is not None and sheet not in sheets:
                raise RosterFileError(f"{path}: no sheet named {sheet!r}; sheets: {', '.join(sheets) or 'none'}")
            if not sheets:
                raise RosterFileError(f"{path}: the workbook has no worksheet; {save_again}")
            ws = sheets[sheet] if sheet else next(iter(sheets.values()))
            rows = []
            width = min(ws.max_column or MAX_COLUMNS, MAX_COLUMNS)  # a sheet may claim 16,384 columns
            for line, values in enumerate(ws.iter_rows(max_col=width, values_only=True), start=1):
                if line > MAX_ROWS:  # blank rows count too: a million of them is no roster either
                    raise RosterFileError(f"{path}: more than {MAX_ROWS} rows; is it the right file?")
                cells = ["" if v is None else _cell_value(v) for v in values]
                if any(str(c).strip() for c in cells):
                    _check_size(path, len(rows), line, cells)
                    rows.append(cells)
            return rows
        except RosterFileError:
            raise
        except Exception as exc:  # a damaged sheet shows only while it is read
            raise RosterFileError(f"{damaged} (its sheet is damaged: {exc.__class__.__name__}); {save_again}") from None
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


def _text_problems(what: str, text: str, limit: int) -> list[str]:
    """What the gates could not be sent (downlink.schema.json) or would show garbled: too long, control characters."""
    problems = []
    if len(text) > limit:
        problems.append(f"{what} longer than {limit} characters ({len(text)})")
    if _CONTROL.search(text):
        problems.append(f"{what} holds a control character (invisible, e.g. \\x07): retype it")
    return problems


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
    class_name = normalise_name(cells.get("class_name", "")) or None
    for what, text, limit in (
        ("person id", person_id, MAX_ID_CHARS),
        ("full name", name, MAX_NAME_CHARS),
        ("class", class_name or "", MAX_CLASS_CHARS),
    ):
        problems += _text_problems(what, text, limit)

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
