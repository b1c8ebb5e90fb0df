"""Frames -> one decision per person per pass: tracking, motion skip, a few embeddings per track.

Embedding is the expensive step (tens of ms per face on a Pi), so faces are tracked across
frames and each track is embedded only a few times; detection itself is skipped while nothing
in the frame moves. A lost track costs another embedding and, for a stranger, another
"unknown face", so tracking must hold at a brisk walk on a slow device: a face can move more
than its own width between two processed frames. Each track therefore predicts where its face
is now (constant velocity over its last few sightings) and takes the nearest detection within
how far a face can travel in the time since, measured in face widths; the closest pairs are
linked first, so two people side by side keep their own tracks, and a track outlives a missed
detection or two. A track that reaches a confident match is decided at once (a teacher walking
in should not wait); a track that leaves still unknown becomes an "unknown face" decision.
Recent embeddings are kept briefly so that a card tapped a moment after the face was seen can
still be verified against it.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from appliance.vision.decisions import FaceDecision
from appliance.vision.detect import Face
from appliance.vision.engine import FaceEngine
from appliance.vision.gallery import Gallery, MatchResult, normalise

Box = tuple[float, float, float, float]  # x, y, width, height


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    iou_match: float = 0.3  # a detection overlapping a track's predicted box this much is always a candidate
    min_reach: float = 0.5  # face widths a face may be from its predicted place whatever the time since
    max_speed: float = 15.0  # face widths per second (about 2.4 m/s): how far beyond that it may have gone
    max_reach: float = 3.0  # face widths: the most, however long the track went unseen
    max_size_ratio: float = 2.0  # a face's box width changes less than this between two sightings
    velocity_window: int = 4  # sightings the velocity is measured over
    embeds_per_track: int = 3
    embed_every: int = 2  # frames between two embeddings of one track
    track_timeout: float = 1.0  # seconds unseen before a track's pass ends
    motion_threshold: float = 2.0  # mean absolute grey difference (0..255) of a 64x48 thumbnail
    recent_seconds: float = 3.0  # how long faces stay available for card verification


@dataclass
class _Track:
    id: int
    box: Box  # where the face was last seen
    first_seen: float
    last_seen: float
    sightings: deque[tuple[float, float, float]]  # (time, centre x, centre y), newest last
    frames: int = 0
    last_embed_frame: int = -(10**9)
    embeddings: list[np.ndarray] = field(default_factory=list)
    decided: bool = False
    best: MatchResult | None = None

    def predict(self, now: float) -> Box:
        """The box moved on at the velocity of the last sightings (where it was, for a track seen once)."""
        (t0, x0, y0), (t1, x1, y1) = self.sightings[0], self.sightings[-1]
        if t1 <= t0:
            return self.box
        lead = (now - t1) / (t1 - t0)
        return (self.box[0] + (x1 - x0) * lead, self.box[1] + (y1 - y0) * lead, self.box[2], self.box[3])

    def see(self, box: Box, now: float) -> None:
        self.box, self.last_seen = box, now
        self.sightings.append((now, *centre(box)))


def centre(box: Box) -> tuple[float, float]:
    return box[0] + box[2] / 2, box[1] + box[3] / 2


def iou(a: Box, b: Box) -> float:
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
        self.stats = {"frames": 0, "skipped": 0, "detections": 0, "embeddings": 0, "tracks": 0}

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
        """Pair detections with tracks, closest pairs first; a detection left over starts a new track."""
        candidates = []
        for t, track in enumerate(self._tracks):
            predicted = track.predict(now)
            for f, face in enumerate(faces):
                distance = self._distance(track, predicted, face.box, now)
                if distance is not None:
                    candidates.append((distance, t, f))
        linked: dict[int, _Track] = {}
        taken: set[int] = set()
        for _distance, t, f in sorted(candidates):
            if t not in taken and f not in linked:
                taken.add(t)
                linked[f] = self._tracks[t]
        pairs = []
        for f, face in enumerate(faces):
            track = linked.get(f)
            if track is None:
                track = _Track(self._next_id, face.box, now, now, deque(maxlen=max(2, self.settings.velocity_window)))
                self._next_id += 1
                self.stats["tracks"] += 1
                self._tracks.append(track)
            track.see(face.box, now)
            pairs.append((track, face))
        return pairs

    def _distance(self, track: _Track, predicted: Box, box: Box, now: float) -> float | None:
        """Centre distance, in face widths, from where the track expects its face; None when out of reach.

        The reach grows with the time since the track was last seen (a missed frame, a slow device) up to
        ``max_reach``; a box of very different width is another face (a child in front of an adult).
        """
        s = self.settings
        narrow, wide = sorted((track.box[2], box[2]))
        if narrow <= 0:
            return None
        distance = math.dist(centre(predicted), centre(box)) / ((narrow + wide) / 2)
        if iou(predicted, box) >= s.iou_match:
            return distance
        reach = min(s.max_reach, s.min_reach + s.max_speed * max(0.0, now - track.last_seen))
        return distance if distance <= reach and wide <= s.max_size_ratio * narrow else None

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
