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
    """Several templates per person; the stacked matrix is rebuilt lazily after changes."""

    def __init__(self, threshold: float, margin: float, dim: int = 128) -> None:
        self.threshold = threshold
        self.margin = margin
        self.dim = dim
        self._templates: dict[str, np.ndarray] = {}
        self._matrix = np.zeros((0, dim), dtype=np.float32)
        self._owners = np.zeros(0, dtype=np.int32)
        self._people: list[str] = []
        self._dirty = False

    def __len__(self) -> int:
        return sum(len(t) for t in self._templates.values())

    @property
    def people(self) -> int:
        return len(self._templates)

    def __contains__(self, person: str) -> bool:
        return person in self._templates

    def add(self, person: str, embeddings: np.ndarray) -> None:
        rows = normalise(embeddings)
        if rows.shape[1] != self.dim:
            raise ValueError(f"template has {rows.shape[1]} values, this model makes {self.dim}")
        old = self._templates.get(person)
        self._templates[person] = rows if old is None else np.vstack([old, rows])
        self._dirty = True

    def remove(self, person: str) -> bool:
        found = self._templates.pop(person, None) is not None
        self._dirty = self._dirty or found
        return found

    def templates(self, person: str) -> np.ndarray | None:
        return self._templates.get(person)

    def _rebuild(self) -> None:
        self._people = list(self._templates)
        if self._people:
            self._matrix = np.ascontiguousarray(np.vstack([self._templates[p] for p in self._people]))
            self._owners = np.repeat(
                np.arange(len(self._people), dtype=np.int32), [len(self._templates[p]) for p in self._people]
            )
        else:
            self._matrix = np.zeros((0, self.dim), dtype=np.float32)
            self._owners = np.zeros(0, dtype=np.int32)
        self._dirty = False

    def match(self, embedding: np.ndarray) -> MatchResult:
        """1:N: who is this face, if anyone."""
        if self._dirty:
            self._rebuild()
        if not self._people:
            return MatchResult(None, -1.0, None, -1.0, False)
        scores = self._matrix @ normalise(embedding)[0]
        best = int(np.argmax(scores))
        owner = self._owners[best]
        best_score = float(scores[best])
        others = np.where(self._owners == owner, -2.0, scores)
        second = int(np.argmax(others))
        second_score = float(others[second]) if others[second] > -2.0 else -1.0
        runner_up = self._people[self._owners[second]] if second_score > -1.0 else None
        accepted = best_score >= self.threshold and best_score - max(second_score, -1.0) >= self.margin
        return MatchResult(self._people[owner], best_score, runner_up, second_score, accepted)

    def verify(self, person: str, embedding: np.ndarray) -> float | None:
        """1:1: how well the face matches this person's best template (None if not enrolled)."""
        rows = self._templates.get(person)
        if rows is None:
            return None
        return float(np.max(rows @ normalise(embedding)[0]))
