"""A lane driven from code (the demo's script and keyboard, tests, benchmarks)."""

from __future__ import annotations

import time

from appliance.events import Direction
from appliance.readers.base import HealthBoard, ReaderHealth, ReaderState, Tap, TapSink


class SimulatedReader:
    def __init__(self, name: str, direction: Direction = Direction.AUTO) -> None:
        self.name = name
        self.direction = direction
        self.board = HealthBoard("simulated", [name])
        self._sink: TapSink | None = None

    def start(self, sink: TapSink) -> None:
        self._sink = sink
        self.board.set(self.name, ReaderState.OK, "ready")

    def tap(self, uid: str) -> Tap:
        if self._sink is None:
            raise RuntimeError("reader not started")
        tap = Tap(self.name, self.direction, uid, time.monotonic())
        self._sink(tap)
        return tap

    def stop(self) -> None:
        self._sink = None

    def health(self) -> list[ReaderHealth]:
        return self.board.snapshot()
