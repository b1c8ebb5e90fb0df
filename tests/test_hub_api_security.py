"""The hub API's doors (issue 9): scoped tokens, input bounded before it is read, connections capped and cut.

The real server on a real port (in this process, or `edugate hub run` as a child with few open files),
spoken to over real HTTP, and over raw sockets where a client must misbehave.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hub_support import REPO, gate_event, payload, register_gate, write_hub_config
from test_hub_api import (
    MONDAY,
    SCHOOL,
    Client,
    add_people,
    error_of,
    free_port,
    ingest,
    monday_events,
    register_gates,
    ts,
)

from appliance.cli import main
from appliance.config import ConfigError, DatabaseConfig, HubConfig, parse_hub_config
from appliance.config import hub as hub_settings
from appliance.hub.api import ApiServer
from appliance.hub.store import Connection, Store

OTHER = "thcs-b"
READER = "rd-" + "0a1b2c3d" * 5  # school A, read only
WRITER = "wr-" + "1b2c3d4e" * 5  # school A, read and write
APPROVER = "ap-" + "2c3d4e5f" * 5  # school A, read, write and approve
DISTRICT = "di-" + "3d4e5f60" * 5  # every school, read only
OLD_STYLE = "old-" + "4e5f6071" * 5  # a line from before scopes
LONG = 120.0  # seconds: what "never" looks like to a test on a busy machine


def token_lines() -> str:
    return (
        "# the hub's API tokens\n"
        f"{READER} schools={SCHOOL} rights=read   # office dashboard\n"
        f"{WRITER} schools={SCHOOL} rights=read,write\n"
        f"{APPROVER} schools={SCHOOL} rights=read,write,approve\n"
        f"{DISTRICT} schools=* rights=read\n"
        f"{OLD_STYLE}\n"
    )


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    path = tmp_path / "api.tokens"
    path.write_text(token_lines(), encoding="utf-8")
    path.chmod(0o600)
    return path


def config_for(store: Store, token_file: Path | None, **api: Any) -> HubConfig:
    """A hub of two schools, its API on a free loopback port."""
    database: dict[str, Any] = {"url": store.url}
    if store.config.password_file is not None:
        database["password_file"] = str(store.config.password_file)
    return parse_hub_config(
        {
            "hub": {"id": "hub-sec", "schools": [SCHOOL, OTHER]},
            "database": database,
            "attendance": {"school_days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]},
            "api": {
                "listen": "127.0.0.1",
                "port": free_port(),
                "workers": 4,
                **({"token_file": str(token_file)} if token_file else {}),
                **api,
            },
        }
    )


def add_other_school(conn: Connection, folder: Path) -> None:
    """School B: one student, one gate, one arrival."""
    now = datetime.now(UTC).isoformat()
    with conn.transaction():
        conn.execute(
            "INSERT INTO people(school, id, full_name, role, class_name, active, cards, parent_phones, "
            "parent_emails, updated_at) VALUES (?, 'B001', 'Vũ Thị Hoa', 'student', '7C', 1, '[]', '[]', '[]', ?)",
            [OTHER, now],
        )
    register_gate(conn, OTHER, "gate-b1", folder / "gate-b1.key")
    arrival = gate_event("gate-b1", 1, kind="arrival", person="B001", role="student", ts=ts(MONDAY, "07:00"))
    ingest(conn, (f"edugate/{OTHER}/gate-b1/events", payload(arrival)))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    created = Store(DatabaseConfig(url=f"sqlite:///{tmp_path / 'hub.db'}"))
    created.migrate()
    return created


def fill_two_schools(store: Store, folder: Path) -> Store:
    conn = store.connect()
    add_people(conn)
    register_gates(conn, folder)
    monday_events(conn)
    add_other_school(conn, folder)
    conn.close()
    return store


@pytest.fixture
def two_schools(store: Store, tmp_path: Path) -> Store:
    return fill_two_schools(store, tmp_path)


@pytest.fixture
def two_schools_on_each_database(hub_store: Store, tmp_path: Path) -> Store:
    """The same two schools on SQLite and on PostgreSQL (the scope is in the queries: both must honour it)."""
    return fill_two_schools(hub_store, tmp_path)


# ------------------------------------------------------------------------------------------------ raw HTTP


def connect(port: int, source: str = "127.0.0.1", timeout: float = LONG) -> socket.socket:
    """A TCP connection to the API from ``source`` (any 127.x address is this machine: another client)."""
    sock = socket.socket()
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def answer_of(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of the answer waiting on ``sock``."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` within ``within`` seconds (reading whatever it sent first)."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def request_bytes(method: str, path: str, token: str | None, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: hub"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def send_while_open(sock: socket.socket, data: bytes) -> bool:
    """Send ``data``; False if the server has closed the connection (what it sent before stays readable)."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def wait_for(condition: Callable[[], bool], timeout: float = LONG, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ scopes


