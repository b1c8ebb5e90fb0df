"""Hub -> gate: signed roster, templates, config and commands, each applied whole or not at all.

Every message is checked in this order, and the first failure refuses it with a reason on
the result topic, changing nothing: not larger than MAX_DOWNLINK_BYTES and carrying a ``sig``
(both before any parsing, so an unsigned or huge message is never turned into objects) -> JSON
object -> Ed25519 signature with the hub's key -> JSON Schema, and versions and seqs that are
integers (JSON Schema lets 20.0 pass as one) -> addressed to this school and gate, on the topic of
its type -> not seen before (nonce) -> newer than what the gate has (version per stream; a roster
delta must sit exactly on the gate's roster version) -> applied in one database transaction that
also records the new version and the nonce. The signature covers the canonical JSON of the whole
envelope, so the message must be parsed once before it can be checked; the size limit bounds that.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import queue
import re
import secrets
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.config import ConfigError, GateConfig, parse_config
from appliance.journal.db import Database, immediate
from appliance.journal.roster_store import RosterStore
from appliance.journal.sealing import Sealer
from appliance.journal.template_store import TemplateStore
from appliance.roster.model import Person, Role, normalise_name
from appliance.sync.sealed_transport import (
    SEALED_FIELD,
    TransportSealError,
    gate_private_key,
    open_sealed,
    sealed_context,
)
from appliance.sync.signing import SignatureError, verify
from appliance.sync.topics import Topics

log = logging.getLogger(__name__)

RESULT_SCHEMA = 1
# The largest message a gate parses. The biggest legitimate ones are the hub's retained roster and templates: a
# school of 3,000 with 5 SFace templates each (what enrollment by camera takes) is 13.8 MB sealed and signed,
# with 10 each 27.5 MB. A 60 MB unsigned roster, parsed whole, took the daemon from 83 to 570 MB.
MAX_DOWNLINK_BYTES = 32 * 1024 * 1024
# Only to name the refused message in the answer (``ref``): the hub puts the nonce near the start.
_PEEK_BYTES = 4096
_NONCE_RE = re.compile(rb'"nonce"\s*:\s*"([0-9a-f]{16,64})"')
_TYPE_RE = re.compile(rb'"type"\s*:\s*"(roster\.snapshot|roster\.delta|templates|config|command)"')
COMMAND_MAX_AGE = timedelta(hours=24)  # a command older than this is refused when the clock can be trusted
NONCE_RETENTION = timedelta(days=30)
# What the hub may change live, key by key (None: anything inside). Never device, journal, readers or sync,
# and nothing that names a program, a file or a pin: a stolen hub key must not run code on the gates.
REMOTE_KEYS: dict[str, Any] = {
    "policy": None,
    "feedback": {"outputs": None, "show_names": None, "sound": {"speak": None}, "gpio": {"on_seconds": None}},
}
STREAM_OF = {"roster.snapshot": "roster", "roster.delta": "roster", "templates": "templates", "config": "config"}
TOPIC_OF = {
    "roster.snapshot": "roster",
    "roster.delta": "roster",
    "templates": "templates",
    "config": "config",
    "command": "command",
}


class Refused(Exception):
    """The message is not obeyed; the text goes back to the hub as the reason."""


class AlreadyApplied(Exception):
    """The very message the gate applied last, seen again (the hub's retained snapshot at each reconnect)."""


@cache
def downlink_schema() -> dict[str, Any]:
    text = resources.files("appliance.schema").joinpath("downlink.schema.json").read_text("utf-8")
    return json.loads(text)


@cache
def _validator() -> jsonschema.protocols.Validator:
    schema = downlink_schema()
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def schema_problem(message: dict[str, Any]) -> str | None:
    """The first schema violation in words, or None."""
    error = jsonschema.exceptions.best_match(_validator().iter_errors(message))
    if error is None:
        return None
    return describe_schema_error(error, "(message)")


def describe_schema_error(error: jsonschema.exceptions.ValidationError, top: str) -> str:
    """Where and which rule, never the offending value (it may be a child's name or card number)."""
    where = "/".join(str(p) for p in error.absolute_path) or top
    if error.validator in ("required", "additionalProperties"):
        return f"{where}: {error.message}"  # these name keys, not values
    expected = error.validator_value if error.validator in ("type", "pattern", "format", "minimum", "maximum") else ""
    return f"{where}: fails {error.validator} {expected}".rstrip()


def new_message(
    kind: str,
    school: str,
    device: str,
    body: dict[str, Any],
    version: int | None = None,
    base_version: int | None = None,
) -> dict[str, Any]:
    """An unsigned downlink envelope with a fresh nonce (the hub signs it with signing.sign)."""
    message: dict[str, Any] = {
        "schema": 1,
        "type": kind,
        "school": school,
        "device": device,
        "nonce": secrets.token_hex(16),
        "issued_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "body": body,
    }
    if version is not None:
        message["version"] = version
    if base_version is not None:
        message["base_version"] = base_version
    return message


def stream_version(conn: sqlite3.Connection, stream: str) -> int:
    """The stream's version; "20.0", which gates before the integer check stored, reads as 20 (not a wedged stream)."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", [f"downlink.{stream}"]).fetchone()
    if row is None:
        return 0
    try:
        return int(row[0])
    except ValueError:
        return int(float(row[0]))


def hub_config_sections(conn: sqlite3.Connection) -> dict[str, Any]:
    """Config sections the hub set, to lay over gate.toml at start and on reload."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'hub_config'").fetchone()
    return json.loads(row[0]) if row else {}


