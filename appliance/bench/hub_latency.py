"""``bench hub``'s latency: a tap on a real gate daemon's lane -> the parents' webhook request, everything online.

The gate syncs to the bench's broker, the hub ingests with the notification hook and runs the outbox
worker, both wired as in production; the webhook goes to an HTTP server started here. One clock
(CLOCK_MONOTONIC) from the write on the lane to the request, with the hub's commit in between.
"""

from __future__ import annotations

import json
import random
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.bench.errors import BenchError
from appliance.bench.hub_rig import (
    LIVE_DEVICE,
    POLL_SECONDS,
    STALL_SECONDS,
    hub_config,
    hub_transport,
    register_gates,
)
from appliance.bench.lane_daemon import DaemonRun, connect_lane, daemon_toml, enroll
from appliance.bench.mqtt_broker import SCHOOL, BenchBroker
from appliance.bench.stats import emit, latency_legs, progress, summary
from appliance.bench.waiting import wait_progress

TAP_GAP = (0.1, 0.3)  # seconds between two students at the gate


def student_id(index: int) -> str:
    return f"HS{index + 1:05d}"


def tap_uid(index: int) -> str:
    return f"0A{0xC0_0000_0000 + index:012X}"


class WebhookSink:
    """The parents' gateway stand-in: records when each student's message arrived, answers 200."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                now = time.monotonic()
                try:
                    message = json.loads(body)
                except ValueError:
                    message = {}
                sink.record(str(message.get("student")), str(message.get("kind")), now, self.headers)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/notify"
        self.arrivals: dict[tuple[str, str], float] = {}
        self.requests = 0
        self.keys: dict[str, int] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.server.serve_forever, name="bench-webhook", daemon=True)

    def record(self, student: str, kind: str, at: float, headers: Any) -> None:
        with self._lock:
            self.requests += 1
            self.arrivals.setdefault((student, kind), at)
            key = str(headers.get("Idempotency-Key"))
            self.keys[key] = self.keys.get(key, 0) + 1

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def students(taps: int) -> list[Any]:
    from appliance.roster.model import Person, Role

    return [
        Person(
            student_id(i),
            f"Học sinh {i + 1:05d}",
            Role.STUDENT,
            f"{6 + i % 4}A",
            True,
            (tap_uid(i),),
            parent_phones=(f"09{10_000_000 + i:08d}",),
        )
        for i in range(taps)
    ]


def enroll_hub(store: Any, people: list[Any]) -> None:
    """The hub's people table, as a roster import leaves it: the children and their parents' phones."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    conn = store.connect()
    try:
        with conn.transaction():
            conn.executemany(
                "INSERT INTO people(school, id, full_name, role, class_name, active, cards, parent_phones,"
                " parent_emails, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        SCHOOL,
                        p.id,
                        p.full_name,
                        str(p.role),
                        p.class_name,
                        1,
                        json.dumps(list(p.cards)),
                        json.dumps(list(p.parent_phones)),
                        json.dumps([]),
                        now,
                    )
                    for p in people
                ],
            )
    finally:
        conn.close()


def run_latency(broker: BenchBroker, passwords: dict[str, str], workdir: Path, taps: int) -> dict[str, Any]:
    """Tap written to a real gate daemon's lane -> the parents' webhook request, with the hub online."""
    from appliance.hub.ingest import IngestWorker
    from appliance.hub.notify import event_hook, outbox_worker
    from appliance.hub.store import Store

    workdir.mkdir(parents=True, exist_ok=True)
    people = students(taps)
    sink = WebhookSink()
    sink.start()
    config = hub_config(
        broker,
        workdir.parent,
        f"sqlite:///{workdir / 'hub.db'}",
        notify={"enabled": True, "webhook": {"url": sink.url, "timeout": 10}},
    )
    store = Store(config.database)
    store.migrate()
    enroll_hub(store, people)
    register_gates(store, {LIVE_DEVICE: workdir / "templates.key"})  # the daemon's vision.key_file
    stored_at: dict[str, float] = {}
    plan = event_hook(config)

    def hook(conn: Any, school: str, event: dict[str, Any]) -> None:
        plan(conn, school, event)
        if event.get("person"):
            stored_at.setdefault(str(event["person"]), time.monotonic())

    worker = IngestWorker(store, config.mqtt.topic_prefix, [hook], config.zone)
    transport = hub_transport(config)
    transport.on_message = worker.submit
    outbox = outbox_worker(store, config)
    password = workdir / "gate-password"
    password.write_text(passwords[LIVE_DEVICE] + "\n")
    password.chmod(0o600)
    journal, lane_path = workdir / "journal.db", workdir / "lane.sock"
    enroll(journal, people)
    gate = workdir / "gate.toml"
    gate.write_text(daemon_toml(journal, lane_path, broker, password, LIVE_DEVICE, school=SCHOOL, show_names=False))
    progress(f"bench hub: latency: edugate run + hub with notify, {taps} taps of distinct students")
    worker.start()
    transport.start()
    outbox.start()
    daemon: Any = None
    lane: Any = None
    written: dict[str, float] = {}
    try:
        if not transport.connected.wait(15):
            raise BenchError(f"the hub could not connect to the bench broker: {transport.link.last_error}")
        daemon = DaemonRun(gate, workdir)
        daemon.wait_ready()
        lane = connect_lane(lane_path)
        rng = random.Random(17)
        for index in range(taps):
            time.sleep(rng.uniform(*TAP_GAP))
            written[student_id(index)] = time.monotonic()
            lane.sendall(f"{tap_uid(index)}\n".encode())
        wait_progress(lambda: len(sink.arrivals), taps, STALL_SECONDS, POLL_SECONDS)
        time.sleep(1.0)  # a second delivery of any message would show up here
    finally:
        if lane is not None:
            lane.close()
        exit_code = daemon.stop() if daemon is not None else None
        outbox.stop()
        transport.stop()
        worker.stop()
        sink.stop()
    to_webhook, to_hub, hub_to_webhook = latency_legs(
        (began, sink.arrivals.get((person, "arrival")), stored_at.get(person)) for person, began in written.items()
    )
    conn = store.connect()
    try:
        statuses = dict(conn.all("SELECT status, COUNT(*) FROM outbox GROUP BY status"))
        events = conn.one("SELECT COUNT(*) FROM events WHERE device = ?", [LIVE_DEVICE])
    finally:
        conn.close()
    result = {
        "bench": "hub",
        "measure": "latency",
        "taps": taps,
        "hub_events": events[0] if events else 0,
        "notified": len(to_webhook),
        "missing": taps - len(to_webhook),
        "webhook_requests": sink.requests,
        "duplicates": sum(n - 1 for n in sink.keys.values()),
        "outbox": statuses,
        "daemon_exit_code": exit_code,
        **summary(to_webhook, "tap_to_webhook_ms", (50, 95, 99)),
        **summary(to_hub, "tap_to_hub_ms", (50, 95, 99)),
        **summary(hub_to_webhook, "hub_to_webhook_ms", (50, 95, 99)),
    }
    emit(**result)
    return result
