"""``edugate bench sync``: how fast a backlog leaves the gate, and how soon a live tap reaches the hub.

A gate that was offline for days must empty its journal quickly once the network is back, and
on a normal morning a tap should reach the hub (and so the parent's phone) within a moment.
Everything runs against a private Mosquitto started here on 127.0.0.1 with the production
broker's settings that matter for speed (logins, the per-device ACL, 100 messages in flight
per client, no Nagle; TLS 1.2 unless ``--no-tls``); persistence is off, since a production
broker writes its database only every 60 s and at shutdown, never per message. A hub stand-in
(:mod:`appliance.bench.mqtt_hub`) subscribes at QoS 1 from its own process, like a real hub on
another machine, and checks that each device's seqs arrive once and in order.

1. Drain: a fresh journal prefilled with realistic events (setup, one transaction) is sent by the
   real SyncService, wired as the daemon wires it. Timed until every event is marked synced in
   the journal, and until the hub has them all. A drain that stops moving for 30 s is reported
   as such (``complete: false``, ``stuck_in_flight``) and the run goes on.
2. Baseline, before and after the drain: a bare paho-mqtt QoS 1 publisher sends the same JSON
   bytes with the same in-flight window as fast as it can and waits for every PUBACK.
3. Live, in process: the drain's service keeps running while events are committed one by one,
   20-50 ms apart; commit -> PUBACK and commit -> hub.
4. Live, end to end: a real ``edugate run`` subprocess with a socket lane; card UIDs written to
   the lane, 20-50 ms apart; written -> hub, with the console acknowledgement in between.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import secrets
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta, timezone
from datetime import time as dt_time
from pathlib import Path
from types import FrameType
from typing import Any

from appliance.bench.stats import emit, machine_info, progress, summary
from appliance.events import Direction, EventDraft, Kind, Method

TARGET_EVENTS_PER_S = 2000
TARGET_RATIO = 0.5
TARGET_LATENCY_P99_MS = 200

SCHOOL = "bench-school"
PREFIX = "edugate"
DRAIN_DEVICE = "bench-gate"
LIVE_DEVICE = "bench-live"
RAW_DEVICE = "bench-raw"
HUB_USER = "hub"
TAP_GAP = (0.020, 0.050)  # seconds between two live taps
RAW_OUTSTANDING = 30_000  # baseline: messages queued in paho at most (its message ids are 16-bit)
STALL_SECONDS = 30.0  # no progress for this long means something is broken, not slow
POLL_SECONDS = 0.01  # progress polling: coarse enough not to take the GIL from the threads measured
READY_TIMEOUT = 60.0
ZONE = timezone(timedelta(hours=7))
MORNING_RUSH = (dt_time(6, 30), dt_time(7, 45))  # the drain's events: arrivals then departures, day after day
AFTERNOON_RUSH = (dt_time(16, 15), dt_time(17, 30))

# The production broker's rules that cost time per message (config/mosquitto/edugate.conf and acl).
BROKER_SETTINGS = {
    "persistence": "false",
    "allow_anonymous": "false",
    "max_inflight_messages": "100",
    "max_queued_messages": "200000",
    "max_queued_bytes": "268435456",
    "set_tcp_nodelay": "true",
}
ACL = """pattern write edugate/+/%u/events
pattern write edugate/+/%u/status
pattern write edugate/+/%u/result
pattern read edugate/+/%u/downlink/#
user hub
topic read edugate/+/+/events
topic read edugate/+/+/status
topic read edugate/+/+/result
topic write edugate/+/+/downlink/#
"""


class BenchError(RuntimeError):
    """The bench could not run or something was lost; the message says what."""


def _tool(name: str) -> str | None:
    """Mosquitto's programs live in /usr/sbin and /usr/bin, which a user's PATH may lack."""
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/bin"):
        candidate = Path(folder) / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def mosquitto_missing() -> str | None:
    """Why the bench's broker cannot run here, or None."""
    for name in ("mosquitto", "mosquitto_passwd"):
        if _tool(name) is None:
            return f"{name} is not installed (apt-get install mosquitto)"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def events_topic(device: str, school: str = SCHOOL) -> str:
    return f"{PREFIX}/{school}/{device}/events"


