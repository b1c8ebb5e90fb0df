"""``edugate bench hub``: how fast the hub swallows a backlog, and how soon a tap becomes a parent's message.

After a night with the school's server down, every gate's events wait in the broker; when the hub
comes back they all arrive at once and must be stored (validated, deduplicated, seq streams kept,
acknowledged after the commit) quickly. Everything runs against a private Mosquitto started here on
127.0.0.1 (plaintext, the production limits that matter: 100 messages in flight per client, a queue
big enough for the backlog) with the gates' ACL.

1. Ingest: the hub's MQTT session is made (shared subscription, persistent session) and closed; a
   few simulated gates publish the backlog (valid events, QoS 1, every PUBACK a success, so the
   broker holds them for the hub); then the hub's ingest starts, wired as HubService wires it
   (IngestWorker + MqttTransport with manual acks after the commit), and is timed until every event
   is in the database. Into SQLite (a file in ``--dir``), and into PostgreSQL with ``--postgres``.
2. Baseline, same run, same rows: bare ``executemany`` inserts in batches of 500 into the same
   events table (sqlite3; psycopg too with ``--postgres``), one transaction per batch. The ratio is
   what validation, dedupe, the streams and MQTT cost on top of writing the rows.
3. Latency, everything online: a real ``edugate run`` (a socket lane, its sync to the bench
   broker) and the hub (ingest with the notification hook, the outbox worker, wired as HubService
   wires them) with ``[notify]`` on and a webhook to an HTTP server started here. Card UIDs of
   distinct students (parents' phones in the hub's people table) are written to the lane, spaced
   like arrivals at a gate; each is timed from the write to the webhook request for that student
   (one clock: CLOCK_MONOTONIC), with the hub's commit in between.
"""

from __future__ import annotations

import contextlib
import json
import random
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from appliance.bench.errors import BenchError
from appliance.bench.gate_events import realistic_drafts
from appliance.bench.lane_daemon import DaemonRun, connect_lane, daemon_toml, enroll
from appliance.bench.mqtt_broker import (
    BROKER_SETTINGS,
    HUB_USER,
    SCHOOL,
    BenchBroker,
    events_topic,
    mosquitto_missing,
)
from appliance.bench.sigterm import sigterm_interrupts
from appliance.bench.stats import emit, machine_info, progress, summary
from appliance.bench.waiting import wait_progress
from appliance.events import Event
from appliance.hub.ingest import event_row

TARGET_INGEST_PER_S = 2000
TARGET_LATENCY_P95_MS = 5000

HUB_ID = "bench-hub"
BASELINE_BATCH = 500
PUBLISH_CHUNK = 20_000  # messages a gate publishes before waiting for their PUBACKs (paho's ids are 16-bit)
STALL_SECONDS = 60.0  # no progress for this long means something is broken, not slow
POLL_SECONDS = 0.005  # progress polling of in-process counters
COUNT_POLL_SECONDS = 0.05  # progress polling of the events table: a query, so less often
NO_MATCHING_SUBSCRIBERS = 0x10
LIVE_DEVICE = "bench-lane"
TAP_GAP = (0.1, 0.3)  # seconds between two students at the gate


def gate_name(index: int) -> str:
    return f"bench-gate-{index + 1}"


class QueueBroker(BenchBroker):
    """The bench broker with a queue per client big enough for the whole backlog (the hub is offline)."""

    def __init__(self, workdir: Path, users: dict[str, str], queued: int) -> None:
        super().__init__(workdir, users, None)
        self.queued = queued

    def _write_files(self) -> Path:
        conf = super()._write_files()
        limit = max(self.queued, int(BROKER_SETTINGS["max_queued_messages"]))
        with conf.open("a") as out:  # later lines win in mosquitto.conf
            out.write(f"max_queued_messages {limit}\nmax_queued_bytes {max(limit * 2048, 268435456)}\n")
        return conf


# --------------------------------------------------------------------------------------------------- events