def forbidden_keys(sections: dict[str, Any], allowed: dict[str, Any] = REMOTE_KEYS, where: str = "") -> list[str]:
    """Keys of the hub's config the hub may not set (dotted paths)."""
    found = []
    for key, value in sections.items():
        path = f"{where}{key}"
        if key not in allowed:
            found.append(path)
        elif allowed[key] is not None and isinstance(value, dict):
            found += forbidden_keys(value, allowed[key], path + ".")
        elif allowed[key] is not None:
            found.append(path)
    return found


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merge(merged.get(key) or {}, value) if isinstance(value, dict) and key != "policy" else value
    return merged


def overlay(config: GateConfig, sections: dict[str, Any]) -> GateConfig:
    """gate.toml with the hub's settings laid over it (raises ConfigError if invalid or not allowed).

    ``policy`` is replaced whole (its windows belong together); feedback keys one by one.
    """
    if not sections:
        return config
    bad = forbidden_keys(sections)
    if bad:
        raise ConfigError(f"hub config: the hub may not set {', '.join(bad)}")
    data = config.model_dump(exclude_none=True, by_alias=True)
    return parse_config(_merge(data, sections), "hub config")


def _person(item: dict[str, Any]) -> Person:
    """A person as the gate keeps them: parents' phones and e-mails, if a sender put them in, are dropped here."""
    return Person(
        id=item["id"],
        full_name=normalise_name(item["full_name"]),
        role=Role(item["role"]),
        class_name=item.get("class_name"),
        active=item.get("active", True),
        cards=tuple(sorted(set(item.get("cards", [])))),
    )


