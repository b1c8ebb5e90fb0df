"""Attendance, absences, leave requests and the daily report: real databases, files and a real HTTP server."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hub_support import ZONE, ensure_registered, gate_event, payload, write_hub_config
from openpyxl import load_workbook

from appliance.cli import main
from appliance.config import HubConfig, parse_hub_config
from appliance.hub.attendance import (
    ABSENT_PERMITTED,
    ABSENT_UNEXCUSED,
    LATE,
    NO_SCHOOL,
    PENDING,
    PRESENT,
    class_day,
    school_summary,
)
from appliance.hub.city import push_day, report_record
from appliance.hub.ingest import Incoming, Ingest
from appliance.hub.jobs import DailyJobs, daily_jobs, decide_absences, gates_behind
from appliance.hub.leave import LeaveError, LeaveFileError, add_leave, import_leave_file
from appliance.hub.report import COLUMNS, export_day
from appliance.hub.resync import MAX_ATTEMPTS
from appliance.hub.store import Connection, Store

SCHOOL = "thcs-a"
MONDAY = date(2024, 10, 21)
SUNDAY = date(2024, 10, 20)

# id, full name, role, class, active
PEOPLE = [
    ("HS001", "Nguyễn Văn An", "student", "6A", 1),  # on time
    ("HS002", "Trần Thị Bình", "student", "6A", 1),  # late (the gate says so)
    ("HS003", "Lê Minh Châu", "student", "6A", 1),  # absent, approved leave
    ("HS004", "Phạm Đức Dũng", "student", "6A", 1),  # absent, leave not approved
    ("HS005", "Hoàng Thị Én", "student", "6A", 1),  # absent, no word
    ("HS006", "Vũ Quốc Giang", "student", "6A", 1),  # only seen leaving: was at school
    ("HS007", "Đỗ Hải Yến", "student", "6A", 0),  # inactive: not counted
    ("HS101", "Bùi Thu Hà", "student", "6B", 1),  # afternoon class (13:00), late by the hub's clock
    ("HS102", "Ngô Gia Khánh", "student", "6B", 1),  # afternoon class, not arrived
    ("GV01", "Đặng Thị Lan", "staff", None, 1),
    ("GV02", "Phan Văn Minh", "staff", None, 1),
]


def hub_config(tmp_path: Path, **sections: Any) -> HubConfig:
    data: dict[str, Any] = {
        "hub": {"schools": [SCHOOL]},
        "attendance": {"class_start": "07:15", "class_start_by_class": {"6B": "13:00"}, "absent_after_minutes": 15},
        "report": {"export_dir": str(tmp_path / "reports"), "send_at": "16:30"},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse_hub_config(data)


def at(day: date, hhmm: str) -> datetime:
    hours, minutes = hhmm.split(":")
    return datetime(day.year, day.month, day.day, int(hours), int(minutes), tzinfo=ZONE)


def ts(day: date, hhmm: str) -> str:
    return at(day, hhmm).isoformat(timespec="milliseconds")


def add_people(conn: Connection, people: list[tuple[str, str, str, str | None, int]] = PEOPLE) -> None:
    with conn.transaction():
        for pid, name, role, klass, active in people:
            conn.execute(
                "INSERT INTO people(school, id, full_name, role, class_name, active, cards, parent_phones, "
                "parent_emails, updated_at) VALUES (?, ?, ?, ?, ?, ?, '[]', ?, '[]', '2024-10-01T00:00:00+00:00')",
                [SCHOOL, pid, name, role, klass, active, json.dumps(["+84901234567"])],
            )


class Gate:
    """Events stored the way the hub stores them: through the real Ingest, as a gate publishes them."""

    def __init__(self, conn: Connection, device: str = "gate-01") -> None:
        ensure_registered(conn, SCHOOL, device)
        self.ingest = Ingest(conn, "edugate")
        self.device = device
        self.seq = 0

    def send(self, kind: str, person: str, when: str, role: str = "student", **fields: Any) -> None:
        self.seq += 1
        event = gate_event(self.device, self.seq, kind=kind, person=person, role=role, ts=when, **fields)
        self.ingest.store_batch([Incoming(f"edugate/{SCHOOL}/{self.device}/events", payload(event))])


def school_monday(conn: Connection) -> None:
    """The day every test below looks at."""
    add_people(conn)
    gate = Gate(conn)
    gate.send("arrival", "HS001", ts(MONDAY, "07:05"), late=False, minutes_late=0)
    gate.send("arrival", "HS002", ts(MONDAY, "07:27"), late=True, minutes_late=12)
    gate.send("departure", "HS006", ts(MONDAY, "16:45"))
    gate.send("arrival", "HS101", ts(MONDAY, "13:20"))  # no verdict from the gate: the hub's 13:00 decides
    gate.send("departure", "HS001", ts(MONDAY, "16:40"))
    gate.send("arrival", "GV01", ts(MONDAY, "06:50"), role="staff", late=False, minutes_late=0)
    gate.send("departure", "GV01", ts(MONDAY, "11:30"), role="staff")
    gate.send("tap", "GV01", ts(MONDAY, "13:00"), role="staff")
    gate.send("departure", "GV01", ts(MONDAY, "17:05"), role="staff")
    gate.send("arrival", "GV02", ts(MONDAY, "07:20"), role="staff", late=True, minutes_late=20)
    # A second gate saw HS001 later: the earliest arrival counts.
    other = Gate(conn, "gate-02")
    other.send("arrival", "HS001", ts(MONDAY, "07:40"), late=True, minutes_late=25)
    # Yesterday's arrival of HS005 says nothing about Monday.
    other.send("arrival", "HS005", ts(SUNDAY, "07:00"), late=False, minutes_late=0)
    add_leave(conn, SCHOOL, "HS003", "2024-10-21", "2024-10-22", "Ốm, sốt cao", True, "test")
    add_leave(conn, SCHOOL, "HS004", "21/10/2024", None, "Việc gia đình", False, "test")


def statuses(rows: list[Any]) -> dict[str, str]:
    return {r.person: r.status for r in rows}


# ---------------------------------------------------------------- attendance


def test_each_students_state_of_the_day(hub_conn: Connection, tmp_path: Path) -> None:
    config = hub_config(tmp_path)
    school_monday(hub_conn)
    before = class_day(hub_conn, config, SCHOOL, MONDAY, "6A", now=at(MONDAY, "07:29"))
    assert statuses(before) == {
        "HS001": PRESENT,
        "HS002": LATE,
        "HS003": ABSENT_PERMITTED,  # an approved leave decides at once
        "HS004": PENDING,
        "HS005": PENDING,
        "HS006": PRESENT,
    }
    after = class_day(hub_conn, config, SCHOOL, MONDAY.isoformat(), "6A", now=at(MONDAY, "07:30"))
    by_id = {r.person: r for r in after}
    assert statuses(after) == {
        "HS001": PRESENT,
        "HS002": LATE,
        "HS003": ABSENT_PERMITTED,
        "HS004": ABSENT_UNEXCUSED,  # a request that is not approved excuses nothing
        "HS005": ABSENT_UNEXCUSED,
        "HS006": PRESENT,
    }
    assert by_id["HS001"].arrival_ts == ts(MONDAY, "07:05") and by_id["HS001"].departure_ts == ts(MONDAY, "16:40")
    assert by_id["HS002"].minutes_late == 12 and by_id["HS001"].minutes_late is None
    assert by_id["HS003"].leave_reason == "Ốm, sốt cao" and by_id["HS003"].full_name == "Lê Minh Châu"
    assert by_id["HS004"].leave_reason is None
    assert by_id["HS006"].arrival_ts is None and by_id["HS006"].departure_ts == ts(MONDAY, "16:45")
    # Class-list order: by given name (An, Bình, Châu, Dũng, Én, Giang).
    assert [r.person for r in after] == ["HS001", "HS002", "HS003", "HS004", "HS005", "HS006"]

    afternoon = class_day(hub_conn, config, SCHOOL, MONDAY, "6B", now=at(MONDAY, "09:00"))
    assert statuses(afternoon) == {"HS101": LATE, "HS102": PENDING}
    assert afternoon[0].minutes_late == 20
    assert statuses(class_day(hub_conn, config, SCHOOL, MONDAY, "6B", now=at(MONDAY, "13:15")))["HS102"] == (
        ABSENT_UNEXCUSED
    )
    # Tuesday is covered by the approved leave too; Sunday is no school day: nobody is absent.
    tuesday_date = MONDAY + timedelta(days=1)
    tuesday = statuses(class_day(hub_conn, config, SCHOOL, tuesday_date, "6A", now=at(tuesday_date, "09:00")))
    assert tuesday["HS003"] == ABSENT_PERMITTED and tuesday["HS005"] == ABSENT_UNEXCUSED
    sunday = statuses(class_day(hub_conn, config, SCHOOL, SUNDAY, "6A", now=at(MONDAY, "12:00")))
    assert sunday == {**dict.fromkeys(sunday, NO_SCHOOL), "HS005": PRESENT}


def test_school_summary_counts_classes_and_staff(hub_conn: Connection, tmp_path: Path) -> None:
    config = hub_config(tmp_path)
    school_monday(hub_conn)
    summary = school_summary(hub_conn, config, SCHOOL, MONDAY, now=at(MONDAY, "16:30"))
    assert summary["school"] == SCHOOL and summary["day"] == "2024-10-21" and summary["school_day"] is True
    assert summary["classes"]["6A"] == {
        "present": 2,
        "late": 1,
        "absent_permitted": 1,
        "absent_unexcused": 2,
        "pending": 0,
        "total": 6,
        "class_start": "07:15",
        "cutoff": "07:30",
    }
    assert summary["classes"]["6B"]["late"] == 1 and summary["classes"]["6B"]["absent_unexcused"] == 1
    assert summary["classes"]["6B"]["cutoff"] == "13:15"
    assert summary["totals"] == {
        "present": 2,
        "late": 2,
        "absent_permitted": 1,
        "absent_unexcused": 3,
        "pending": 0,
        "total": 8,
    }
    staff = {s["person"]: s for s in summary["staff"]}
    assert staff["GV01"]["first_in"] == ts(MONDAY, "06:50") and staff["GV01"]["last_out"] == ts(MONDAY, "17:05")
    assert staff["GV01"]["minutes_late"] is None
    assert staff["GV02"]["first_in"] == ts(MONDAY, "07:20") and staff["GV02"]["last_out"] is None
    assert staff["GV02"]["minutes_late"] == 20
    json.dumps(summary)  # what the API returns as it is


# ---------------------------------------------------------------- leave requests


def test_leave_file_with_vietnamese_headers_is_imported_and_a_repeat_updates(
    hub_conn: Connection, tmp_path: Path
) -> None:
    add_people(hub_conn)
    file = tmp_path / "don-xin-nghi.csv"
    file.write_text(
        "Mã học sinh,Từ ngày,Đến ngày,Lý do,Duyệt\n"
        "HS003,21/10/2024,22/10/2024,Ốm  sốt cao,có\n"
        "HS004,2024-10-21,,Về quê,chưa duyệt\n"
        "GV02,21/10/2024,21/10/2024,Đi tập huấn,x\n",
        encoding="utf-8-sig",
    )
    parsed = import_leave_file(hub_conn, SCHOOL, file)
    assert parsed.errors == []
    rows = hub_conn.all("SELECT person, day_from, day_to, reason, approved, source FROM leave_requests ORDER BY person")
    assert rows == [
        ("GV02", "2024-10-21", "2024-10-21", "Đi tập huấn", 1, "file:don-xin-nghi.csv"),
        ("HS003", "2024-10-21", "2024-10-22", "Ốm sốt cao", 1, "file:don-xin-nghi.csv"),
        ("HS004", "2024-10-21", "2024-10-21", "Về quê", 0, "file:don-xin-nghi.csv"),
    ]
    # The office approves HS004's request and imports the file again: updated, not doubled.
    file.write_text("Person ID,From,To,Reason,Approved\nHS004,21/10/2024,21/10/2024,Về quê,yes\n", encoding="utf-8")
    assert import_leave_file(hub_conn, SCHOOL, file).errors == []
    assert hub_conn.all("SELECT approved FROM leave_requests WHERE person = 'HS004'") == [(1,)]
    assert hub_conn.one("SELECT COUNT(*) FROM leave_requests")[0] == 3
    config = hub_config(tmp_path)
    assert statuses(class_day(hub_conn, config, SCHOOL, MONDAY, "6A", now=at(MONDAY, "08:00")))["HS004"] == (
        ABSENT_PERMITTED
    )


def test_a_leave_file_with_one_bad_row_imports_nothing(hub_conn: Connection, tmp_path: Path) -> None:
    add_people(hub_conn)
    file = tmp_path / "leave.csv"
    file.write_text(
        "Mã HS;Từ ngày;Đến ngày;Lý do;Duyệt\n"
        "HS003;21/10/2024;22/10/2024;Ốm;có\n"
        "HS999;21/10/2024;21/10/2024;Ốm;có\n"
        "HS004;32/10/2024;;Ốm;có\n"
        "HS005;25/10/2024;21/10/2024;Ốm;có\n"
        "HS006;21/10/2024;;Ốm;có lẽ\n"
        "HS003;21/10/2024;22/10/2024;Ốm;có\n"
        ";21/10/2024;;;có\n",
        encoding="utf-8",
    )
    parsed = import_leave_file(hub_conn, SCHOOL, file)
    messages = [str(e) for e in parsed.errors]
    assert messages == [
        "row 3 (HS999): not on this school's roster",
        "row 4 (HS004): from: not a date: '32/10/2024' (use dd/mm/yyyy)",
        "row 5 (HS005): last day 21/10/2024 is before the first 25/10/2024",
        "row 6 (HS006): approved: 'có lẽ' is not yes/no (có/không, đã duyệt/chưa duyệt)",
        "row 7 (HS003): the same request as row 2",
        "row 8: missing person id",
    ]
    assert hub_conn.one("SELECT COUNT(*) FROM leave_requests")[0] == 0
    no_id = tmp_path / "no-id.csv"
    no_id.write_text("Họ tên,Từ ngày\nAn,21/10/2024\n", encoding="utf-8")
    with pytest.raises(LeaveFileError, match="no 'Mã học sinh'"):
        import_leave_file(hub_conn, SCHOOL, no_id)
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(b"M\xe3 h\xf4c sinh,T\xf9 ng\xe0y\nHS003,21/10/2024\n")
    with pytest.raises(LeaveFileError, match="not UTF-8"):
        import_leave_file(hub_conn, SCHOOL, latin1)
    with pytest.raises(LeaveError, match="not on the roster"):
        add_leave(hub_conn, SCHOOL, "HS999", "2024-10-21", None, None, True, "api")
    with pytest.raises(LeaveError, match="before the first"):
        add_leave(hub_conn, SCHOOL, "HS003", "2024-10-22", "2024-10-21", None, True, "api")
    assert hub_conn.one("SELECT COUNT(*) FROM leave_requests")[0] == 0


def test_leave_from_an_xlsx_with_date_cells(hub_conn: Connection, tmp_path: Path) -> None:
    from openpyxl import Workbook

    add_people(hub_conn)
    book = Workbook()
    sheet = book.active
    sheet.append(["Mã học sinh", "Từ ngày", "Đến ngày", "Lý do"])
    sheet.append(["HS005", datetime(2024, 10, 21), datetime(2024, 10, 23), "Khám bệnh"])
    path = tmp_path / "nghi.xlsx"
    book.save(path)
    assert import_leave_file(hub_conn, SCHOOL, path).errors == []
    assert hub_conn.all("SELECT person, day_from, day_to, approved FROM leave_requests") == [
        ("HS005", "2024-10-21", "2024-10-23", 1)  # no approval column: the office imports approved requests
    ]


# ---------------------------------------------------------------- report files


def test_report_files_open_back_with_vietnamese_intact(hub_conn: Connection, tmp_path: Path) -> None:
    config = hub_config(tmp_path)
    school_monday(hub_conn)
    files = export_day(hub_conn, config, SCHOOL, MONDAY, now=at(MONDAY, "16:30"))
    assert files.xlsx == tmp_path / "reports" / SCHOOL / "2024-10-21.xlsx"
    assert files.csv == tmp_path / "reports" / SCHOOL / "2024-10-21.csv"
    assert sorted(p.name for p in files.xlsx.parent.iterdir()) == ["2024-10-21.csv", "2024-10-21.xlsx"]

    book = load_workbook(files.xlsx)
    assert book.sheetnames == ["Tổng hợp", "6A", "6B", "Cán bộ, giáo viên"]
    summary = [list(r) for r in book["Tổng hợp"].iter_rows(values_only=True)]
    assert summary[0][:2] == ["Trường", SCHOOL] and summary[1][1] == datetime(2024, 10, 21)
    assert book["Tổng hợp"]["B2"].number_format == "DD/MM/YYYY"
    assert summary[3][:7] == ["Lớp", "Sĩ số", "Có mặt", "Đi muộn", "Vắng có phép", "Vắng không phép", "Chưa xác định"]
    assert summary[4][:9] == ["6A", 6, 2, 1, 1, 2, 0, "07:15", "07:30"]
    assert summary[6][:7] == ["Toàn trường", 8, 2, 2, 1, 3, 0]
    sheet = book["6A"]
    rows = [list(r) for r in sheet.iter_rows(values_only=True)]
    assert tuple(rows[0]) == COLUMNS
    assert rows[0] == ["Mã học sinh", "Họ và tên", "Lớp", "Ngày", "Trạng thái", "Giờ đến", "Giờ về", "Lý do"]
    an, binh, chau = rows[1], rows[2], rows[3]
    assert an[:5] == ["HS001", "Nguyễn Văn An", "6A", datetime(2024, 10, 21), "Có mặt"]
    assert an[5].strftime("%H:%M") == "07:05" and an[6].strftime("%H:%M") == "16:40"
    assert sheet["D2"].number_format == "DD/MM/YYYY" and sheet["F2"].number_format == "HH:MM"
    assert binh[4] == "Đi muộn"
    assert chau[4] == "Vắng có phép" and chau[7] == "Ốm, sốt cao" and chau[5] is None
    assert [r[4] for r in rows[4:6]] == ["Vắng không phép", "Vắng không phép"]
    staff = [list(r) for r in book["Cán bộ, giáo viên"].iter_rows(values_only=True)]
    assert staff[1][:2] == ["GV01", "Đặng Thị Lan"] and staff[1][3].strftime("%H:%M") == "17:05"
    assert staff[2][4] == 20

    raw = files.csv.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # the BOM: Excel opens it as UTF-8
    table = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
    assert table[0] == list(COLUMNS)
    assert table[1] == ["HS001", "Nguyễn Văn An", "6A", "21/10/2024", "Có mặt", "07:05", "16:40", ""]
    assert table[3] == ["HS003", "Lê Minh Châu", "6A", "21/10/2024", "Vắng có phép", "", "", "Ốm, sốt cao"]
    assert [r[2] for r in table[1:]] == ["6A"] * 6 + ["6B"] * 2
    assert table[7][:6] == ["HS101", "Bùi Thu Hà", "6B", "21/10/2024", "Đi muộn", "13:20"]

    # A second export of the day replaces the first whole, with nothing left behind.
    Gate(hub_conn, "gate-03").send("arrival", "HS005", ts(MONDAY, "17:00"), late=True, minutes_late=585)
    export_day(hub_conn, config, SCHOOL, MONDAY, now=at(MONDAY, "17:10"))
    table = list(csv.reader(io.StringIO(files.csv.read_text("utf-8-sig"))))
    assert table[5][4] == "Đi muộn"
    assert sorted(p.name for p in files.xlsx.parent.iterdir()) == ["2024-10-21.csv", "2024-10-21.xlsx"]


# ---------------------------------------------------------------- the city's API


class CityServer:
    """A real HTTP server on 127.0.0.1 playing the city's API: answers from a script, every request recorded."""

    def __init__(self) -> None:
        self.script: list[tuple[int, str, float]] = []  # (status, body, seconds to wait before answering)
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, text, delay = server.script.pop(0) if server.script else (200, '{"ok":true}', 0.0)
                time.sleep(delay)
                data = text.encode("utf-8")
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up waiting (the timeout test)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/api/diemdanh"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r["body"]) for r in self.requests]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def city() -> Iterator[CityServer]:
    server = CityServer()
    yield server
    server.close()


