"""Face templates in the journal database, each sealed (encrypted) before it is written.

Only templates are stored, never photos. Rows are bound to (person, model), so a gallery is
loaded per model and a template made by another model is never compared with this one's.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import NamedTuple

import numpy as np

from appliance.journal.db import Database, immediate
from appliance.journal.sealing import Sealer, SealingError


def _context(person_id: str, model: str) -> str:
    return f"{person_id}|{model}"


class LoadedTemplates(NamedTuple):
    """Templates of one model as matrix rows: ``rows[i]`` belongs to ``people[owners[i]]``."""

    people: list[str]
    owners: np.ndarray  # int32, one per row
    rows: np.ndarray  # float32 (n, dim), as stored (not normalised here)
    skipped: int = 0  # stored rows left out: not of this model's size, or not openable with this key


def _grown(array: np.ndarray, size: int) -> np.ndarray:
    bigger = np.empty((size, *array.shape[1:]), dtype=array.dtype)
    bigger[: len(array)] = array
    return bigger


class TemplateStore:
    def __init__(self, database: Database, sealer: Sealer) -> None:
        self.conn = database.conn
        self.sealer = sealer

    def add(self, person_id: str, model: str, embeddings: np.ndarray) -> int:
        rows = np.asarray(embeddings, dtype=np.float32)
        if rows.ndim == 1:
            rows = rows[None, :]
        now = datetime.now(UTC).isoformat(timespec="seconds")
        sealed = [(person_id, model, self.sealer.seal(row.tobytes(), _context(person_id, model)), now) for row in rows]
        with self.conn:
            self.conn.executemany(
                "INSERT INTO templates(person_id, model, sealed, created_at) VALUES (?, ?, ?, ?)", sealed
            )
            self._bump()
        return len(sealed)

    def replace_many(
        self,
        model: str,
        new: dict[str, np.ndarray],
        remove: list[str],
        in_transaction: Callable[[sqlite3.Connection], None] | None = None,
    ) -> tuple[int, int]:
        """The hub's templates: each listed person's rows of ``model`` replaced, ``remove`` erased.

        One transaction, with ``in_transaction`` (version bookkeeping) inside it: a gate never
        holds half a template update. Returns (templates written, people erased).
        """
        now = datetime.now(UTC).isoformat(timespec="seconds")
        rows = [
            (person, model, self.sealer.seal(vector.tobytes(), _context(person, model)), now)
            for person, vectors in new.items()
            for vector in np.asarray(vectors, dtype=np.float32).reshape(len(vectors), -1)
        ]
        with immediate(self.conn) as conn:
            conn.executemany("DELETE FROM templates WHERE person_id = ? AND model = ?", [(p, model) for p in new])
            erased = 0
            for person in remove:
                erased += conn.execute("DELETE FROM templates WHERE person_id = ?", [person]).rowcount > 0
            conn.executemany("INSERT INTO templates(person_id, model, sealed, created_at) VALUES (?, ?, ?, ?)", rows)
            self._bump()
            if in_transaction is not None:
                in_transaction(conn)
        return len(rows), erased

    def remove(self, person_id: str) -> int:
        with self.conn:
            removed = self.conn.execute("DELETE FROM templates WHERE person_id = ?", [person_id]).rowcount
            self._bump()
        return removed

    def _bump(self) -> None:
        self.conn.execute(
            "INSERT INTO meta(key, value) VALUES ('templates_version', '1') "
            "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
        )

    def version(self) -> int:
        """Grows with every change, so a running daemon knows when to reload its gallery."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'templates_version'").fetchone()
        return int(row[0]) if row else 0

    def load(self, model: str) -> dict[str, np.ndarray]:
        """person -> (k, dim) templates of this model, decrypted."""
        grouped: dict[str, list[np.ndarray]] = {}
        for person_id, vector in self._opened(model):
            grouped.setdefault(person_id, []).append(vector)
        return {person: np.vstack(vectors) for person, vectors in grouped.items()}

    def load_matrix(self, model: str, dim: int) -> LoadedTemplates:
        """Every template of this model, decrypted straight into one (n, dim) float32 matrix.

        The daemon holds the whole school and runs for months: rows written one by one into a matrix
        allocated once at its final size leave no per-person arrays or growth copies behind to fragment
        its heap (the gallery adopts the matrix as it is).

        A row that cannot be used (another size than ``dim``, or sealed with another key) is counted in
        ``skipped`` and left out: one bad template must not cost the gate everyone else's faces.
        """
        expected = self.counts(model)[1]
        rows = np.empty((expected, dim), dtype=np.float32)
        owners = np.empty(expected, dtype=np.int32)
        people: list[str] = []
        index: dict[str, int] = {}
        count = skipped = 0
        stored = self.conn.execute("SELECT person_id, sealed FROM templates WHERE model = ? ORDER BY id", [model])
        for person_id, sealed in stored:
            try:
                vector = self._open(person_id, model, sealed)
            except SealingError:
                skipped += 1
                continue
            if len(vector) != dim:
                skipped += 1
                continue
            if count == len(rows):  # enrolled between the count and the read: rare, grow by an eighth
                size = count + 64 + count // 8
                rows, owners = _grown(rows, size), _grown(owners, size)
            owner = index.get(person_id)
            if owner is None:
                owner = index[person_id] = len(people)
                people.append(person_id)
            rows[count], owners[count] = vector, owner
            count += 1
        return LoadedTemplates(people, owners[:count], rows[:count], skipped)

    def _open(self, person_id: str, model: str, sealed: bytes) -> np.ndarray:
        return np.frombuffer(self.sealer.open(sealed, _context(person_id, model)), dtype=np.float32)

    def _opened(self, model: str) -> Iterator[tuple[str, np.ndarray]]:
        """(person, template) of this model in enrollment order, decrypted one at a time."""
        rows = self.conn.execute("SELECT person_id, sealed FROM templates WHERE model = ? ORDER BY id", [model])
        for person_id, sealed in rows:
            yield person_id, self._open(person_id, model, sealed)

    def counts(self, model: str | None = None) -> tuple[int, int]:
        """(people, templates), for one model or all."""
        where, params = ("WHERE model = ?", [model]) if model else ("", [])
        row = self.conn.execute(f"SELECT COUNT(DISTINCT person_id), COUNT(*) FROM templates {where}", params)
        people, templates = row.fetchone()
        return people, templates
