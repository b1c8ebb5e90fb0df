"""The attendance event: the one record every part of edugate passes around.

Defined once here and imported everywhere (policy, journal, sync, hub), so that the
wire format, the journal rows and the JSON Schema in ``schema/event.schema.json`` agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from enum import StrEnum
from functools import cache
from importlib import resources
from typing import Any

SCHEMA_VERSION = 1


class Kind(StrEnum):
    """What happened at the gate."""

    ARRIVAL = "arrival"
    DEPARTURE = "departure"
    TAP = "tap"
    UNKNOWN_CARD = "unknown_card"
    REJECTED = "rejected"
    CARD_FACE_MISMATCH = "card_face_mismatch"
    UNKNOWN_FACE = "unknown_face"


class Method(StrEnum):
    """How the person was identified."""

    CARD = "card"
    FACE = "face"
    CARD_FACE = "card+face"


class Direction(StrEnum):
    """Which way a reader's lane goes; ``auto`` lets the time windows decide."""

    IN = "in"
    OUT = "out"
    AUTO = "auto"


@dataclass(frozen=True, slots=True)
class EventDraft:
    """An event decided by the policy but not yet journalled (no id, no seq)."""

    kind: Kind
    ts: str
    clock_ok: bool
    method: Method = Method.CARD
    person: str | None = None
    role: str | None = None
    reader: str | None = None
    direction: Direction | None = None
    card_uid: str | None = None
    face_score: float | None = None
    late: bool | None = None
    minutes_late: int | None = None
    reason: str | None = None


# The draft's fields are all scalars: reading them directly avoids asdict()'s deep copies on the hot path.
_DRAFT_FIELDS = tuple(f.name for f in fields(EventDraft))


@dataclass(frozen=True, slots=True)
class Event:
    """A journalled event: a draft plus its identity on the device."""

    id: str
    device: str
    journal: str
    seq: int
    draft: EventDraft = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The wire form (also what the journal stores): flat, ``None`` fields left out."""
        out: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "id": self.id,
            "device": self.device,
            "journal": self.journal,
            "seq": self.seq,
        }
        for key in _DRAFT_FIELDS:
            value = getattr(self.draft, key)
            if value is not None or key == "person":
                out[key] = str(value) if isinstance(value, StrEnum) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        draft_fields = {k: v for k, v in data.items() if k in EventDraft.__dataclass_fields__}
        draft_fields["kind"] = Kind(draft_fields["kind"])
        draft_fields["method"] = Method(draft_fields.get("method", Method.CARD))
        if draft_fields.get("direction") is not None:
            draft_fields["direction"] = Direction(draft_fields["direction"])
        return cls(
            id=data["id"],
            device=data["device"],
            journal=data["journal"],
            seq=data["seq"],
            draft=EventDraft(**draft_fields),
        )

    @classmethod
    def from_json(cls, text: str) -> Event:
        return cls.from_dict(json.loads(text))

    @property
    def kind(self) -> Kind:
        return self.draft.kind

    @property
    def ts(self) -> str:
        return self.draft.ts

    @property
    def person(self) -> str | None:
        return self.draft.person


@cache
def event_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) that every published event must satisfy."""
    text = resources.files("appliance.schema").joinpath("event.schema.json").read_text("utf-8")
    return json.loads(text)