def city_config(tmp_path: Path, server: CityServer, **city: Any) -> HubConfig:
    token = tmp_path / "city.token"
    token.write_text("s3cret-token\n")
    values = {
        "url": server.url,
        "token_file": str(token),
        "timeout": 2.0,
        "max_attempts": 4,
        "retry_min": 0.05,
        "retry_max": 0.2,
        "field_mapping": {"person_id": "ma_hoc_sinh", "students": "hoc_sinh", "date": "ngay", "full_name": ""},
        **city,
    }
    return hub_config(tmp_path, report={"city": values})


def test_push_retries_through_server_errors_and_records_the_exchange(
    hub_conn: Connection, tmp_path: Path, city: CityServer
) -> None:
    config = city_config(tmp_path, city)
    school_monday(hub_conn)
    city.script = [(500, "overloaded", 0.0), (503, "maintenance", 0.0), (200, '{"ma":"OK-123"}', 0.0)]
    result = push_day(hub_conn, config, SCHOOL, MONDAY)
    assert (result.status, result.attempts, result.response_code, result.response) == (
        "sent",
        3,
        200,
        '{"ma":"OK-123"}',
    )
    assert len(city.requests) == 3
    sent = city.requests[-1]
    assert sent["path"] == "/api/diemdanh"
    assert sent["headers"]["Authorization"] == "Bearer s3cret-token"
    assert sent["headers"]["Idempotency-Key"] == f"{SCHOOL}/2024-10-21"
    assert sent["headers"]["Content-Type"] == "application/json; charset=utf-8"
    body = json.loads(sent["body"])
    assert body["ngay"] == "2024-10-21" and body["school"] == SCHOOL and "date" not in body
    students = {s["ma_hoc_sinh"]: s for s in body["hoc_sinh"]}
    assert "full_name" not in students["HS001"]  # mapped to "": left out
    assert students["HS003"]["status"] == "absent_permitted" and students["HS003"]["leave_reason"] == "Ốm, sốt cao"
    assert students["HS002"]["arrival"] == "2024-10-21T07:27:00+07:00" and students["HS002"]["minutes_late"] == 12
    assert body["totals"]["absent_unexcused"] == 3 and body["classes"][0]["class_name"] == "6A"
    assert body["staff"][1]["ma_hoc_sinh"] == "GV02"

    record = report_record(hub_conn, SCHOOL, MONDAY)
    assert record is not None
    assert (record["status"], record["attempts"], record["response_code"]) == ("sent", 3, 200)
    assert record["response"] == '{"ma":"OK-123"}' and record["sent_at"]
    request = json.loads(record["request"])
    assert request["body"].encode("utf-8") == sent["body"]  # exactly what went over the wire
    assert request["url"] == city.url and request["method"] == "POST"
    assert "s3cret" not in record["request"] and request["headers"]["Authorization"].startswith("Bearer <")

    # Accepted: not sent again, unless forced.
    again = push_day(hub_conn, config, SCHOOL, MONDAY)
    assert again.status == "skipped_sent" and len(city.requests) == 3
    forced = push_day(hub_conn, config, SCHOOL, MONDAY, force=True)
    assert (forced.status, forced.attempts) == ("sent", 1) and len(city.requests) == 4


