"""``edugate hub roster publish``: the hub's roster and face templates to every gate, signed and retained.

For each registered gate of a school (appliance.hub.gates: registered by IT at provisioning) the
hub builds two downlink messages: a ``roster.snapshot`` (people with their cards; never parents'
phones or e-mails) and a ``templates`` message (every active person's templates of one model in
``set``; everyone else on the roster in ``remove``, so a gate holds exactly the hub's templates).
The ``people`` and the ``set`` travel sealed to the gate's template key as IT registered it
(appliance.sync.sealed_transport; never a key a gate's status claims), so the broker keeps no name,
card number or face in clear; a gate with no registered key is sent neither, and a key a gate
presents later is sealed to only once IT approved it. The digest is of the clear content. Each is signed with the hub's
Ed25519 key and published at QoS 1 with the retain flag on
``{prefix}/{school}/{device}/downlink/{roster|templates}``: a gate that is offline, or installed
later, gets the latest of each when it (re)connects and subscribes.

One message per stream and gate, never batches: the broker keeps only the last retained message
of a topic and a gate keeps one version per stream, so of a templates update split in parts a gate
that comes back after its session expired would get the last part only. The shipped Mosquitto
config's max_packet_size is 32 MiB + 64 KiB, the most a gate parses; 3,000 students with 5 SFace
templates each are 13.8 MB. A broker that announces a smaller maximum packet size, or refuses the
message, is reported.

Versions grow per (gate, stream) in ``published``: the Unix time of the publish, or the previous
version + 1 if that is larger, so a hub whose database was rebuilt or restored from a backup still
sends versions newer than what the gates hold. The version is recorded before the message leaves
(with an empty digest: not confirmed) and the content's digest once the broker acknowledged it, so
a version is never used twice and an unchanged stream is not sent again unless forced. What was
sealed is also recorded with the gate key it was sealed to (``sealed_to``): a gate whose key file was
replaced has changed, and gets roster and templates again sealed to its new key.

Gate keys come from the registry (``appliance.hub.gates.sealing_keys``) only. ``appliance.hub.catch_up``
publishes by itself to the gates that missed a publish.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.config import HubConfig
from appliance.hub import gates
from appliance.hub.broker_session import BrokerSession, PublishError
from appliance.hub.publish_lease import LOCK_MARGIN, give_back, mark_published, take_lease
from appliance.hub.roster import TemplateKeyError, hub_sealer, hub_templates, roster_people, template_models
from appliance.hub.store import Connection
from appliance.sync.downlink import new_message, schema_problem
from appliance.sync.sealed_transport import SEALED_FIELD, TransportSealError, seal, sealed_context
from appliance.sync.signing import sign
from appliance.sync.topics import Topics
from appliance.sync.transport import NO_MATCHING_SUBSCRIBERS, TransportConfigError

log = logging.getLogger(__name__)

STREAMS = ("roster", "templates")
NO_MODEL = "none"  # the model of a templates message that only erases (nothing in ``set``)
PACKET_OVERHEAD = 64  # fixed header, topic length, packet id and properties of a PUBLISH, besides topic and payload


def digest(body: dict[str, Any]) -> str:
    """The content's fingerprint: the same roster gives the same digest, whatever the envelope."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def kind_of(stream: str) -> str:
    return "roster.snapshot" if stream == "roster" else "templates"


def sealed_stream(stream: str, body: dict[str, Any]) -> bool:
    """Rosters and templates are sealed to the gate's key; a templates message that only erases carries none."""
    return stream == "roster" or (stream == "templates" and bool(body.get("set")))


