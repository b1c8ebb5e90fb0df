"""Gate messages -> hub database, exactly once, acknowledged to the broker only after the commit.

Events arrive at least once (a gate resends what it is not sure of), so each is stored under
its globally unique id and a repeat changes nothing. Messages are taken in batches, one
transaction per batch; only after the COMMIT are their PUBACKs sent, so a hub killed at any
moment leaves the broker holding (and later redelivering) whatever it had not stored.

Per gate and journal the hub keeps ``contiguous`` (every seq up to it is here) and
``highest``; a difference is a gap, which the resync loop asks the gate to fill. Whatever must
follow an event (parent notifications) is planned by hooks inside the same transaction, so it
happens once or not at all.

The door is bounded (docs/security/mqtt.md): a message larger than a gate ever sends is refused
before it is parsed, an event's seq may not run far past what its gate reported, and refusals
are counted per sender (``rejected_counts``) while only the first payloads of each hour are kept
and a few lines a minute logged, so one login's flood grows neither the database nor the log. A
database that is busy or down, or a hub out of file handles or memory, stores nothing and
acknowledges nothing: the broker delivers those messages again.
"""

from __future__ import annotations

import errno
import json
import logging
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
# A batch ends once no message came for this long: a burst from paho arrives microseconds apart, and with
# the broker's window of 100 unacknowledged messages waiting longer only delays their acks.
BATCH_WAIT = 0.002
IDLE = 1.0  # seconds; an idle ingest thread writes the refusal log's pending summaries this often
# Refused before parsing. A gate's event is about 0.5 KB, its status about 1 KB, a result a few hundred bytes.
MAX_BYTES = {"events": 16 * 1024, "status": 16 * 1024, "result": 64 * 1024}
REASON_CHARS = 300  # of a refusal's reason and topic, wherever they are kept or logged
KEPT_PER_HOUR = 20  # refused payloads kept in rejected_messages per sender and hour; the rest are counted
KEPT_CHARS = 4096  # of each kept payload
MAX_SENDERS = 1000  # rows of rejected_counts; senders beyond are counted together under "*"
LOG_PER_MINUTE = 3  # refusal warnings per sender and minute; then one line says how many more were refused
SEQ_AHEAD = 10_000  # how far an event's seq may run past what the hub knows its gate has
YEARS = range(1970, 2100)  # an event's local date: what a gate's clock can show (the event schema says the same)
GATE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a school or gate id (config NAME_PATTERN)
SCHEMAS = ("event", "status", "result")
PSYCOPG_TRANSIENT = ("OperationalError", "InterfaceError")  # the server is down or the connection lost


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


def _strict(cls: type[jsonschema.protocols.Validator]) -> type[jsonschema.protocols.Validator]:
    """The validator class with "integer" meaning a JSON integer: JSON Schema counts 20.0 as one, and a seq or
    version the hub keeps as 20.0 is compared and stored as a float from then on."""
    checker = cls.TYPE_CHECKER.redefine("integer", lambda _checker, value: type(value) is int)
    return jsonschema.validators.extend(cls, type_checker=checker)


@cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    """The repository's schema for gate messages: event, status or result."""
    if name == "event":
        schema = event_schema()
    else:
        schema = json.loads(resources.files("appliance.schema").joinpath(f"{name}.schema.json").read_text("utf-8"))
    cls = _strict(jsonschema.validators.validator_for(schema))
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def load_schemas() -> None:
    """Read and compile the gate messages' schemas now, at start: read at the first message instead, a hub out of
    file handles took every valid event for one it could not check, and refused them all."""
    for name in SCHEMAS:
        _validator(name)


def _check_schema(name: str, data: dict[str, Any]) -> None:
    try:
        error = jsonschema.exceptions.best_match(_validator(name).iter_errors(data))
    except RecursionError:
        raise Rejected(f"{name} schema: nested too deeply to check") from None
    if error is not None:
        raise Rejected(f"{name} schema: {describe_schema_error(error, '(' + name + ')')}")


def is_transient(exc: BaseException, conn: Connection) -> bool:
    """The hub cannot store anything right now (a database busy, down or unreachable; no file handle or memory
    left): retry the batch later and acknowledge nothing, rather than take a valid message for a bad one.

    Follows the exception's explicit cause (``raise ... from``), as a library may wrap an OSError in its own.
    """
    if conn.broken:
        return True
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError | MemoryError | sqlite3.OperationalError | StoreError):
            return True
        if type(seen).__module__.startswith("psycopg") and type(seen).__name__ in PSYCOPG_TRANSIENT:
            return True
        seen = seen.__cause__
    return False


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _hint(exc: BaseException) -> str:
    """What to do about a resource the hub ran out of (empty for a database that is busy or down)."""
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        return ": the hub is out of file handles; raise LimitNOFILE= in its systemd unit"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return ": the disk is full; free space"
    if isinstance(exc, MemoryError):
        return ": the hub is out of memory"
    return ""


