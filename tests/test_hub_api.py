"""The hub's HTTP API: the real server on a free port, real HTTP requests, data stored through the real ingest."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from hub_support import ZONE, HubProcess, RegisteredGate, gate_event, payload, register_gate, write_hub_config
from postgres_server import session_server

from appliance.config import ConfigError, DatabaseConfig, HubConfig, parse_hub_config
from appliance.hub.api import ApiServer
from appliance.hub.api.server import listen_socket
from appliance.hub.ingest import Incoming, Ingest
from appliance.hub.resync import Resyncer
from appliance.hub.store import Connection, Store
from appliance.sync.status import offline_status, online_status

SCHOOL = "thcs-a"
MONDAY = date(2024, 10, 21)
TOKEN = "t0k-" + "a1b2c3d4" * 5
OTHER_TOKEN = "t0k-" + "99887766" * 5
CARD = "04A1B2C3D4E5F6"

# id, full name, role, class
PEOPLE = [
    ("HS001", "Nguyễn Văn An", "student", "6A"),
    ("HS002", "Trần Thị Bình", "student", "6A"),
    ("HS003", "Lê Minh Châu", "student", "6A"),
    ("HS101", "Phạm Đức Dũng", "student", "6B"),
    ("GV01", "Đặng Thị Lan", "staff", None),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ts(day: date, hhmm: str) -> str:
    hours, minutes = hhmm.split(":")
    return datetime(day.year, day.month, day.day, int(hours), int(minutes), tzinfo=ZONE).isoformat(
        timespec="milliseconds"
    )


def add_people(conn: Connection) -> None:
    now = datetime.now(UTC).isoformat()
    with conn.transaction():
        for person, name, role, klass in PEOPLE:
            conn.execute(
                "INSERT INTO people(school, id, full_name, role, class_name, active, cards, parent_phones, "
                "parent_emails, updated_at) VALUES (?, ?, ?, ?, ?, 1, ?, '[]', '[]', ?)",
                [SCHOOL, person, name, role, klass, json.dumps([CARD]) if person == "HS001" else "[]", now],
            )


def ingest(conn: Connection, *messages: tuple[str, bytes]) -> Ingest:
    worker = Ingest(conn, "edugate")
    worker.store_batch([Incoming(topic, body) for topic, body in messages])
    return worker


def event(device: str, seq: int, person: str, kind: str, at: str, **fields: Any) -> tuple[str, bytes]:
    role = "staff" if person.startswith("GV") else "student"
    data = gate_event(device, seq, kind=kind, person=person, role=role, ts=at, card_uid=CARD, **fields)
    return f"edugate/{SCHOOL}/{device}/events", payload(data)


GATES = ("gate-01", "gate-02")


def register_gates(conn: Connection, folder: Path, school: str = SCHOOL) -> None:
    """The tests' gates registered at the hub as IT does (the hub refuses events of gates it does not know)."""
    for device in GATES:
        register_gate(conn, school, device, folder / f"{school}-{device}.key")


def gate_keys(folder: Path, device: str, school: str = SCHOOL) -> RegisteredGate:
    """A gate registered by :func:`register_gates`, to sign its status."""
    return RegisteredGate(school, device, folder / f"{school}-{device}.key")


def monday_events(conn: Connection) -> None:
    """HS001 on time and leaving, HS002 late, HS003 nothing, HS101 (6B) on time, GV01 clocking in."""
    ingest(
        conn,
        event("gate-01", 1, "GV01", "arrival", ts(MONDAY, "06:50"), late=False, direction="in"),
        event("gate-01", 2, "HS001", "arrival", ts(MONDAY, "07:05"), late=False, direction="in"),
        event("gate-01", 3, "HS002", "arrival", ts(MONDAY, "07:27"), late=True, minutes_late=12, direction="in"),
        event("gate-01", 4, "HS101", "arrival", ts(MONDAY, "07:10"), late=False, direction="in"),
        event("gate-01", 5, "HS001", "departure", ts(MONDAY, "16:40"), direction="out"),
    )