@dataclass
class Item:
    """One message for one gate and stream, and what became of it."""

    school: str
    device: str
    stream: str
    summary: str
    digest: str
    version: int | None = None
    size: int = 0
    nonce: str | None = None
    sealed_to: str | None = None  # the gate's template key a templates set is sealed to
    state: str = "unchanged"  # unchanged | pending | sent | offline (retained, no subscriber now) | failed
    error: str | None = None
    result: dict[str, Any] | None = None
    payload: bytes = field(default=b"", repr=False)
    body: dict[str, Any] | None = field(default=None, repr=False)  # until signed

    @property
    def needs_gate_key(self) -> bool:
        return self.body is not None and sealed_stream(self.stream, self.body)

    @property
    def delivered(self) -> bool:
        return self.state in ("sent", "offline")


@dataclass
class SchoolPlan:
    school: str
    devices: list[str]
    bodies: dict[str, tuple[dict[str, Any], str]]  # stream -> (body, summary)
    notes: list[str] = field(default_factory=list)


def known_devices(conn: Connection, school: str) -> list[str]:
    """The school's registered gates."""
    return gates.school_gates(conn, school)


def schools_to_publish(conn: Connection, config: HubConfig, school: str | None) -> list[str]:
    if school is not None:
        return [school]
    if config.hub.schools:
        return list(config.hub.schools)
    return [r[0] for r in conn.all("SELECT DISTINCT school FROM people ORDER BY school")]


def templates_body(conn: Connection, config: HubConfig, school: str, model: str | None) -> tuple[dict[str, Any], str]:
    """The templates message body: active people's templates in ``set``, everyone else on the roster in ``remove``."""
    models = template_models(conn, school)
    if model is None:
        if len(models) > 1:
            raise PublishError(f"{school}: templates of several models at the hub ({', '.join(models)}); use --model")
        model = models[0]
    elif model not in models:
        raise PublishError(f"{school}: no templates of model {model!r} at the hub (models: {', '.join(models)})")
    stored = hub_templates(conn, hub_sealer(config, create=False), school, model)
    active = {r[0] for r in conn.all("SELECT id FROM people WHERE school = ? AND active = 1", [school])}
    everyone = {r[0] for r in conn.all("SELECT id FROM people WHERE school = ?", [school])}
    chosen = {person: texts for person, texts in stored.items() if person in active}
    body = {"model": model, "set": chosen, "remove": sorted(everyone - set(chosen))}
    held_back = len(set(stored) - active)
    summary = f"model {model}, {len(chosen)} people, {sum(len(v) for v in chosen.values())} templates"
    if held_back:
        summary += f", {held_back} not sent (inactive or not on the roster)"
    return body, summary


def plan_school(
    conn: Connection,
    config: HubConfig,
    school: str,
    extra: Iterable[str],
    model: str | None,
    only: bool = False,
    roster_only: bool = False,
) -> SchoolPlan:
    """What each gate of the school (or, with ``only``, each gate in ``extra``) should hold; refuses an empty
    roster (it would deactivate everyone). ``roster_only`` leaves the templates out."""
    devices = sorted(set(extra) if only else set(known_devices(conn, school)) | set(extra))
    people = roster_people(conn, school)
    if not people:
        raise PublishError(f"{school}: no roster at the hub; run `edugate hub roster import FILE --school {school}`")
    active = sum(1 for p in people if p["active"])
    bodies: dict[str, tuple[dict[str, Any], str]] = {
        "roster": ({"people": people}, f"{len(people)} people, {active} active")
    }
    notes: list[str] = []
    if roster_only:
        notes.append("templates not sent: the roster only was asked for")
    elif template_models(conn, school):
        bodies["templates"] = templates_body(conn, config, school, model)
    elif conn.one("SELECT 1 FROM published WHERE school = ? AND stream = 'templates'", [school]):
        # Every template was erased at the hub after some were published: erase them on the gates too.
        everyone = [str(p["id"]) for p in people]
        bodies["templates"] = ({"model": NO_MODEL, "set": {}, "remove": everyone}, "no templates: erase all")
    else:
        notes.append("no face templates at the hub for this school: templates not sent")
    for stream, (body, _) in bodies.items():
        kind = kind_of(stream)
        problem = schema_problem({**new_message(kind, school, "check", body, version=1), "sig": "-"})
        if problem:
            raise PublishError(f"{school}: the {stream} cannot be sent, a gate would refuse it: {problem}")
    return SchoolPlan(school, devices, bodies, notes)