def parse_topic(topic: str, prefix: str) -> tuple[str, str, str] | None:
    """(school, device, kind) of ``{prefix}/{school}/{device}/{events|status|result}``, both ids as a gate's
    config allows them (a gate may write any school level: an id 60 KB long must go no further)."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != prefix or parts[3] not in ("events", "status", "result"):
        return None
    if not GATE_ID.match(parts[1]) or not GATE_ID.match(parts[2]):
        return None
    return parts[1], parts[2], parts[3]


def sender(topic: str) -> tuple[str, str]:
    """(school, gate) a refused message is counted for: the topic's levels, whatever they hold (clipped).

    The broker's ACL lets a login write only under its own gate id, so the gate level names the login.
    """
    parts = topic.split("/", 3)
    school = parts[1][:64] if len(parts) > 1 else ""
    device = parts[2][:64] if len(parts) > 2 else ""
    return school, device or "?"


def _clip(text: str, limit: int = REASON_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _check_size(message: Incoming) -> None:
    """Refuse a message larger than a gate sends before anything parses it (a 50 MB event stays unread)."""
    kind = message.topic.rsplit("/", 1)[-1]
    limit = MAX_BYTES.get(kind, min(MAX_BYTES.values()))
    if len(message.payload) > limit:
        raise Rejected(
            f"{kind} message of {len(message.payload):,} bytes is larger than the hub takes ({limit:,} bytes): no gate "
            "sends one; check what publishes with this gate's login"
        )


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse(payload: bytes) -> Any:
    """The JSON document, or Rejected: bad UTF-8, NaN/Infinity (not JSON, and no database column takes them),
    numbers or nesting beyond what Python parses."""
    try:
        return json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError):
        raise Rejected("not JSON") from None
    except RecursionError:
        raise Rejected("not JSON: nested too deeply") from None


def _check_time(ts: str) -> None:
    """An event's time as the hub files it: a real date with an offset, in the years a gate's clock can show."""
    try:
        moment = datetime.fromisoformat(ts)
    except ValueError:
        raise Rejected("event ts is not a real date and time (ISO 8601 with an offset)") from None
    if moment.tzinfo is None or moment.year not in YEARS:
        raise Rejected("event ts is outside the years 1970-2099: no clock a gate can have")


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


def _storable_text(raw: bytes, limit: int = KEPT_CHARS) -> str:
    """A refused payload as text any database keeps: bad UTF-8, NUL bytes and lone surrogates (written as escapes)
    become U+FFFD, at most ``limit`` chars."""
    return raw[: limit * 4].decode("utf-8", "replace").replace("\x00", "\ufffd")[:limit]


def _has_surrogate(value: Any) -> bool:
    """Whether a decoded JSON value holds a lone surrogate (\\ud800): no database's UTF-8 text can store one."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


@dataclass
class _Tally:
    """One sender's refusals in the transaction under way, written to rejected_counts with it."""

    device: str
    school: str
    hour: str
    kept_before: int  # payloads of this sender already kept this hour
    refused: int = 0
    kept: int = 0
    last_reason: str = ""


@dataclass
class _Window:
    start: float
    last_at: float
    logged: int = 0
    more: int = 0
    last: str = ""
    summarised: bool = False


