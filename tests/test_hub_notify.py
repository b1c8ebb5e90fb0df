"""Parent notifications against real parts: the real ingest with the notify hook, a real HTTP server as the
SMS/Zalo gateway (failing, refusing and slow on purpose), a real SMTP server with STARTTLS and a login, the
outbox worker in this process and in a process killed mid-delivery, and `edugate hub run` killed mid-ingest.

What parents and the office rely on: one arrival and one departure message per child per day, none for a
backlog that arrives hours late (recorded as skipped, with the reason), none lost to a crash or a flaky
gateway, the same idempotency key on every attempt, and the Vietnamese text intact.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import pickle
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from click.testing import CliRunner
from hub_support import REPO, ZONE, HubProcess, ensure_registered, gate_event, hub_mqtt, payload, write_hub_config
from mqtt_broker import BROKER_USERS, Broker, MqttPeer, Pki, free_port

from appliance.cli import main as cli_main
from appliance.config import DatabaseConfig, HubConfig, parse_hub_config
from appliance.hub.ingest import Incoming, Ingest
from appliance.hub.notify import backoff, event_hook, outbox_key, outbox_worker, plan_absent, planner
from appliance.hub.notify import worker as worker_module
from appliance.hub.notify.worker import OutboxWorker
from appliance.hub.store import Connection, Store
from appliance.sync.signing import generate_private_key

SCHOOL = "thcs-a"
TOPIC = f"edugate/{SCHOOL}/gate-01/events"
NAME = "Nguyễn Thị Ánh Dương"
PHONES = ["0912345678", "0987654321"]


# ------------------------------------------------------------------------------------------------ a gateway


@dataclass
class Seen:
    key: str
    header_key: str | None
    authorization: str | None
    body: dict[str, Any]


@dataclass
class Gateway:
    """What the gateway stand-in does and what it saw. ``fail_first`` answers 500 to the first N requests,
    ``answer`` fixes the status of every answer, ``delay_first`` holds the first N requests ``delay`` s."""

    fail_first: int = 0
    answer: int = 200
    answer_body: str = '{"ok": true}'
    delay: float = 0.0
    delay_first: int = 0
    requests: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    arrived: threading.Event = field(default_factory=threading.Event)

    @property
    def keys(self) -> set[str]:
        with self.lock:
            return {r.key for r in self.requests}

    def total(self) -> int:
        with self.lock:
            return len(self.requests)


class _Handler(BaseHTTPRequestHandler):
    gateway: Gateway

    def do_POST(self) -> None:
        gateway = self.gateway
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length).decode("utf-8"))
        with gateway.lock:
            number = len(gateway.requests)
            gateway.requests.append(
                Seen(body["key"], self.headers.get("Idempotency-Key"), self.headers.get("Authorization"), body)
            )
        gateway.arrived.set()
        if number < gateway.delay_first:
            time.sleep(gateway.delay)
        status, text = (500, "gateway overloaded") if number < gateway.fail_first else (gateway.answer, "")
        data = (text or gateway.answer_body).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the hub gave up waiting (timeout) or was killed

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def gateway() -> Iterator[tuple[Gateway, str]]:
    """A real HTTP server on 127.0.0.1 standing in for the SMS/Zalo gateway: (its behaviour, its URL)."""
    state = Gateway()
    handler = type("Handler", (_Handler,), {"gateway": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}/send"
    server.shutdown()
    server.server_close()


# ------------------------------------------------------------------------------------------------ helpers


def add_person(
    conn: Connection,
    person: str,
    name: str = NAME,
    *,
    role: str = "student",
    class_name: str | None = "6A",
    phones: list[str] | None = None,
    emails: list[str] | None = None,
    active: int = 1,
    school: str = SCHOOL,
) -> None:
    """A people row as `edugate hub roster import` writes it."""
    conn.execute(
        "INSERT INTO people(school, id, full_name, role, class_name, active, cards, parent_phones, parent_emails,"
        " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            school,
            person,
            name,
            role,
            class_name,
            active,
            json.dumps([f"C{person}"]),
            json.dumps(PHONES if phones is None else phones),
            json.dumps(emails or []),
            datetime.now(ZONE).isoformat(),
        ],
    )


def hub_config(store: Store, *, notify: dict[str, Any], language: str = "vi") -> HubConfig:
    database: dict[str, Any] = {"url": store.config.url}
    if store.config.password_file is not None:
        database["password_file"] = str(store.config.password_file)
    settings = {"enabled": True, "retry_min": 0.05, "retry_max": 0.2, **notify}
    return parse_hub_config({"hub": {"language": language}, "database": database, "notify": settings})


def webhook_config(store: Store, url: str, language: str = "vi", **notify: Any) -> HubConfig:
    timeout = notify.pop("timeout", 5.0)
    return hub_config(store, notify={"webhook": {"url": url, "timeout": timeout}, **notify}, language=language)


def tap(seq: int, person: str | None = "HS001", *, kind: str = "arrival", at: datetime | None = None, **fields: Any):
    moment = at or datetime.now(ZONE)
    extra: dict[str, Any] = {"person": person, "kind": kind, "ts": moment.isoformat(timespec="milliseconds")}
    if person is not None:
        extra["role"] = fields.pop("role", "student")
    return gate_event("gate-01", seq, **extra, **fields)


def ingest(conn: Connection, config: HubConfig, *events: dict[str, Any]) -> Ingest:
    ensure_registered(conn, SCHOOL, "gate-01")
    worker = Ingest(conn, "edugate", [event_hook(config)])
    worker.store_batch([Incoming(TOPIC, payload(e)) for e in events])
    return worker


def rows(conn: Connection, where: str = "", params: list[Any] | None = None) -> list[dict[str, Any]]:
    names = ["key", "person", "day", "kind", "channel", "recipients", "body", "status", "attempts", "last_error"]
    found = conn.all(f"SELECT {', '.join(names)} FROM outbox {where} ORDER BY created_at, key", params or [])
    return [dict(zip(names, r, strict=True)) for r in found]


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        time.sleep(0.05)


def statuses(conn: Connection) -> list[str]:
    return [r[0] for r in conn.all("SELECT status FROM outbox ORDER BY key")]


def settled(conn: Connection) -> Callable[[], bool]:
    return lambda: bool(statuses(conn)) and all(s in ("sent", "failed", "skipped") for s in statuses(conn))


@pytest.fixture
def workers() -> Iterator[list[OutboxWorker]]:
    """Outbox workers started by a test, stopped at its end whatever happened."""
    made: list[OutboxWorker] = []
    yield made
    for worker in made:
        worker.stop()


def start_worker(store: Store, config: HubConfig, workers: list[OutboxWorker]) -> OutboxWorker:
    worker = outbox_worker(store, config)
    workers.append(worker)
    worker.start()
    return worker


# ------------------------------------------------------------------------------------------------ planning


def test_a_gate_clocked_in_utc_tells_parents_the_local_time_and_day(
    hub_store: Store, hub_conn: Connection, gateway: tuple[Gateway, str]
) -> None:
    _, url = gateway
    config = webhook_config(hub_store, url)
    add_person(hub_conn, "HS001")
    moment = datetime.now(ZONE).replace(hour=6, minute=45, second=0, microsecond=0)
    ingest(hub_conn, config, tap(1, at=moment.astimezone(UTC)))  # "...T23:45:00+00:00" the day before
    (planned,) = rows(hub_conn)
    assert planned["day"] == moment.date().isoformat()
    assert "06:45" in planned["body"] and "23:45" not in planned["body"]
    assert moment.strftime("%d/%m/%Y") in planned["body"]


def test_one_arrival_and_one_departure_per_child_per_day(
    hub_store: Store, hub_conn: Connection, gateway: tuple[Gateway, str], workers: list[OutboxWorker]
) -> None:
    server, url = gateway
    config = webhook_config(hub_store, url)
    add_person(hub_conn, "HS001")
    add_person(hub_conn, "GV001", "Trần Văn Bình", role="staff", class_name=None)
    add_person(hub_conn, "HS002", "Lê Minh", phones=[])  # no contacts: nobody to tell
    add_person(hub_conn, "HS003", "Phạm An", active=0)  # left the school
    first = tap(1)
    ingest(hub_conn, config, first)
    assert [(r["kind"], r["channel"], r["status"]) for r in rows(hub_conn)] == [("arrival", "webhook", "pending")]
    ingest(
        hub_conn,
        config,
        first,  # the same event delivered again by the broker
        tap(2),  # a second arrival the same day (another gate's first tap)
        tap(3, "GV001", role="staff"),
        tap(4, None, kind="unknown_card"),
        tap(5, "HS002"),
        tap(6, "HS003"),
        tap(7, "HS404"),  # not in the hub's people table
    )
    assert len(rows(hub_conn)) == 1
    ingest(hub_conn, config, tap(8, kind="departure"), tap(9, kind="departure"))
    planned = rows(hub_conn)
    assert [(r["kind"], r["person"]) for r in planned] == [("arrival", "HS001"), ("departure", "HS001")]
    today = first["ts"][:10]
    assert planned[0]["key"] == outbox_key(SCHOOL, "HS001", today, "arrival", "webhook")
    assert json.loads(planned[0]["recipients"]) == PHONES

    start_worker(hub_store, config, workers)
    wait(settled(hub_conn), 10, "both messages delivered")
    assert statuses(hub_conn) == ["sent", "sent"]
    assert server.total() == 2 and server.keys == {r["key"] for r in planned}
    arrival = next(r.body for r in server.requests if r.body["kind"] == "arrival")
    hhmm = first["ts"][11:16]
    dmy = f"{today[8:10]}/{today[5:7]}/{today[:4]}"
    assert arrival["text"] == f"{SCHOOL}: em {NAME} đã đến trường lúc {hhmm} ngày {dmy}."
    assert arrival["recipients"] == PHONES and arrival["student"] == "HS001" and arrival["late"] is False
    assert all(r.header_key == r.key for r in server.requests)


def test_the_next_day_brings_new_messages(hub_store: Store, hub_conn: Connection) -> None:
    config = webhook_config(hub_store, "http://127.0.0.1:9/send", max_age_minutes=3000)
    add_person(hub_conn, "HS001")
    yesterday = (datetime.now(ZONE) - timedelta(days=1)).replace(hour=7, minute=5)
    ingest(hub_conn, config, tap(1, at=yesterday), tap(2, kind="departure", at=yesterday.replace(hour=16)))
    ingest(hub_conn, config, tap(3), tap(4, kind="departure"))
    planned = rows(hub_conn)
    assert len(planned) == 4 and len({r["key"] for r in planned}) == 4
    assert sorted((r["day"], r["kind"]) for r in planned) == sorted(
        (d, k)
        for d in (yesterday.date().isoformat(), datetime.now(ZONE).date().isoformat())
        for k in ("arrival", "departure")
    )


def test_an_old_event_notifies_nobody_and_says_why(
    hub_store: Store,
    hub_conn: Connection,
    gateway: tuple[Gateway, str],
    workers: list[OutboxWorker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The hub's clock at noon: at 00:13 the event 95 minutes old was yesterday's, and the fresh one today's.
    noon = datetime.now(ZONE).replace(hour=12, minute=0, second=0, microsecond=0)
    for module in (planner, worker_module):
        monkeypatch.setattr(module, "utc_now", lambda: noon.astimezone(UTC))
    server, url = gateway
    config = webhook_config(hub_store, url, max_age_minutes=60)
    add_person(hub_conn, "HS001")
    ingest(hub_conn, config, tap(1, at=noon - timedelta(minutes=95)))
    ingest(hub_conn, config, tap(2, kind="departure", at=noon + timedelta(hours=3)))  # a gate with a wrong clock
    start_worker(hub_store, config, workers)
    time.sleep(1.0)
    skipped = sorted(rows(hub_conn), key=lambda r: r["kind"])
    assert [(r["kind"], r["status"], r["attempts"]) for r in skipped] == [
        ("arrival", "skipped", 0),
        ("departure", "skipped", 0),
    ]
    assert "95 min old" in skipped[0]["last_error"] and "max_age_minutes = 60" in skipped[0]["last_error"]
    assert "ahead of the hub's clock" in skipped[1]["last_error"]
    assert server.total() == 0
    ingest(hub_conn, config, tap(3, at=noon))  # a fresh arrival the same day does not make up for it: at most one
    assert len(rows(hub_conn)) == 2


def test_a_late_arrival_says_so_and_english_and_custom_templates(hub_store: Store, hub_conn: Connection) -> None:
    add_person(hub_conn, "HS001")
    add_person(hub_conn, "HS002", "Hoàng Lan", class_name="7B")
    vi = webhook_config(hub_store, "http://127.0.0.1:9/send")
    ingest(hub_conn, vi, tap(1, late=True, minutes_late=12))
    text = json.loads(rows(hub_conn)[0]["body"])["text"]
    assert "đã đến trường muộn lúc" in text and "(muộn 12 phút)" in text
    custom = webhook_config(
        hub_store,
        "http://127.0.0.1:9/send",
        language="en",
        templates={"departure": "{name} ({class}) left {school} at {time}, {date}"},
        school_names={SCHOOL: "Trường THCS A"},
    )
    ingest(hub_conn, custom, tap(2, "HS002", kind="departure"), tap(3, "HS002", late=True, minutes_late=3))
    by_kind = {r["kind"]: json.loads(r["body"]) for r in rows(hub_conn, "WHERE person = ?", ["HS002"])}
    today = datetime.now(ZONE).date().isoformat()
    assert (
        by_kind["departure"]["text"].startswith("Hoàng Lan (7B) left Trường THCS A at ")
        and today in by_kind["departure"]["text"]
    )
    assert by_kind["arrival"]["text"].endswith("(3 min late).") and by_kind["arrival"]["subject"].startswith(
        "Attendance"
    )


def test_a_template_with_an_unknown_placeholder_is_one_line_at_load(tmp_path: Path) -> None:
    config = write_hub_config(
        tmp_path / "hub.toml",
        {
            "notify": {
                "enabled": True,
                "templates": {"arrival": "Em {ten} đã đến lúc {time}"},
                "webhook": {"url": "https://gw.example.vn/send"},
            }
        },
    )
    done = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "hub", "check", str(config)], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"edugate: error: {config}: notify.templates: arrival: unknown placeholder {{ten}}; "
        "use {name}, {time}, {class}, {date}, {school}, {minutes}"
    ]


def test_absent_is_planned_once_in_the_same_outbox(hub_store: Store, hub_conn: Connection) -> None:
    config = hub_config(
        hub_store,
        notify={
            "webhook": {"url": "http://127.0.0.1:9/send"},
            "smtp": {"host": "127.0.0.1", "sender": "Trường <a@b.vn>"},
        },
    )
    add_person(hub_conn, "HS001", emails=["me@example.vn"])
    add_person(hub_conn, "GV001", role="staff", class_name=None)
    day = datetime.now(ZONE).date()
    assert plan_absent(hub_conn, config, SCHOOL, "HS001", day) == 2  # webhook + one e-mail
    assert plan_absent(hub_conn, config, SCHOOL, "HS001", day.isoformat()) == 0
    assert plan_absent(hub_conn, config, SCHOOL, "GV001", day) == 0
    assert plan_absent(hub_conn, config, SCHOOL, "HS404", day) == 0
    planned = rows(hub_conn)
    assert {(r["kind"], r["channel"], r["status"]) for r in planned} == {
        ("absent", "webhook", "pending"),
        ("absent", "smtp", "pending"),
    }
    text = json.loads(planned[0]["body"])["text"]
    assert "vắng mặt không phép" in text and "lớp 6A" in text
    disabled = webhook_config(hub_store, "http://127.0.0.1:9/send").model_copy(
        update={"notify": config.notify.model_copy(update={"enabled": False})}
    )
    assert plan_absent(hub_conn, disabled, SCHOOL, "HS001", day + timedelta(days=1)) == 0


# ------------------------------------------------------------------------------------------------ delivery


def test_a_gateway_failing_three_times_gets_the_message_once_with_one_key(
    hub_store: Store, hub_conn: Connection, gateway: tuple[Gateway, str], workers: list[OutboxWorker], tmp_path: Path
) -> None:
    server, url = gateway
    server.fail_first = 3
    token = tmp_path / "webhook.token"
    token.write_text("s3cret-token\n")
    config = hub_config(hub_store, notify={"webhook": {"url": url, "token_file": str(token)}})
    add_person(hub_conn, "HS001")
    ingest(hub_conn, config, tap(1))
    start_worker(hub_store, config, workers)
    wait(settled(hub_conn), 15, "delivered after the failures")
    (row,) = rows(hub_conn)
    assert row["status"] == "sent" and row["attempts"] == 4
    assert row["last_error"] == "HTTP 500: gateway overloaded"  # what happened before the success stays visible
    assert server.total() == 4 and server.keys == {row["key"]}
    assert all(r.header_key == row["key"] and r.authorization == "Bearer s3cret-token" for r in server.requests)


def test_a_permanent_refusal_is_failed_with_the_answer_and_not_retried(
    hub_store: Store, hub_conn: Connection, gateway: tuple[Gateway, str], workers: list[OutboxWorker]
) -> None:
    server, url = gateway
    server.answer, server.answer_body = 400, '{"error": "phone number 0912 is not a subscriber"}'
    config = webhook_config(hub_store, url)
    add_person(hub_conn, "HS001")
    ingest(hub_conn, config, tap(1))
    start_worker(hub_store, config, workers)
    wait(settled(hub_conn), 10, "refused")
    time.sleep(0.5)
    (row,) = rows(hub_conn)
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert row["last_error"] == 'HTTP 400: {"error": "phone number 0912 is not a subscriber"}'
    assert server.total() == 1


def test_a_gateway_that_keeps_failing_is_given_up_after_max_attempts(
    hub_store: Store, hub_conn: Connection, gateway: tuple[Gateway, str], workers: list[OutboxWorker]
) -> None:
    server, url = gateway
    server.answer, server.answer_body = 503, "maintenance"
    config = webhook_config(hub_store, url, max_attempts=3)
    add_person(hub_conn, "HS001")
    ingest(hub_conn, config, tap(1))
    start_worker(hub_store, config, workers)
    wait(settled(hub_conn), 10, "given up")
    (row,) = rows(hub_conn)
    assert (row["status"], row["attempts"], row["last_error"]) == ("failed", 3, "HTTP 503: maintenance")
    assert server.total() == 3


def test_a_gateway_that_is_not_there_is_retried_then_failed_with_the_reason(
    hub_store: Store, hub_conn: Connection, workers: list[OutboxWorker]
) -> None:
    config = webhook_config(hub_store, f"http://127.0.0.1:{free_port()}/send", max_attempts=2)
    add_person(hub_conn, "HS001")
    ingest(hub_conn, config, tap(1))
    start_worker(hub_store, config, workers)
    wait(settled(hub_conn), 10, "given up")
    (row,) = rows(hub_conn)
    assert (row["status"], row["attempts"]) == ("failed", 2)
    assert row["last_error"] == "connection failed: [Errno 111] Connection refused"


def test_a_slow_gateway_times_out_and_the_retry_delivers(
    hub_store: Store, hub_conn: Connection, gateway: tuple[Gateway, str], workers: list[OutboxWorker]
) -> None:
    server, url = gateway
    server.delay, server.delay_first = 2.5, 1
    config = webhook_config(hub_store, url, timeout=0.5)
    add_person(hub_conn, "HS001")
    ingest(hub_conn, config, tap(1))
    started = time.monotonic()
    start_worker(hub_store, config, workers)
    wait(lambda: rows(hub_conn)[0]["last_error"] is not None, 5, "the first attempt timed out")
    assert rows(hub_conn)[0]["last_error"] == "no answer within 0.5 s"
    assert time.monotonic() - started < 2.0  # the hub stopped waiting long before the gateway answered
    wait(settled(hub_conn), 10, "delivered by the retry")
    (row,) = rows(hub_conn)
    assert (row["status"], row["attempts"]) == ("sent", 2)
    assert server.total() == 2 and server.keys == {row["key"]}


def test_a_hung_gateway_never_holds_up_ingest(
    hub_store: Store, hub_conn: Connection, gateway: tuple[Gateway, str], workers: list[OutboxWorker]
) -> None:
    server, url = gateway
    server.delay, server.delay_first = 3.0, 1000
    config = webhook_config(hub_store, url, timeout=5.0, concurrency=2)
    for i in range(50):
        add_person(hub_conn, f"HS{i:03d}")
    ingest(hub_conn, config, *(tap(1 + i, f"HS{i:03d}") for i in range(10)))
    start_worker(hub_store, config, workers)
    assert server.arrived.wait(5)
    started = time.monotonic()
    ingest(hub_conn, config, *(tap(11 + i, f"HS{i:03d}") for i in range(10, 50)))
    assert time.monotonic() - started < 1.0
    assert len(rows(hub_conn)) == 50
    stopping = time.monotonic()
    workers.pop().stop()  # waits for the two requests in flight only; the rest of its batch is given back
    assert time.monotonic() - stopping < 4.0
    assert hub_conn.one("SELECT COUNT(*) FROM outbox WHERE status = 'sending'")[0] <= 2


def test_a_worker_stopped_mid_flight_and_started_again_delivers_each_message_once(
    hub_store: Store, hub_conn: Connection, gateway: tuple[Gateway, str], workers: list[OutboxWorker]
) -> None:
    server, url = gateway
    server.delay, server.delay_first = 1.0, 3
    config = webhook_config(hub_store, url, concurrency=1)
    for i in range(6):
        add_person(hub_conn, f"HS{i:03d}")
    ingest(hub_conn, config, *(tap(1 + i, f"HS{i:03d}") for i in range(6)))
    worker = start_worker(hub_store, config, workers)
    assert server.arrived.wait(5)
    worker.stop()  # while a request is in flight: it is finished and recorded, nothing new is started
    assert server.total() < 6
    start_worker(hub_store, config, workers)
    wait(settled(hub_conn), 20, "all delivered after the restart")
    assert statuses(hub_conn) == ["sent"] * 6
    assert [r["attempts"] for r in rows(hub_conn)] == [1] * 6  # what stop() gave back kept its attempt count
    assert server.total() == 6 and len(server.keys) == 6


CHILD = """
import pickle, sys, time
from appliance.hub.notify import outbox_worker
from appliance.hub.store import Store
config = pickle.loads(open(sys.argv[1], "rb").read())
worker = outbox_worker(Store(config.database), config)
worker.start()
print("started", flush=True)
time.sleep(600)
"""


def test_a_worker_killed_mid_delivery_retries_with_the_same_key(
    hub_store: Store, hub_conn: Connection, gateway: tuple[Gateway, str], workers: list[OutboxWorker], tmp_path: Path
) -> None:
    """SIGKILL while the gateway holds the request: the row stays 'sending' until its lease ends, then the
    next worker sends it again under the same idempotency key (the gateway sees one message, two requests)."""
    server, url = gateway
    server.delay, server.delay_first = 3.0, 1
    config = webhook_config(hub_store, url, timeout=1.0)
    add_person(hub_conn, "HS001")
    ingest(hub_conn, config, tap(1))
    frozen = tmp_path / "config.pickle"
    frozen.write_bytes(pickle.dumps(config))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(frozen)], cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    try:
        assert server.arrived.wait(15), "the child never delivered"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(10)
    (row,) = rows(hub_conn)
    assert (row["status"], row["attempts"]) == ("sending", 1)
    worker = start_worker(hub_store, config, workers)
    assert worker.lease == pytest.approx(2 * 1.0 + 5.0)
    wait(settled(hub_conn), worker.lease + 10, "sent after the lease ran out")
    (row,) = rows(hub_conn)
    assert (row["status"], row["attempts"]) == ("sent", 2)
    assert server.total() == 2 and server.keys == {row["key"]}
    assert [r.header_key for r in server.requests] == [row["key"], row["key"]]


def test_backoff_doubles_with_jitter_within_the_bounds() -> None:
    import random

    rng = random.Random(5)
    delays = [backoff(n, 5.0, 600.0, rng) for n in range(1, 12)]
    assert all(5.0 <= d <= 600.0 for d in delays)
    assert 2.5 <= delays[0] <= 5.0 or delays[0] == 5.0
    assert 40.0 <= delays[4] <= 80.0  # 5 * 2**4 = 80, jittered in its upper half
    assert delays[-1] >= 300.0
    assert len({round(backoff(3, 5.0, 600.0, rng), 6) for _ in range(20)}) > 1


# ------------------------------------------------------------------------------------------------ e-mail


@dataclass
class Mailbox:
    mails: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        if address in self.refuse:
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails.append((envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content)))
        return "250 Message accepted"


@pytest.fixture
def smtp_server(pki: Pki) -> Iterator[tuple[Mailbox, int]]:
    """A real SMTP server (aiosmtpd) that requires STARTTLS (the test CA's 127.0.0.1 certificate) and a login."""
    box = Mailbox()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"truong", b"mat-khau")
        if ok:
            box.logins.append(data.login.decode())
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535

    port = free_port()
    controller = Controller(
        box,
        hostname="127.0.0.1",
        port=port,
        tls_context=context,
        require_starttls=True,
        authenticator=authenticate,
        auth_required=True,
    )
    controller.start()
    yield box, port
    controller.stop()


