"""Faces at the gate: camera frames through the pipeline into decisions, and 1:1 checks of card taps.

It runs beside the card path and never blocks it: if the models or the camera fail, the gate
keeps taking cards and status says which part is degraded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from appliance.config import VisionConfig
from appliance.journal.db import Database
from appliance.vision.decisions import FaceDecision, Verdict, Verification
from appliance.vision.pipeline import FacePipeline
from appliance.vision.service import FaceService

log = logging.getLogger(__name__)


class FrameSource(Protocol):
    """What the face gate needs from a camera (see appliance.vision.camera)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def latest(self, after_index: int | None = None, timeout: float = 1.0) -> Any: ...

    def health(self) -> Any: ...


class FaceGate:
    def __init__(self, service: FaceService, frames: FrameSource | None, sink: Callable[[FaceDecision], None]) -> None:
        self.service = service
        self.pipeline = FacePipeline(service.engine, lambda: service.gallery)
        self.frames = frames
        self.sink = sink
        self.error: str | None = None
        self.reload_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(
        cls, config: VisionConfig, database: Database, frames: FrameSource | None, sink: Callable[[FaceDecision], None]
    ) -> FaceGate:
        return cls(FaceService(config, database), frames, sink)

    def start(self) -> None:
        if self.frames is None:
            return
        self.frames.start()
        self._thread = threading.Thread(target=self._run, name="vision", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.frames is not None:
            self.frames.stop()

    def _run(self) -> None:
        assert self.frames is not None
        index: int | None = None
        last_reload = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - last_reload > 5.0:
                last_reload = now
                self._reload()
            frame = self.frames.latest(after_index=index, timeout=0.5)
            if frame is None:
                for decision in self.pipeline.flush(time.monotonic()):
                    self.sink(decision)
                continue
            index = frame.index
            try:
                decisions = self.pipeline.process(frame.image, frame.mono)
                self.error = None
            except Exception as exc:  # a model failure must not take the card path down
                if self.error is None:
                    log.exception("face pipeline failed; cards keep working")
                self.error = f"face pipeline failed: {exc}"
                self._stop.wait(1.0)
                continue
            for decision in decisions:
                self.sink(decision)

    def _reload(self) -> None:
        """Pick up enrollments and hub templates; a failure (a locked database) keeps the gallery in use."""
        try:
            self.service.reload()
            self.reload_error = None
        except Exception as exc:
            if self.reload_error is None:
                log.exception("face gallery reload failed; matching goes on with the gallery loaded before")
            self.reload_error = f"face gallery reload failed: {exc}"

    def verify(self, person_id: str, now: float | None = None) -> Verification:
        """Is the face in front of the camera right now the cardholder's?"""
        gallery = self.service.gallery
        if person_id not in gallery:
            return Verification(Verdict.NOT_ENROLLED)
        recent = self.pipeline.recent_embeddings(time.monotonic() if now is None else now)
        if not recent:
            return Verification(Verdict.NO_FACE)
        best = max(gallery.verify(person_id, embedding) or -1.0 for embedding in recent)
        verdict = Verdict.MATCH if best >= gallery.threshold else Verdict.MISMATCH
        return Verification(verdict, round(best, 4))

    def health(self) -> dict[str, Any]:
        camera = self.frames.health() if self.frames is not None else None
        detail = f"{self.service.gallery.people} people enrolled"
        if self.service.skipped:
            detail += f", {self.service.skipped} stored templates left out (see the log)"
        problem = self.error or self.reload_error
        return {
            "state": "error" if self.error else "degraded" if problem or self.service.skipped else "ok",
            "detail": problem or detail,
            "camera": camera.as_dict() if hasattr(camera, "as_dict") else camera,
            "stats": dict(self.pipeline.stats),
        }
