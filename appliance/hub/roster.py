"""The school's roster and enrolled face templates as the hub keeps them, to be published to the gates.

People come from the same CSV/XLSX exports a gate imports (appliance/roster/importer.py, the hub's
``[roster]`` settings), all or nothing; a file is the school's whole roster, so people missing
from it are deactivated (kept, so their past events still resolve). Cards stay unique within a
school: a card given to someone in the file is taken from whoever held it before.

Face templates are enrolled at a gate (camera, photos) and sealed there with the gate's key. The
hub takes them from a copy of that gate's journal and the gate's key file, and seals them again
with its own key (``signing.template_key_file``, AES-256-GCM as on the gates), one sealed blob per
(school, person, model) bound to those three as associated data: a copied hub database gives no
face template away, and a blob moved to another person does not open.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from appliance.config import HubConfig
from appliance.hub.store import Connection
from appliance.journal import open_database
from appliance.journal.sealing import KEY_BYTES, Sealer, SealingError, load_or_create_key
from appliance.journal.template_store import TemplateStore
from appliance.roster.model import Person, Role

MAX_TEMPLATES_PER_PERSON = 50  # what one downlink message may carry per person (downlink.schema.json)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class RosterImport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deactivated: int = 0
    cards_moved: list[tuple[str, str, str]] = field(default_factory=list)  # (uid, from, to)


def _row(person: Person) -> tuple[str, str, str | None, int, str, str, str]:
    """The stored form of a person (cards sorted: the same person always compares equal)."""
    return (
        person.full_name,
        person.role.value,
        person.class_name,
        int(person.active),
        json.dumps(sorted(set(person.cards))),
        json.dumps(list(person.parent_phones)),
        json.dumps(list(person.parent_emails), ensure_ascii=False),
    )


def import_people(conn: Connection, school: str, people: list[Person], replace: bool = True) -> RosterImport:
    """Write a checked roster into ``people`` in one transaction.

    ``replace``: the file is the whole roster: people of the school missing from it are
    deactivated and a card of theirs given to someone in the file moves. Without it (a merge), a
    card held by someone outside the file is an error (ValueError) and nothing is written.
    """
    report = RosterImport()
    incoming = {p.id: p for p in people}
    now = _now()
    with conn.transaction():
        existing = {
            row[0]: row[1:]
            for row in conn.all(
                "SELECT id, full_name, role, class_name, active, cards, parent_phones, parent_emails "
                "FROM people WHERE school = ?",
                [school],
            )
        }
        owner_of = {uid: pid for pid, row in existing.items() for uid in json.loads(row[4])}
        taken: dict[str, set[str]] = {}
        for person in people:
            for uid in person.cards:
                owner = owner_of.get(uid)
                if owner is None or owner in incoming:
                    continue
                if not replace:
                    raise ValueError(f"card {uid} already belongs to {owner}, who is not in this file")
                taken.setdefault(owner, set()).add(uid)
                report.cards_moved.append((uid, owner, person.id))
        for person in people:
            row = _row(person)
            old = existing.get(person.id)
            if old is not None and tuple(old) == row:
                report.unchanged += 1
                continue
            if old is None:
                report.added += 1
            else:
                report.updated += 1
            conn.execute(
                "INSERT INTO people(school, id, full_name, role, class_name, active, cards, parent_phones, "
                "parent_emails, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(school, id) DO UPDATE "
                "SET full_name = excluded.full_name, role = excluded.role, class_name = excluded.class_name, "
                "active = excluded.active, cards = excluded.cards, parent_phones = excluded.parent_phones, "
                "parent_emails = excluded.parent_emails, updated_at = excluded.updated_at",
                [school, person.id, *row, now],
            )
        for pid, old in existing.items():
            if pid in incoming:
                continue
            active = bool(old[3]) and not replace
            cards = sorted(set(json.loads(old[4])) - taken.get(pid, set()))
            if (bool(old[3]), json.loads(old[4])) == (active, cards):
                continue
            report.deactivated += bool(old[3]) and not active
            conn.execute(
                "UPDATE people SET active = ?, cards = ?, updated_at = ? WHERE school = ? AND id = ?",
                [int(active), json.dumps(cards), now, school, pid],
            )
    return report


def roster_people(conn: Connection, school: str) -> list[dict[str, object]]:
    """The school's people as a gate needs them: no parents' phones or e-mails (the gate has no use for them)."""
    people = []
    for pid, name, role, class_name, active, cards in conn.all(
        "SELECT id, full_name, role, class_name, active, cards FROM people WHERE school = ?", [school]
    ):
        people.append(
            {
                "id": pid,
                "full_name": name,
                "role": Role(role).value,
                "class_name": class_name,
                "active": bool(active),
                "cards": sorted(json.loads(cards)),
            }
        )
    return sorted(people, key=lambda p: str(p["id"]))  # one order on SQLite and PostgreSQL: one digest


# ----------------------------------------------------------------------------------------------- templates


class TemplateKeyError(Exception):
    """A template key or sealed template that cannot be used; the message says which file and why."""


def hub_sealer(config: HubConfig, create: bool) -> Sealer:
    """The hub's template key; created (0600) only when templates are being stored, never to read them."""
    path = config.signing.template_key_file
    if not create and not path.exists():
        raise TemplateKeyError(f"signing.template_key_file {path}: missing, so the hub's templates cannot be opened")
    try:
        return Sealer(load_or_create_key(path))
    except SealingError as exc:
        raise TemplateKeyError(str(exc)) from None
    except OSError as exc:
        raise TemplateKeyError(f"signing.template_key_file {path}: {exc.strerror}") from None