def test_mails_arrive_one_per_parent_with_the_vietnamese_text_intact(
    hub_store: Store,
    hub_conn: Connection,
    smtp_server: tuple[Mailbox, int],
    pki: Pki,
    workers: list[OutboxWorker],
    tmp_path: Path,
) -> None:
    box, port = smtp_server
    box.refuse = {"cu@truong-cu.vn"}
    password = tmp_path / "smtp.password"
    password.write_text("mat-khau\n")
    config = hub_config(
        hub_store,
        notify={
            "smtp": {
                "host": "127.0.0.1",
                "port": port,
                "ca_file": str(pki.ca),
                "username": "truong",
                "password_file": str(password),
                "sender": "Trường THCS Đống Đa <thongbao@truong.edu.vn>",
                "timeout": 5,
            },
            "school_names": {SCHOOL: "Trường THCS Đống Đa"},
        },
    )
    add_person(hub_conn, "HS001", emails=["me@example.vn", "bo@example.vn", "cu@truong-cu.vn"])
    ingest(hub_conn, config, tap(1, late=True, minutes_late=7))
    ingest(hub_conn, config, tap(2, kind="arrival"))  # one arrival per parent address
    start_worker(hub_store, config, workers)
    wait(settled(hub_conn), 15, "mails delivered")
    by_address = {json.loads(r["recipients"])[0]: r for r in rows(hub_conn)}
    assert {a: r["status"] for a, r in by_address.items()} == {
        "me@example.vn": "sent",
        "bo@example.vn": "sent",
        "cu@truong-cu.vn": "failed",
    }
    assert by_address["cu@truong-cu.vn"]["last_error"] == "recipient refused: 550 5.1.1 mailbox unavailable"
    assert sorted(to[0] for _, to, _ in box.mails) == ["bo@example.vn", "me@example.vn"]
    assert all(len(to) == 1 for _, to, _ in box.mails) and box.logins == ["truong", "truong", "truong"]
    for _, to, raw in box.mails:
        mail = email.message_from_bytes(raw, policy=email.policy.default)
        assert mail["Subject"] == f"Điểm danh: {NAME} đến trường muộn"
        assert str(mail["From"]) == "Trường THCS Đống Đa <thongbao@truong.edu.vn>"
        assert mail["To"] == to[0] and mail["Message-ID"] == f"<{by_address[to[0]]['key']}@truong.edu.vn>"
        body = mail.get_content()
        assert f"Trường THCS Đống Đa: em {NAME} đã đến trường muộn lúc" in body and "(muộn 7 phút)" in body
        assert mail.get_content_charset() == "utf-8"