def hub_config(store: Store, tmp_path: Path, token_file: Path | None, **api: Any) -> HubConfig:
    database: dict[str, Any] = {"url": store.url}
    if store.config.password_file is not None:
        database["password_file"] = str(store.config.password_file)
    return parse_hub_config(
        {
            "hub": {"id": "hub-test", "schools": [SCHOOL]},
            "database": database,
            "attendance": {
                "class_start": "07:15",
                "absent_after_minutes": 15,
                "school_days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
            },
            "api": {
                "listen": "127.0.0.1",
                "port": free_port(),
                "workers": 4,
                **({"token_file": str(token_file)} if token_file else {}),
                **api,
            },
        }
    )


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "api.tokens"
    path.write_text(
        f"# office\n{TOKEN} schools=* rights=read,write,approve\n"
        f"{OTHER_TOKEN} schools={SCHOOL} rights=read  # city dashboard\n\nshort\n",
        encoding="utf-8",
    )
    path.chmod(0o600)
    return path


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Store:
    store = Store(DatabaseConfig(url=f"sqlite:///{tmp_path / 'api.db'}"))
    store.migrate()
    return store


class Client:
    def __init__(self, server: ApiServer, token: str | None = TOKEN, **options: Any) -> None:
        assert server.url is not None, server.last_error
        self.base = server.url
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.options = {"timeout": 10, **options}

    def get(self, path: str, **params: Any) -> requests.Response:
        return self.session.get(self.base + path, params=params, **self.options)

    def post(self, path: str, body: Any) -> requests.Response:
        return self.session.post(self.base + path, json=body, **self.options)


def error_of(response: requests.Response) -> str:
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    body = response.json()
    assert set(body) == {"error"}, body
    return str(body["error"])


# ------------------------------------------------------------------------------------------------ tokens


def test_without_a_token_file_every_request_is_refused_with_how_to_configure(
    sqlite_store: Store, tmp_path: Path, serve: Callable[..., ApiServer]
) -> None:
    server = serve(sqlite_store, hub_config(sqlite_store, tmp_path, None))
    for path in ("/v1/health", "/v1/gates", f"/v1/schools/{SCHOOL}/attendance"):
        answer = Client(server).get(path)
        assert answer.status_code == 503
        assert "api.token_file" in error_of(answer) and "restart" in error_of(answer)
    posted = Client(server).post(f"/v1/schools/{SCHOOL}/leave-requests", {"person": "HS001", "day_from": "2024-10-21"})
    assert posted.status_code == 503
    assert sqlite_store.connect().one("SELECT COUNT(*) FROM leave_requests") == (0,)


def test_a_token_file_that_appears_later_is_read_without_a_restart(
    sqlite_store: Store, tmp_path: Path, serve: Callable[..., ApiServer]
) -> None:
    path = tmp_path / "later.tokens"
    server = serve(sqlite_store, hub_config(sqlite_store, tmp_path, path))
    missing = Client(server).get("/v1/health")
    assert missing.status_code == 503 and str(path) in error_of(missing) and "No such file" in error_of(missing)
    path.write_text("# nothing yet\n")
    empty = Client(server).get("/v1/health")
    assert empty.status_code == 503 and "holds no token" in error_of(empty)
    path.write_text(f"{TOKEN} schools={SCHOOL} rights=read\n")
    assert Client(server).get("/v1/health").status_code == 200