def _previous(conn: Connection, device: str, stream: str) -> tuple[int, str, str | None] | None:
    """(version, digest, sealed_to) of what was last published to the gate on this stream."""
    row = conn.one("SELECT version, digest, sealed_to FROM published WHERE device = ? AND stream = ?", [device, stream])
    return (int(row[0]), str(row[1]), row[2]) if row else None


def stored_gate_keys(conn: Connection, schools: Iterable[str]) -> dict[tuple[str, str], str]:
    """(school, gate) -> the template key IT registered (none for a gate whose key change awaits approval)."""
    return gates.sealing_keys(conn, schools)


def next_version(previous: int | None) -> int:
    return max((previous or 0) + 1, int(time.time()))


def _record(conn: Connection, item: Item, confirmed: bool) -> bool:
    """Reserve the version (empty digest) before sending; store the digest once the broker has the message.

    Versions only move forward: a reservation is refused (False) if the gate's row already holds this
    version or a newer one, and a confirmation never overwrites a newer reservation.
    """
    assert item.version is not None
    newer = "published.version <= excluded.version" if confirmed else "published.version < excluded.version"
    with conn.transaction():
        return (
            conn.execute(
                "INSERT INTO published(device, stream, school, version, digest, sealed_to, published_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(device, stream) DO UPDATE SET school = excluded.school, "
                "version = excluded.version, digest = excluded.digest, sealed_to = excluded.sealed_to, "
                f"published_at = excluded.published_at WHERE {newer}",
                [
                    item.device,
                    item.stream,
                    item.school,
                    item.version,
                    item.digest if confirmed else "",
                    item.sealed_to if confirmed else None,
                    datetime.now(UTC).isoformat(timespec="seconds"),
                ],
            ).rowcount
            == 1
        )


def build_items(
    conn: Connection, plan: SchoolPlan, force: bool, gate_keys: dict[tuple[str, str], str] | None = None
) -> list[Item]:
    """An item for every gate and stream; pending where the content or the gate's key changed (all with ``force``).

    The digest is of the clear content, so sealing (new ciphertext every time) never makes it look changed;
    a templates set sealed to a key the gate no longer has does.
    """
    items = []
    for device in plan.devices:
        for stream, (body, summary) in plan.bodies.items():
            item = Item(plan.school, device, stream, summary, digest(body))
            if sealed_stream(stream, body):
                item.sealed_to = (gate_keys or {}).get((plan.school, device))
            previous = _previous(conn, device, stream)
            if previous is not None and previous[1:] == (item.digest, item.sealed_to) and not force:
                item.version = previous[0]
                items.append(item)
                continue
            item.version = next_version(previous[0] if previous else None)
            item.body = body
            item.state = "pending"
            items.append(item)
    return items