class BenchBroker:
    """A private Mosquitto on 127.0.0.1: passwords for ``users``, the production ACL, TLS if a CA is given."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path, users: dict[str, str], pki: Any | None) -> None:
        self.workdir = workdir
        self.users = users
        self.pki = pki
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "mosquitto.log"
        workdir.mkdir(parents=True, exist_ok=True)

    def _write_files(self) -> Path:
        passwd = self.workdir / "passwd"
        passwd.write_text("".join(f"{user}:{password}\n" for user, password in self.users.items()))
        passwd.chmod(0o600)
        hashed = subprocess.run([_tool("mosquitto_passwd") or "", "-U", str(passwd)], capture_output=True, text=True)
        if hashed.returncode:
            raise BenchError(f"mosquitto_passwd -U failed: {hashed.stdout}{hashed.stderr}")
        acl = self.workdir / "acl"
        acl.write_text(ACL)
        lines = [
            f"user {_user_name()}",
            f"log_dest file {self.log}",
            "log_type error",
            *(f"{key} {value}" for key, value in BROKER_SETTINGS.items()),
            f"password_file {passwd}",
            f"acl_file {acl}",
            f"listener {self.port} {self.host}",
        ]
        if self.pki is not None:
            lines += [
                f"cafile {self.pki.ca}",
                f"certfile {self.pki.server_cert}",
                f"keyfile {self.pki.server_key}",
                "tls_version tlsv1.2",
            ]
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout: float = 10.0) -> None:
        """Start on a free port; try another port if the chosen one was taken in between."""
        for _ in range(3):
            self.port = free_port()
            conf = self._write_files()
            with (self.workdir / "mosquitto.out").open("ab") as out:
                self.proc = subprocess.Popen(
                    [_tool("mosquitto") or "mosquitto", "-c", str(conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                )
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2):
                    return
                time.sleep(0.02)
            self.stop()
        raise BenchError(f"mosquitto did not start: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_tail(self) -> str:
        text = ""
        for name in ("mosquitto.log", "mosquitto.out"):
            with contextlib.suppress(OSError):
                text += (self.workdir / name).read_text(errors="replace")
        return text[-1500:].strip() or "(no log)"


def _user_name() -> str:
    """Mosquitto started as root switches to this user; it must be able to read the bench's files."""
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