def test_missing_wrong_and_right_tokens(
    sqlite_store: Store, tmp_path: Path, token_file: Path, serve: Callable[..., ApiServer], caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    server = serve(sqlite_store, hub_config(sqlite_store, tmp_path, token_file))

    none = Client(server, token=None).get("/v1/health")
    assert none.status_code == 401 and none.headers["WWW-Authenticate"] == 'Bearer realm="edugate-hub"'
    assert "Bearer" in error_of(none)
    for wrong in (TOKEN[:-1], TOKEN + "x", "short", OTHER_TOKEN.upper()):
        answer = Client(server, token=wrong).get("/v1/health")
        assert answer.status_code == 401 and 'error="invalid_token"' in answer.headers["WWW-Authenticate"]
    basic = requests.get(server.url + "/v1/health", auth=("office", TOKEN), timeout=10)  # type: ignore[operator]
    assert basic.status_code == 401

    health = Client(server).get("/v1/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["database"] == "ok" and health.json()["hub"] == "hub-test"
    assert Client(server, token=OTHER_TOKEN).get("/v1/health").status_code == 200

    token_file.write_text(f"{OTHER_TOKEN} schools={SCHOOL} rights=read\n")  # the office's token revoked: no restart
    assert Client(server).get("/v1/health").status_code == 401
    assert Client(server, token=OTHER_TOKEN).get("/v1/health").status_code == 200

    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert TOKEN not in logged and OTHER_TOKEN not in logged and TOKEN[:-1] not in logged
    assert "line 5 is not used" in logged  # "short"
    assert "refused" in logged and "wrong token" in logged


def test_the_openapi_document_is_served_without_a_token(
    sqlite_store: Store, tmp_path: Path, token_file: Path, serve: Callable[..., ApiServer]
) -> None:
    server = serve(sqlite_store, hub_config(sqlite_store, tmp_path, token_file))
    answer = Client(server, token=None).get("/v1/openapi.json")
    assert answer.status_code == 200
    document = answer.json()
    assert set(document["paths"]) == {
        "/v1/schools/{school}/classes/{class_name}/attendance",
        "/v1/schools/{school}/attendance",
        "/v1/schools/{school}/people/{person}/events",
        "/v1/gates",
        "/v1/health",
        "/v1/schools/{school}/leave-requests",
    }
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    history = document["paths"]["/v1/schools/{school}/people/{person}/events"]["get"]
    assert {p["name"] for p in history["parameters"]} >= {"from", "to", "limit", "cursor", "kind"}
    assert history["responses"]["422"]["content"]["application/json; charset=utf-8"]["schema"]["$ref"].endswith(
        "/ErrorOut"
    )
    assert "card_uid" not in answer.text
    unknown = Client(server).get("/v1/nothing")
    assert unknown.status_code == 404 and "/v1/nothing" in error_of(unknown)
    wrong_method = Client(server).session.delete(server.url + "/v1/gates", timeout=10)  # type: ignore[operator]
    assert wrong_method.status_code == 405 and "DELETE" in error_of(wrong_method)


# ------------------------------------------------------------------------------------------------ attendance


@pytest.fixture
def monday(
    hub_store: Store, hub_conn: Connection, tmp_path: Path, token_file: Path, serve: Callable[..., ApiServer]
) -> Client:
    add_people(hub_conn)
    register_gates(hub_conn, tmp_path)
    monday_events(hub_conn)
    return Client(serve(hub_store, hub_config(hub_store, tmp_path, token_file)))


def test_class_attendance(monday: Client) -> None:
    answer = monday.get(f"/v1/schools/{SCHOOL}/classes/6A/attendance", date="2024-10-21")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json; charset=utf-8"
    assert "Nguyễn Văn An".encode() in answer.content  # UTF-8 as it is, not \u escapes
    body = answer.json()
    assert (body["school"], body["class_name"], body["day"], body["school_day"]) == (SCHOOL, "6A", "2024-10-21", True)
    assert (body["class_start"], body["cutoff"]) == ("07:15", "07:30")
    assert body["counts"] == {
        "present": 1,
        "late": 1,
        "absent_permitted": 0,
        "absent_unexcused": 1,
        "pending": 0,
        "total": 3,
    }
    by_id = {s["person"]: s for s in body["students"]}
    assert [s["full_name"] for s in body["students"]] == ["Nguyễn Văn An", "Trần Thị Bình", "Lê Minh Châu"]
    assert by_id["HS001"]["status"] == "present"
    assert by_id["HS001"]["arrival"] == ts(MONDAY, "07:05") and by_id["HS001"]["departure"] == ts(MONDAY, "16:40")
    assert by_id["HS002"]["status"] == "late" and by_id["HS002"]["minutes_late"] == 12
    assert by_id["HS003"]["status"] == "absent_unexcused" and by_id["HS003"]["arrival"] is None
    assert CARD not in answer.text

    other = monday.get(f"/v1/schools/{SCHOOL}/classes/6B/attendance", date="2024-10-21").json()
    assert [s["person"] for s in other["students"]] == ["HS101"]


def test_class_attendance_today_by_default_and_errors(monday: Client) -> None:
    today = datetime.now(ZONE).date().isoformat()
    body = monday.get(f"/v1/schools/{SCHOOL}/classes/6A/attendance").json()
    assert body["day"] == today
    assert {s["status"] for s in body["students"]} <= {"pending", "absent_unexcused"}

    unknown_class = monday.get(f"/v1/schools/{SCHOOL}/classes/9Z/attendance")
    assert unknown_class.status_code == 404
    assert "9Z" in error_of(unknown_class) and "6A, 6B" in error_of(unknown_class)
    unknown_school = monday.get("/v1/schools/thcs-khac/classes/6A/attendance")
    assert unknown_school.status_code == 404 and "thcs-khac" in error_of(unknown_school)
    for bad in ("21/10/2024", "2024-02-30", "2024-1-5", "20241021", "hôm nay"):
        answer = monday.get(f"/v1/schools/{SCHOOL}/classes/6A/attendance", date=bad)
        assert answer.status_code == 422 and error_of(answer).startswith("date: not a date"), bad


def test_school_summary(monday: Client) -> None:
    answer = monday.get(f"/v1/schools/{SCHOOL}/attendance", date="2024-10-21")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["day"] == "2024-10-21" and body["school_day"] is True
    assert list(body["classes"]) == ["6A", "6B"]
    assert body["classes"]["6A"]["late"] == 1 and body["classes"]["6A"]["cutoff"] == "07:30"
    assert body["classes"]["6B"]["present"] == 1 and body["classes"]["6B"]["total"] == 1
    assert body["totals"] == {
        "present": 2,
        "late": 1,
        "absent_permitted": 0,
        "absent_unexcused": 1,
        "pending": 0,
        "total": 4,
    }
    assert body["staff"] == [
        {
            "person": "GV01",
            "full_name": "Đặng Thị Lan",
            "first_in": ts(MONDAY, "06:50"),
            "last_out": None,
            "minutes_late": None,
        }
    ]
    assert "Đặng Thị Lan".encode() in answer.content
    assert monday.get("/v1/schools/nope/attendance").status_code == 404
    assert monday.get(f"/v1/schools/{SCHOOL}/attendance", date="2024-13-01").status_code == 422


# ------------------------------------------------------------------------------------------------ history


def test_person_history_filters_and_pages(monday: Client, hub_conn: Connection) -> None:
    days = [MONDAY + timedelta(days=n) for n in range(1, 4)]
    ingest(
        hub_conn,
        *[
            event("gate-02", n + 1, "HS001", kind, ts(day, hhmm), direction="in" if kind == "arrival" else "out")
            for n, (day, kind, hhmm) in enumerate(
                (day, kind, hhmm) for day in days for kind, hhmm in (("arrival", "07:01"), ("departure", "16:31"))
            )
        ],
        event("gate-02", 7, "HS001", "rejected", ts(days[2], "17:00"), reason="inactive"),
    )
    path = f"/v1/schools/{SCHOOL}/people/HS001/events"

    everything = monday.get(path)
    assert everything.status_code == 200, everything.text
    body = everything.json()
    assert (body["person"], body["full_name"], body["role"], body["class_name"]) == (
        "HS001",
        "Nguyễn Văn An",
        "student",
        "6A",
    )
    assert len(body["events"]) == 9 and body["next"] is None
    assert [e["ts"] for e in body["events"]] == sorted(e["ts"] for e in body["events"])
    first = body["events"][0]
    assert first["ts"] == ts(MONDAY, "07:05") and first["kind"] == "arrival" and first["method"] == "card"
    assert first["gate"] == "gate-01" and first["late"] is False and first["clock_ok"] is True
    assert body["events"][-1]["kind"] == "rejected" and body["events"][-1]["reason"] == "inactive"
    assert CARD not in everything.text and "card_uid" not in everything.text

    window = monday.get(path, **{"from": days[0].isoformat(), "to": days[1].isoformat()}).json()["events"]
    assert [e["ts"][:10] for e in window] == [d.isoformat() for d in days[:2] for _ in range(2)]
    assert {e["gate"] for e in window} == {"gate-02"}
    one_day = monday.get(path, **{"from": days[2].isoformat(), "to": days[2].isoformat()}).json()["events"]
    assert [e["kind"] for e in one_day] == ["arrival", "departure", "rejected"]
    departures = monday.get(path, kind="departure").json()["events"]
    assert len(departures) == 4 and all(e["kind"] == "departure" and e["direction"] == "out" for e in departures)

    pages: list[str] = []
    cursor = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = monday.get(path, **params).json()
        assert len(page["events"]) <= 2
        pages += [e["id"] for e in page["events"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert pages == [e["id"] for e in body["events"]]

    assert monday.get(path, **{"from": "2024-10-23", "to": "2024-10-22"}).status_code == 422
    assert "before" in error_of(monday.get(path, **{"from": "2024-10-23", "to": "2024-10-22"}))
    assert error_of(monday.get(path, **{"from": "23/10/2024"})).startswith("from: not a date")
    assert error_of(monday.get(path, to="yesterday")).startswith("to: not a date")
    for limit in (0, 1001, "many"):
        too = monday.get(path, limit=limit)
        assert too.status_code == 422 and error_of(too).startswith("limit: "), limit
    assert monday.get(path, kind="teleport").status_code == 422
    assert monday.get(path, cursor="not-a-cursor").status_code == 400
    unknown = monday.get(f"/v1/schools/{SCHOOL}/people/HS999/events")
    assert unknown.status_code == 404 and "HS999" in error_of(unknown)


# ------------------------------------------------------------------------------------------------ gates


def test_gates_with_backlog_gap_and_resync(monday: Client, hub_conn: Connection, tmp_path: Path) -> None:
    oldest = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    one, two = gate_keys(tmp_path, "gate-01"), gate_keys(tmp_path, "gate-02")
    readers = [{"name": "lane", "state": "ok"}]
    status = online_status("gate-01", readers, None, True, 4, oldest, 9, "a" * 32, signer=one.status)
    ingest(
        hub_conn,
        event("gate-01", 7, "HS003", "arrival", ts(MONDAY, "07:40")),  # 6 missing; 8, 9 known only from the status
        (f"edugate/{SCHOOL}/gate-01/status", status),
        event("gate-02", 1, "HS101", "departure", ts(MONDAY, "16:00")),
        (f"edugate/{SCHOOL}/gate-02/status", offline_status("gate-02", "connection lost", signer=two.status)),
    )
    answer = monday.get("/v1/gates")
    assert answer.status_code == 200, answer.text
    gates = {g["gate"]: g for g in answer.json()["gates"]}
    assert list(gates) == ["gate-01", "gate-02"]
    one = gates["gate-01"]
    assert (one["school"], one["online"], one["backlog"], one["last_seq"]) == (SCHOOL, True, 4, 9)
    assert 290 <= one["oldest_unsynced_age_s"] <= 330 and one["status_age_s"] < 60 and one["gate_clock_ok"] is True
    assert one["readers"] == [{"name": "lane", "state": "ok"}]
    assert one["gap"] is True and one["missing"] == 3 and one["resync_requested"] is False
    assert one["streams"] == [
        {
            "journal": "a" * 32,
            "contiguous": 5,
            "highest": 9,
            "missing": 3,
            "gap_since": one["streams"][0]["gap_since"],
            "resync_requested_at": None,
        }
    ]
    assert one["streams"][0]["gap_since"] is not None
    two = gates["gate-02"]
    assert two["online"] is False and two["offline_reason"] == "connection lost" and two["backlog"] is None
    assert two["gap"] is False and two["streams"][0]["contiguous"] == two["streams"][0]["highest"] == 1

    sent: list[tuple[str, bytes]] = []
    Resyncer(hub_conn, "edugate", Ed25519PrivateKey.generate(), lambda t, b: sent.append((t, b)), 0).run_once(
        datetime.now(UTC) + timedelta(seconds=1)
    )
    assert [json.loads(b)["body"]["from_seq"] for _, b in sent] == [6, 8]
    asked = {g["gate"]: g for g in monday.get("/v1/gates").json()["gates"]}["gate-01"]
    assert asked["resync_requested"] is True and asked["streams"][0]["resync_requested_at"] is not None

    ingest(hub_conn, *(event("gate-01", seq, "HS003", "tap", ts(MONDAY, "08:00")) for seq in (6, 8, 9)))
    healed = {g["gate"]: g for g in monday.get("/v1/gates").json()["gates"]}["gate-01"]
    assert healed["gap"] is False and healed["missing"] == 0 and healed["resync_requested"] is False

    only = monday.get("/v1/gates", school=SCHOOL).json()["gates"]
    assert len(only) == 2
    assert monday.get("/v1/gates", school="elsewhere").status_code == 404
    health = monday.get("/v1/health").json()
    assert health["gates"] == {"total": 2, "online": 1, "with_gap": 0}


# ------------------------------------------------------------------------------------------------ leave requests


def test_leave_request_validation(monday: Client, hub_conn: Connection) -> None:
    path = f"/v1/schools/{SCHOOL}/leave-requests"
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"person": "HS003", "day_from": "21/10/2024"}, 422, "day_from: not a date"),
        ({"person": "HS003", "day_from": "2024-02-30"}, 422, "day_from: not a date"),
        ({"person": "HS003", "day_from": "2024-10-21", "day_to": "2024-10-20"}, 422, "before the first"),
        ({"person": "HS003", "day_from": "2024-01-01", "day_to": "2025-06-01"}, 422, "at most 366 days"),
        ({"person": "HS003", "from": "2024-10-21"}, 422, "day_from"),  # a misspelt field is not ignored
        ({"day_from": "2024-10-21"}, 422, "person"),
        ({"person": "HS003", "day_from": "2024-10-21", "approved": "maybe"}, 422, "approved"),
        ({"person": "HS999", "day_from": "2024-10-21"}, 404, "HS999"),
    ]
    for body, status, text in cases:
        answer = monday.post(path, body)
        assert answer.status_code == status and text in error_of(answer), (body, answer.text)
    not_json = monday.session.post(
        monday.base + path, data=b"{nope", headers={"Content-Type": "application/json"}, timeout=10
    )
    assert not_json.status_code == 422 and error_of(not_json)
    elsewhere = monday.post("/v1/schools/thcs-khac/leave-requests", {"person": "HS003", "day_from": "2024-10-21"})
    assert elsewhere.status_code == 404
    anonymous = Client.__new__(Client)
    anonymous.base, anonymous.session, anonymous.options = monday.base, requests.Session(), {"timeout": 10}
    assert anonymous.post(path, {"person": "HS003", "day_from": "2024-10-21"}).status_code == 401
    assert hub_conn.one("SELECT COUNT(*) FROM leave_requests") == (0,)


def test_an_approved_leave_request_makes_the_student_absent_with_permission(
    monday: Client, hub_conn: Connection
) -> None:
    attendance = f"/v1/schools/{SCHOOL}/classes/6A/attendance"

    def status_of(person: str) -> tuple[str, str | None]:
        students = {s["person"]: s for s in monday.get(attendance, date="2024-10-21").json()["students"]}
        return students[person]["status"], students[person]["leave_reason"]

    assert status_of("HS003") == ("absent_unexcused", None)
    body = {"person": "HS003", "day_from": "2024-10-21", "day_to": "2024-10-22", "reason": "Ốm, sốt cao"}
    created = monday.post(f"/v1/schools/{SCHOOL}/leave-requests", body)
    assert created.status_code == 201, created.text
    out = created.json()
    assert out["created"] is True and out["approved"] is True and out["reason"] == "Ốm, sốt cao"
    assert (out["day_from"], out["day_to"], out["person"], out["school"]) == (
        "2024-10-21",
        "2024-10-22",
        "HS003",
        SCHOOL,
    )
    assert "Ốm, sốt cao".encode() in created.content
    assert status_of("HS003") == ("absent_permitted", "Ốm, sốt cao")
    summary = monday.get(f"/v1/schools/{SCHOOL}/attendance", date="2024-10-21").json()
    assert summary["classes"]["6A"]["absent_permitted"] == 1 and summary["classes"]["6A"]["absent_unexcused"] == 0
    assert status_of("HS001")[0] == "present"  # a leave changes nobody who came

    source = hub_conn.one("SELECT source FROM leave_requests WHERE id = ?", [out["id"]])
    assert source is not None and source[0].startswith("api:") and TOKEN not in source[0]

    withdrawn = monday.post(f"/v1/schools/{SCHOOL}/leave-requests", {**body, "approved": False})
    assert withdrawn.status_code == 200 and withdrawn.json()["created"] is False and withdrawn.json()["id"] == out["id"]
    assert hub_conn.one("SELECT COUNT(*) FROM leave_requests") == (1,)
    assert status_of("HS003") == ("absent_unexcused", None)


# ------------------------------------------------------------------------------------------------ the server


def test_requests_at_once_share_a_bounded_pool_of_connections(monday: Client) -> None:
    paths = [f"/v1/schools/{SCHOOL}/classes/6A/attendance", "/v1/gates", f"/v1/schools/{SCHOOL}/attendance"] * 12

    def fetch(path: str) -> int:
        return requests.get(monday.base + path, headers=monday.session.headers, timeout=20).status_code

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(fetch, paths)) == {200}