def test_token_lines_carry_scopes_and_a_bare_token_is_refused_with_how_to_fix_it(
    two_schools: Store, tokens: Path, serve: Callable[[Store, HubConfig], ApiServer], caplog: Any
) -> None:
    server = serve(two_schools, config_for(two_schools, tokens))
    assert Client(server, token=READER).get("/v1/health").status_code == 200

    old = Client(server, token=OLD_STYLE).get("/v1/health")
    assert old.status_code == 401 and 'error="invalid_token"' in old.headers["WWW-Authenticate"]
    assert "line 6" in error_of(old) and "schools=" in error_of(old) and "rights=" in error_of(old)
    wrong = Client(server, token=READER[:-1] + "x").get("/v1/health")
    assert wrong.status_code == 401 and error_of(wrong) == "the token is not valid"  # nothing about any line
    warned = [r.getMessage() for r in caplog.records if "line 6 is not used" in r.getMessage()]
    assert warned and "no scopes" in warned[0] and "schools=" in warned[0]

    tokens.write_text(
        token_lines().replace(f"{OLD_STYLE}\n", f"{OLD_STYLE} schools={OTHER} rights=read\n")
        + "0123456789abcdef0123 schools=thcs-a rights=read,delete\n"
        + "0123456789abcdef0124 rights=read\n"
        + "0123456789abcdef0125 schools=thcs-zz rights=read\n"
        + "0123456789abcdef0126 secret-half-of-the-token schools=thcs-a rights=read\n"
    )
    assert Client(server, token=OLD_STYLE).get(f"/v1/schools/{OTHER}/attendance").status_code == 200  # no restart
    assert Client(server, token=OLD_STYLE).get(f"/v1/schools/{SCHOOL}/attendance").status_code == 403
    assert Client(server, token="0123456789abcdef0123").get("/v1/health").status_code == 401
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "line 7 is not used: rights= takes read, write, approve, not 'read,delete'" in logged
    assert "line 8 is not used: no schools=" in logged
    assert "line 9: school(s) thcs-zz not in hub.schools" in logged
    assert "line 10 is not used: after the token comes schools=" in logged and "secret-half" not in logged
    for secret in (READER, WRITER, APPROVER, DISTRICT, OLD_STYLE, "0123456789abcdef012"):
        assert secret not in logged


def test_a_token_sees_only_its_schools_in_every_listing(
    two_schools_on_each_database: Store, tokens: Path, serve: Callable[[Store, HubConfig], ApiServer]
) -> None:
    store = two_schools_on_each_database
    server = serve(store, config_for(store, tokens))
    school_a, district = Client(server, token=READER), Client(server, token=DISTRICT)

    for path in (
        f"/v1/schools/{OTHER}/classes/7C/attendance",
        f"/v1/schools/{OTHER}/attendance",
        f"/v1/schools/{OTHER}/people/B001/events",
        f"/v1/schools/{OTHER}/classes/7C/attendance?date=not-a-date",  # refused before anything is looked at
        "/v1/schools/thcs-nowhere/attendance",  # whether it exists or not
    ):
        refused = school_a.get(path)
        assert refused.status_code == 403, (path, refused.text)
        assert "not for school" in error_of(refused) and SCHOOL in error_of(refused), path
        assert "Vũ Thị Hoa".encode() not in refused.content and "B001" not in refused.text
    assert school_a.get("/v1/gates", school=OTHER).status_code == 403

    gates = school_a.get("/v1/gates").json()["gates"]
    assert sorted(g["gate"] for g in gates) == ["gate-01"] and {g["school"] for g in gates} == {SCHOOL}
    assert school_a.get("/v1/health").json()["gates"]["total"] == 1
    assert school_a.get(f"/v1/schools/{SCHOOL}/classes/6A/attendance", date="2024-10-21").status_code == 200

    everyone = district.get("/v1/gates").json()["gates"]
    assert sorted(g["gate"] for g in everyone) == ["gate-01", "gate-b1"]
    assert district.get("/v1/health").json()["gates"]["total"] == 2
    visit = district.get(f"/v1/schools/{OTHER}/classes/7C/attendance", date="2024-10-21").json()
    assert [(s["person"], s["status"]) for s in visit["students"]] == [("B001", "present")]
    assert district.get("/v1/schools/thcs-nowhere/attendance").status_code == 404  # its scope is every school


