"""What every card reader gives the rest of the gate: taps, and its own health."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from appliance.events import Direction


@dataclass(frozen=True, slots=True)
class Tap:
    """A card UID read at a reader; ``detected`` is ``time.monotonic()`` when the card was noticed."""

    reader: str
    direction: Direction
    uid: str
    detected: float


TapSink = Callable[[Tap], None]


class ReaderState(StrEnum):
    OK = "ok"
    WAITING = "waiting"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class ReaderHealth:
    """One line of ``edugate status`` for a reader: never contains card numbers."""

    name: str
    type: str
    state: ReaderState
    detail: str
    since: float


class CardReader(Protocol):
    """A reader (or a group of readers sharing one thread) feeding taps into a sink."""

    def start(self, sink: TapSink) -> None: ...

    def stop(self) -> None: ...

    def health(self) -> list[ReaderHealth]: ...


class HealthBoard:
    """Thread-safe per-reader health, changed by reader threads and read by the status writer."""

    def __init__(self, kind: str, names: list[str]) -> None:
        self._kind = kind
        self._lock = threading.Lock()
        now = time.time()
        self._items = {n: ReaderHealth(n, kind, ReaderState.WAITING, "starting", now) for n in names}

    def set(self, name: str, state: ReaderState, detail: str) -> bool:
        """Record a state; returns True when it changed (so callers log transitions only)."""
        with self._lock:
            old = self._items[name]
            if old.state == state and old.detail == detail:
                return False
            self._items[name] = ReaderHealth(name, self._kind, state, detail, time.time())
            return True

    def snapshot(self) -> list[ReaderHealth]:
        with self._lock:
            return list(self._items.values())