def test_a_busy_port_is_one_log_line_and_the_api_starts_once_it_is_free(
    sqlite_store: Store, tmp_path: Path, token_file: Path, serve: Callable[..., ApiServer], caplog: Any
) -> None:
    config = hub_config(sqlite_store, tmp_path, token_file)
    blocker = listen_socket("127.0.0.1", config.api.port)
    server = serve(sqlite_store, config, retry_every=0.2)
    assert server.url is None and server.last_error is not None and "in use" in server.last_error
    time.sleep(0.6)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "cannot listen" in r.getMessage()]
    assert len(errors) == 1 and f"127.0.0.1:{config.api.port}" in errors[0].getMessage()
    blocker.close()
    deadline = time.monotonic() + 10
    while server.url is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert Client(server).get("/v1/health").status_code == 200


def test_stop_releases_the_port(
    sqlite_store: Store, tmp_path: Path, token_file: Path, serve: Callable[..., ApiServer]
) -> None:
    config = hub_config(sqlite_store, tmp_path, token_file)
    server = serve(sqlite_store, config)
    client = Client(server)
    assert client.get("/v1/health").status_code == 200  # a kept-alive connection is open too
    server.stop()
    assert server.url is None
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{config.api.port}/v1/health", timeout=5)
    listen_socket("127.0.0.1", config.api.port).close()
    again = serve(sqlite_store, config)
    assert Client(again).get("/v1/health").status_code == 200