def _not_integer(value: object) -> str | None:
    """What a version or seq is when it is not a JSON integer (None if it is one); bool is a subclass of int."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        return f"a number with a decimal point ({value!r})"
    return None


def integer_problem(message: dict[str, Any]) -> str | None:
    """Versions and seqs must be integers: the gate stores and compares them as such, and JSON Schema's
    "integer" lets 20.0 through (stored as "20.0", it would wedge that stream on every later message)."""
    body = message.get("body")
    fields = [(name, message.get(name)) for name in ("version", "base_version")]
    if message.get("type") == "command" and isinstance(body, dict):
        fields += [(f"body/{name}", body.get(name)) for name in ("from_seq", "to_seq")]
    for name, value in fields:
        what = _not_integer(value)
        if what is not None:
            return f"{name} must be an integer such as 20, not {what}"
    return None


def _peek(payload: bytes) -> dict[str, Any]:
    """The nonce and type of a message refused before parsing, from its first bytes, only to name it in the answer."""
    head = payload[:_PEEK_BYTES]
    found: dict[str, Any] = {}
    if nonce := _NONCE_RE.search(head):
        found["nonce"] = nonce.group(1).decode("ascii")
    if kind := _TYPE_RE.search(head):
        found["type"] = kind.group(1).decode("ascii")
    return found


def _vectors(person: str, texts: list[str]) -> np.ndarray:
    rows = []
    for text in texts:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise Refused(f"body/set/{person}: a template is not base64") from None
        if len(raw) == 0 or len(raw) % 4:
            raise Refused(f"body/set/{person}: a template is not a float32 vector")
        rows.append(np.frombuffer(raw, dtype="<f4"))
    if len({len(r) for r in rows}) != 1:
        raise Refused(f"body/set/{person}: templates of different lengths")
    matrix = np.vstack(rows)
    if not np.all(np.isfinite(matrix)):
        raise Refused(f"body/set/{person}: a template holds NaN or infinity")
    return matrix


@dataclass
class Hooks:
    """What the daemon does once a change is in the database (all optional)."""

    config_changed: Callable[[GateConfig], None] | None = None
    reload: Callable[[], str] | None = None
    resync: Callable[[int, int | None], int] | None = None
    rotate_logs: Callable[[], str] | None = None
    template_size: Callable[[str], int | None] | None = None  # model -> values per template, None if not loaded


@dataclass
class Outcome:
    ok: bool
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class Downlink:
    """Checks and applies downlink messages on its own thread (never in paho's network thread)."""

    def __init__(
        self,
        topics: Topics,
        database: Database,
        hub_key: Ed25519PublicKey | None,
        config: GateConfig | Callable[[], GateConfig],
        publish: Callable[[str, bytes], object],
        clock_ok: Callable[[], bool] = lambda: True,
        hooks: Hooks | None = None,
        max_bytes: int = MAX_DOWNLINK_BYTES,
    ) -> None:
        self.topics = topics
        self.database = database
        self.conn = database.conn
        self.hub_key = hub_key
        # gate.toml as it is now (a reload may have changed it): the hub's settings are laid over this.
        self.base_config: Callable[[], GateConfig] = config if callable(config) else (lambda: config)
        self.publish = publish
        self.clock_ok = clock_ok
        self.hooks = hooks or Hooks()
        self.max_bytes = max_bytes
        self.applied = 0
        self.refused = 0
        self.last_refusal: str | None = None
        self._queue: queue.Queue[tuple[str, bytes, Callable[[], None]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="downlink", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(10)

    def submit(self, topic: str, payload: bytes, ack: Callable[[], None] = lambda: None) -> None:
        """``ack`` tells the broker the message is dealt with; until then it is redelivered after a crash."""
        self._queue.put((topic, payload, ack))

    def _run(self) -> None:
        while self._next():
            pass

    def _next(self) -> bool:
        """Handle one queued message; its payload (up to max_bytes) is freed on return, not held until the next."""
        item = self._queue.get()
        if item is None:
            return False
        topic, payload, ack = item
        try:
            self.handle(topic, payload)
        except Exception:
            log.exception("downlink: could not answer a message")
        ack()
        return True

    def handle(self, topic: str, payload: bytes) -> Outcome:
        """Check, apply and answer one message; returns what was answered."""
        message: dict[str, Any] = {}
        try:
            message = _peek(payload)
            self._screen(payload)
            message = self._parse(payload)
            self._check(topic, message)
            outcome = self._apply(message)
        except AlreadyApplied:
            log.debug("downlink: %s version %s already applied", message.get("type"), message.get("version"))
            return Outcome(True, detail={"already_applied": True})
        except Refused as exc:
            outcome = Outcome(False, str(exc))
        except Exception as exc:
            # Disk full, a locked journal: every change is in one transaction, so nothing was applied.
            # The hub hears why instead of nothing (the message is acknowledged: send it again later).
            log.exception("downlink: could not apply a %s message", message.get("type"))
            outcome = Outcome(False, f"the gate could not apply it, nothing changed: {type(exc).__name__}: {exc}")
        if outcome.ok:
            self.applied += 1
            log.info("downlink: %s applied (version %s)", message.get("type"), message.get("version"))
        else:
            self.refused += 1
            self.last_refusal = outcome.reason
            log.warning("downlink: refused a message on %s: %s", topic, outcome.reason)
        self._answer(message, outcome)
        return outcome

    def _screen(self, payload: bytes) -> None:
        """Refusals that need no parsing: a message too large to parse safely, or one that cannot be signed."""
        if len(payload) > self.max_bytes:
            raise Refused(
                f"message of {len(payload):,} bytes is larger than this gate accepts ({self.max_bytes:,} bytes): "
                "publish fewer templates per person"
            )
        if self.hub_key is None:
            raise Refused("this gate has no hub public key (sync.hub_public_key), so it obeys no downlink")
        if b'"sig"' not in payload:
            raise Refused("message is not signed")

    def _parse(self, payload: bytes) -> dict[str, Any]:
        try:
            message = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise Refused("not a JSON document") from None
        if not isinstance(message, dict):
            raise Refused("not a JSON object")
        return message

    def _check(self, topic: str, message: dict[str, Any]) -> None:
        assert self.hub_key is not None  # _screen refused it otherwise
        try:
            verify(self.hub_key, message)
        except SignatureError as exc:
            raise Refused(str(exc)) from None
        problem = integer_problem(message) or schema_problem(message)
        if problem:
            raise Refused(f"invalid message: {problem}")
        if message["school"] != self.topics.school or message["device"] != self.topics.device:
            raise Refused(f"addressed to {message['school']}/{message['device']}, not this gate")
        kind = self.topics.downlink_kind(topic)
        if kind != TOPIC_OF[message["type"]]:
            raise Refused(f"a {message['type']} message on the {kind or topic} topic")
        seen = self.conn.execute("SELECT 1 FROM downlink_seen WHERE nonce = ?", [message["nonce"]]).fetchone()
        if seen:
            stream = STREAM_OF.get(message["type"])
            if stream is not None and message.get("version") == stream_version(self.conn, stream):
                raise AlreadyApplied()
            raise Refused("replayed: this nonce was already used")
        if message["type"] == "command" and self.clock_ok():
            issued = datetime.fromisoformat(message["issued_at"].replace("Z", "+00:00"))
            if issued.tzinfo is None or abs(datetime.now(UTC) - issued) > COMMAND_MAX_AGE:
                raise Refused("stale command: issued more than 24 hours from this gate's clock")
        stream = STREAM_OF.get(message["type"])
        if stream is not None:
            have = stream_version(self.conn, stream)
            if message["version"] <= have:
                raise Refused(f"stale: {stream} version {message['version']} is not newer than {have}")
            if message["type"] == "roster.delta" and message["base_version"] != have:
                raise Refused(
                    f"out of order: delta is based on roster version {message['base_version']}, the gate has "
                    f"{have}; send a snapshot"
                )

    def _bookkeeping(self, message: dict[str, Any]) -> Callable[[sqlite3.Connection], None]:
        """Records the stream's new version and the nonce, inside the applying transaction."""

        def record(conn: sqlite3.Connection) -> None:
            stream = STREAM_OF.get(message["type"])
            if stream is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                    [f"downlink.{stream}", str(message["version"])],
                )
            now = datetime.now(UTC)
            conn.execute(
                "INSERT INTO downlink_seen(nonce, type, received_at) VALUES (?, ?, ?)",
                [message["nonce"], message["type"], now.isoformat(timespec="seconds")],
            )
            conn.execute(
                "DELETE FROM downlink_seen WHERE received_at < ?",
                [(now - NONCE_RETENTION).isoformat(timespec="seconds")],
            )

        return record

    def _in_transaction(self, work: Callable[[sqlite3.Connection], None]) -> None:
        with immediate(self.conn):
            work(self.conn)

    def _apply(self, message: dict[str, Any]) -> Outcome:
        kind = message["type"]
        body = self._opened_body(message)
        record = self._bookkeeping(message)
        if kind in ("roster.snapshot", "roster.delta"):
            snapshot = kind == "roster.snapshot"
            people = [_person(p) for p in body.get("people" if snapshot else "upsert", [])]
            try:
                report = RosterStore(self.database).apply(
                    people,
                    replace=snapshot,
                    deactivate=body.get("deactivate", []),
                    move_cards=True,
                    in_transaction=record,
                )
            except ValueError as exc:
                raise Refused(str(exc)) from None
            detail = {"added": report.added, "updated": report.updated, "deactivated": len(report.deactivated)}
            return Outcome(True, detail=detail)
        if kind == "templates":
            key_file = self.base_config().vision.key_file
            try:
                sealer = Sealer.from_file(key_file)
            except Exception as exc:
                raise Refused(f"cannot open the template key {key_file}: {exc}") from None
            texts = body.get("set", {})
            new = {person: _vectors(person, person_texts) for person, person_texts in texts.items()}
            self._check_size(body["model"], new)
            written, erased = TemplateStore(self.database, sealer).replace_many(
                body["model"], new, body.get("remove", []), in_transaction=record
            )
            return Outcome(True, detail={"templates": written, "people_erased": erased})
        if kind == "config":
            return self._apply_config(body, record)
        return self._command(body, record)

    def _check_size(self, model: str, new: dict[str, np.ndarray]) -> None:
        """Templates the gate's own model could never match (another size) are refused, not stored."""
        size = self.hooks.template_size(model) if self.hooks.template_size is not None else None
        if size is None:
            return
        for person, matrix in new.items():
            if matrix.shape[1] != size:
                raise Refused(f"body/set/{person}: templates have {matrix.shape[1]} values, {model} makes {size}")

    def _opened_body(self, message: dict[str, Any]) -> dict[str, Any]:
        """The body with the field the hub sealed to this gate's key opened, checked against the schema like a
        clear one (a body with nothing sealed is returned as it is)."""
        body = message["body"]
        if "sealed" not in body:
            return dict(body)
        kind = message["type"]
        what = "sealed templates" if kind == "templates" else "sealed roster"
        try:
            private = gate_private_key(self.base_config().vision.key_file)
            content = json.loads(open_sealed(private, body["sealed"], sealed_context(message)))
        except TransportSealError as exc:
            raise Refused(str(exc)) from None
        except Exception as exc:
            raise Refused(f"{what}: {exc}") from None
        opened = {key: value for key, value in body.items() if key != "sealed"} | {SEALED_FIELD[kind]: content}
        problem = schema_problem({**message, "body": opened})
        if problem:
            raise Refused(f"{what}: {problem}")
        return opened

    def _apply_config(self, body: dict[str, Any], record: Callable[[sqlite3.Connection], None]) -> Outcome:
        sections = _merge(hub_config_sections(self.conn), body)
        try:
            new_config = overlay(self.base_config(), sections)
        except ConfigError as exc:
            raise Refused(f"config not valid: {exc}") from None
        if self.hooks.config_changed is not None:
            # Applied before it is kept: a config the gate cannot run with is refused, not stored for the next start.
            try:
                self.hooks.config_changed(new_config)
            except Exception as exc:
                raise Refused(f"config could not be applied, the gate keeps its own: {exc}") from None

        def store(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('hub_config', ?)",
                [json.dumps(sections, ensure_ascii=False, sort_keys=True)],
            )
            record(conn)

        self._in_transaction(store)
        return Outcome(True, detail={"sections": sorted(body)})

    def _command(self, body: dict[str, Any], record: Callable[[sqlite3.Connection], None]) -> Outcome:
        name = body["name"]
        if name == "resync":
            if self.hooks.resync is None:
                raise Refused("command resync is not available on this gate")
            asked = body.get("journal")
            if asked is not None and asked != self.database.journal_id:
                raise Refused(
                    f"journal {asked} is not this gate's journal (now {self.database.journal_id}): "
                    "its events cannot be sent again"
                )
            self._in_transaction(record)
            try:
                count = self.hooks.resync(body["from_seq"], body.get("to_seq"))
            except Exception as exc:
                raise Refused(f"resync failed: {exc}") from None
            return Outcome(True, detail={"from_seq": body["from_seq"], "to_seq": body.get("to_seq"), "events": count})
        hook = self.hooks.reload if name == "reload" else self.hooks.rotate_logs
        if hook is None:
            raise Refused(f"command {name} is not available on this gate")
        self._in_transaction(record)
        try:
            done = hook()
        except Exception as exc:
            raise Refused(f"{name} failed: {exc}") from None
        return Outcome(True, detail={"done": done})

    def _answer(self, message: dict[str, Any], outcome: Outcome) -> None:
        version = message.get("version")
        result = {
            "schema": RESULT_SCHEMA,
            "device": self.topics.device,
            "ref": message.get("nonce") if isinstance(message.get("nonce"), str) else None,
            "type": message.get("type") if isinstance(message.get("type"), str) else None,
            "version": version if isinstance(version, int) and not isinstance(version, bool) else None,
            "ok": outcome.ok,
            "reason": outcome.reason,
            "detail": outcome.detail,
            "ts": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        data = json.dumps(result, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")
        self.publish(self.topics.result, data)