def backlog(count: int, gates: int, seed: int = 5) -> dict[str, list[bytes]]:
    """A school's days at its gates, dealt round-robin to ``gates`` devices, each with its own seq from 1."""
    journals = {gate_name(i): uuid.UUID(int=random.Random(seed + i).getrandbits(128)).hex for i in range(gates)}
    out: dict[str, list[bytes]] = {name: [] for name in journals}
    for index, draft in enumerate(realistic_drafts(count, seed)):
        device = gate_name(index % gates)
        event = Event(uuid.uuid4().hex, device, journals[device], len(out[device]) + 1, draft)
        out[device].append(event.to_json().encode("utf-8"))
    return out


def _publish_gate(broker: BenchBroker, device: str, password: str, payloads: list[bytes], refused: list[str]) -> None:
    """One gate's QoS 1 publisher; any PUBACK that is not a plain success is recorded as refused."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"{device}-{secrets.token_hex(3)}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.username_pw_set(device, password)
    connected = threading.Event()
    acked = [0]
    lock = threading.Lock()

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        connected.set()

    def on_publish(client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with lock:
            acked[0] += 1
            if reason.is_failure or reason.value == NO_MATCHING_SUBSCRIBERS:
                refused.append(f"{device}: {reason}")

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise BenchError(f"{device}: no CONNACK within 10 s")
        topic = events_topic(device)
        for start in range(0, len(payloads), PUBLISH_CHUNK):
            for payload in payloads[start : start + PUBLISH_CHUNK]:
                client.publish(topic, payload, qos=1)
            goal = min(start + PUBLISH_CHUNK, len(payloads))
            if wait_progress(lambda: acked[0], goal, STALL_SECONDS, POLL_SECONDS) is None:
                raise BenchError(f"{device}: stuck at {acked[0]}/{goal} PUBACKs: {broker.log_tail()}")
    finally:
        client.disconnect()
        client.loop_stop()


def publish_backlog(broker: BenchBroker, passwords: dict[str, str], events: dict[str, list[bytes]]) -> float:
    """Every gate publishes its part at once; returns the seconds until the last PUBACK."""
    refused: list[str] = []
    errors: list[BaseException] = []

    def gate(device: str) -> None:
        try:
            _publish_gate(broker, device, passwords[device], events[device], refused)
        except BaseException as exc:
            errors.append(exc)

    began = time.monotonic()
    threads = [threading.Thread(target=gate, args=(device,), name=f"bench-{device}") for device in events]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchError(str(errors[0]))
    if refused:
        raise BenchError(
            f"the broker did not queue {len(refused)} events for the hub ({refused[0]}): is the hub's session there?"
        )
    return time.monotonic() - began


def _count(conn: Any) -> int:
    row = conn.one("SELECT COUNT(*) FROM events")
    return int(row[0]) if row else 0


# --------------------------------------------------------------------------------------------------- the hub


def hub_config(broker: BenchBroker, workdir: Path, database_url: str, **sections: dict[str, Any]) -> Any:
    """hub.toml as a dict, validated like a real one: this broker, plaintext, the hub's password file."""
    from appliance.config import parse_hub_config
    from appliance.sync.signing import generate_private_key

    password_file = workdir / "hub-password"
    if not password_file.exists():
        password_file.write_text(broker.users[HUB_USER] + "\n")
        password_file.chmod(0o600)
    key_file = workdir / "hub-signing.key"
    if not key_file.exists():
        generate_private_key(key_file)
    data: dict[str, Any] = {
        "hub": {"id": HUB_ID, "schools": [SCHOOL]},
        "database": {"url": database_url},
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "tls": False,
            "username": HUB_USER,
            "password_file": str(password_file),
        },
        "signing": {"key_file": str(key_file)},
        **sections,
    }
    return parse_hub_config(data, "<bench hub>")


def _hub_transport(config: Any) -> Any:
    """The hub's MQTT session exactly as HubService opens it (client id, shared subscription, manual acks)."""
    from appliance.hub.service import subscriptions
    from appliance.sync.transport import MqttTransport

    return MqttTransport(
        config.mqtt,
        client_id=config.mqtt.client_id or f"edugate-{config.hub.id}",
        username=config.mqtt.username or HUB_USER,
        subscriptions=subscriptions(config),
        manual_ack=True,
    )