def test_a_refused_smtp_login_is_retried_and_a_fixed_password_file_works(
    hub_store: Store,
    hub_conn: Connection,
    smtp_server: tuple[Mailbox, int],
    pki: Pki,
    workers: list[OutboxWorker],
    tmp_path: Path,
) -> None:
    box, port = smtp_server
    password = tmp_path / "smtp.password"
    password.write_text("wrong\n")
    smtp = {
        "host": "127.0.0.1",
        "port": port,
        "ca_file": str(pki.ca),
        "username": "truong",
        "password_file": str(password),
        "sender": "thongbao@truong.edu.vn",
    }
    config = hub_config(hub_store, notify={"smtp": smtp, "retry_min": 0.3, "retry_max": 0.5})
    add_person(hub_conn, "HS001", emails=["me@example.vn"])
    ingest(hub_conn, config, tap(1))
    start_worker(hub_store, config, workers)
    wait(lambda: rows(hub_conn)[0]["last_error"] is not None, 10, "refused")
    assert rows(hub_conn)[0]["last_error"] == "SMTP login refused: 535 5.7.8 Authentication credentials invalid"
    assert rows(hub_conn)[0]["status"] == "pending"
    password.write_text("mat-khau\n")
    wait(settled(hub_conn), 10, "sent with the new password")
    assert rows(hub_conn)[0]["status"] == "sent" and len(box.mails) == 1