def test_a_refusal_is_final_and_recorded(hub_conn: Connection, tmp_path: Path, city: CityServer) -> None:
    config = city_config(tmp_path, city)
    school_monday(hub_conn)
    city.script = [(400, '{"loi":"truong ma_truong bat buoc"}', 0.0)]
    result = push_day(hub_conn, config, SCHOOL, MONDAY)
    assert (result.status, result.attempts, result.response_code) == ("failed", 1, 400)
    record = report_record(hub_conn, SCHOOL, MONDAY)
    assert record is not None
    assert (record["status"], record["attempts"], record["response_code"]) == ("failed", 1, 400)
    assert record["response"] == '{"loi":"truong ma_truong bat buoc"}' and record["sent_at"] is None
    assert len(city.requests) == 1
    # 429 is not a refusal: it is retried (Retry-After is capped by retry_max).
    city.script = [(429, "slow down", 0.0), (200, "ok", 0.0)]
    assert push_day(hub_conn, config, SCHOOL, MONDAY).status == "sent"  # a failed day may be tried again
    assert len(city.requests) == 3


def test_a_slow_server_times_out_and_the_push_is_retried(
    hub_conn: Connection, tmp_path: Path, city: CityServer
) -> None:
    config = city_config(tmp_path, city, timeout=0.5)
    school_monday(hub_conn)
    city.script = [(200, "too late", 2.0), (200, "ok", 0.0)]
    started = time.monotonic()
    result = push_day(hub_conn, config, SCHOOL, MONDAY)
    assert (result.status, result.attempts, result.response) == ("sent", 2, "ok")
    assert time.monotonic() - started < 2.0
    assert len(city.requests) == 2


