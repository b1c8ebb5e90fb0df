"""The roster as kept in the journal database: people, their cards, a version that grows on change.

Parents' phones and e-mails are never kept here: the gate never uses them, and a stolen gate (its SD
card) must not give away how to reach every child's family. The ``persons`` table still has their
columns (older journals filled them); they hold ``[]``, and opening the roster empties any that do not.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from appliance.journal.db import Database, immediate
from appliance.roster.model import Person, Role, fold

log = logging.getLogger(__name__)

_PERSON_SQL = (
    "SELECT p.id, p.full_name, p.role, p.class_name, p.active, "
    "(SELECT group_concat(uid, ';') FROM cards c WHERE c.person_id = p.id) FROM persons p"
)
_KEPT_CONTACTS = "parent_phones <> '[]' OR parent_emails <> '[]'"


@dataclass
class ApplyReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deactivated: list[str] = field(default_factory=list)
    cards_moved: list[tuple[str, str, str]] = field(default_factory=list)
    version: int = 0


def _row_to_person(row: tuple) -> Person:
    pid, name, role, class_name, active, cards = row
    return Person(pid, name, Role(role), class_name, bool(active), tuple(sorted(cards.split(";"))) if cards else ())


def _empty_contacts(conn: sqlite3.Connection) -> int:
    """Empty every parent contact still in the table (inside the caller's transaction); returns the rows changed."""
    sql = f"UPDATE persons SET parent_phones = '[]', parent_emails = '[]' WHERE {_KEPT_CONTACTS}"
    return conn.execute(sql).rowcount


def forget_parent_contacts(conn: sqlite3.Connection) -> int:
    """Remove the parents' phones and e-mails an older version kept, from the rows and from the file's bytes.

    ``secure_delete`` zeroes the old values in the pages instead of leaving them in free space, and the
    checkpoint copies the cleaned pages over the old ones in the main file and empties the WAL. Returns the
    number of people cleaned (0, without writing, when there was nothing to clean).
    """
    if conn.execute(f"SELECT NOT EXISTS (SELECT 1 FROM persons WHERE {_KEPT_CONTACTS})").fetchone()[0]:
        return 0
    secure = conn.execute("PRAGMA secure_delete").fetchone()[0]
    conn.execute("PRAGMA secure_delete = ON")
    try:
        with immediate(conn):
            cleaned = _empty_contacts(conn)
    finally:
        conn.execute(f"PRAGMA secure_delete = {int(secure)}")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    log.info("roster: removed parents' phones and e-mails of %d people from the journal (a gate needs none)", cleaned)
    return cleaned


class RosterStore:
    """Reads for the gate (card lookup per tap, always fresh) and all-or-nothing writes for imports.

    Opening it on a writable journal removes parents' contacts an older version kept (the daemon opens it at
    every start); on a read-only one that waits for the next writer.
    """

    def __init__(self, database: Database) -> None:
        self.conn = database.conn
        try:
            forget_parent_contacts(self.conn)
        except sqlite3.OperationalError as exc:  # a read-only journal (edugate roster list), or a busy one
            log.debug("roster: parents' contacts left for the next writer: %s", exc)

    def by_card(self, uid: str) -> Person | None:
        row = self.conn.execute(
            _PERSON_SQL + " WHERE p.id = (SELECT person_id FROM cards WHERE uid = ?)", [uid]
        ).fetchone()
        return _row_to_person(row) if row else None

    def get(self, person_id: str) -> Person | None:
        row = self.conn.execute(_PERSON_SQL + " WHERE p.id = ?", [person_id]).fetchone()
        return _row_to_person(row) if row else None

    def all(self) -> list[Person]:
        return [_row_to_person(r) for r in self.conn.execute(_PERSON_SQL + " ORDER BY p.id")]

    def search(self, text: str) -> list[Person]:
        """People whose name contains ``text``, with or without diacritics."""
        pattern = f"%{fold(text)}%"
        rows = self.conn.execute(_PERSON_SQL + " WHERE p.search_name LIKE ? ORDER BY p.id", [pattern])
        return [_row_to_person(r) for r in rows]

    def count(self) -> tuple[int, int]:
        """(people, cards)."""
        people = self.conn.execute("SELECT COUNT(*) FROM persons").fetchone()[0]
        cards = self.conn.execute("SELECT COUNT(*) FROM cards").fetchone()[0]
        return people, cards

    def version(self) -> int:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'roster_version'").fetchone()
        return int(row[0]) if row else 0

    def card_owners(self, uids: list[str]) -> dict[str, str]:
        marks = ",".join("?" * len(uids))
        rows = self.conn.execute(f"SELECT uid, person_id FROM cards WHERE uid IN ({marks})", uids) if uids else []
        return dict(rows)

    def apply(
        self,
        people: list[Person],
        replace: bool,
        deactivate: Sequence[str] = (),
        move_cards: bool = False,
        in_transaction: Callable[[sqlite3.Connection], None] | None = None,
    ) -> ApplyReport:
        """Write the people in one transaction.

        ``deactivate``: ids to deactivate besides, and ``move_cards``: a card held by someone outside
        the list goes to its new holder (both for a hub's roster delta, which is authoritative). ``in_transaction`` runs
        inside the same transaction before the commit (the hub's version bookkeeping), so the
        change and its record land together or not at all.

        ``replace``: the file is the whole roster, so people missing from it are deactivated
        (kept, so their past events still resolve) and their cards may be given to others.
        Without it, a card already held by someone outside the file is an error (ValueError).
        """
        report = ApplyReport()
        now = datetime.now(UTC).isoformat(timespec="seconds")
        people = [p.without_contacts() for p in people]
        incoming = {p.id: p for p in people}
        with immediate(self.conn) as conn:
            existing = {p.id: p for p in self.all()}
            owners = self.card_owners([uid for p in people for uid in p.cards])
            for uid, owner in owners.items():
                if owner in incoming:
                    continue
                if not (replace or move_cards):
                    raise ValueError(f"card {uid} already belongs to {owner}, who is not in this file")
                new_owner = next(p.id for p in people if uid in p.cards)
                report.cards_moved.append((uid, owner, new_owner))
            for person in people:
                old = existing.get(person.id)
                if old == person:
                    report.unchanged += 1
                    continue
                if old is None:
                    report.added += 1
                else:
                    report.updated += 1
                conn.execute(
                    "INSERT INTO persons(id, full_name, search_name, class_name, role, active, updated_at) "
                    "VALUES (?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
                    "full_name=excluded.full_name, search_name=excluded.search_name, class_name=excluded.class_name, "
                    "role=excluded.role, active=excluded.active, updated_at=excluded.updated_at",
                    [
                        person.id,
                        person.full_name,
                        fold(person.full_name),
                        person.class_name,
                        person.role.value,
                        int(person.active),
                        now,
                    ],
                )
                conn.execute("DELETE FROM cards WHERE person_id = ?", [person.id])
                conn.executemany(
                    "INSERT OR REPLACE INTO cards(uid, person_id) VALUES (?, ?)",
                    [(uid, person.id) for uid in person.cards],
                )
            for pid, old in existing.items():
                gone = replace and pid not in incoming
                if (gone or (pid in deactivate and pid not in incoming)) and old.active:
                    conn.execute("UPDATE persons SET active = 0, updated_at = ? WHERE id = ?", [now, pid])
                    report.deactivated.append(pid)
            _empty_contacts(conn)
            report.version = self.version() + (1 if (report.added or report.updated or report.deactivated) else 0)
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('roster_version', ?)", [str(report.version)])
            if in_transaction is not None:
                in_transaction(conn)
        return report
