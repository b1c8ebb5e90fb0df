"""The gates IT registered at the hub: each gate's school and keys are fixed at provisioning.

Nothing a gate says about itself changes them. A stolen gate login (its MQTT password) lets a thief
publish on that gate's topics, but:

- a status is believed only when it is signed with the signing key IT registered for the gate
  (appliance.sync.gate_keys); one signed with another key is a *key change*: held as pending, logged
  loudly, shown in ``edugate hub gates list``, and nothing is sealed to it until IT approves it
  (``edugate hub gates approve GATE --fingerprint F``, after reading F on the gate: ``edugate identity``);
- rosters and face templates are sealed only to the registered template key (``sealing_keys``);
- statuses and events of a gate the hub has not registered, or on another school's topics, are refused
  and counted on the gate's row (``refused``), which ``hub gates list`` shows. A real gate refused before
  IT registered it loses nothing: its journal keeps the events, and once it is registered the hub sees the
  gap from its status and asks it to send them again.

This module owns the SQL of the ``gates`` table. The ingest calls ``admit`` and ``check_status`` inside its
transaction, so counts and pending keys land with the batch or not at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from weakref import WeakKeyDictionary

from appliance.hub.store import Connection
from appliance.sync.gate_keys import GateKeyError, check_signing_key, check_template_key, fingerprint, verify_status
from appliance.sync.signing import SignatureError

log = logging.getLogger(__name__)

KEY_LOG_EVERY = 60.0  # seconds between two log lines about the keys one gate presents
MAX_UNREGISTERED = 1000  # rows kept for gates heard from but not registered (a flood of names must not grow it)
COLUMNS = (
    "device, school, template_key, signing_key, pending_template_key, pending_signing_key, pending_since, "
    "refused, last_refusal, added_at, approved_at"
)


# Per connection (an ingest has its own): device -> (when its key was last logged, keys presented unsaid since).
_said: WeakKeyDictionary[Connection, dict[str, tuple[float, int]]] = WeakKeyDictionary()


class GateRefused(Exception):
    """A message the hub does not take from this gate; the text says why and what IT can do."""


class RegistryError(Exception):
    """An ``edugate hub gates`` command that cannot be done; the text says why and how to fix it."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Gate:
    device: str
    school: str
    template_key: str | None
    signing_key: str | None
    pending_template_key: str | None
    pending_signing_key: str | None
    pending_since: str | None
    refused: int
    last_refusal: str | None
    added_at: str
    approved_at: str | None

    @property
    def registered(self) -> bool:
        return self.signing_key is not None

    @property
    def pending(self) -> bool:
        return self.pending_signing_key is not None

    @property
    def fingerprint(self) -> str | None:
        return fingerprint(self.template_key, self.signing_key) if self.registered else None

    @property
    def pending_fingerprint(self) -> str | None:
        return fingerprint(self.pending_template_key, self.pending_signing_key) if self.pending else None


def _gate(row: tuple[Any, ...]) -> Gate:
    return Gate(*row[:7], int(row[7] or 0), *row[8:])  # type: ignore[arg-type]


def get(conn: Connection, device: str) -> Gate | None:
    row = conn.one(f"SELECT {COLUMNS} FROM gates WHERE device = ?", [device])
    return _gate(row) if row is not None else None


def all_gates(conn: Connection, schools: Iterable[str] | None = None) -> list[Gate]:
    rows = [_gate(r) for r in conn.all(f"SELECT {COLUMNS} FROM gates ORDER BY school, device")]
    wanted = set(schools) if schools is not None else None
    return [g for g in rows if wanted is None or g.school in wanted]


def school_gates(conn: Connection, school: str) -> list[str]:
    """The registered gates of a school: the ones a publish sends to."""
    return [
        r[0]
        for r in conn.all(
            "SELECT device FROM gates WHERE school = ? AND signing_key IS NOT NULL ORDER BY device", [school]
        )
    ]


def sealing_keys(conn: Connection, schools: Iterable[str]) -> dict[tuple[str, str], str]:
    """(school, gate) -> the registered template key: the only key a roster or face template is ever sealed to.

    A key a gate presents later is not used before IT approves it; meanwhile the registered key is still
    sealed to (a thief presenting a key can neither read the messages nor stop the real gate's updates).
    """
    keys: dict[tuple[str, str], str] = {}
    for school in schools:
        for device, key in conn.all(
            "SELECT device, template_key FROM gates WHERE school = ? AND signing_key IS NOT NULL "
            "AND template_key IS NOT NULL",
            [school],
        ):
            keys[(school, device)] = key
    return keys