def open_session(config: Any) -> None:
    """Connect once as the hub (subscribing) and leave: the broker keeps the session and queues for it."""
    transport = _hub_transport(config)
    transport.start()
    try:
        if not transport.connected.wait(15):
            raise BenchError(f"the hub could not connect to the bench broker: {transport.link.last_error}")
        time.sleep(0.3)  # the SUBSCRIBEs leave before the DISCONNECT; the publishers' PUBACKs prove they landed
    finally:
        transport.stop()


def run_ingest(config: Any, total: int, label: str) -> dict[str, Any]:
    """Start the hub's ingest on the waiting backlog; time it until ``total`` events are stored."""
    from appliance.hub.ingest import IngestWorker
    from appliance.hub.store import Store, StoreError

    store = Store(config.database)
    try:
        store.migrate()
    except StoreError as exc:
        raise BenchError(str(exc)) from None
    worker = IngestWorker(store, config.mqtt.topic_prefix)
    transport = _hub_transport(config)
    first: list[float] = []
    acked = [0]  # only the ingest thread acknowledges (after the commit)

    def submit(topic: str, payload: bytes, ack: Callable[[], None]) -> None:
        if not first:
            first.append(time.monotonic())

        def counted() -> None:
            ack()
            acked[0] += 1

        worker.submit(topic, payload, counted)

    transport.on_message = submit
    progress(f"bench hub: ingest into {label}: {total} events waiting in the broker")
    began = time.monotonic()
    worker.start()
    transport.start()
    counter = store.connect()
    try:
        assert worker.ingest is not None
        stats = worker.ingest.stats
        # Acknowledged means committed; the table is the judge (a redelivered message is acknowledged too).
        done = wait_progress(lambda: acked[0], total, STALL_SECONDS, POLL_SECONDS)
        if done is not None:
            done = wait_progress(lambda: _count(counter), total, STALL_SECONDS, COUNT_POLL_SECONDS)
        seconds = done - began if done is not None else None
    finally:
        transport.stop()
        worker.stop()
        counter.close()
    conn = store.connect()
    try:
        rows, distinct = conn.one("SELECT COUNT(*), COUNT(DISTINCT id) FROM events") or (0, 0)
        streams = conn.all("SELECT device, contiguous, highest FROM streams ORDER BY device")
    finally:
        conn.close()
    result = {
        "bench": "hub",
        "measure": "ingest",
        "database": label,
        "events": total,
        "complete": done is not None,
        "seconds": round(seconds, 3) if seconds is not None else None,
        "events_per_s": round(total / seconds, 1) if seconds else None,
        "first_message_ms": round((first[0] - began) * 1000, 1) if first else None,
        "stored": stats.stored,
        "rows": rows,
        "distinct_ids": distinct,
        "duplicates": stats.duplicates,
        "rejected": stats.rejected,
        "batches": stats.batches,
        "mean_batch": round((stats.stored + stats.duplicates) / stats.batches, 1) if stats.batches else None,
        "gaps": sum(1 for _, contiguous, highest in streams if contiguous != highest),
        "every_event_once": rows == total and distinct == total and stats.rejected == 0,
    }
    emit(**result)
    return result


# --------------------------------------------------------------------------------------------------- baseline


def event_rows(events: dict[str, list[bytes]]) -> list[tuple[Any, ...]]:
    """The events table's rows for the payloads, as the ingest builds them (prepared outside the timing)."""
    received = datetime.now(UTC).isoformat(timespec="milliseconds")
    return [
        tuple(event_row(SCHOOL, device, json.loads(raw), received))
        for device, payloads in events.items()
        for raw in payloads
    ]