class HubProcess:
    """The hub stand-in child (see mqtt_hub.py): one JSON command line in, one answer line out."""

    def __init__(self, settings: dict[str, Any], workdir: Path) -> None:
        self.stderr_path = workdir / "hub.err"
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance.bench.mqtt_hub"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        ready = self._ask(settings, timeout=30)
        if not ready.get("ready"):
            raise BenchError(f"hub stand-in could not subscribe: {ready.get('error')}")

    def _ask(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if readable else ""
        if not line:
            raise BenchError(f"hub stand-in gave no answer: {self.stderr_path.read_text(errors='replace')[-1500:]}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def wait(self, topic: str, count: int) -> dict[str, Any]:
        """The topic's tally once ``count`` distinct seqs arrived, or after STALL_SECONDS without progress."""
        return self._ask({"cmd": "wait", "topic": topic, "count": count, "stall": STALL_SECONDS}, timeout=86400)

    def arrivals(self, topic: str) -> dict[str, float]:
        arrivals: dict[str, float] = self._ask({"cmd": "arrivals", "topic": topic}, timeout=30)["arrivals"]
        return arrivals

    def wait_online(self, device: str, timeout: float) -> bool:
        return bool(self._ask({"cmd": "status", "device": device, "timeout": timeout}, timeout + 5)["online"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, BenchError):
                self._ask({"cmd": "stop"}, timeout=5)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


# --------------------------------------------------------------------------------------------------- events


def card_uid(rng: random.Random) -> str:
    """A random 7-byte NXP-style UID (the drain's cards; live taps use :func:`live_uid`)."""
    return "04" + "".join(f"{rng.randrange(256):02X}" for _ in range(6))


def live_uid(index: int) -> str:
    """A distinct UID per live tap, outside the drain's 04... range, so the debounce never merges two."""
    return f"08{0xB0_0000_0000 + index:012X}"


def realistic_drafts(count: int, seed: int = 4) -> Iterator[EventDraft]:
    """A school's days at the gate: 2,000 students and 120 staff arriving in the morning rush and
    leaving in the afternoon one, some late, a few unknown or withdrawn cards, staff by card and face;
    timestamps in ms with the +07:00 offset, as the policy writes them."""
    rng = random.Random(seed)
    students = [(f"HS{i:05d}", card_uid(rng)) for i in range(1, 2001)]
    staff = [(f"GV{i:04d}", card_uid(rng)) for i in range(1, 121)]
    moment = datetime.combine(date(2026, 11, 23), MORNING_RUSH[0], ZONE)
    for _ in range(count):
        moment += timedelta(milliseconds=rng.randint(50, 1500))
        if moment.time() > MORNING_RUSH[1] and moment.time() < AFTERNOON_RUSH[0]:
            moment = datetime.combine(moment.date(), AFTERNOON_RUSH[0], ZONE)
        elif moment.time() > AFTERNOON_RUSH[1]:
            moment = datetime.combine(moment.date() + timedelta(days=1), MORNING_RUSH[0], ZONE)
        arriving = moment.time() <= MORNING_RUSH[1]
        common: dict[str, Any] = {
            "ts": moment.isoformat(timespec="milliseconds"),
            "clock_ok": True,
            "reader": "lane-in" if arriving else "lane-out",
            "direction": Direction.IN if arriving else Direction.OUT,
        }
        roll = rng.random()
        if roll < 0.02:
            yield EventDraft(Kind.UNKNOWN_CARD, card_uid=card_uid(rng), **common)
            continue
        kind = Kind.ARRIVAL if arriving else Kind.DEPARTURE
        if roll < 0.03:
            person, uid = rng.choice(students)
            yield EventDraft(Kind.REJECTED, person=person, role="student", card_uid=uid, reason="inactive", **common)
        elif roll < 0.09:
            person, uid = rng.choice(staff)
            score = round(rng.uniform(0.45, 0.8), 4)
            yield EventDraft(
                kind, method=Method.CARD_FACE, person=person, role="staff", card_uid=uid, face_score=score, **common
            )
        else:
            person, uid = rng.choice(students)
            late = arriving and rng.random() < 0.08
            minutes = (rng.randint(1, 40) if late else 0) if arriving else None
            yield EventDraft(
                kind,
                person=person,
                role="student",
                card_uid=uid,
                late=late if arriving else None,
                minutes_late=minutes,
                **common,
            )


def prefill(path: Path, device: str, count: int) -> list[bytes]:
    """Journal ``count`` events in one transaction (setup, not measured); their wire payloads in seq order."""
    from appliance.journal import EventJournal, open_database

    database = open_database(path, writer=True)
    try:
        journal = EventJournal(database, device)
        database.conn.execute("BEGIN")
        for draft in realistic_drafts(count):
            journal.append(draft)
        database.conn.execute("COMMIT")
        rows = database.conn.execute("SELECT payload FROM events ORDER BY seq").fetchall()
    finally:
        database.close()
    return [payload.encode("utf-8") for (payload,) in rows]


def check_payloads(payloads: list[bytes], sample: int = 500) -> None:
    """The prefilled events must be ones a hub accepts: validate a spread sample against the event schema."""
    import jsonschema

    from appliance.events import event_schema

    validator = jsonschema.Draft202012Validator(event_schema())
    step = max(1, len(payloads) // sample)
    for payload in payloads[::step]:
        errors = sorted(validator.iter_errors(json.loads(payload)), key=str)
        if errors:
            raise BenchError(f"bench event does not match the event schema: {errors[0].message}")


# --------------------------------------------------------------------------------------------------- MQTT


def tls_context(ca: Path | None) -> ssl.SSLContext | None:
    """The same client context as the gate's transport: the CA pinned, TLS 1.2 at least."""
    if ca is None:
        return None
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _wait_progress(done: Callable[[], int], total: int) -> float | None:
    """Poll ``done()`` until it reaches ``total``: time.monotonic() then, or None after STALL_SECONDS
    without progress."""
    last, last_change = -1, time.monotonic()
    while True:
        now_done = done()
        now = time.monotonic()
        if now_done >= total:
            return now
        if now_done != last:
            last, last_change = now_done, now
        elif now - last_change > STALL_SECONDS:
            return None
        time.sleep(POLL_SECONDS)


def raw_publish(
    broker: BenchBroker, password: str, ca: Path | None, window: int, payloads: list[bytes], topic: str
) -> tuple[float, float]:
    """A bare paho-mqtt 2.x QoS 1 publisher: connect, publish everything, wait for every PUBACK.

    paho keeps all but ``window`` messages in its own queue and sends them as PUBACKs free the window.
    It numbers messages with 16-bit ids and silently replaces a pending message whose id comes round
    again, so the loop keeps at most RAW_OUTSTANDING messages published and not yet acknowledged.

    Returns (monotonic start before the connect, monotonic time of the last PUBACK).
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"{RAW_DEVICE}-{secrets.token_hex(3)}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)
    client.username_pw_set(RAW_DEVICE, password)
    context = tls_context(ca)
    if context is not None:
        client.tls_set_context(context)
    connected = threading.Event()
    room = threading.Event()
    acks = [0, 0]  # acknowledged, refused
    published = 0

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        connected.set()

    def on_publish(client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        acks[0] += 1
        acks[1] += reason.is_failure
        if published - acks[0] <= RAW_OUTSTANDING // 2:
            room.set()

    client.on_connect = on_connect
    client.on_publish = on_publish
    began = time.monotonic()
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise BenchError("baseline publisher: no CONNACK within 10 s")
        for payload in payloads:
            if published - acks[0] >= RAW_OUTSTANDING:
                room.clear()
                if published - acks[0] >= RAW_OUTSTANDING and not room.wait(STALL_SECONDS):
                    raise BenchError(f"baseline publisher: no PUBACK for {STALL_SECONDS:.0f} s: {broker.log_tail()}")
            client.publish(topic, payload, qos=1)
            published += 1
        finished = _wait_progress(lambda: acks[0], len(payloads))
        if finished is None:
            raise BenchError(f"baseline publisher: stuck at {acks[0]}/{len(payloads)} PUBACKs: {broker.log_tail()}")
    finally:
        client.disconnect()
        client.loop_stop()
    if acks[1]:
        raise BenchError(f"the broker refused {acks[1]} baseline messages: {broker.log_tail()}")
    return began, finished


def _rate(count: int, seconds: float | None) -> float | None:
    return round(count / seconds, 1) if seconds else None


def _delivery(tally: dict[str, Any], count: int) -> dict[str, Any]:
    """What the hub saw of one topic, in the bench's JSON."""
    return {
        "hub_received": tally["received"],
        "hub_distinct": tally["distinct"],
        "missing": count - tally["distinct"],
        "duplicates": tally["duplicates"],
        "out_of_order": tally["out_of_order"],
        "in_order": tally["out_of_order"] == 0,
        "every_seq_once": bool(tally["exact"]) and tally["duplicates"] == 0,
    }


def run_raw(
    broker: BenchBroker, hub: HubProcess, password: str, ca: Path | None, window: int, payloads: list[bytes], run: int
) -> dict[str, Any]:
    topic = events_topic(RAW_DEVICE, school=f"raw-{run}")
    progress(f"bench sync: baseline run {run}: bare paho publisher, {len(payloads)} messages")
    began, acked = raw_publish(broker, password, ca, window, payloads, topic)
    tally = hub.wait(topic, len(payloads))
    seconds = acked - began
    received = tally["complete_at"] - began if tally["complete_at"] is not None else None
    result = {
        "bench": "sync",
        "measure": "raw",
        "run": run,
        "events": len(payloads),
        "seconds": round(seconds, 3),
        "events_per_s": _rate(len(payloads), seconds),
        "received_seconds": round(received, 3) if received is not None else None,
        "received_events_per_s": _rate(len(payloads), received),
        **_delivery(tally, len(payloads)),
    }
    emit(**result)
    return result


# --------------------------------------------------------------------------------------------------- drain


def _gate_config(journal: Path, device: str, broker: BenchBroker, ca: Path | None, password: Path, window: int) -> Any:
    from appliance.config import parse_config

    return parse_config(
        {
            "device": {"id": device, "school": SCHOOL},
            "journal": {"path": str(journal), "min_free_mb": 1},
            "sync": {
                "enabled": True,
                "host": broker.host,
                "port": broker.port,
                "tls": ca is not None,
                **({"ca_file": str(ca)} if ca is not None else {}),
                "username": device,
                "password_file": str(password),
                "window": window,
            },
        },
        "<bench sync>",
    )


class AckClock:
    """Times each event's PUBACK: wraps the transport's publish (mid -> seq) and its on_ack callback."""

    def __init__(self, transport: Any, events_topic: str) -> None:
        self.transport = transport
        self.topic = events_topic
        self.seq_of_mid: dict[int, int] = {}
        self.acked_at: dict[int, float] = {}
        self._publish = transport.publish
        self._on_ack = transport.on_ack

    def install(self) -> None:
        self.transport.publish = self.publish
        self.transport.on_ack = self.on_ack

    def remove(self) -> None:
        self.transport.publish = self._publish
        self.transport.on_ack = self._on_ack

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int | None:
        mid: int | None = self._publish(topic, payload, retain)
        if mid is not None and topic == self.topic:
            self.seq_of_mid[mid] = int(json.loads(payload)["seq"])
        return mid

    def on_ack(self, mid: int, error: str | None) -> None:
        self.acked_at.setdefault(mid, time.monotonic())
        self._on_ack(mid, error)

    def puback_times(self) -> dict[int, float]:
        """seq -> PUBACK time (an ack can arrive before publish() returned, so join at the end)."""
        return {seq: self.acked_at[mid] for mid, seq in self.seq_of_mid.items() if mid in self.acked_at}


def _live_draft(index: int) -> EventDraft:
    return EventDraft(
        Kind.ARRIVAL,
        datetime.now(ZONE).isoformat(timespec="milliseconds"),
        True,
        person=f"HS{index + 1:05d}",
        role="student",
        reader="lane-in",
        direction=Direction.IN,
        card_uid=live_uid(index),
        late=False,
        minutes_late=0,
    )


def run_drain(
    journal_path: Path,
    broker: BenchBroker,
    hub: HubProcess,
    ca: Path | None,
    password_file: Path,
    window: int,
    count: int,
    taps: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The drain of ``count`` events, then ``taps`` live commits through the same running service."""
    from appliance.journal import EventJournal, open_database
    from appliance.sync.service import SyncService

    config = _gate_config(journal_path, DRAIN_DEVICE, broker, ca, password_file, window)
    topic = events_topic(DRAIN_DEVICE)
    database = open_database(journal_path, writer=True)
    service: SyncService | None = None
    try:
        journal = EventJournal(database, DRAIN_DEVICE)
        service = SyncService(
            config, journal, lambda: {"readers": [], "camera": None, "clock_ok": True}, clock_ok=lambda: True
        )
        uplink = service.uplink
        progress(f"bench sync: drain: {count} events through SyncService (window {window}, batch {config.sync.batch})")
        began = time.monotonic()
        service.start()
        synced = _wait_progress(lambda: uplink.acked_total, count)
        if synced is None:
            progress(
                f"bench sync: drain stalled: {uplink.acked_total}/{count} marked synced, {uplink.inflight()} in "
                f"flight for {STALL_SECONDS:.0f} s ({service.health()})"
            )
        tally = hub.wait(topic, count)
        unsynced = database.conn.execute("SELECT COUNT(*) FROM events WHERE synced_at IS NULL").fetchone()[0]
        received = tally["complete_at"] - began if tally["complete_at"] is not None else None
        synced_seconds = synced - began if synced is not None else None
        drain = {
            "bench": "sync",
            "measure": "drain",
            "events": count,
            "window": window,
            "batch": config.sync.batch,
            "complete": synced is not None,
            "synced_events": uplink.acked_total,
            "stuck_in_flight": uplink.inflight() if synced is None else 0,
            "synced_seconds": round(synced_seconds, 3) if synced_seconds is not None else None,
            "synced_events_per_s": _rate(count, synced_seconds),
            "received_seconds": round(received, 3) if received is not None else None,
            "received_events_per_s": _rate(count, received),
            "unsynced_after": unsynced,
            "published": uplink.published,
            **_delivery(tally, count),
        }
        emit(**drain)

        progress(
            f"bench sync: live in process: {taps} commits {TAP_GAP[0] * 1000:.0f}-{TAP_GAP[1] * 1000:.0f} ms apart"
        )
        clock = AckClock(service.transport, topic)
        clock.install()
        rng = random.Random(11)
        committed: dict[int, float] = {}
        uid_seq: dict[str, int] = {}
        for index in range(taps):
            time.sleep(rng.uniform(*TAP_GAP))
            event = journal.append(_live_draft(index))
            committed[event.seq] = time.monotonic()
            uid_seq[live_uid(index)] = event.seq
            service.wake()
        live_tally = hub.wait(topic, count + taps)
        arrivals = hub.arrivals(topic)
        clock.remove()
        pubacks = clock.puback_times()
        to_puback = [(pubacks[seq] - t) * 1000 for seq, t in committed.items() if seq in pubacks]
        to_hub = [(arrivals[uid] - committed[seq]) * 1000 for uid, seq in uid_seq.items() if uid in arrivals]
        live = {
            "bench": "sync",
            "measure": "live_in_process",
            "taps": taps,
            "pubacks": len(to_puback),
            "hub_received": len(to_hub),
            "duplicates": live_tally["duplicates"] - tally["duplicates"],
            "in_order": live_tally["out_of_order"] == 0,
            **summary(to_puback, "commit_to_puback_ms"),
            **summary(to_hub, "commit_to_hub_ms"),
        }
        emit(**live)
        return drain, live
    finally:
        if service is not None:
            service.stop()
        database.close()


# --------------------------------------------------------------------------------------------------- daemon


_ACK_NAME = re.compile(r"Học sinh (\d{5})")


def _toml(value: Any) -> str:
    """TOML for the few value types of the bench's gate.toml (JSON strings are valid TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))


def daemon_toml(
    journal: Path,
    lane: Path,
    broker: BenchBroker,
    ca: Path | None,
    password: Path,
    window: int = 100,
    show_names: bool = True,
    device: str = LIVE_DEVICE,
    school: str = SCHOOL,
) -> str:
    """A gate whose every tap of a known card is an arrival (windows all day), synced to the bench broker.

    ``show_names`` puts the student's name in the console acknowledgement (what ``bench sync`` reads).
    """
    whole_day = ["00:00", "23:59"]
    sections: dict[str, dict[str, Any]] = {
        "device": {"id": device, "school": school},
        "journal": {"path": str(journal), "min_free_mb": 1},
        "policy": {"debounce_seconds": 30},
        "policy.student": {"arrival_window": whole_day, "departure_window": whole_day, "start": "23:59"},
        "policy.staff": {"arrival_window": whole_day, "departure_window": whole_day, "start": "23:59"},
        "feedback": {"outputs": ["console"], "show_names": show_names},
        "logging": {"level": "WARNING"},
        "sync": {
            "enabled": True,
            "host": broker.host,
            "port": broker.port,
            "tls": ca is not None,
            **({"ca_file": str(ca)} if ca is not None else {}),
            "username": device,
            "password_file": str(password),
            "window": window,
        },
    }
    text = "".join(
        f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items()) + "\n"
        for name, keys in sections.items()
    )
    reader = {"name": "lane-in", "type": "socket", "path": str(lane), "direction": "in"}
    return text + "[[readers]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in reader.items())


def _enroll(journal: Path, taps: int) -> None:
    """The live taps' cards belong to students, so each tap is a real arrival (not an unknown card)."""
    from appliance.journal import open_database
    from appliance.journal.roster_store import RosterStore
    from appliance.roster.model import Person, Role

    database = open_database(journal, writer=True)
    try:
        people = [
            Person(f"HS{i + 1:05d}", f"Học sinh {i:05d}", Role.STUDENT, f"{6 + i % 4}A", True, (live_uid(i),))
            for i in range(taps)
        ]
        RosterStore(database).apply(people, replace=True)
    finally:
        database.close()


class DaemonRun:
    """``edugate run`` as a child: READY=1 over sd_notify, console acknowledgements timed as they are printed."""

    def __init__(self, config: Path, workdir: Path) -> None:
        self.log = workdir / "daemon.log"
        self.notify_path = workdir / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.acks: dict[int, float] = {}
        self.other_lines: list[str] = []
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(self.notify_path),
            "PYTHONUNBUFFERED": "1",
            "PYTHONIOENCODING": "utf-8",
        }
        for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance.cli", "run", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                cwd=workdir,
            )
        self._reader = threading.Thread(target=self._read_acks, name="bench-acks", daemon=True)
        self._reader.start()

    def _read_acks(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            now = time.monotonic()
            line = raw.decode("utf-8", errors="replace")
            found = _ACK_NAME.search(line)
            if found and line.startswith("✔"):
                self.acks.setdefault(int(found.group(1)), now)
            else:
                self.other_lines.append(line.rstrip())

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        self.notify.settimeout(0.2)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"edugate run exited with {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(TimeoutError):
                if b"READY=1" in self.notify.recv(4096).split(b"\n"):
                    return
        raise BenchError(f"edugate run was not ready within {READY_TIMEOUT:.0f} s: {self.log_tail()}")

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-1500:].strip() or "(empty log)"
        return "(no log)"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.notify.close()
        return self.proc.returncode


def _connect_lane(path: Path, timeout: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        lane = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            lane.connect(str(path))
            return lane
        except (FileNotFoundError, ConnectionRefusedError):
            lane.close()
            if time.monotonic() > deadline:
                raise BenchError(f"the daemon's socket lane {path} never accepted a connection") from None
            time.sleep(0.05)


def run_daemon_latency(
    workdir: Path, broker: BenchBroker, hub: HubProcess, ca: Path | None, password: Path, window: int, taps: int
) -> dict[str, Any]:
    """Card UIDs written to a real daemon's socket lane -> the hub has the event (one clock: CLOCK_MONOTONIC)."""
    from appliance.journal import open_database
    from appliance.journal.events import journal_stats

    workdir.mkdir(parents=True, exist_ok=True)
    journal = workdir / "journal.db"
    lane_path = workdir / "lane.sock"
    _enroll(journal, taps)
    config = workdir / "gate.toml"
    config.write_text(daemon_toml(journal, lane_path, broker, ca, password, window))
    progress(f"bench sync: live end to end: edugate run, {taps} taps on a socket lane")
    daemon = DaemonRun(config, workdir)
    written: dict[int, float] = {}
    lane: socket.socket | None = None
    try:
        daemon.wait_ready()
        if not hub.wait_online(LIVE_DEVICE, READY_TIMEOUT):
            raise BenchError(f"the daemon never said online on its status topic: {daemon.log_tail()}")
        lane = _connect_lane(lane_path)
        rng = random.Random(13)
        for index in range(taps):
            time.sleep(rng.uniform(*TAP_GAP))
            line = f"{live_uid(index)}\n".encode()
            written[index] = time.monotonic()
            lane.sendall(line)
        topic = events_topic(LIVE_DEVICE)
        tally = hub.wait(topic, taps)
        arrivals = hub.arrivals(topic)
    finally:
        if lane is not None:
            lane.close()
        exit_code = daemon.stop()
    database = open_database(journal, readonly=True)
    try:
        stats = journal_stats(database)
    finally:
        database.close()
    to_hub, to_ack, ack_to_hub = [], [], []
    for index, began in written.items():
        arrived = arrivals.get(live_uid(index))
        acked = daemon.acks.get(index)
        if arrived is not None:
            to_hub.append((arrived - began) * 1000)
        if acked is not None:
            to_ack.append((acked - began) * 1000)
        if arrived is not None and acked is not None:
            ack_to_hub.append((arrived - acked) * 1000)
    result = {
        "bench": "sync",
        "measure": "latency",
        "taps": taps,
        "acked": len(to_ack),
        "daemon_events": stats.events,
        "daemon_unsynced_after_stop": stats.unsynced,
        "daemon_exit_code": exit_code,
        **_delivery(tally, taps),
        **summary(to_hub, "tap_to_hub_ms"),
        **summary(to_ack, "tap_to_ack_ms"),
        **summary(ack_to_hub, "ack_to_hub_ms"),
    }
    emit(**result)
    return result


# --------------------------------------------------------------------------------------------------- run


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(events: int, taps: int, tls: bool, window: int) -> None:
    """Run every phase against a private broker; JSON lines on stdout; everything started here is stopped."""
    why = mosquitto_missing()
    if why:
        raise BenchError(why)
    workdir = Path(tempfile.mkdtemp(prefix="edugate-bench-sync-"))
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    broker: BenchBroker | None = None
    hub: HubProcess | None = None
    try:
        pki = None
        if tls:
            from appliance.bench.mqtt_pki import make_broker_pki

            pki = make_broker_pki(workdir / "pki")
        ca = pki.ca if pki is not None else None
        passwords = {user: secrets.token_urlsafe(18) for user in (HUB_USER, DRAIN_DEVICE, LIVE_DEVICE, RAW_DEVICE)}
        password_files = {}
        for user in (DRAIN_DEVICE, LIVE_DEVICE):
            path = workdir / f"password-{user}"
            path.write_text(passwords[user] + "\n")
            path.chmod(0o600)
            password_files[user] = path

        progress(f"bench sync: prefilling a journal with {events} events (setup, not timed)")
        journal_path = workdir / "drain" / "journal.db"
        began = time.monotonic()
        payloads = prefill(journal_path, DRAIN_DEVICE, events)
        prefill_s = time.monotonic() - began
        check_payloads(payloads)

        broker = BenchBroker(workdir / "broker", passwords, pki)
        broker.start()
        hub = HubProcess(
            {
                "host": broker.host,
                "port": broker.port,
                "ca": str(ca) if ca else None,
                "username": HUB_USER,
                "password": passwords[HUB_USER],
            },
            workdir,
        )
        emit(
            bench="sync",
            measure="setup",
            events=events,
            taps=taps,
            tls=tls,
            window=window,
            payload_bytes_mean=round(sum(map(len, payloads)) / len(payloads), 1),
            prefill_seconds=round(prefill_s, 2),
            broker=f"mosquitto on {broker.host}:{broker.port}",
            broker_settings=BROKER_SETTINGS,
            **machine_info(),
        )
        raw_runs = [run_raw(broker, hub, passwords[RAW_DEVICE], ca, window, payloads, 1)]
        drain, live = run_drain(journal_path, broker, hub, ca, password_files[DRAIN_DEVICE], window, events, taps)
        raw_runs.append(run_raw(broker, hub, passwords[RAW_DEVICE], ca, window, payloads, 2))
        latency = run_daemon_latency(workdir / "live", broker, hub, ca, password_files[LIVE_DEVICE], window, taps)
        _summary(events, tls, window, drain, raw_runs, live, latency)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if hub is not None:
            hub.stop()
        if broker is not None:
            broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _summary(
    events: int,
    tls: bool,
    window: int,
    drain: dict[str, Any],
    raw_runs: list[dict[str, Any]],
    live: dict[str, Any],
    latency: dict[str, Any],
) -> None:
    raw_rates = [r["events_per_s"] for r in raw_runs if r["events_per_s"]]
    raw = sum(raw_rates) / len(raw_rates) if raw_rates else None
    rate = drain["synced_events_per_s"]
    ratio = round(rate / raw, 3) if rate and raw else None
    p99 = latency.get("tap_to_hub_ms_p99")
    drain_met = bool(rate) and rate >= TARGET_EVENTS_PER_S
    ratio_met = ratio is not None and ratio >= TARGET_RATIO
    latency_met = p99 is not None and p99 <= TARGET_LATENCY_P99_MS
    emit(
        bench="sync",
        events=events,
        tls=tls,
        window=window,
        drain_complete=drain["complete"],
        drain_events_per_s=rate,
        drain_received_events_per_s=drain["received_events_per_s"],
        raw_events_per_s=round(raw, 1) if raw else None,
        raw_runs_events_per_s=raw_rates,
        ratio=ratio,
        missing=drain["missing"],
        duplicates=drain["duplicates"],
        in_order=drain["in_order"],
        every_seq_once=drain["every_seq_once"],
        latency_taps=latency["taps"],
        latency_missing=latency["missing"],
        latency_ms_p50=latency.get("tap_to_hub_ms_p50"),
        latency_ms_p90=latency.get("tap_to_hub_ms_p90"),
        latency_ms_p99=p99,
        latency_ms_max=latency.get("tap_to_hub_ms_max"),
        in_process_commit_to_puback_ms_p50=live.get("commit_to_puback_ms_p50"),
        in_process_commit_to_puback_ms_p99=live.get("commit_to_puback_ms_p99"),
        in_process_commit_to_hub_ms_p99=live.get("commit_to_hub_ms_p99"),
        target_events_per_s=TARGET_EVENTS_PER_S,
        target_ratio=TARGET_RATIO,
        target_latency_p99_ms=TARGET_LATENCY_P99_MS,
        drain_target_met=drain_met,
        ratio_target_met=ratio_met,
        latency_target_met=latency_met,
        target_met=drain_met and ratio_met and latency_met,
    )