class RefusalLog:
    """Warnings for refused messages, per sender: the first LOG_PER_MINUTE of each minute, then a line saying how
    many more were refused, once the sender has been quiet for a moment and at the minute's end (at most two).
    20,000 junk messages from one login once made 20,000 log lines."""

    def __init__(self, per_window: int = LOG_PER_MINUTE, window: float = 60.0, quiet: float = IDLE) -> None:
        self.per_window = per_window
        self.window = window
        self.quiet = quiet
        self._windows: dict[str, _Window] = {}

    def refused(self, device: str, topic: str, reason: str) -> None:
        now = time.monotonic()
        current = self._windows.get(device)
        if current is not None and now - current.start >= self.window:
            self._summarise(device, current, now)
            current = None
        if current is None:
            current = self._windows[device] = _Window(now, now)
        current.last_at = now
        if current.logged < self.per_window:
            current.logged += 1
            log.warning("hub: refused a message on %s: %s", _clip(topic), reason)
        else:
            current.more += 1
            current.last = reason

    def flush(self) -> None:
        """Write the counts of senders that went quiet, and forget the minutes that are over."""
        now = time.monotonic()
        for device, current in list(self._windows.items()):
            if now - current.start >= self.window:
                self._summarise(device, current, now)
                del self._windows[device]
            elif current.more and not current.summarised and now - current.last_at >= self.quiet:
                self._summarise(device, current, now)
                current.summarised = True

    def _summarise(self, device: str, current: _Window, now: float) -> None:
        if current.more:
            log.warning(
                "hub: %s more messages from %s refused in the last %.0f s (the last: %s); all are counted in "
                "rejected_counts, the first %d of each hour kept in rejected_messages",
                f"{current.more:,}",
                device,
                now - current.start,
                current.last,
                KEPT_PER_HOUR,
            )
            current.more = 0


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
        self.refusal_log = RefusalLog()
        self._tallies: dict[str, _Tally] | None = None  # refusals per sender, while a transaction is open
        self._known: dict[tuple[str, str], int] = {}  # (device, journal) -> the seq it has, in this transaction
        load_schemas()

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
        A transient failure (database busy or down, no file handle or memory left) propagates: nothing is
        acknowledged, retry later.
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
        with self.conn.transaction(), self._refusals():
            for message in batch:
                try:
                    _check_size(message)
                    for stream, seq in self._store_one(message, hooks):
                        highest[stream] = max(seq, highest.get(stream, 0))
                except Rejected as exc:
                    self._record_rejection(message, str(exc))
                if message.topic.endswith("/status"):
                    self._known.clear()  # a status tells a gate's seq anew
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

    @contextmanager
    def _refusals(self) -> Iterator[None]:
        """Refusals of the transaction under way, counted per sender and written with it (one row each)."""
        self._tallies, self._known = {}, {}
        try:
            yield
            self._write_tallies(self._tallies)
        finally:
            self._tallies = None

    def _record_rejection(self, message: Incoming, reason: str) -> None:
        """The one place a refused message is recorded: counted for its sender (``rejected_counts``), its payload
        kept (clipped) only among the sender's first KEPT_PER_HOUR of the hour, and logged (RefusalLog)."""
        self.stats.rejected += 1
        reason = _clip(reason)
        school, device = sender(message.topic)
        tallies = self._tallies if self._tallies is not None else {}
        tally = tallies.get(device)
        if tally is None:
            tally = tallies[device] = self._tally(school, device)
        tally.refused += 1
        tally.last_reason = reason
        if tally.kept_before + tally.kept < KEPT_PER_HOUR:
            tally.kept += 1
            self.conn.execute(
                "INSERT INTO rejected_messages(topic, reason, payload, received_at) VALUES (?, ?, ?, ?)",
                [_clip(message.topic), reason, _storable_text(message.payload), _now()],
            )
        self.refusal_log.refused(device, message.topic, reason)
        if self._tallies is None:
            self._write_tallies(tallies)

    def _tally(self, school: str, device: str) -> _Tally:
        hour = datetime.now(UTC).strftime("%Y-%m-%dT%H")
        row = self.conn.one("SELECT hour, kept_in_hour FROM rejected_counts WHERE device = ?", [device])
        if row is None:
            senders = self.conn.one("SELECT COUNT(*) FROM rejected_counts")
            if senders is not None and int(senders[0]) >= MAX_SENDERS:
                device = "*"
                row = self.conn.one("SELECT hour, kept_in_hour FROM rejected_counts WHERE device = ?", [device])
        kept_before = int(row[1]) if row is not None and row[0] == hour else 0
        return _Tally(device, school, hour, kept_before)

    def _write_tallies(self, tallies: dict[str, _Tally]) -> None:
        now = _now()
        for tally in tallies.values():
            self.conn.execute(
                "INSERT INTO rejected_counts(device, school, refused, first_at, last_at, last_reason, hour, "
                "kept_in_hour) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(device) DO UPDATE SET "
                "school = excluded.school, refused = rejected_counts.refused + excluded.refused, "
                "last_at = excluded.last_at, last_reason = excluded.last_reason, hour = excluded.hour, "
                "kept_in_hour = CASE WHEN rejected_counts.hour = excluded.hour "
                "THEN rejected_counts.kept_in_hour + excluded.kept_in_hour ELSE excluded.kept_in_hour END",
                [tally.device, tally.school, tally.refused, now, now, tally.last_reason, tally.hour, tally.kept],
            )

    def flush_refusal_log(self) -> None:
        self.refusal_log.flush()

    def _reject_alone(self, message: Incoming, exc: Exception) -> None:
        """A message that fails on its own, in its own transaction: kept as rejected, then acknowledged."""
        with self.conn.transaction(), self._refusals():
            self._record_rejection(message, f"cannot be stored: {type(exc).__name__}")
        message.acknowledge()

    def _store_one(self, message: Incoming, hooks: bool = True) -> list[tuple[tuple[str, str, str], int]]:
        where = parse_topic(message.topic, self.prefix)
        if where is None:
            raise Rejected("not a gate topic")
        school, device, kind = where
        self._check_school(school, device, kind)
        data = _parse(message.payload)
        if not isinstance(data, dict):
            raise Rejected("not a JSON object")
        if b"\\u0000" in message.payload and _has_nul(data):
            raise Rejected("a string holds a NUL character (\\u0000), which a database text column cannot store")
        if b"\\ud" in message.payload.lower() and _has_surrogate(data):
            raise Rejected(
                "a string holds a lone surrogate (\\ud800-\\udfff), which a database text column cannot store"
            )
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
        _check_time(data["ts"])
        self._check_seq(device, data["journal"], data["seq"])
        cur = self.conn.execute(INSERT_EVENT, event_row(school, device, data, _now(), self.zone))
        if cur.rowcount == 0:
            self.stats.duplicates += 1
            return []
        self.stats.stored += 1
        self.stats.by_device[device] = self.stats.by_device.get(device, 0) + 1
        for hook in self.hooks if hooks else []:
            hook(self.conn, school, data)
        return [((device, data["journal"], school), data["seq"])]

    def _check_seq(self, device: str, journal: str, seq: int) -> None:
        """Refuse a seq far beyond what the gate has: one event of seq 2^53-1 once opened a gap no gate could fill,
        which kept the school's absence notices waiting every day. A real one is asked for again once the gate's
        status reports it (the gap is then visible), so refusing loses nothing."""
        key = (device, journal)
        known = self._known.get(key)
        if known is None:
            known = self._known[key] = self._known_seq(device, journal)
        if seq > known + SEQ_AHEAD:
            raise Rejected(
                f"seq {seq} is more than {SEQ_AHEAD:,} beyond what {device} reported (seq {known}); a real event "
                "this far ahead is asked for again once the gate's status reports it"
            )

    def _known_seq(self, device: str, journal: str) -> int:
        """The last seq the gate's status gave for this journal, or the highest the hub holds without a gap (of any
        of the gate's journals: a journal rebuilt after damage goes on from the old one's seq)."""
        held = self.conn.one("SELECT MAX(contiguous) FROM streams WHERE device = ?", [device])
        return max(self._told_seq(device, journal) or 0, int(held[0] or 0) if held is not None else 0)

    def _told_seq(self, device: str, journal: str) -> int | None:
        """The last seq of ``journal`` in the gate's last status the hub took (signed with its registered key)."""
        row = self.conn.one("SELECT status FROM devices WHERE device = ?", [device])
        if row is None:
            return None
        try:
            status = json.loads(row[0])
        except ValueError:
            return None
        if isinstance(status, dict) and status.get("journal") == journal and type(status.get("last_seq")) is int:
            return int(status["last_seq"])
        return None

    def _advance(self, device: str, journal: str, school: str) -> None:
        """Move ``contiguous`` over every seq now present; note when a gap opened or closed.

        A request's attempts start again only when the range it asked for first is filled (or no gap is left):
        new events arriving below a range that stays missing are progress, which delays the next request, but
        do not reset its count, or one seq far beyond the gate's would keep it "behind" for ever.
        """
        row = self.conn.one(
            "SELECT contiguous, highest, gap_since, resync_requested_at, resync_upto FROM streams "
            "WHERE device = ? AND journal = ?",
            [device, journal],
        )
        if row is None:
            return
        contiguous, highest, gap_since, requested, upto = row
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
        filled = not open_gap or upto is None or contiguous >= upto  # the range asked for first is all here
        if contiguous != start and filled:
            # Progress on the gap (a backlog or a resync arriving): asking again can wait, and a gap left above
            # is a new one, with requests of its own.
            self.conn.execute(
                "UPDATE streams SET contiguous = ?, gap_since = ?, progress_at = ?, resync_attempts = 0, "
                "resync_requested_at = ?, resync_upto = NULL WHERE device = ? AND journal = ?",
                [contiguous, gap, _now(), requested if open_gap else None, device, journal],
            )
        elif contiguous != start:
            self.conn.execute(
                "UPDATE streams SET contiguous = ?, gap_since = ?, progress_at = ? WHERE device = ? AND journal = ?",
                [contiguous, gap, _now(), device, journal],
            )
        elif open_gap:
            self.conn.execute(
                "UPDATE streams SET gap_since = ? WHERE device = ? AND journal = ?", [gap, device, journal]
            )
        else:
            self.conn.execute(
                "UPDATE streams SET gap_since = NULL, resync_requested_at = NULL, resync_attempts = 0, "
                "resync_upto = NULL WHERE device = ? AND journal = ?",
                [device, journal],
            )

    def _status(self, school: str, device: str, data: dict[str, Any]) -> None:
        """Stored only when signed with the gate's registered key; a new key is held for IT (appliance.hub.gates)."""
        if data["device"] != device:  # a gate's signed status replayed on another gate's topic
            raise Rejected(f"status of {data['device']} published on {device}'s topic")
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
        detail = data.get("detail") or {}
        if data.get("type") == "command" and data.get("ok") is True and type(detail.get("events")) is int:
            self._resync_answered(device, ref, detail["events"])

    def _resync_answered(self, device: str, nonce: str, events: int) -> None:
        """A gate answered one of the hub's resync requests with how many events it sent again.

        None at all means the gate holds none of that range. If its last status (signed with its registered
        key: its own word) ends below the range, or nothing is stored from the range up and the range reaches
        the top of the stream, the gate has nothing from there on: what the hub waited for came from an event
        or status that said more than the gate holds (events carry no signature: a stolen login can send one
        of seq last+9,999), so the hub stops waiting: ``highest`` drops to the gate's tail. Any other range is
        left to the usual requests (the gate may have pruned it: they give up after MAX_ATTEMPTS).
        """
        request = self.conn.one(
            "SELECT journal, school, from_seq, to_seq FROM resync_requests WHERE device = ? AND nonce = ? "
            "AND answered_at IS NULL",
            [device, nonce],
        )
        if request is None:
            return  # not a resync the hub asked for, or answered already
        journal, school, first, last = request
        self.conn.execute(
            "UPDATE resync_requests SET answered_at = ?, events = ? WHERE device = ? AND nonce = ?",
            [_now(), events, device, nonce],
        )
        stream = self.conn.one(
            "SELECT contiguous, highest FROM streams WHERE device = ? AND journal = ?", [device, journal]
        )
        if events != 0 or stream is None:
            return
        contiguous, highest = stream
        told = self._told_seq(device, journal)
        top = self.conn.one("SELECT MAX(seq) FROM events WHERE device = ? AND journal = ?", [device, journal])
        held = int(top[0] or 0) if top is not None else 0
        if told is not None and told < first:
            tail = told
        elif told is None and held < first and last >= highest:
            # No signed word of the gate on its tail: only then does the (unsigned) answer lower it. Results are
            # not signed, and a stolen login reads the request on the gate's downlink and may answer first.
            tail = first - 1
        else:
            return
        tail = max(tail, contiguous)
        if tail >= highest:
            return
        self.conn.execute(
            "UPDATE streams SET highest = ?, updated_at = ? WHERE device = ? AND journal = ?",
            [tail, _now(), device, journal],
        )
        self._advance(device, journal, school)
        log.warning(
            "hub: %s has no events from seq %d to %d it was asked for (journal %s); the hub no longer waits for them",
            device,
            first,
            last,
            journal[:8],
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
            try:
                first = self._queue.get(timeout=IDLE)
            except queue.Empty:
                self.ingest.flush_refusal_log()
                continue
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
                    self.ingest.flush_refusal_log()
                    break
                except Exception as exc:
                    # The database is unavailable: nothing was acknowledged; retry this batch, in order, first.
                    self.ingest.stats.last_error = str(exc)
                    log.error(
                        "hub: cannot store %d messages (%s)%s; nothing acknowledged, retrying in %.0f s",
                        len(batch),
                        exc,
                        _hint(exc),
                        delay,
                    )
                    if self._stopping.wait(delay):
                        return
                    delay = min(delay * 2, 30.0)
                    self._reconnect_if_broken()
            if stopping:
                return