def held(conn: Connection, school: str) -> list[str]:
    """Registered gates of the school presenting a key IT has not approved."""
    return [
        r[0]
        for r in conn.all(
            "SELECT device FROM gates WHERE school = ? AND signing_key IS NOT NULL AND pending_signing_key IS NOT NULL",
            [school],
        )
    ]


def _checked_keys(template_key: str, signing_key: str) -> tuple[str, str]:
    try:
        return check_template_key(template_key), check_signing_key(signing_key)
    except GateKeyError as exc:
        raise RegistryError(f"{exc} (copy both keys as `edugate identity` prints them on the gate)") from None


def add(conn: Connection, device: str, school: str, template_key: str, signing_key: str, replace: bool = False) -> Gate:
    """Register a gate with its keys (what ``edugate identity`` prints on it). A registered gate keeps its keys
    unless ``replace``: the keys are the gate's identity, not a detail to overwrite by accident."""
    template_key, signing_key = _checked_keys(template_key, signing_key)
    with conn.transaction():
        gate = get(conn, device)
        if gate is not None and gate.registered and not replace:
            if (gate.school, gate.template_key, gate.signing_key) == (school, template_key, signing_key):
                return gate
            if gate.school != school:
                raise RegistryError(
                    f"{device} is registered to school {gate.school}; a gate that moved: "
                    f"`edugate hub gates forget {device}` first"
                )
            raise RegistryError(
                f"{device} is registered with other keys (fingerprint {gate.fingerprint}); if the gate's key file "
                f"was replaced, use --replace (or approve the key it presents: `edugate hub gates approve {device}`)"
            )
        now = _now()
        conn.execute(
            "INSERT INTO gates(device, school, template_key, signing_key, refused, added_at, approved_at) "
            "VALUES (?, ?, ?, ?, 0, ?, ?) ON CONFLICT(device) DO UPDATE SET school = excluded.school, "
            "template_key = excluded.template_key, signing_key = excluded.signing_key, pending_template_key = NULL, "
            "pending_signing_key = NULL, pending_since = NULL, approved_at = excluded.approved_at",
            [device, school, template_key, signing_key, now, now],
        )
        added = get(conn, device)
    assert added is not None
    return added


def approve(conn: Connection, device: str, expected: str, school: str | None = None) -> Gate:
    """Make the key a gate presents its registered key, once IT read the same fingerprint on the gate.

    A gate the hub never registered is registered this way too (to the school of its status, or ``school``).
    """
    with conn.transaction():
        gate = get(conn, device)
        if gate is None or not gate.pending:
            raise RegistryError(
                f"{device} presents no new key (see `edugate hub gates list`); a gate presents its key in its status "
                "once it is online"
            )
        if expected.strip().lower() != gate.pending_fingerprint:
            raise RegistryError(
                f"{device}: fingerprint {expected.strip()} is not the one the gate presents; read it on the gate "
                "with `edugate identity` (a different one means someone else is using the gate's login)"
            )
        if school is not None and gate.registered and school != gate.school:
            raise RegistryError(f"{device} is registered to school {gate.school}, not {school}")
        conn.execute(
            "UPDATE gates SET school = ?, template_key = pending_template_key, signing_key = pending_signing_key, "
            "pending_template_key = NULL, pending_signing_key = NULL, pending_since = NULL, approved_at = ? "
            "WHERE device = ?",
            [school or gate.school, _now(), device],
        )
        approved = get(conn, device)
    assert approved is not None
    return approved


def forget(conn: Connection, device: str) -> bool:
    """Remove a gate's registration, last status and what was published to it: it is refused until registered
    again, and then sent everything anew (``appliance.hub.publish.clear_retained`` empties the broker's copies)."""
    with conn.transaction():
        removed = conn.execute("DELETE FROM gates WHERE device = ?", [device]).rowcount
        removed += conn.execute("DELETE FROM devices WHERE device = ?", [device]).rowcount
        conn.execute("DELETE FROM published WHERE device = ?", [device])
    return bool(removed)


def _ensure_row(conn: Connection, school: str, device: str) -> bool:
    """The gate's row, made for a gate heard from but not registered (at most MAX_UNREGISTERED of those)."""
    if conn.one("SELECT 1 FROM gates WHERE device = ?", [device]) is not None:
        return True
    unregistered = conn.one("SELECT COUNT(*) FROM gates WHERE signing_key IS NULL")
    if unregistered is not None and int(unregistered[0]) >= MAX_UNREGISTERED:
        return False
    conn.execute(
        "INSERT INTO gates(device, school, refused, added_at) VALUES (?, ?, 0, ?) ON CONFLICT(device) DO NOTHING",
        [device, school, _now()],
    )
    return True


