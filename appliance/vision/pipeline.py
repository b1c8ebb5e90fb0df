"""Frames -> one decision per person per pass: tracking, motion skip, a few embeddings per track.

Embedding is the expensive step (tens of ms per face on a Pi), so faces are tracked across
frames by box overlap and each track is embedded only a few times; detection itself is
skipped while nothing in the frame moves. A track that reaches a confident match is decided
at once (a teacher walking in should not wait); a track that leaves still unknown becomes an
"unknown face" decision. Recent embeddings are kept briefly so that a card tapped a moment
after the face was seen can still be verified against it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from appliance.vision.decisions import FaceDecision
from appliance.vision.detect import Face
from appliance.vision.engine import FaceEngine
from appliance.vision.gallery import Gallery, MatchResult, normalise


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    iou_match: float = 0.3
    embeds_per_track: int = 3
    embed_every: int = 2  # frames between two embeddings of one track
    track_timeout: float = 1.0  # seconds unseen before a track's pass ends
    motion_threshold: float = 2.0  # mean absolute grey difference (0..255) of a 64x48 thumbnail
    recent_seconds: float = 3.0  # how long faces stay available for card verification


@dataclass
class _Track:
    id: int
    box: tuple[float, float, float, float]
    first_seen: float
    last_seen: float
    frames: int = 0
    last_embed_frame: int = -(10**9)
    embeddings: list[np.ndarray] = field(default_factory=list)
    decided: bool = False
    best: MatchResult | None = None


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    w = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    h = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = w * h
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


class FacePipeline:
    """Not thread-safe for ``process`` (one vision thread); ``recent_*`` may be called from the gate thread."""

    def __init__(
        self, engine: FaceEngine, gallery: Callable[[], Gallery], settings: PipelineSettings | None = None
    ) -> None:
        self.engine = engine
        self.gallery = gallery
        self.settings = settings or PipelineSettings()
        self._tracks: list[_Track] = []
        self._next_id = 1
        self._thumb: np.ndarray | None = None
        self._recent: list[tuple[float, np.ndarray]] = []
        self._recent_lock = threading.Lock()
        self.stats = {"frames": 0, "skipped": 0, "detections": 0, "embeddings": 0}

    def _moved(self, image: np.ndarray) -> bool:
        thumb = cv2.cvtColor(cv2.resize(image, (64, 48), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2GRAY)
        previous, self._thumb = self._thumb, thumb.astype(np.int16)
        if previous is None:
            return True
        return float(np.mean(np.abs(self._thumb - previous))) >= self.settings.motion_threshold

    def process(self, image: np.ndarray, now: float) -> list[FaceDecision]:
        """Feed one frame (BGR) taken at monotonic time ``now``; returns the decisions it completed."""
        self.stats["frames"] += 1
        decisions = self._expire(now)
        if not self._moved(image) and not self._tracks:
            self.stats["skipped"] += 1
            return decisions
        faces = self.engine.detect(image)
        self.stats["detections"] += 1
        for track, face in self._associate(faces, now):
            track.frames += 1
            wants = len(track.embeddings) < self.settings.embeds_per_track and not track.decided
            if wants and track.frames - track.last_embed_frame >= self.settings.embed_every:
                observation = self.engine.observe(image, [face])[0]
                track.last_embed_frame = track.frames
                if observation.embedding is not None:
                    self.stats["embeddings"] += 1
                    track.embeddings.append(observation.embedding)
                    with self._recent_lock:
                        self._recent.append((now, observation.embedding))
                    decision = self._judge(track, now)
                    if decision is not None:
                        decisions.append(decision)
        return decisions

    def _associate(self, faces: list[Face], now: float) -> list[tuple[_Track, Face]]:
        pairs = []
        free = list(self._tracks)
        for face in faces:
            best = max(free, key=lambda t: iou(t.box, face.box), default=None)
            if best is not None and iou(best.box, face.box) >= self.settings.iou_match:
                free.remove(best)
                track = best
            else:
                track = _Track(self._next_id, face.box, now, now)
                self._next_id += 1
                self._tracks.append(track)
            track.box, track.last_seen = face.box, now
            pairs.append((track, face))
        return pairs

    def _judge(self, track: _Track, now: float) -> FaceDecision | None:
        """Match the track's mean embedding; decide at once only when confident."""
        mean = normalise(np.mean(track.embeddings, axis=0))[0]
        track.best = self.gallery().match(mean)
        if track.best.accepted and not track.decided:
            track.decided = True
            return FaceDecision(track.best.person, track.best.score, True, track.id, now)
        return None

    def _expire(self, now: float) -> list[FaceDecision]:
        decisions = []
        alive = []
        for track in self._tracks:
            if now - track.last_seen <= self.settings.track_timeout:
                alive.append(track)
            elif not track.decided and track.embeddings and track.best is not None:
                decisions.append(FaceDecision(None, track.best.score, False, track.id, now))
        self._tracks = alive
        with self._recent_lock:
            self._recent = [(t, e) for t, e in self._recent if now - t <= self.settings.recent_seconds]
        return decisions

    def flush(self, now: float) -> list[FaceDecision]:
        """End every pass (the camera stopped or a benchmark ended)."""
        for track in self._tracks:
            track.last_seen = -1e9
        return self._expire(now)

    def recent_embeddings(self, now: float) -> list[np.ndarray]:
        """Faces embedded in the last ``recent_seconds``: what a card tap is verified against."""
        with self._recent_lock:
            return [e for t, e in self._recent if now - t <= self.settings.recent_seconds]