INSERT_EVENT = (
    "INSERT INTO events(id, school, device, journal, seq, ts, day, kind, person, role, method, late, payload,"
    " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def baseline_sqlite(rows: list[tuple[Any, ...]], path: Path) -> dict[str, Any]:
    """Bare sqlite3: the same schema and pragmas as the hub's store, executemany per 500, one transaction each."""
    from appliance.hub.store import TABLES

    progress(f"bench hub: baseline: bare sqlite3 executemany of {len(rows)} rows, {BASELINE_BATCH} per transaction")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        for statement in TABLES:
            conn.execute(statement)
        began = time.monotonic()
        for start in range(0, len(rows), BASELINE_BATCH):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(INSERT_EVENT, rows[start : start + BASELINE_BATCH])
            conn.execute("COMMIT")
        seconds = time.monotonic() - began
        stored = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    finally:
        conn.close()
    return _baseline_result("sqlite", rows, seconds, stored)


def baseline_postgres(rows: list[tuple[Any, ...]], url: str) -> dict[str, Any]:
    """Bare psycopg: executemany per 500 rows, one transaction each, into the same events table."""
    import psycopg

    from appliance.hub.store import TABLES

    progress(f"bench hub: baseline: bare psycopg executemany of {len(rows)} rows, {BASELINE_BATCH} per transaction")
    sql = INSERT_EVENT.replace("?", "%s")
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in TABLES:
            conn.execute(statement)
        began = time.monotonic()
        for start in range(0, len(rows), BASELINE_BATCH):
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(sql, rows[start : start + BASELINE_BATCH])
        seconds = time.monotonic() - began
        stored = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    return _baseline_result("postgresql", rows, seconds, stored)


def _baseline_result(label: str, rows: list[tuple[Any, ...]], seconds: float, stored: int) -> dict[str, Any]:
    result = {
        "bench": "hub",
        "measure": "baseline",
        "database": label,
        "events": len(rows),
        "batch": BASELINE_BATCH,
        "seconds": round(seconds, 3),
        "events_per_s": round(len(rows) / seconds, 1) if seconds else None,
        "stored": stored,
    }
    emit(**result)
    return result


# --------------------------------------------------------------------------------------------------- PostgreSQL


class PgSchemas:
    """Private schemas in the given PostgreSQL database, dropped at the end: the bench leaves no rows behind."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.created: list[str] = []

    def new(self, purpose: str) -> str:
        """A fresh schema; returns the URL whose connections see only it (search_path)."""
        import psycopg

        name = f"edugate_bench_{purpose}_{secrets.token_hex(4)}"
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f'CREATE SCHEMA "{name}"')
        except psycopg.Error as exc:
            raise BenchError(f"--postgres: cannot create a schema: {str(exc).strip().splitlines()[0]}") from None
        self.created.append(name)
        return with_search_path(self.url, name)

    def drop(self) -> None:
        import psycopg

        if not self.created:
            return
        with contextlib.suppress(psycopg.Error), psycopg.connect(self.url, autocommit=True) as conn:
            for name in self.created:
                conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        self.created.clear()


def with_search_path(url: str, schema: str) -> str:
    """The URL with ``options=-c search_path=SCHEMA`` added to what its query already says."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query["options"] = (query.get("options", "") + f" -c search_path={schema}").strip()
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))  # libpq reads no '+' as space


# --------------------------------------------------------------------------------------------------- latency


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
    stored_at: dict[str, float] = {}
    plan = event_hook(config)

    def hook(conn: Any, school: str, event: dict[str, Any]) -> None:
        plan(conn, school, event)
        if event.get("person"):
            stored_at.setdefault(str(event["person"]), time.monotonic())

    worker = IngestWorker(store, config.mqtt.topic_prefix, [hook])
    transport = _hub_transport(config)
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
    to_webhook, to_hub, hub_to_webhook = [], [], []
    for person, began in written.items():
        arrived = sink.arrivals.get((person, "arrival"))
        stored = stored_at.get(person)
        if arrived is not None:
            to_webhook.append((arrived - began) * 1000)
        if stored is not None:
            to_hub.append((stored - began) * 1000)
        if arrived is not None and stored is not None:
            hub_to_webhook.append((arrived - stored) * 1000)
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


# --------------------------------------------------------------------------------------------------- run