# ------------------------------------------------------------------------------------------------ the CLI


def test_outbox_lists_without_contacts_and_retries_failed(
    hub_store: Store, hub_conn: Connection, gateway: tuple[Gateway, str], workers: list[OutboxWorker], tmp_path: Path
) -> None:
    server, url = gateway
    server.answer, server.answer_body = 400, "unknown subscriber"
    config = webhook_config(hub_store, url)
    add_person(hub_conn, "HS001")
    add_person(hub_conn, "HS002", "Lê Minh")
    ingest(hub_conn, config, tap(1), tap(2, "HS002"))
    ingest(hub_conn, config, tap(3, "HS002", kind="departure", at=datetime.now(ZONE) - timedelta(hours=5)))
    worker = start_worker(hub_store, config, workers)
    wait(settled(hub_conn), 10, "refused")
    worker.stop()
    toml = write_hub_config(
        tmp_path / "hub.toml",
        {"database": config.database.model_dump(mode="json", exclude_none=True), "notify": {"webhook": {"url": url}}},
    )
    runner = CliRunner()
    listed = runner.invoke(cli_main, ["hub", "outbox", "--config", str(toml)])
    assert listed.exit_code == 0, listed.output
    assert "unknown subscriber" in listed.output and "min old" in listed.output and NAME in listed.output
    assert not any(phone in listed.output for phone in PHONES)
    assert "by status: failed 2, skipped 1" in listed.output
    failed = runner.invoke(cli_main, ["hub", "outbox", "--config", str(toml), "--status", "failed", "--json"])
    records = [json.loads(line) for line in failed.output.splitlines()]
    assert len(records) == 2 and all(r["status"] == "failed" and r["recipients"] == 2 for r in records)
    shown = runner.invoke(cli_main, ["hub", "outbox", "--config", str(toml), "--show-contacts", "--day", "today"])
    assert all(phone in shown.output for phone in PHONES)

    server.answer = 200
    one = records[0]["key"]
    again = runner.invoke(cli_main, ["hub", "outbox", "retry", one[:10], "--config", str(toml)])
    assert again.exit_code == 0 and f"requeued message {one[:12]} (was failed)" in again.output
    sent_before = runner.invoke(cli_main, ["hub", "outbox", "retry", one, "--config", str(toml)])
    assert sent_before.exit_code == 1 and "only failed or skipped messages" in sent_before.output
    bad = runner.invoke(cli_main, ["hub", "outbox", "retry", "--config", str(toml)])
    assert bad.exit_code == 1 and "give a KEY" in bad.output
    rest = runner.invoke(cli_main, ["hub", "outbox", "--config", str(toml), "retry", "--all-failed"])
    assert rest.exit_code == 0 and "requeued 1 failed message(s)" in rest.output
    start_worker(hub_store, config, workers)
    wait(lambda: statuses(hub_conn).count("sent") == 2, 10, "sent after the retry")
    assert sorted(statuses(hub_conn)) == ["sent", "sent", "skipped"]