def _context(school: str, person: str, model: str) -> str:
    return f"hub|{school}|{person}|{model}"


def _encode(vectors: np.ndarray) -> list[str]:
    """Templates in the downlink's wire form: base64 of little-endian float32, one string per vector."""
    rows = np.asarray(vectors, dtype="<f4")
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in rows.reshape(len(rows), -1)]


@dataclass
class TemplateImport:
    people: int = 0
    templates: int = 0
    trimmed: int = 0  # people with more than MAX_TEMPLATES_PER_PERSON: only their newest were kept
    not_on_roster: int = 0
    models: list[str] = field(default_factory=list)


def read_gate_templates(journal: Path, key_file: Path, model: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """model -> person -> (k, dim) templates, opened from a gate's journal with that gate's key.

    The key must exist: a mistyped path must not create a new, useless key (as a gate does on first use).
    """
    if not key_file.is_file():
        raise TemplateKeyError(f"{key_file}: no such key file (the gate's vision.key_file)")
    try:
        raw = key_file.read_bytes()
    except OSError as exc:
        raise TemplateKeyError(f"{key_file}: {exc.strerror}") from None
    if len(raw) != KEY_BYTES:
        raise TemplateKeyError(f"{key_file}: not a template key ({len(raw)} bytes, expected {KEY_BYTES})")
    database = open_database(journal, readonly=True)
    try:
        models = [r[0] for r in database.conn.execute("SELECT DISTINCT model FROM templates ORDER BY model")]
        if model is not None:
            if model not in models:
                found = ", ".join(models) or "none"
                raise TemplateKeyError(f"{journal}: no templates of model {model!r} (models there: {found})")
            models = [model]
        store = TemplateStore(database, Sealer(raw))
        try:
            return {name: store.load(name) for name in models}
        except SealingError:
            raise TemplateKeyError(
                f"{key_file}: the templates in {journal} do not open with this key (another gate's key?)"
            ) from None
    except sqlite3.DatabaseError as exc:  # a copy taken while the gate wrote, or from a damaged card
        raise TemplateKeyError(
            f"{journal}: this journal copy cannot be read ({exc}); stop edugate on the gate and copy it again"
        ) from None
    finally:
        database.close()


def import_templates(
    conn: Connection, sealer: Sealer, school: str, templates: dict[str, dict[str, np.ndarray]]
) -> TemplateImport:
    """Seal each person's templates with the hub's key, replacing what the hub held for that person and model.

    People enrolled elsewhere and not in ``templates`` keep theirs. All in one transaction.
    """
    report = TemplateImport(models=sorted(templates))
    known = {r[0] for r in conn.all("SELECT id FROM people WHERE school = ?", [school])}
    now = _now()
    rows = []
    for model, people in templates.items():
        for person, vectors in people.items():
            matrix = np.asarray(vectors, dtype=np.float32)
            if len(matrix) > MAX_TEMPLATES_PER_PERSON:
                matrix = matrix[-MAX_TEMPLATES_PER_PERSON:]  # enrollment order: the newest last
                report.trimmed += 1
            plain = json.dumps(_encode(matrix)).encode("ascii")
            sealed = base64.b64encode(sealer.seal(plain, _context(school, person, model))).decode("ascii")
            rows.append([school, person, model, sealed, now])
            report.templates += len(matrix)
        report.people += len(people)
        report.not_on_roster += len(set(people) - known)
    with conn.transaction():
        conn.executemany(
            "INSERT INTO templates(school, person, model, sealed, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(school, person, model) DO UPDATE SET sealed = excluded.sealed, "
            "updated_at = excluded.updated_at",
            rows,
        )
    return report


def template_models(conn: Connection, school: str) -> list[str]:
    return [r[0] for r in conn.all("SELECT DISTINCT model FROM templates WHERE school = ? ORDER BY model", [school])]


def hub_templates(conn: Connection, sealer: Sealer, school: str, model: str) -> dict[str, list[str]]:
    """person -> templates (wire form) of this model, opened with the hub's key."""
    out: dict[str, list[str]] = {}
    for person, sealed in conn.all(
        "SELECT person, sealed FROM templates WHERE school = ? AND model = ? ORDER BY person", [school, model]
    ):
        try:
            plain = sealer.open(base64.b64decode(sealed), _context(school, person, model))
        except SealingError:
            raise TemplateKeyError(
                "a stored face template does not open with signing.template_key_file (wrong key file, or the "
                "database was changed); import the templates again"
            ) from None
        out[person] = json.loads(plain)
    return out


def remove_templates(conn: Connection, school: str, people: list[str]) -> int:
    """Erase people's templates at the hub (every model); the next publish erases them on the gates."""
    removed = 0
    with conn.transaction():
        for person in people:
            removed += conn.execute("DELETE FROM templates WHERE school = ? AND person = ?", [school, person]).rowcount
    return removed
