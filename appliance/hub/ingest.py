"""Gate messages -> hub database, exactly once, acknowledged to the broker only after the commit.

Events arrive at least once (a gate resends what it is not sure of), so each is stored under
its globally unique id and a repeat changes nothing. Messages are taken in batches, one
transaction per batch; only after the COMMIT are their PUBACKs sent, so a hub killed at any
moment leaves the broker holding (and later redelivering) whatever it had not stored.

Per gate and journal the hub keeps ``contiguous`` (every seq up to it is here) and
``highest``; a difference is a gap, which the resync loop asks the gate to fill. Whatever must
follow an event (parent notifications) is planned by hooks inside the same transaction, so it
happens once or not at all.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, tzinfo
from functools import cache
from importlib import resources
from typing import Any
from zoneinfo import ZoneInfo

import jsonschema

from appliance.config.hub import HubSection
from appliance.events import event_schema
from appliance.hub import gates
from appliance.hub.store import Connection, Store, StoreError
from appliance.sync.downlink import describe_schema_error

log = logging.getLogger(__name__)
DEFAULT_ZONE = ZoneInfo(HubSection().timezone)  # hub.timezone's default; the service passes the configured one

BATCH = 500
BATCH_WAIT = 0.02  # seconds to gather more messages once one arrived


@dataclass
class Incoming:
    topic: str
    payload: bytes
    ack: Callable[[], None] = lambda: None
    acknowledged: bool = False

    def acknowledge(self) -> None:
        """PUBACK once: a batch retried after its first messages were stored one by one must not ack them
        again, since the broker may have given their packet id to a message not stored yet."""
        if not self.acknowledged:
            self.acknowledged = True
            self.ack()


# Runs inside the ingest transaction for every newly stored event: (connection, school, event).
EventHook = Callable[[Connection, str, dict[str, Any]], None]


@dataclass
class IngestStats:
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    statuses: int = 0
    results: int = 0
    batches: int = 0
    hook_failures: int = 0  # events stored without what a hook adds (a parent notification)
    last_error: str | None = None
    by_device: dict[str, int] = field(default_factory=dict)


@cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    """The repository's schema for gate messages: event, status or result."""
    if name == "event":
        schema = event_schema()
    else:
        schema = json.loads(resources.files("appliance.schema").joinpath(f"{name}.schema.json").read_text("utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _check_schema(name: str, data: dict[str, Any]) -> None:
    error = jsonschema.exceptions.best_match(_validator(name).iter_errors(data))
    if error is not None:
        raise Rejected(f"{name} schema: {describe_schema_error(error, '(' + name + ')')}")


def is_transient(exc: BaseException, conn: Connection) -> bool:
    """A database that is busy, down or unreachable (retry the batch) rather than a message it cannot hold."""
    if conn.broken or isinstance(exc, sqlite3.OperationalError | StoreError):
        return True
    return type(exc).__module__.startswith("psycopg") and type(exc).__name__ in ("OperationalError", "InterfaceError")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def parse_topic(topic: str, prefix: str) -> tuple[str, str, str] | None:
    """(school, device, kind) of ``{prefix}/{school}/{device}/{events|status|result}``."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != prefix or parts[3] not in ("events", "status", "result"):
        return None
    return parts[1], parts[2], parts[3]


class Rejected(Exception):
    pass


INSERT_EVENT = (
    "INSERT INTO events(id, school, device, journal, seq, ts, day, kind, person, role, method, late, payload,"
    " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING"
)


def local_day(ts: str, zone: tzinfo) -> str:
    """The school day of a timestamp, in the hub's zone: a gate whose clock is set to UTC still files a
    06:45 arrival under the right day."""
    return datetime.fromisoformat(ts).astimezone(zone).date().isoformat()


def event_row(school: str, device: str, data: dict[str, Any], received_at: str, zone: tzinfo) -> list[Any]:
    """The events table's row for a validated event (also what the ingest benchmark's baseline inserts)."""
    return [
        data["id"],
        school,
        device,
        data["journal"],
        data["seq"],
        data["ts"],
        local_day(data["ts"], zone),
        data["kind"],
        data.get("person"),
        data.get("role"),
        data["method"],
        None if data.get("late") is None else int(data["late"]),
        json.dumps(data, ensure_ascii=False, separators=(",", ":"), sort_keys=True),
        received_at,
    ]


def _has_nul(value: Any) -> bool:
    """Whether a decoded JSON value holds U+0000 anywhere (PostgreSQL text refuses it; SQLite would keep it)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _storable_text(raw: bytes) -> str:
    """A refused payload as text any database keeps: bad UTF-8 and NUL bytes become U+FFFD, at most 10,000 chars."""
    return raw.decode("utf-8", "replace").replace("\x00", "\ufffd")[:10000]


class Ingest:
    """Stores batches of gate messages; used by the hub's ingest thread and by the benchmarks."""

    def __init__(
        self, conn: Connection, prefix: str, hooks: list[EventHook] | None = None, zone: tzinfo = DEFAULT_ZONE
    ) -> None:
        self.conn = conn
        self.prefix = prefix
        self.zone = zone
        self.hooks = hooks if hooks is not None else []  # the caller may add hooks to its list later
        self.stats = IngestStats()
        self._admitted: dict[str, tuple[str, int]] = {}  # device -> (school, batch) it was admitted for

    def _check_school(self, school: str, device: str, kind: str) -> None:
        """Only gates IT registered, on their own school's topics (appliance.hub.gates).

        The broker's ACL ties a login to its gate id, not to a school: a stolen gate's login could otherwise
        speak for a gate of that name in another school of a district hub. A status is let through to
        ``_status`` even from a gate not registered: it may present keys for IT to approve. A gate is looked up
        once per batch (a gate forgotten meanwhile is refused from the next batch on).
        """
        cached = self._admitted.get(device)
        if cached is not None and cached == (school, self.stats.batches):
            return
        self._admitted.pop(device, None)
        try:
            if kind == "status":
                gate = gates.get(self.conn, device)
                if gate is None or not gate.registered or gate.school == school:
                    return
            gates.admit(self.conn, school, device)
        except gates.GateRefused as exc:
            raise Rejected(str(exc)) from None
        self._admitted[device] = (school, self.stats.batches)

    def store_batch(self, batch: list[Incoming]) -> None:
        """One transaction for the batch, then every message's ack (never before the commit).

        If the batch fails for a reason other than the database being unavailable, one of its
        messages is one the database cannot hold (an out-of-range number, a broken string) or a hook
        chokes on: the messages are then stored one by one. One that still fails is stored without
        the hooks if it can be (the check-in counts more than its notification), else recorded as
        rejected; either way it is acknowledged, so a single bad message never blocks the queue.
        A transient failure (database busy or down) propagates: nothing is acknowledged, retry later.
        """
        try:
            self._store(batch)
        except Exception as exc:
            if len(batch) == 1 or is_transient(exc, self.conn):
                if len(batch) == 1 and not is_transient(exc, self.conn):
                    self._store_without_hooks(batch[0], exc)
                    return
                raise
            log.warning(
                "hub: a batch of %d failed (%s); storing its messages one by one", len(batch), type(exc).__name__
            )
            for message in batch:
                self.store_batch([message])

    def _store_without_hooks(self, message: Incoming, exc: Exception) -> None:
        """A message that fails alone: if only a hook (a notification) chokes on it, the check-in is kept
        without it; if the message itself cannot be stored, it is kept as rejected. Then it is acknowledged."""
        try:
            self._store([message], hooks=False)
        except Exception as again:
            if is_transient(again, self.conn):
                raise
            self._reject_alone(message, exc)
            return
        self.stats.hook_failures += 1
        log.error("hub: an event on %s is stored, but a hook failed on it: %s", message.topic, type(exc).__name__)

    def _store(self, batch: list[Incoming], hooks: bool = True) -> None:
        highest: dict[tuple[str, str, str], int] = {}  # per (device, journal, school): the batch's top seq
        counted = replace(self.stats, by_device=dict(self.stats.by_device))
        try:
            self._store_in_transaction(batch, hooks, highest)
        except Exception:
            self.stats = counted  # rolled back: the retry counts these messages again
            raise
        self.stats.batches += 1
        for message in batch:
            message.acknowledge()

    def _store_in_transaction(
        self, batch: list[Incoming], hooks: bool, highest: dict[tuple[str, str, str], int]
    ) -> None:
        with self.conn.transaction():
            for message in batch:
                try:
                    for stream, seq in self._store_one(message, hooks):
                        highest[stream] = max(seq, highest.get(stream, 0))
                except Rejected as exc:
                    self._record_rejection(message, str(exc))
            for (device, journal, school), seq in highest.items():
                # One upsert per gate and batch, not per event (a round trip each on PostgreSQL).
                self.conn.execute(
                    "INSERT INTO streams(device, journal, school, contiguous, highest, updated_at) "
                    "VALUES (?, ?, ?, 0, ?, ?) ON CONFLICT(device, journal) DO UPDATE SET highest = CASE WHEN "
                    "excluded.highest > streams.highest THEN excluded.highest ELSE streams.highest END, "
                    "updated_at = excluded.updated_at",
                    [device, journal, school, seq, _now()],
                )
                self._advance(device, journal, school)

    def _record_rejection(self, message: Incoming, reason: str) -> None:
        self.stats.rejected += 1
        log.warning("hub: refused a message on %s: %s", message.topic, reason)
        self.conn.execute(
            "INSERT INTO rejected_messages(topic, reason, payload, received_at) VALUES (?, ?, ?, ?)",
            [message.topic, reason, _storable_text(message.payload), _now()],
        )

    def _reject_alone(self, message: Incoming, exc: Exception) -> None:
        """A message that fails on its own, in its own transaction: kept as rejected, then acknowledged."""
        with self.conn.transaction():
            self._record_rejection(message, f"cannot be stored: {type(exc).__name__}")
        message.acknowledge()

    def _store_one(self, message: Incoming, hooks: bool = True) -> list[tuple[tuple[str, str, str], int]]:
        where = parse_topic(message.topic, self.prefix)
        if where is None:
            raise Rejected("not a gate topic")
        school, device, kind = where
        self._check_school(school, device, kind)
        try:
            data = json.loads(message.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise Rejected("not JSON") from None
        if not isinstance(data, dict):
            raise Rejected("not a JSON object")
        if b"\\u0000" in message.payload and _has_nul(data):
            raise Rejected("a string holds a NUL character (\\u0000), which a database text column cannot store")
        if kind == "status":
            _check_schema("status", data)
            self._status(school, device, data)
            return []
        if kind == "result":
            _check_schema("result", data)
            self._result(device, data)
            return []
        _check_schema("event", data)
        if data["device"] != device:
            raise Rejected(f"event of {data['device']} published on {device}'s topic")
        cur = self.conn.execute(INSERT_EVENT, event_row(school, device, data, _now(), self.zone))
        if cur.rowcount == 0:
            self.stats.duplicates += 1
            return []
        self.stats.stored += 1
        self.stats.by_device[device] = self.stats.by_device.get(device, 0) + 1
        for hook in self.hooks if hooks else []:
            hook(self.conn, school, data)
        return [((device, data["journal"], school), data["seq"])]

    def _advance(self, device: str, journal: str, school: str) -> None:
        """Move ``contiguous`` over every seq now present; note when a gap opened or closed."""
        row = self.conn.one(
            "SELECT contiguous, highest, gap_since, resync_requested_at FROM streams WHERE device = ? AND journal = ?",
            [device, journal],
        )
        if row is None:
            return
        contiguous, highest, gap_since, requested = row
        start = contiguous
        while True:
            seqs = [
                r[0]
                for r in self.conn.all(
                    "SELECT seq FROM events WHERE device = ? AND journal = ? AND seq > ? ORDER BY seq LIMIT 2000",
                    [device, journal, contiguous],
                )
            ]
            advanced = contiguous
            for seq in seqs:
                if seq != advanced + 1:
                    break
                advanced = seq
            if advanced == contiguous:
                break
            contiguous = advanced
            if len(seqs) < 2000 or advanced != seqs[-1]:
                break
        open_gap = highest > contiguous
        gap = gap_since if open_gap and gap_since else (_now() if open_gap else None)
        if contiguous != start:
            # Progress: the gap is being filled (a backlog or a resync arriving); asking again can wait.
            self.conn.execute(
                "UPDATE streams SET contiguous = ?, gap_since = ?, progress_at = ?, resync_attempts = 0, "
                "resync_requested_at = ? WHERE device = ? AND journal = ?",
                [contiguous, gap, _now(), requested if open_gap else None, device, journal],
            )
        else:
            self.conn.execute(
                "UPDATE streams SET gap_since = ?, resync_requested_at = ? WHERE device = ? AND journal = ?",
                [gap, requested if open_gap else None, device, journal],
            )

    def _status(self, school: str, device: str, data: dict[str, Any]) -> None:
        """Stored only when signed with the gate's registered key; a new key is held for IT (appliance.hub.gates)."""
        gate = gates.get(self.conn, device)
        try:
            gates.check_status(self.conn, gate, school, device, data)
        except gates.GateRefused as exc:
            raise Rejected(str(exc)) from None
        self.stats.statuses += 1
        self.conn.execute(
            "INSERT INTO devices(device, school, online, status, status_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(device) DO UPDATE SET online = excluded.online, "
            "status = excluded.status, status_at = excluded.status_at",
            [device, school, int(bool(data.get("online"))), json.dumps(data, ensure_ascii=False), _now()],
        )
        journal, last_seq = data.get("journal"), data.get("last_seq")
        if isinstance(journal, str) and isinstance(last_seq, int) and last_seq > 0:
            # The tail: events after the last one the hub saw are a gap too, visible only from the status.
            self.conn.execute(
                "INSERT INTO streams(device, journal, school, contiguous, highest, updated_at) "
                "VALUES (?, ?, ?, 0, ?, ?) ON CONFLICT(device, journal) DO UPDATE SET highest = CASE WHEN "
                "excluded.highest > streams.highest THEN excluded.highest ELSE streams.highest END",
                [device, journal, school, last_seq, _now()],
            )
            self._advance(device, journal, school)

    def _result(self, device: str, data: dict[str, Any]) -> None:
        self.stats.results += 1
        ref = data.get("ref")
        if not isinstance(ref, str):
            return
        self.conn.execute(
            "INSERT INTO downlink_results(ref, device, type, ok, reason, payload, received_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(device, ref) DO NOTHING",
            [ref, device, data.get("type"), int(bool(data.get("ok"))), data.get("reason"), json.dumps(data), _now()],
        )


class IngestWorker:
    """The thread between paho and the database: gathers messages into batches, stores, acks."""

    def __init__(
        self, store: Store, prefix: str, hooks: list[EventHook] | None = None, zone: tzinfo = DEFAULT_ZONE
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.zone = zone
        self.hooks = hooks if hooks is not None else []  # the caller may add hooks to its list later
        self._queue: queue.Queue[Incoming | None] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.ingest: Ingest | None = None

    def submit(self, topic: str, payload: bytes, ack: Callable[[], None]) -> None:
        self._queue.put(Incoming(topic, payload, ack))

    def start(self) -> None:
        self.ingest = Ingest(self.store.connect(), self.prefix, self.hooks, self.zone)
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(10)
        if self.ingest is not None:
            self.ingest.conn.close()

    def _reconnect_if_broken(self) -> None:
        """A PostgreSQL connection does not survive a server restart: open a new one (retried next round)."""
        assert self.ingest is not None
        if not self.ingest.conn.broken:
            return
        try:
            conn = self.store.connect()
        except StoreError as exc:
            self.ingest.stats.last_error = str(exc)
            log.error("hub: %s", exc)
            return
        self.ingest.conn.close()
        self.ingest.conn = conn
        log.warning("hub: reconnected to the database %s", self.store.describe())

    def backlog(self) -> int:
        return self._queue.qsize()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        assert self.ingest is not None
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stopping = False
            while len(batch) < BATCH:
                try:
                    item = self._queue.get(timeout=BATCH_WAIT)
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            delay = 1.0
            while True:
                try:
                    self.ingest.store_batch(batch)
                    self.ingest.stats.last_error = None
                    break
                except Exception as exc:
                    # The database is unavailable: nothing was acknowledged; retry this batch, in order, first.
                    self.ingest.stats.last_error = str(exc)
                    log.error("hub: cannot store %d messages (%s); retrying in %.0f s", len(batch), exc, delay)
                    if self._stopping.wait(delay):
                        return
                    delay = min(delay * 2, 30.0)
                    self._reconnect_if_broken()
            if stopping:
                return