def run(events: int, gates: int, taps: int, postgres: str | None, workdir: Path | None) -> None:
    """Every phase against a private broker; JSON lines on stdout; everything started here is stopped."""
    why = mosquitto_missing()
    if why:
        raise BenchError(why)
    base = Path(tempfile.mkdtemp(prefix="edugate-bench-hub-", dir=workdir))
    broker: BenchBroker | None = None
    schemas = PgSchemas(postgres) if postgres else None
    try:
        with sigterm_interrupts():
            devices = [gate_name(i) for i in range(gates)]
            passwords = {user: secrets.token_urlsafe(18) for user in (HUB_USER, LIVE_DEVICE, *devices)}
            broker = QueueBroker(base / "broker", passwords, events + 10_000)
            broker.start()
            emit(
                bench="hub",
                measure="setup",
                events=events,
                gates=gates,
                taps=taps,
                postgres=postgres is not None,
                broker=f"mosquitto on {broker.host}:{broker.port}, plaintext",
                **machine_info(),
            )
            targets: list[tuple[str, str]] = [("sqlite", f"sqlite:///{base / 'hub.db'}")]
            if schemas is not None:
                targets.append(("postgresql", schemas.new("ingest")))
            ingests: dict[str, dict[str, Any]] = {}
            baselines: dict[str, dict[str, Any]] = {}
            config = hub_config(broker, base, targets[0][1])
            open_session(config)
            for label, url in targets:
                progress(f"bench hub: {len(devices)} gates publish {events} events while the hub is away")
                waiting = backlog(events, gates, seed=len(ingests) + 5)
                publish_s = publish_backlog(broker, passwords, waiting)
                emit(
                    bench="hub",
                    measure="publish",
                    database=label,
                    events=events,
                    seconds=round(publish_s, 3),
                    events_per_s=round(events / publish_s, 1),
                )
                ingests[label] = run_ingest(hub_config(broker, base, url), events, label)
                rows = event_rows(waiting)
                if label == "sqlite":
                    baselines[label] = baseline_sqlite(rows, base / "baseline.db")
                else:
                    assert schemas is not None
                    baselines[label] = baseline_postgres(rows, schemas.new("baseline"))
            latency = run_latency(broker, passwords, base / "live", taps)
            _summary(events, ingests, baselines, latency)
    finally:
        if schemas is not None:
            schemas.drop()
        if broker is not None:
            broker.stop()
        shutil.rmtree(base, ignore_errors=True)


def _summary(
    events: int, ingests: dict[str, dict[str, Any]], baselines: dict[str, dict[str, Any]], latency: dict[str, Any]
) -> None:
    out: dict[str, Any] = {"bench": "hub", "events": events}
    for label, ingest in ingests.items():
        rate, raw = ingest["events_per_s"], baselines[label]["events_per_s"]
        out[f"{label}_events_per_s"] = rate
        out[f"{label}_baseline_events_per_s"] = raw
        out[f"{label}_ratio"] = round(rate / raw, 3) if rate and raw else None
        out[f"{label}_every_event_once"] = ingest["every_event_once"]
    sqlite_rate = ingests["sqlite"]["events_per_s"]
    p95 = latency.get("tap_to_webhook_ms_p95")
    out.update(
        latency_taps=latency["taps"],
        latency_missing=latency["missing"],
        latency_duplicates=latency["duplicates"],
        latency_ms_p50=latency.get("tap_to_webhook_ms_p50"),
        latency_ms_p95=p95,
        latency_ms_max=latency.get("tap_to_webhook_ms_max"),
        target_events_per_s=TARGET_INGEST_PER_S,
        target_latency_p95_ms=TARGET_LATENCY_P95_MS,
    )
    ingest_met = bool(sqlite_rate) and sqlite_rate >= TARGET_INGEST_PER_S
    latency_met = p95 is not None and p95 <= TARGET_LATENCY_P95_MS and latency["missing"] == 0
    out.update(ingest_target_met=ingest_met, latency_target_met=latency_met, target_met=ingest_met and latency_met)
    emit(**out)
