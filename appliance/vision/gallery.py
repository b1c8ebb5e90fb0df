"""Enrolled face templates in memory and the 1:N / 1:1 decision rules.

Templates are L2-normalised, so cosine similarity is one matrix-vector product. A face is
identified only when its best person scores at least ``threshold`` AND beats the best other
person by ``margin``: the margin keeps look-alikes (siblings, children of one class) and
strangers "unknown" instead of picking whoever happens to be closest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class MatchResult:
    person: str | None
    score: float
    runner_up: str | None
    runner_up_score: float
    accepted: bool


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); zero rows stay zero rather than becoming NaN."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class Gallery:
    """Several templates per person, held once: one float32 matrix whose rows are every template.

    A daemon holds the whole school in memory, so templates are kept only in the matrix that matching reads
    (not also per person): rows are appended to a buffer that grows by doubling (pages not yet written are
    not resident), and a removed person's rows are dropped by compacting the buffer with a mask. Removal is
    rare (erasure on request) and costs one pass over the rows.

    Not safe for a write during a read from another thread: the daemon builds a new gallery and swaps it in.
    """

    def __init__(self, threshold: float, margin: float, dim: int = 128) -> None:
        self.threshold = threshold
        self.margin = margin
        self.dim = dim
        self._rows = np.zeros((0, dim), dtype=np.float32)  # capacity; the first ``_count`` rows are used
        self._row_owners = np.zeros(0, dtype=np.int32)
        self._count = 0
        self._people: list[str] = []
        self._index: dict[str, int] = {}

    @classmethod
    def from_rows(
        cls, threshold: float, margin: float, rows: np.ndarray, owners: np.ndarray, people: list[str]
    ) -> Gallery:
        """A gallery that adopts ``rows`` as its matrix, where ``rows[i]`` is a template of ``people[owners[i]]``.

        Loading a whole school this way holds the templates once, in the array they were decrypted into,
        with no per-person copies or growth copies on the way. The rows are normalised in place.
        """
        rows = np.require(rows, dtype=np.float32, requirements=["C", "W"])
        owners = np.require(owners, dtype=np.int32)
        if rows.ndim != 2 or owners.shape != (len(rows),):
            raise ValueError(f"need a (n, dim) matrix and n owners, got {rows.shape} and {owners.shape}")
        if len(set(people)) != len(people):
            raise ValueError("a person is listed twice")
        if len(rows) and (owners.min() < 0 or owners.max() >= len(people)):
            raise ValueError("a row's owner is not in the list of people")
        if np.bincount(owners, minlength=len(people)).min(initial=1) == 0:
            raise ValueError("a listed person has no template")
        gallery = cls(threshold, margin, dim=rows.shape[1])
        rows /= np.maximum(np.sqrt(np.einsum("ij,ij->i", rows, rows)), 1e-12)[:, None]  # no (n, dim) temporary
        gallery._rows, gallery._row_owners, gallery._count = rows, owners, len(rows)
        gallery._people = list(people)
        gallery._index = {person: index for index, person in enumerate(people)}
        return gallery

    @property
    def _matrix(self) -> np.ndarray:
        """Every template, one row each (a view: the memory ``match`` reads)."""
        return self._rows[: self._count]

    @property
    def _owners(self) -> np.ndarray:
        """For every row of ``_matrix``, the index of its person in ``_people``."""
        return self._row_owners[: self._count]

    def __len__(self) -> int:
        return self._count

    @property
    def people(self) -> int:
        return len(self._people)

    def __contains__(self, person: str) -> bool:
        return person in self._index

    def add(self, person: str, embeddings: np.ndarray) -> None:
        rows = normalise(embeddings)
        if rows.shape[1] != self.dim:
            raise ValueError(f"template has {rows.shape[1]} values, this model makes {self.dim}")
        if not len(rows):
            return
        owner = self._index.get(person)
        if owner is None:
            owner = self._index[person] = len(self._people)
            self._people.append(person)
        end = self._count + len(rows)
        if end > len(self._rows):
            self._grow(end)
        self._rows[self._count : end] = rows
        self._row_owners[self._count : end] = owner
        self._count = end

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * len(self._rows), 64)
        rows = np.empty((capacity, self.dim), dtype=np.float32)
        owners = np.empty(capacity, dtype=np.int32)
        rows[: self._count] = self._matrix
        owners[: self._count] = self._owners
        self._rows, self._row_owners = rows, owners

    def remove(self, person: str) -> bool:
        owner = self._index.pop(person, None)
        if owner is None:
            return False
        keep = self._owners != owner
        kept = int(keep.sum())
        self._rows[:kept] = self._matrix[keep]
        owners = self._owners[keep]
        self._row_owners[:kept] = np.where(owners > owner, owners - 1, owners)
        self._count = kept
        del self._people[owner]
        for name in self._people[owner:]:
            self._index[name] -= 1
        return True

    def templates(self, person: str) -> np.ndarray | None:
        """A copy of the person's templates (rows), or None if not enrolled."""
        owner = self._index.get(person)
        return None if owner is None else self._matrix[self._owners == owner]

    def match(self, embedding: np.ndarray) -> MatchResult:
        """1:N: who is this face, if anyone."""
        if not self._count:
            return MatchResult(None, -1.0, None, -1.0, False)
        owners = self._owners
        scores = self._matrix @ normalise(embedding)[0]
        best = int(np.argmax(scores))
        owner = owners[best]
        best_score = float(scores[best])
        others = np.where(owners == owner, -2.0, scores)
        second = int(np.argmax(others))
        second_score = float(others[second]) if others[second] > -2.0 else -1.0
        runner_up = self._people[owners[second]] if second_score > -1.0 else None
        accepted = best_score >= self.threshold and best_score - max(second_score, -1.0) >= self.margin
        return MatchResult(self._people[owner], best_score, runner_up, second_score, accepted)

    def verify(self, person: str, embedding: np.ndarray) -> float | None:
        """1:1: how well the face matches this person's best template (None if not enrolled)."""
        rows = self.templates(person)
        if rows is None:
            return None
        return float(np.max(rows @ normalise(embedding)[0]))
