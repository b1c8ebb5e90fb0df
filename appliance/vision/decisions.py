"""What the face side tells the gate, kept free of model imports so a card-only gate never loads them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True, slots=True)
class FaceDecision:
    """One person's pass in front of the camera: identified (``person`` set, ``accepted``) or unknown."""

    person: str | None
    score: float
    accepted: bool
    track: int
    at: float


class Verdict(StrEnum):
    MATCH = "match"
    MISMATCH = "mismatch"
    NO_FACE = "no_face"
    NOT_ENROLLED = "not_enrolled"


@dataclass(frozen=True, slots=True)
class Verification:
    """A card tap checked 1:1 against the faces just seen."""

    verdict: Verdict
    score: float | None = None