def test_a_push_stopped_between_attempts_is_resumed_not_restarted(
    hub_conn: Connection, tmp_path: Path, city: CityServer
) -> None:
    config = city_config(tmp_path, city, retry_min=0.5, retry_max=0.5)
    school_monday(hub_conn)
    city.script = [(502, "bad gateway", 0.0), (200, "ok", 0.0)]
    stop = threading.Event()
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(push_day(hub_conn, config, SCHOOL, MONDAY, stop=stop)))
    worker.start()
    deadline = time.monotonic() + 10
    while not city.requests:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stop.set()  # the hub is stopping while it waits to retry
    worker.join(10)
    assert (results[0].status, results[0].attempts) == ("retrying", 1)
    record = report_record(hub_conn, SCHOOL, MONDAY)
    assert record is not None and (record["status"], record["attempts"], record["response_code"]) == (
        "retrying",
        1,
        502,
    )
    # Before the retry is due the day is left alone (another instance, or this one after a restart, waits).
    assert push_day(hub_conn, config, SCHOOL, MONDAY).status == "busy" and len(city.requests) == 1
    time.sleep(0.6)
    resumed = push_day(hub_conn, config, SCHOOL, MONDAY)
    assert (resumed.status, resumed.attempts) == ("sent", 2) and len(city.requests) == 2