def refuse(conn: Connection, school: str, device: str, reason: str) -> GateRefused:
    """Count a refused message on the gate's row; the exception to raise."""
    if _ensure_row(conn, school, device):
        conn.execute("UPDATE gates SET refused = refused + 1, last_refusal = ? WHERE device = ?", [_now(), device])
    return GateRefused(reason)


def admit(conn: Connection, school: str, device: str) -> Gate:
    """The registered gate a message on ``{school}/{device}`` comes from; GateRefused (counted) otherwise."""
    gate = get(conn, device)
    if gate is None or not gate.registered:
        raise refuse(
            conn,
            school,
            device,
            f"{device} is not a registered gate of this hub: register it with `edugate hub gates add` (its keys from "
            "`edugate identity` on the gate)",
        )
    if gate.school != school:
        raise refuse(
            conn,
            school,
            device,
            f"{device} is a gate of {gate.school}, not of {school} (a gate moved to another school: "
            f"`edugate hub gates forget {device}`, then add it again)",
        )
    return gate


def check_status(conn: Connection, gate: Gate | None, school: str, device: str, status: dict[str, Any]) -> None:
    """Believe a status only if signed with the registered key; hold a new key for IT; GateRefused otherwise.

    From a gate that is not registered (``gate`` None, or its row made by earlier refusals), a correctly
    self-signed status presents its keys for IT to approve, and is refused like anything else from it.
    """
    registered = gate is not None and gate.registered
    if gate is not None and registered and gate.school != school:
        raise refuse(conn, school, device, f"{device} is a gate of {gate.school}, not of {school}")
    said = status.get("school")
    if said is not None and said != school:  # its own signed word: replayed on another school's topic
        raise refuse(conn, school, device, f"{device}: a status of a gate of {said} on {school}'s topic")
    signing_key, template_key, sig = status.get("signing_key"), status.get("template_key"), status.get("sig")
    if not isinstance(signing_key, str) or not isinstance(sig, str):
        raise refuse(
            conn, school, device, f"{device}: the status is not signed (a gate older than the hub: update the gate)"
        )
    try:
        verify_status(signing_key, status)
    except SignatureError as exc:
        raise refuse(conn, school, device, f"{device}: status signature refused: {exc}") from None
    if gate is not None and registered and signing_key == gate.signing_key:
        if template_key is not None and template_key != gate.template_key:
            raise refuse(conn, school, device, f"{device}: the status's template key is not the registered one")
        return
    if not isinstance(template_key, str):
        raise refuse(conn, school, device, f"{device}: a new signing key without a template key is not taken")
    _hold(conn, gate, school, device, template_key, signing_key)
    what = "registered with other keys" if registered else "not registered"
    raise refuse(conn, school, device, f"{device}: {what}; the key it presents waits for IT: `edugate hub gates list`")


def _hold(conn: Connection, gate: Gate | None, school: str, device: str, template_key: str, signing_key: str) -> None:
    """Keep the presented keys as pending, and say so loudly (a stolen login looks exactly like this): once per
    key, and at most once a minute per gate (a login that keeps presenting other keys must not flood the log)."""
    if gate is not None and (gate.pending_template_key, gate.pending_signing_key) == (template_key, signing_key):
        return
    if not _ensure_row(conn, school, device):
        return  # too many unregistered gates already: not kept
    conn.execute(
        "UPDATE gates SET pending_template_key = ?, pending_signing_key = ?, pending_since = ?, "
        "school = CASE WHEN signing_key IS NULL THEN ? ELSE school END WHERE device = ?",
        [template_key, signing_key, _now(), school, device],
    )
    now = time.monotonic()
    said = _said.setdefault(conn, {})
    last, unsaid = said.get(device, (now - KEY_LOG_EVERY, 0))
    if now - last < KEY_LOG_EVERY:
        said[device] = (last, unsaid + 1)
        return
    said[device] = (now, 0)
    new = fingerprint(template_key, signing_key)
    more = f" ({unsaid} other key(s) presented since the last such line: someone else has its login)" if unsaid else ""
    if gate is not None and gate.registered:
        log.error(
            "hub: gate %s presents a NEW KEY (fingerprint %s, registered %s)%s: nothing is sealed to it and the "
            "gate's status is refused until IT approves. If the gate's key file was replaced, check that "
            "`edugate identity` on the gate shows %s, then `edugate hub gates approve %s --fingerprint %s`; "
            "if not, someone else is using its login: revoke it (scripts/provision-gate --revoke %s)",
            device,
            new,
            gate.fingerprint,
            more,
            new,
            device,
            new,
            device,
        )
    else:
        log.warning(
            "hub: gate %s of %s is not registered; it presents fingerprint %s%s: if `edugate identity` on the gate "
            "shows the same, `edugate hub gates approve %s --fingerprint %s`",
            device,
            school,
            new,
            more,
            device,
            new,
        )