def test_an_unreachable_database_is_a_503_and_one_log_line(
    tmp_path: Path, token_file: Path, serve: Callable[..., ApiServer], caplog: Any
) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    store = Store(DatabaseConfig(url=f"sqlite:///{blocked / 'hub.db'}"))
    server = serve(store, hub_config(store, tmp_path, token_file))
    for path in ("/v1/health", "/v1/gates", f"/v1/schools/{SCHOOL}/classes/6A/attendance"):
        answer = Client(server).get(path)
        assert answer.status_code == 503 and "database" in error_of(answer), path
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 3 and all("cannot open the hub database" in r.getMessage() for r in errors)
    assert not any(r.exc_info for r in caplog.records)


def test_connections_killed_by_a_postgresql_restart_are_replaced_unnoticed(
    pytestconfig: pytest.Config, tmp_path: Path, token_file: Path, serve: Callable[..., ApiServer]
) -> None:
    server = session_server(pytestconfig)
    name = server.create_database("api")
    api: ApiServer | None = None
    try:
        store = Store(DatabaseConfig(url=server.url(name), password_file=server.password_file))
        store.migrate()
        conn = store.connect()
        add_people(conn)
        register_gates(conn, tmp_path)
        monday_events(conn)
        conn.close()
        api = serve(store, hub_config(store, tmp_path, token_file))
        client = Client(api)
        path = f"/v1/schools/{SCHOOL}/classes/6A/attendance"
        with ThreadPoolExecutor(4) as pool:  # several pooled connections
            assert set(pool.map(lambda _: client.get(path, date="2024-10-21").status_code, range(12))) == {200}
        with server.admin(name) as admin:
            ended = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND usename = 'edugate'",
                [name],
            ).fetchall()
        assert ended and all(row[0] for row in ended)
        for _ in range(6):
            answer = client.get(path, date="2024-10-21")
            assert answer.status_code == 200 and answer.json()["counts"]["total"] == 3, answer.text
        leave = {"person": "HS003", "day_from": "2024-10-21"}
        assert client.post(f"/v1/schools/{SCHOOL}/leave-requests", leave).status_code == 201
    finally:
        if api is not None:
            api.stop()  # its connections end before the database is dropped
        server.drop_database(name)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hub.truong.lan")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "api.crt", tmp_path / "api.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def test_https_with_the_configured_certificate(
    sqlite_store: Store, tmp_path: Path, token_file: Path, serve: Callable[..., ApiServer]
) -> None:
    cert_file, key_file = _self_signed(tmp_path)
    config = hub_config(sqlite_store, tmp_path, token_file, tls_cert_file=str(cert_file), tls_key_file=str(key_file))
    server = serve(sqlite_store, config)
    assert server.url is not None and server.url.startswith("https://")
    assert Client(server, verify=str(cert_file)).get("/v1/health").status_code == 200
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url.replace("https://", "http://") + "/v1/health", timeout=5)
    with pytest.raises(ConfigError, match="tls_cert_file and tls_key_file go together"):
        parse_hub_config({"api": {"tls_cert_file": str(cert_file)}})