def sign_items(items: list[Item], key: Ed25519PrivateKey) -> None:
    """Seal templates to each gate's key (``sealed_to``, from its status), sign, and serialise every pending item."""
    for item in items:
        if item.state != "pending" or item.body is None:
            continue
        body = item.body
        kind = kind_of(item.stream)
        message = new_message(kind, item.school, item.device, body, version=item.version)
        if item.needs_gate_key:
            recipient = item.sealed_to
            if recipient is None:
                item.state = "failed"
                item.error = (
                    f"no registered key for this gate: the {item.stream} is only sent sealed to the key IT registered "
                    "(`edugate hub gates add`, see `edugate hub gates list`)"
                )
                continue
            field_name = SEALED_FIELD[kind]
            plain = json.dumps(body[field_name], ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            try:
                sealed = seal(recipient, plain, sealed_context(message))
            except TransportSealError as exc:  # a malformed key in that gate's status: that gate only
                item.state, item.error = "failed", f"cannot seal to the gate's template key: {exc}"
                continue
            message["body"] = {k: v for k, v in body.items() if k != field_name} | {"sealed": sealed}
        message = sign(key, message)
        item.nonce = message["nonce"]
        item.payload = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        item.size = len(item.payload)
        item.body = None


def _too_large(item: Item, topic: str, limit: int | None) -> str | None:
    if limit is None or item.size + len(topic.encode()) + PACKET_OVERHEAD <= limit:
        return None
    return (
        f"{item.size:,} bytes, more than the broker accepts ({limit:,} bytes, max_packet_size in mosquitto.conf); "
        "raise the broker's limit"
    )


def send(session: BrokerSession, conn: Connection, prefix: str, items: list[Item], ack_timeout: float) -> None:
    """Publish every pending item retained at QoS 1 and record what the broker acknowledged."""
    by_mid: dict[int, Item] = {}
    for item in items:
        if item.state != "pending":
            continue
        topic = Topics(prefix, item.school, item.device).downlink_topic(item.stream)
        problem = _too_large(item, topic, session.max_packet)
        if problem:
            item.state, item.error = "failed", problem
            continue
        if not _record(conn, item, confirmed=False):
            item.state = "failed"
            item.error = f"another publish took version {item.version} or a newer one for this gate; run it again"
            continue
        if item.nonce is not None:
            session.wanted.add(item.nonce)
        by_mid[session.publish(topic, item.payload)] = item
    total = sum(i.size for i in by_mid.values())
    acks = session.acks(list(by_mid), ack_timeout + total / 1_000_000)  # a second more per MB on a slow link
    for mid, item in by_mid.items():
        reason = acks.get(mid)
        item.payload = b""
        if reason is None and session.lost is not None:
            # Mosquitto 2.0 answers a message over message_size_limit with a PUBACK code that MQTT 5 does
            # not allow there (0x95); paho takes it for a malformed packet and drops the connection.
            item.state = "failed"
            item.error = (
                f"the connection ended before the broker acknowledged it ({session.lost}); a broker does so for a "
                f"message over message_size_limit in mosquitto.conf (this one: {item.size:,} bytes)"
            )
        elif reason is None:
            item.state, item.error = "failed", "no acknowledgement from the broker within the time allowed"
        elif reason.is_failure:
            item.state, item.error = "failed", f"the broker refused it ({reason})"
        else:
            item.state = "offline" if reason.value == NO_MATCHING_SUBSCRIBERS else "sent"
            _record(conn, item, confirmed=True)
        log.info(
            "hub: %s %s version %s to %s: %s", item.school, item.stream, item.version, item.device, item.error or "ok"
        )


@dataclass
class PublishReport:
    items: list[Item] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # "school: ..." lines that are not errors
    errors: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # schools left alone: another publish to them was under way

    @property
    def failed(self) -> bool:
        return (
            bool(self.errors)
            or any(i.state == "failed" for i in self.items)
            or any(i.result is not None and not i.result.get("ok") for i in self.items)
        )


def publish(
    conn: Connection,
    config: HubConfig,
    key: Ed25519PrivateKey,
    school: str | None = None,
    devices: Iterable[str] = (),
    force: bool = False,
    model: str | None = None,
    wait: float = 0.0,
    ack_timeout: float = 30.0,
    only: bool = False,
    roster_only: bool = False,
) -> PublishReport:
    """Plan, sign, send and (with ``wait``) collect the gates' answers; the report says what happened per gate.

    ``devices`` are published to besides the known gates, or instead of them with ``only``; ``roster_only``
    sends no templates.
    """
    report = PublishReport()
    extra = list(devices)
    schools = schools_to_publish(conn, config, school)
    if extra and len(schools) > 1:
        # A gate may read every school's downlink under its own name (the ACL does not check the school level).
        raise PublishError(f"this hub serves {len(schools)} schools: name the gate's school with --school")
    strangers = [d for d in extra if schools and d not in gates.school_gates(conn, schools[0])]
    if strangers:
        raise PublishError(
            f"not registered gates of {schools[0]}: {', '.join(strangers)} (`edugate hub gates list`; register a gate "
            "with `edugate hub gates add`)"
        )
    leases: dict[str, str] = {}
    try:
        for name in schools:
            taken, lease = take_lease(conn, name, ack_timeout + wait + LOCK_MARGIN)
            if not taken:
                report.busy.append(name)
                report.errors.append(f"{name}: {lease}")
                continue
            leases[name] = lease
        return _publish_locked(
            conn, config, key, report, list(leases), extra, force, model, wait, ack_timeout, only, roster_only
        )
    finally:
        for name, lease in leases.items():
            give_back(conn, name, lease)


def _publish_locked(
    conn: Connection,
    config: HubConfig,
    key: Ed25519PrivateKey,
    report: PublishReport,
    schools: list[str],
    extra: list[str],
    force: bool,
    model: str | None,
    wait: float,
    ack_timeout: float,
    only: bool,
    roster_only: bool,
) -> PublishReport:
    """Plan, seal, sign and send to ``schools``, whose publish leases this call holds."""
    plans: list[SchoolPlan] = []
    for name in schools:
        try:
            plan = plan_school(conn, config, name, extra, model, only, roster_only)
        except PublishError as exc:
            report.errors.append(str(exc))  # names the school already
            continue
        except TemplateKeyError as exc:
            report.errors.append(f"{name}: {exc}")
            continue
        report.notes += [f"{name}: {note}" for note in plan.notes]
        report.notes += [
            f"{name}: {device} presents a new key; sealed to its registered key until `edugate hub gates approve`"
            for device in gates.held(conn, name)
        ]
        if not plan.devices:
            report.notes.append(f"{name}: no registered gates (`edugate hub gates add`, see `edugate identity`)")
        plans.append(plan)
        mark_published(conn, name, plan.bodies.get("templates", ({}, ""))[0].get("model"))
    keys = stored_gate_keys(conn, [plan.school for plan in plans])
    session: BrokerSession | None = None
    try:
        for plan in plans:
            report.items += build_items(conn, plan, force, keys)
        pending = [i for i in report.items if i.state == "pending"]
        if not pending:
            return report
        session = session or _connected(config)
        sign_items(pending, key)
        pending = [i for i in pending if i.state == "pending"]
        if wait > 0:
            for name in sorted({i.school for i in pending}):
                session.subscribe(f"{config.mqtt.topic_prefix}/{name}/+/result")
        send(session, conn, config.mqtt.topic_prefix, pending, ack_timeout)
        live = {i.nonce for i in pending if i.state == "sent" and i.nonce}
        if wait > 0 and live:
            session.wait_results(live, wait)
            for item in pending:
                if item.nonce is not None:
                    item.result = session.results.get(item.nonce)
    except OSError as exc:
        raise PublishError(f"the connection to the broker failed: {exc}") from None
    finally:
        if session is not None:
            session.close()
    return report


def clear_retained(config: HubConfig, school: str, device: str, timeout: float = 15.0) -> str | None:
    """Empty the roster and templates the broker keeps for a gate the hub forgot (a retained message is deleted by
    an empty one): a gate moved to another school could otherwise still read its old school's on its old topics.
    None when done, else why not."""
    topics = Topics(config.mqtt.topic_prefix, school, device)
    try:
        session = _connected(config)
    except (PublishError, TransportConfigError, OSError) as exc:
        return str(exc)
    try:
        mids = [session.publish(topics.downlink_topic(stream), b"") for stream in STREAMS]
        acks = session.acks(mids, timeout)
    except (PublishError, OSError) as exc:
        return str(exc)
    finally:
        session.close()
    if len(acks) < len(mids) or any(reason.is_failure for reason in acks.values()):
        return "the broker did not acknowledge every empty message"
    return None


def _connected(config: HubConfig) -> BrokerSession:
    session = BrokerSession(config)
    session.connect()
    return session