def test_two_senders_racing_for_the_same_day_send_it_once(
    hub_store: Store, hub_conn: Connection, tmp_path: Path, city: CityServer
) -> None:
    config = city_config(tmp_path, city)
    school_monday(hub_conn)
    city.script = [(200, "ok", 0.5)]
    barrier = threading.Barrier(4)
    results: list[str] = []

    def sender() -> None:
        conn = hub_store.connect()
        try:
            barrier.wait()
            results.append(push_day(conn, config, SCHOOL, MONDAY).status)
        finally:
            conn.close()

    threads = [threading.Thread(target=sender) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(results) == 4 and results.count("sent") == 1
    assert set(results) - {"sent"} <= {"busy", "skipped_sent"}  # the others saw it in flight (or already done)
    assert len(city.requests) == 1


def test_a_push_that_never_gets_through_fails_after_max_attempts(hub_conn: Connection, tmp_path: Path) -> None:
    server = CityServer()
    url = server.url
    server.close()  # nothing listens there any more: connection refused
    config = hub_config(
        tmp_path, report={"city": {"url": url, "max_attempts": 3, "retry_min": 0.01, "retry_max": 0.02}}
    )
    add_people(hub_conn)
    result = push_day(hub_conn, config, SCHOOL, MONDAY)
    assert (result.status, result.attempts, result.response_code) == ("failed", 3, None)
    assert "cannot connect" in (result.response or "")
    missing_token = hub_config(tmp_path, report={"city": {"url": url, "token_file": str(tmp_path / "nope.token")}})
    refused = push_day(hub_conn, missing_token, SCHOOL, MONDAY)
    assert refused.status == "failed" and "nope.token" in (refused.response or "")


# ---------------------------------------------------------------- daily jobs


def absence_rows(conn: Connection) -> dict[str, dict[str, Any]]:
    return {k: json.loads(v) for k, v in conn.all("SELECT key, value FROM meta WHERE key LIKE 'absent/%'")}


def test_jobs_decide_absences_at_each_cut_off_once_and_push_once_across_a_restart(
    hub_store: Store, hub_conn: Connection, tmp_path: Path, city: CityServer
) -> None:
    config = city_config(tmp_path, city)
    school_monday(hub_conn)
    jobs = DailyJobs(hub_store, config)
    jobs.run_once(at(MONDAY, "07:29"))
    assert absence_rows(hub_conn) == {}
    jobs.run_once(at(MONDAY, "07:31"))
    rows = absence_rows(hub_conn)
    assert list(rows) == [f"absent/{SCHOOL}/2024-10-21/6A"]  # 6B's cut-off is 13:15
    assert rows[f"absent/{SCHOOL}/2024-10-21/6A"]["absent"] == ["HS004", "HS005"]
    assert rows[f"absent/{SCHOOL}/2024-10-21/6A"]["notified"] is False  # notify.enabled is off
    # Én arrives late after the cut-off: the decision stands, the report will say "late".
    Gate(hub_conn, "gate-03").send("arrival", "HS005", ts(MONDAY, "08:10"), late=True, minutes_late=55)
    jobs.run_once(at(MONDAY, "08:00"))
    jobs.stop()

    restarted = DailyJobs(hub_store, config)  # the hub restarted at 16:40: catches up with 6B and the report
    restarted.run_once(at(MONDAY, "16:40"))
    rows = absence_rows(hub_conn)
    assert sorted(rows) == [f"absent/{SCHOOL}/2024-10-21/6A", f"absent/{SCHOOL}/2024-10-21/6B"]
    assert rows[f"absent/{SCHOOL}/2024-10-21/6A"]["absent"] == ["HS004", "HS005"]
    assert rows[f"absent/{SCHOOL}/2024-10-21/6B"]["absent"] == ["HS102"]
    assert len(city.requests) == 1
    assert (tmp_path / "reports" / SCHOOL / "2024-10-21.xlsx").exists()
    done = json.loads(hub_conn.one("SELECT value FROM meta WHERE key = ?", [f"report/{SCHOOL}/2024-10-21"])[0])
    assert done["push"] == "sent"

    again = DailyJobs(hub_store, config)
    again.run_once(at(MONDAY, "16:45"))
    again.run_once(at(MONDAY, "18:00"))
    assert len(city.requests) == 1
    assert len(absence_rows(hub_conn)) == 2
    restarted.stop()
    again.stop()
    # The next day starts afresh; a Sunday does nothing.
    DailyJobs(hub_store, config).run_once(at(SUNDAY + timedelta(days=7), "17:00"))
    assert len(absence_rows(hub_conn)) == 2 and len(city.requests) == 1


def test_a_city_retry_waits_in_the_database_not_in_the_jobs_thread(
    hub_store: Store, hub_conn: Connection, tmp_path: Path, city: CityServer
) -> None:
    """The city answers 503 at 16:40: the round records the retry for a minute later and goes on (the same
    thread decides the absences at the cut-offs); a later round sends it when it is due."""
    config = city_config(tmp_path, city, retry_min=60.0, retry_max=60.0)
    school_monday(hub_conn)
    city.script = [(503, "busy", 0.0), (200, "ok", 0.0)]
    jobs = DailyJobs(hub_store, config)
    jobs.run_once(at(MONDAY, "16:40"))
    record = report_record(hub_conn, SCHOOL, MONDAY)
    assert record is not None and (record["status"], record["attempts"], record["response_code"]) == (
        "retrying",
        1,
        503,
    )
    assert len(city.requests) == 1 and len(absence_rows(hub_conn)) == 2
    assert hub_conn.one("SELECT 1 FROM meta WHERE key = ?", [f"report/{SCHOOL}/2024-10-21"]) is None
    jobs.run_once(at(MONDAY, "16:40"))
    assert len(city.requests) == 1  # not due yet
    hub_conn.execute("UPDATE reports SET next_attempt_at = ?", ["2000-01-01T00:00:00+00:00"])  # a minute went by
    jobs.run_once(at(MONDAY, "16:41"))
    assert len(city.requests) == 2
    done = json.loads(hub_conn.one("SELECT value FROM meta WHERE key = ?", [f"report/{SCHOOL}/2024-10-21"])[0])
    assert done["push"] == "sent"
    assert report_record(hub_conn, SCHOOL, MONDAY)["attempts"] == 2  # type: ignore[index]
    jobs.stop()


def test_a_retry_due_after_the_day_is_over_is_still_sent(
    hub_store: Store, hub_conn: Connection, tmp_path: Path, city: CityServer
) -> None:
    """Monday's push failed at 23:55 with its retry due after midnight; Tuesday's (or a Sunday's) rounds send it."""
    config = city_config(tmp_path, city, retry_min=60.0, retry_max=60.0)
    school_monday(hub_conn)
    city.script = [(503, "busy", 0.0), (200, "ok", 0.0)]
    jobs = DailyJobs(hub_store, config)
    jobs.run_once(at(MONDAY, "23:55"))
    assert report_record(hub_conn, SCHOOL, MONDAY)["status"] == "retrying"  # type: ignore[index]
    hub_conn.execute("UPDATE reports SET next_attempt_at = ?", ["2000-01-01T00:00:00+00:00"])  # now due
    jobs.run_once(at(SUNDAY + timedelta(days=7), "00:01"))  # no school that day: nothing else is done
    assert len(city.requests) == 2
    assert report_record(hub_conn, SCHOOL, MONDAY)["status"] == "sent"  # type: ignore[index]
    done = json.loads(hub_conn.one("SELECT value FROM meta WHERE key = ?", [f"report/{SCHOOL}/2024-10-21"])[0])
    assert done["push"] == "sent"
    jobs.run_once(at(SUNDAY + timedelta(days=7), "00:02"))
    assert len(city.requests) == 2
    jobs.stop()


def test_absences_wait_for_a_gate_that_is_behind(hub_conn: Connection, tmp_path: Path) -> None:
    config = hub_config(tmp_path)
    school_monday(hub_conn)
    went_offline = at(MONDAY, "06:00").astimezone().isoformat()
    hub_conn.execute(
        "INSERT INTO devices(device, school, online, status, status_at) VALUES ('gate-02', ?, 0, ?, ?)",
        [SCHOOL, json.dumps({"online": False, "reason": "connection lost"}), went_offline],
    )
    assert decide_absences(hub_conn, config, SCHOOL, MONDAY, "6A", at(MONDAY, "07:31")) is None
    assert decide_absences(hub_conn, config, SCHOOL, MONDAY, "6A", at(MONDAY, "08:29")) is None
    decision = decide_absences(hub_conn, config, SCHOOL, MONDAY, "6A", at(MONDAY, "08:31"))
    assert decision is not None
    assert decision.absent == ("HS004", "HS005") and decision.notified is False
    assert decision.gates_behind == ("gate-02",)
    # Back online with its backlog sent and no gap: the next class is decided at its cut-off.
    hub_conn.execute("UPDATE devices SET online = 1, status = ? WHERE device = 'gate-02'", [json.dumps({"backlog": 0})])
    decision = decide_absences(hub_conn, config, SCHOOL, MONDAY, "6B", at(MONDAY, "13:15"))
    assert decision is not None and decision.gates_behind == ()


def test_only_a_gap_that_may_still_close_holds_absences(hub_conn: Connection) -> None:
    """A gap in the gate's current journal holds the parents' messages; one the hub gave up on, or one in a
    journal the gate replaced, can never close and must not hold them every day from then on."""
    current, earlier = "c" * 32, "e" * 32
    hub_conn.execute(
        "INSERT INTO devices(device, school, online, status, status_at) VALUES ('gate-02', ?, 1, ?, ?)",
        [SCHOOL, json.dumps({"backlog": 0, "journal": current}), at(MONDAY, "07:00").isoformat()],
    )

    def stream(journal: str, attempts: int) -> None:
        hub_conn.execute("DELETE FROM streams")
        hub_conn.execute(
            "INSERT INTO streams(device, journal, school, contiguous, highest, resync_attempts, updated_at) "
            "VALUES ('gate-02', ?, ?, 10, 20, ?, ?)",
            [journal, SCHOOL, attempts, at(MONDAY, "07:00").isoformat()],
        )

    now = at(MONDAY, "07:31")
    stream(current, 0)
    assert gates_behind(hub_conn, SCHOOL, now) == ["gate-02"]
    stream(current, MAX_ATTEMPTS)  # the last request is out: the gate may still answer it
    assert gates_behind(hub_conn, SCHOOL, now) == ["gate-02"]
    stream(current, MAX_ATTEMPTS + 1)  # given up
    assert gates_behind(hub_conn, SCHOOL, now) == []
    stream(earlier, 0)
    assert gates_behind(hub_conn, SCHOOL, now) == []


def test_absent_parents_are_notified_once(hub_store: Store, hub_conn: Connection, tmp_path: Path) -> None:
    config = hub_config(tmp_path, notify={"enabled": True, "webhook": {"url": "http://127.0.0.1:9/never-called"}})
    school_monday(hub_conn)
    DailyJobs(hub_store, config).run_once(at(MONDAY, "07:31"))
    DailyJobs(hub_store, config).run_once(at(MONDAY, "07:45"))
    planned = hub_conn.all("SELECT person, day FROM outbox WHERE kind = 'absent' ORDER BY person")
    assert planned == [("HS004", "2024-10-21"), ("HS005", "2024-10-21")]
    assert absence_rows(hub_conn)[f"absent/{SCHOOL}/2024-10-21/6A"]["notified"] is True


def test_the_jobs_thread_starts_and_stops(hub_store: Store, hub_conn: Connection, tmp_path: Path) -> None:
    config = hub_config(
        tmp_path,
        attendance={
            "class_start": "00:00",
            "class_start_by_class": {},
            "absent_after_minutes": 0,
            "school_days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
        },
        report={"send_at": "00:00"},
    )
    add_people(hub_conn)
    today = datetime.now(ZONE).date().isoformat()
    jobs = daily_jobs(hub_store, config)
    jobs.start()
    try:
        deadline = time.monotonic() + 20
        while hub_conn.one("SELECT 1 FROM meta WHERE key = ?", [f"report/{SCHOOL}/{today}"]) is None:
            assert time.monotonic() < deadline, "the daily jobs never exported the report"
            time.sleep(0.1)
    finally:
        jobs.stop()
    assert (tmp_path / "reports" / SCHOOL / f"{today}.csv").exists()
    assert sorted(absence_rows(hub_conn)) == [f"absent/{SCHOOL}/{today}/6A", f"absent/{SCHOOL}/{today}/6B"]


# ---------------------------------------------------------------- the command line


def cli_config(tmp_path: Path, store: Store, city: CityServer | None = None) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "hub": {"schools": [SCHOOL], "language": "vi"},
        "database": {"url": store.url}
        | ({"password_file": str(store.config.password_file)} if store.config.password_file else {}),
        "attendance": {"class_start": "07:15", "class_start_by_class": {"6B": "13:00"}},
        "report": {"export_dir": str(tmp_path / "reports")},
    }
    if city is not None:
        token = tmp_path / "city.token"
        token.write_text("s3cret-token")
        sections["report"]["city"] = {"url": city.url, "token_file": str(token), "retry_min": 0.05, "retry_max": 0.1}
    return write_hub_config(tmp_path / "hub.toml", sections)