def test_an_unreadable_certificate_is_logged_and_nothing_listens(
    sqlite_store: Store, tmp_path: Path, token_file: Path, serve: Callable[..., ApiServer], caplog: Any
) -> None:
    config = hub_config(
        sqlite_store,
        tmp_path,
        token_file,
        tls_cert_file=str(tmp_path / "no.crt"),
        tls_key_file=str(tmp_path / "no.key"),
    )
    server = serve(sqlite_store, config, retry_every=30)
    assert server.url is None and server.last_error is not None and "no.crt" in server.last_error
    assert any("no.crt" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"https://127.0.0.1:{config.api.port}/v1/health", timeout=5, verify=False)


def test_edugate_hub_run_serves_the_api(sqlite_store: Store, tmp_path: Path, token_file: Path) -> None:
    """The API as HubService wires it: `edugate hub run` with no broker reachable still answers."""
    add_people(sqlite_store.connect())
    port = free_port()
    config = write_hub_config(
        tmp_path / "hub.toml",
        {
            "hub": {"id": "hub-api", "schools": [SCHOOL]},
            "database": {"url": sqlite_store.url},
            "mqtt": {"host": "127.0.0.1", "port": free_port(), "tls": False},
            "signing": {"key_file": str(tmp_path / "absent.key")},
            "api": {"port": port, "token_file": str(token_file)},
        },
    )
    hub = HubProcess(config).start(wait_for="hub API: listening")
    try:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        answer = requests.get(f"http://127.0.0.1:{port}/v1/health", headers=headers, timeout=10)
        assert answer.status_code == 200 and answer.json()["hub"] == "hub-api"
        classes = requests.get(f"http://127.0.0.1:{port}/v1/schools/{SCHOOL}/attendance", headers=headers, timeout=10)
        assert list(classes.json()["classes"]) == ["6A", "6B"]
    finally:
        hub.stop()
    assert hub.proc is not None and hub.proc.returncode == 0
    assert not any(TOKEN in line for line in hub.stderr_lines)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/v1/health", timeout=5)