# ------------------------------------------------------------------------------------------------ end to end


def _not_today() -> str:
    days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    today = datetime.now(ZONE).weekday()
    return days[(today + 1) % 7]


def _hub_toml(tmp_path: Path, broker: Broker, pki: Pki, url: str) -> Path:
    key_file = tmp_path / "hub.key"
    generate_private_key(key_file)
    return write_hub_config(
        tmp_path / "hub.toml",
        {
            "hub": {"id": "hub-notify"},
            "database": {"url": f"sqlite:///{tmp_path / 'hub.db'}"},
            # Arrivals and departures only: today is not a school day, so no absence cut-off fires mid-test.
            "attendance": {"school_days": [_not_today()]},
            "mqtt": hub_mqtt(tmp_path, broker, pki),
            "signing": {"key_file": str(key_file)},
            "notify": {
                "enabled": True,
                "retry_min": 0.2,
                "retry_max": 1.0,
                "webhook": {"url": url, "timeout": 1.0},
            },
            "api": {"enabled": False},
        },
    )


def test_hub_killed_mid_ingest_stores_every_event_once_and_notifies_each_child_once(
    tmp_path: Path, broker: Broker, pki: Pki, gateway: tuple[Gateway, str]
) -> None:
    server, url = gateway
    server.delay, server.delay_first = 0.05, 10_000  # deliveries are in flight when the hub dies
    students = 120
    config = _hub_toml(tmp_path, broker, pki, url)
    store = Store(DatabaseConfig(url=f"sqlite:///{tmp_path / 'hub.db'}"))
    store.migrate()
    conn = store.connect()
    with conn.transaction():
        for i in range(students):
            add_person(conn, f"HS{i:03d}", f"Học Sinh {i}", phones=[f"09{i:08d}"])
        add_person(conn, "GV001", "Giáo Viên", role="staff", class_name=None)
    ensure_registered(conn, SCHOOL, "gate-01")
    journal = "b" * 32
    events: list[dict[str, Any]] = []
    for i in range(students):
        events.append(tap(0, f"HS{i:03d}", journal=journal))
        events.append(tap(0, None, kind="unknown_card", journal=journal))
    events.append(tap(0, "GV001", role="staff", journal=journal))
    events += [tap(0, f"HS{i:03d}", kind="departure", journal=journal) for i in range(students)]
    for seq, event in enumerate(events, start=1):
        event["seq"] = seq
    gate = MqttPeer(broker, "gate-01", BROKER_USERS["gate-01"], client_id="gate-01")
    problems: list[BaseException] = []

    def publish_all() -> None:
        """The gate stand-in: a steady stream, then a resend of the first 50 (a gate not sure of its PUBACKs)."""
        try:
            for event in [*events, *events[:50]]:
                gate.publish(TOPIC, payload(event))
                time.sleep(0.01)
        except BaseException as exc:
            problems.append(exc)

    hub = HubProcess(config).start(wait_for="sync: connected")
    publisher = threading.Thread(target=publish_all, daemon=True)
    try:
        gate.connect()
        publisher.start()
        wait(lambda: len(server.keys) >= 10, 30, "messages going out")
        hub.kill()
        at_kill = (stored(conn), len(server.keys), conn.one("SELECT COUNT(*) FROM outbox")[0])
        assert at_kill[0] < len(events), "the hub was killed after the ingest had finished"
        publisher.join(60)
        assert not publisher.is_alive() and not problems, problems
        hub = HubProcess(config).start(wait_for="sync: connected")
        wait(lambda: stored(conn) == len(events), 60, "every event at the hub after the restart")
        wait(lambda: len(server.keys) >= 2 * students, 60, "every message at the gateway")
        wait(lambda: conn.one("SELECT COUNT(*) FROM outbox WHERE status != 'sent'")[0] == 0, 30, "outbox drained")
    finally:
        hub.stop()
        gate.close()
    assert conn.one("SELECT COUNT(*), COUNT(DISTINCT id), COUNT(DISTINCT seq) FROM events") == (len(events),) * 3
    with server.lock:
        by_kind: dict[str, dict[str, set[str]]] = {"arrival": {}, "departure": {}}
        for seen in server.requests:
            assert seen.header_key == seen.key
            by_kind[seen.body["kind"]].setdefault(seen.body["student"], set()).add(seen.key)
        total = len(server.requests)
    for kind in ("arrival", "departure"):
        assert sorted(by_kind[kind]) == [f"HS{i:03d}" for i in range(students)]
        assert all(len(keys) == 1 for keys in by_kind[kind].values()), f"a child got two {kind} messages"
    assert conn.one("SELECT COUNT(*), SUM(attempts) FROM outbox")[0] == 2 * students
    print(
        f"killed with {at_kill[0]}/{len(events)} events stored, {at_kill[2]} messages planned, {at_kill[1]} at the"
        f" gateway; in the end {total} requests for {2 * students} messages (repeats carry the same key)"
    )
    conn.close()


def stored(conn: Connection) -> int:
    return int(conn.one("SELECT COUNT(*) FROM events")[0])