def test_cli_absent_report_and_leave_import(
    hub_store: Store, hub_conn: Connection, tmp_path: Path, city: CityServer
) -> None:
    school_monday(hub_conn)
    config = cli_config(tmp_path, hub_store, city)
    runner = CliRunner()

    result = runner.invoke(main, ["hub", "absent", "--class", "6A", "--date", "2024-10-21", "--config", str(config)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "Lớp 6A, 21/10/2024 (chốt vắng 07:30): 2 vắng không phép, 1 vắng có phép"
    assert any("Lê Minh Châu" in line and "vắng có phép" in line and "Ốm, sốt cao" in line for line in lines)
    assert any("Hoàng Thị Én" in line and "vắng không phép" in line for line in lines)
    assert not any("Nguyễn Văn An" in line for line in lines)
    everyone = runner.invoke(
        main, ["hub", "absent", "--class", "6A", "--date", "21/10/2024", "--all", "--config", str(config)]
    )
    assert everyone.exit_code == 0 and "Trần Thị Bình" in everyone.output and "muộn 12 phút" in everyone.output
    unknown = runner.invoke(main, ["hub", "absent", "--class", "9Z", "--date", "2024-10-21", "--config", str(config)])
    assert unknown.exit_code == 1 and "no class '9Z'" in unknown.output and "6A, 6B" in unknown.output

    result = runner.invoke(main, ["hub", "report", "--date", "2024-10-21", "--push", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "reports" / SCHOOL / "2024-10-21.xlsx") in result.output
    assert "accepted (HTTP 200, attempt 1)" in result.output and len(city.requests) == 1
    result = runner.invoke(main, ["hub", "report", "--date", "2024-10-21", "--push", "--config", str(config)])
    assert result.exit_code == 0 and "not sent again" in result.output and len(city.requests) == 1
    result = runner.invoke(
        main, ["hub", "report", "--date", "2024-10-21", "--push", "--force", "--config", str(config)]
    )
    assert result.exit_code == 0 and len(city.requests) == 2
    city.script = [(422, "sai dinh dang", 0.0)]
    result = runner.invoke(
        main, ["hub", "report", "--date", "2024-10-21", "--push", "--force", "--config", str(config)]
    )
    assert result.exit_code == 1 and "failed after 1 attempt(s): HTTP 422: sai dinh dang" in result.output

    good = tmp_path / "leave.csv"
    good.write_text("Mã học sinh,Từ ngày,Lý do\nHS005,22/10/2024,Đi khám răng\n", encoding="utf-8")
    result = runner.invoke(main, ["hub", "leave", "import", str(good), "--school", SCHOOL, "--config", str(config)])
    assert result.exit_code == 0 and "imported 1 leave request(s)" in result.output
    bad = tmp_path / "bad.csv"
    bad.write_text("Mã học sinh,Từ ngày\nHS005,23/10/2024\nHS999,23/10/2024\n", encoding="utf-8")
    result = runner.invoke(main, ["hub", "leave", "import", str(bad), "--school", SCHOOL, "--config", str(config)])
    assert result.exit_code == 1
    assert (
        "rejected, nothing imported" in result.output and "row 3 (HS999): not on this school's roster" in result.output
    )
    assert hub_conn.one("SELECT COUNT(*) FROM leave_requests WHERE person = 'HS005'")[0] == 1
    missing = runner.invoke(
        main, ["hub", "leave", "import", str(tmp_path / "nope.csv"), "--school", SCHOOL, "--config", str(config)]
    )
    assert missing.exit_code == 1 and "no such file" in missing.output


def test_nothing_is_decided_until_the_hub_has_caught_up(hub_store: Store, hub_conn: Connection, tmp_path: Path) -> None:
    """A hub restarted after the cut-off first takes in the arrivals the broker kept for it."""
    config = hub_config(tmp_path)
    school_monday(hub_conn)
    caught_up = {"now": False}
    jobs = DailyJobs(hub_store, config, ready=lambda: caught_up["now"])
    jobs.run_once(at(MONDAY, "09:00"))
    assert absence_rows(hub_conn) == {}
    caught_up["now"] = True
    jobs.run_once(at(MONDAY, "09:01"))
    assert absence_rows(hub_conn)[f"absent/{SCHOOL}/2024-10-21/6A"]["absent"] == ["HS004", "HS005"]