def test_leave_requests_need_write_and_stay_pending_without_approve(
    two_schools_on_each_database: Store, tokens: Path, serve: Callable[[Store, HubConfig], ApiServer]
) -> None:
    store = two_schools_on_each_database
    server = serve(store, config_for(store, tokens))
    path = f"/v1/schools/{SCHOOL}/leave-requests"
    attendance = f"/v1/schools/{SCHOOL}/classes/6A/attendance"
    leave = {"person": "HS003", "day_from": "2024-10-21", "reason": "Ốm"}

    def status_of_hs003() -> str:
        students = Client(server, token=READER).get(attendance, date="2024-10-21").json()["students"]
        return str(next(s["status"] for s in students if s["person"] == "HS003"))

    read_only = Client(server, token=READER).post(path, leave)
    assert read_only.status_code == 403 and "lacks the 'write' right" in error_of(read_only)
    assert Client(server, token=DISTRICT).post(path, leave).status_code == 403
    elsewhere = Client(server, token=WRITER).post(f"/v1/schools/{OTHER}/leave-requests", {**leave, "person": "B001"})
    assert elsewhere.status_code == 403 and "not for school" in error_of(elsewhere)

    pending = Client(server, token=WRITER).post(path, leave)
    assert pending.status_code == 201 and pending.json()["approved"] is False, pending.text
    assert status_of_hs003() == "absent_unexcused"  # a pending request excuses no one (the parents are told)
    asking = Client(server, token=WRITER).post(path, {**leave, "approved": True})
    assert asking.status_code == 403 and "'approve' right" in error_of(asking)
    assert status_of_hs003() == "absent_unexcused"

    approved = Client(server, token=APPROVER).post(path, leave)
    assert approved.status_code == 200 and approved.json()["approved"] is True, approved.text
    assert status_of_hs003() == "absent_permitted"
    overwrite = Client(server, token=WRITER).post(path, {**leave, "approved": False, "reason": "nhầm"})
    assert overwrite.status_code == 403 and "approved already" in error_of(overwrite)
    assert status_of_hs003() == "absent_permitted"

    conn = store.connect()
    rows = conn.all("SELECT school, approved, source, reason FROM leave_requests")
    conn.close()
    assert rows == [(SCHOOL, 1, "api:" + hashlib.sha256(APPROVER.encode()).hexdigest()[:8], "Ốm")]


# ------------------------------------------------------------------------------------------------ bodies


def test_a_body_without_a_token_is_refused_before_it_is_read(
    two_schools: Store, tokens: Path, serve: Callable[[Store, HubConfig], ApiServer]
) -> None:
    server = serve(two_schools, config_for(two_schools, tokens))
    port = server.config.api.port
    path = f"/v1/schools/{SCHOOL}/leave-requests"
    for headers in ({"Content-Length": str(200 * 1024 * 1024)}, {"Transfer-Encoding": "chunked"}):
        sock = connect(port)
        sock.sendall(request_bytes("POST", path, None, {"Content-Type": "application/json", **headers}))
        part = b"x" * 65536 if "Content-Length" in headers else chunk(b"x" * 65536)
        for _ in range(4):  # a little of the body, never all of it: the answer must not wait for the rest
            if not send_while_open(sock, part):
                break  # the server answered and closed already: its answer is waiting to be read
        status, got, body = answer_of(sock)
        assert status == 401 and got["connection"] == "close", (headers, body)
        assert "Bearer" in json.loads(body)["error"]
        assert closed_by_server(sock, LONG)
        sock.close()


