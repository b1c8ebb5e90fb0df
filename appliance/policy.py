"""Attendance policy: turns a tap (who, where, when) into an event, or into a repeat acknowledgement.

Rules, per role (student/staff) from the config:
- a reader bound to ``in`` asks for an arrival, ``out`` for a departure; an ``auto`` reader
  asks for an arrival inside the arrival window and a departure inside the departure window;
- the first arrival (departure) of the day is an ``arrival`` (``departure``) event, later ones are
  plain ``tap`` events kept for the record; a tap outside every window is a ``tap`` too;
- an arrival after the start time (per class for students) plus the grace is late;
- a card seen again on a lane of the same direction within ``debounce_seconds`` is acknowledged
  but makes no event (tapping in, then out on the other lane, is two events);
- an unknown card is an ``unknown_card`` event, an inactive person's card a ``rejected`` one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime
from datetime import time as dtime

from appliance.config import PolicyConfig, RolePolicy
from appliance.events import Direction, EventDraft, Kind, Method
from appliance.roster.model import Person, Role


@dataclass(frozen=True, slots=True)
class Decision:
    """What to journal (``draft``; None for a debounced repeat) and who it was."""

    draft: EventDraft | None
    person: Person | None
    repeat_of: Kind | None = None


def _in_window(t: dtime, window: tuple[dtime, dtime]) -> bool:
    return window[0] <= t <= window[1]


class AttendancePolicy:
    """Holds today's memory (who arrived/departed, when each card was last seen); not thread-safe."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self._day: str | None = None
        self._done: set[tuple[str, Kind]] = set()
        self._last_seen: dict[tuple[str, str], tuple[float, Kind]] = {}

    def _roll_day(self, day: str) -> None:
        if day != self._day:
            self._day = day
            self._done.clear()
            self._last_seen.clear()

    def remember(self, rows: list[tuple[str, str | None, str | None, str, str | None]], now: datetime) -> None:
        """Seed today's memory from the journal after a restart: (kind, person, card_uid, ts, direction) rows."""
        self._roll_day(now.date().isoformat())
        mono = time.monotonic()
        for kind, person, card_uid, ts, direction in rows:
            if person is not None and kind in (Kind.ARRIVAL, Kind.DEPARTURE):
                self._done.add((person, Kind(kind)))
            if card_uid:
                age = (now - datetime.fromisoformat(ts)).total_seconds()
                if 0 <= age <= self.config.debounce_seconds:
                    self._last_seen[(card_uid, direction or Direction.AUTO.value)] = (mono - age, Kind(kind))

    def role_policy(self, role: Role) -> RolePolicy:
        return self.config.staff if role is Role.STAFF else self.config.student

    def start_time(self, person: Person) -> dtime:
        if person.role is Role.STUDENT and person.class_name in self.config.class_start:
            return self.config.class_start[person.class_name]
        return self.role_policy(person.role).start

    def decide(
        self,
        uid: str,
        person: Person | None,
        reader: str,
        direction: Direction,
        now: datetime,
        clock_ok: bool,
        detected: float | None = None,
    ) -> Decision:
        self._roll_day(now.date().isoformat())
        mono = detected if detected is not None else time.monotonic()
        key = (uid, direction.value)
        last = self._last_seen.get(key)
        if last is not None and 0 <= mono - last[0] < self.config.debounce_seconds:
            return Decision(None, person, repeat_of=last[1])

        ts = now.isoformat(timespec="milliseconds")
        common = {
            "ts": ts,
            "clock_ok": clock_ok,
            "reader": reader,
            "direction": direction,
            "card_uid": uid,
            "method": Method.CARD,
        }
        if person is None:
            draft = EventDraft(kind=Kind.UNKNOWN_CARD, **common)
        else:
            return self._decide_person(person, direction, now, common, key, mono)
        self._last_seen[key] = (mono, draft.kind)
        return Decision(draft, person)

    def _decide_person(
        self, person: Person, direction: Direction, now: datetime, common: dict, key: tuple[str, str], mono: float
    ) -> Decision:
        """Shared by card and face: inactive -> rejected, else the attendance rules; then remember it."""
        if not person.active:
            draft = EventDraft(
                kind=Kind.REJECTED, person=person.id, role=person.role.value, reason="inactive", **common
            )
        else:
            draft = self._attendance(person, direction, now, common)
        self._last_seen[key] = (mono, draft.kind)
        if draft.kind in (Kind.ARRIVAL, Kind.DEPARTURE):
            self._done.add((person.id, draft.kind))
        return Decision(draft, person)

    def _attendance(self, person: Person, direction: Direction, now: datetime, common: dict) -> EventDraft:
        rules = self.role_policy(person.role)
        t = now.time().replace(tzinfo=None)
        wanted: Kind | None
        if direction is Direction.IN:
            wanted = Kind.ARRIVAL
        elif direction is Direction.OUT:
            wanted = Kind.DEPARTURE
        elif _in_window(t, rules.arrival_window) and (person.id, Kind.ARRIVAL) not in self._done:
            wanted = Kind.ARRIVAL
        elif _in_window(t, rules.departure_window):
            wanted = Kind.DEPARTURE
        elif _in_window(t, rules.arrival_window):
            wanted = Kind.ARRIVAL
        else:
            wanted = None
        base = {"person": person.id, "role": person.role.value, **common}
        if wanted is None or (person.id, wanted) in self._done:
            return EventDraft(kind=Kind.TAP, **base)
        if wanted is Kind.DEPARTURE:
            return EventDraft(kind=Kind.DEPARTURE, **base)
        start = datetime.combine(now.date(), self.start_time(person), tzinfo=now.tzinfo)
        minutes = (now - start).total_seconds() / 60
        late = minutes > rules.late_grace_minutes
        return EventDraft(kind=Kind.ARRIVAL, late=late, minutes_late=math.floor(minutes) if late else 0, **base)

    def forget(self, uid: str, draft: EventDraft) -> None:
        """Undo the memory of a decision whose event could not be committed, so a retry counts."""
        self._last_seen.pop((uid, (draft.direction or Direction.AUTO).value), None)
        if draft.person is not None:
            self._done.discard((draft.person, draft.kind))

    def decide_face(
        self, person: Person, direction: Direction, now: datetime, clock_ok: bool, score: float, reader: str
    ) -> Decision:
        """Face-only clock-in (staff): the same windows and memory as a card, keyed by the person."""
        self._roll_day(now.date().isoformat())
        key = (f"face:{person.id}", direction.value)
        mono = time.monotonic()
        last = self._last_seen.get(key)
        if last is not None and 0 <= mono - last[0] < self.config.debounce_seconds:
            return Decision(None, person, repeat_of=last[1])
        common = {
            "ts": now.isoformat(timespec="milliseconds"),
            "clock_ok": clock_ok,
            "reader": reader,
            "direction": direction,
            "method": Method.FACE,
            "face_score": round(score, 4),
        }
        return self._decide_person(person, direction, now, common, key, mono)