def test_a_body_over_the_limit_is_413_before_it_is_read(
    two_schools: Store, tokens: Path, serve: Callable[[Store, HubConfig], ApiServer]
) -> None:
    server = serve(two_schools, config_for(two_schools, tokens, max_body_bytes=4096))
    port = server.config.api.port
    path = f"/v1/schools/{SCHOOL}/leave-requests"

    sock = connect(port)
    sock.sendall(
        request_bytes("POST", path, WRITER, {"Content-Type": "application/json", "Content-Length": "300000000"})
    )
    status, got, body = answer_of(sock)  # declared too large: answered before a byte of the body is sent
    assert status == 413 and got["connection"] == "close" and "api.max_body_bytes" in json.loads(body)["error"]
    sock.close()

    sock = connect(port)
    sock.sendall(
        request_bytes("POST", path, WRITER, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    )
    start = b'{"person": "HS003", "reason": "'
    sock.sendall(chunk(start))
    sent = len(start)
    while sent < 2 * 1024 * 1024 and not select.select([sock], [], [], 0.02)[0]:  # counted as it comes
        if not send_while_open(sock, chunk(b"a" * 1024)):
            break
        sent += 1024
    status, got, body = answer_of(sock)
    assert status == 413 and got["connection"] == "close", body
    assert sent < 1024 * 1024, sent  # refused after about max_body_bytes, not after the whole body
    sock.close()

    small = Client(server, token=WRITER).post(path, {"person": "HS003", "day_from": "2024-10-21", "reason": "Ốm"})
    assert small.status_code == 201  # a real leave request is far below the limit
    assert Client(server, token=WRITER).get("/v1/health").status_code == 200


def test_a_deeply_nested_cursor_is_a_400(
    two_schools: Store, tokens: Path, serve: Callable[[Store, HubConfig], ApiServer]
) -> None:
    server = serve(two_schools, config_for(two_schools, tokens))
    path = f"/v1/schools/{SCHOOL}/people/HS001/events"
    nested = base64.urlsafe_b64encode(b"[" * 9000 + b"]" * 9000).decode().rstrip("=")
    short = base64.urlsafe_b64encode(b"[" * 150 + b"]" * 150).decode().rstrip("=")
    for cursor in (nested, short, "not-a-cursor"):
        answer = Client(server, token=READER).get(path, cursor=cursor)
        assert answer.status_code == 400 and error_of(answer).startswith("cursor: not a cursor"), answer.text
    first = Client(server, token=READER).get(path, limit=1).json()
    assert Client(server, token=READER).get(path, limit=1, cursor=first["next"]).status_code == 200


# ------------------------------------------------------------------------------------------------ connections


def test_a_connection_that_never_finishes_its_request_is_cut(
    two_schools: Store, tokens: Path, serve: Callable[[Store, HubConfig], ApiServer]
) -> None:
    server = serve(two_schools, config_for(two_schools, tokens, request_timeout=2))
    port = server.config.api.port
    silent = connect(port)
    dripping = connect(port)
    dripping.sendall(b"GET /v1/health HTTP/1.1\r\nHost: hub\r\nX-Slow: ")
    started = time.monotonic()
    while time.monotonic() - started < LONG:
        try:
            dripping.sendall(b"a")  # a byte now and then: uvicorn's keep-alive timer starts again at each
        except (BrokenPipeError, ConnectionResetError):
            break
        if closed_by_server(dripping, 0.5):
            break
    assert time.monotonic() - started < LONG, "a header sent a byte at a time held its connection"
    assert closed_by_server(silent, LONG)

    slow_body = connect(port)
    slow_body.sendall(
        request_bytes("POST", f"/v1/schools/{SCHOOL}/leave-requests", WRITER, {"Content-Length": "100"}) + b"{"
    )
    assert closed_by_server_peek(slow_body)  # cut, not answered: the rest of the body never came
    assert Client(server, token=READER).get("/v1/health").status_code == 200
    for sock in (silent, dripping, slow_body):
        sock.close()


def closed_by_server_peek(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` without answering (waits up to LONG)."""
    sock.settimeout(LONG)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (ConnectionResetError, TimeoutError):
        return True


def test_at_the_cap_the_client_holding_most_connections_makes_room(
    two_schools: Store, tokens: Path, serve: Callable[[Store, HubConfig], ApiServer]
) -> None:
    server = serve(two_schools, config_for(two_schools, tokens, max_connections=8, request_timeout=LONG))
    port = server.config.api.port
    office = connect(port, "127.0.0.2")  # a keep-alive connection of another client, idle between requests
    office.sendall(request_bytes("GET", "/v1/health", READER))
    assert answer_of(office)[0] == 200
    flood = [connect(port) for _ in range(12)]  # one client holding more than the cap, sending nothing
    wait_for(lambda: sum(closed_by_server(s, 0.05) for s in flood) >= 5, what="the flood's oldest to be closed")
    late = connect(port, "127.0.0.3")
    late.sendall(request_bytes("GET", "/v1/health", READER))
    assert answer_of(late)[0] == 200
    office.sendall(request_bytes("GET", "/v1/gates", READER))  # still open: the flood made room, not the office
    assert answer_of(office)[0] == 200
    for sock in [office, late, *flood]:
        sock.close()


# ------------------------------------------------------------------------------------------------ the hub process


class LimitedHub:
    """`edugate hub run` as a child that may open only ``files`` files, its log in a file."""

    def __init__(self, folder: Path, store: Store, files: int, **api: Any) -> None:
        self.port = free_port()
        tokens = folder / "api.tokens"
        tokens.write_text(token_lines())
        tokens.chmod(0o600)
        self.config = write_hub_config(
            folder / "hub.toml",
            {
                "hub": {"id": "hub-limited", "schools": [SCHOOL, OTHER]},
                "database": {"url": store.url},
                "mqtt": {"host": "127.0.0.1", "port": free_port(), "tls": False},
                "signing": {"key_file": str(folder / "absent.key")},
                "api": {"port": self.port, "token_file": str(tokens), **api},
            },
        )
        self.log = folder / "hub.log"
        self.files = files
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LimitedHub:
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.files, self.files))

        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance.cli", "hub", "run", "--config", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                preexec_fn=limit,
            )
        wait_for(lambda: b"hub API: listening" in self.log.read_bytes() or self.proc.poll() is not None)  # type: ignore[union-attr]
        assert self.proc.poll() is None, self.log.read_text()
        return self

    def __exit__(self, *_: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def get(self, path: str, source: str = "127.0.0.2") -> int:
        sock = connect(self.port, source)
        sock.sendall(request_bytes("GET", path, READER))
        try:
            return answer_of(sock)[0]
        finally:
            sock.close()


@pytest.fixture
def idle_sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def open_idle(port: int, count: int, into: list[socket.socket]) -> None:
    """``count`` connections that will never send a byte (connect without waiting: the backlog fills)."""
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        into.append(sock)


def test_a_thousand_idle_sockets_do_not_silence_the_api_or_flood_its_log(
    store: Store, tmp_path: Path, idle_sockets: list[socket.socket]
) -> None:
    with LimitedHub(tmp_path, store, files=400, max_connections=64, request_timeout=LONG) as hub:
        assert hub.get("/v1/health") == 200
        open_idle(hub.port, 1010, idle_sockets)
        assert hub.get("/v1/health") == 200  # long before any idle one times out: the cap made room
        size = hub.log.stat().st_size
        text = hub.log.read_text()
    assert size < 20_000 and "Traceback" not in text, text[-3000:]
    assert "Too many open files" not in text and text.count("api.max_connections (64) reached") <= 2


def test_out_of_files_the_log_stays_bounded_and_the_api_answers_once_idle_ones_are_cut(
    store: Store, tmp_path: Path, idle_sockets: list[socket.socket]
) -> None:
    with LimitedHub(tmp_path, store, files=128, max_connections=512, request_timeout=3) as hub:
        assert hub.get("/v1/health") == 200  # its database connection is open before the files run out
        opened = hub.log.read_text()
        assert "the hub may open 128 files, too few for api.max_connections (512)" in opened
        assert "raise LimitNOFILE to 704" in opened
        open_idle(hub.port, 400, idle_sockets)
        wait_for(lambda: "cannot accept connections" in hub.log.read_text(), what="the hub to run out of files")
        assert hub.get("/v1/health") == 200  # once the idle ones are cut
        text = hub.log.read_text()
    assert len(text) < 20_000 and "Traceback" not in text, text[-3000:]
    assert 1 <= text.count("cannot accept connections") <= 3


# ------------------------------------------------------------------------------------------------ configuration


def test_plain_http_beyond_loopback_is_refused_by_check_and_at_start_unless_allowed(tmp_path: Path) -> None:
    def check(api: dict[str, Any]) -> Any:
        path = write_hub_config(tmp_path / "hub.toml", {"mqtt": {"tls": False}, "api": api})
        return CliRunner().invoke(main, ["hub", "check", str(path)])

    refused = check({"listen": "0.0.0.0"})
    assert refused.exit_code == 1
    lines = refused.output.strip().splitlines()
    assert len(lines) == 1 and "api: listen = '0.0.0.0' without TLS" in lines[0] and "allow_plaintext" in lines[0]
    assert check({"listen": "192.168.1.10", "enabled": False}).exit_code == 0
    assert check({"listen": "127.0.0.5"}).exit_code == 0 and check({"listen": "::1"}).exit_code == 0
    allowed = check({"listen": "0.0.0.0", "allow_plaintext": True})
    assert allowed.exit_code == 0 and "warning: api.allow_plaintext" in allowed.output
    tls = check({"listen": "::", "tls_cert_file": "/etc/edugate/api.crt", "tls_key_file": "/etc/edugate/api.key"})
    assert tls.exit_code == 0, tls.output

    config = write_hub_config(tmp_path / "hub.toml", {"mqtt": {"tls": False}, "api": {"listen": "0.0.0.0"}})
    run = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "hub", "run", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=LONG,
    )
    assert run.returncode == 1 and "without TLS" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_hub_check_names_the_token_lines_the_hub_would_not_use(tmp_path: Path) -> None:
    tokens = tmp_path / "api.tokens"
    tokens.write_text(token_lines() + "short schools=* rights=read\n")
    config = write_hub_config(
        tmp_path / "hub.toml",
        {"hub": {"schools": [SCHOOL, OTHER]}, "mqtt": {"tls": False}, "api": {"token_file": str(tokens)}},
    )
    result = CliRunner().invoke(main, ["hub", "check", str(config)])
    assert result.exit_code == 0
    warned = [line for line in result.output.splitlines() if "api.token_file" in line]
    assert len(warned) == 2 and "line 6 is not used: it has no scopes" in warned[0]
    assert "line 7 is not used: a token is at least 16 characters" in warned[1]
    assert not any(secret in result.output for secret in (READER, WRITER, APPROVER, DISTRICT, OLD_STYLE))


def test_the_template_key_lives_outside_the_database_folder_and_an_old_one_is_not_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = Path(DatabaseConfig().url.removeprefix("sqlite:///")).parent
    default = parse_hub_config({}).signing.template_key_file
    assert database not in default.parents and default == hub_settings.DEFAULT_TEMPLATE_KEY_FILE
    assert default.parent == parse_hub_config({}).signing.key_file.parent  # beside the signing key

    old, new = tmp_path / "var-lib" / "templates.key", tmp_path / "etc" / "hub-templates.key"
    monkeypatch.setattr(hub_settings, "OLD_TEMPLATE_KEY_FILE", old)
    monkeypatch.setattr(hub_settings, "DEFAULT_TEMPLATE_KEY_FILE", new)
    assert parse_hub_config({}).signing.template_key_file == new  # nothing at either place: a new hub
    old.parent.mkdir()
    old.write_bytes(b"k" * 32)
    with pytest.raises(ConfigError) as moved:
        parse_hub_config({}, "hub.toml")
    message = str(moved.value)
    assert len(message.splitlines()) == 1 and message.startswith("hub.toml: ")
    assert "signing.template_key_file: the default moved" in message
    assert f"mv {old} {new}" in message and f'template_key_file = "{old}"' in message
    explicit = parse_hub_config({"signing": {"template_key_file": str(old)}})
    assert explicit.signing.template_key_file == old
    new.parent.mkdir()
    new.write_bytes(b"k" * 32)
    assert parse_hub_config({}).signing.template_key_file == new  # moved: the old copy no longer matters
