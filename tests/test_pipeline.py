"""The face pipeline on a synthetic walk-past video made from real photos: one decision per person per pass."""

from __future__ import annotations

from itertools import pairwise

import cv2
import numpy as np
import pytest
from conftest import FACES

from appliance.vision.engine import FaceEngine
from appliance.vision.gallery import Gallery
from appliance.vision.images import read_image
from appliance.vision.models import ModelPack
from appliance.vision.pipeline import FacePipeline, PipelineSettings

W, H = 640, 480


def portrait(path: str, height: int = 300) -> np.ndarray:
    image = read_image(FACES / path)
    scale = height / image.shape[0]
    return cv2.resize(image, (max(1, int(image.shape[1] * scale)), height), interpolation=cv2.INTER_AREA)


def walk_past(person: np.ndarray, frames: int) -> list[np.ndarray]:
    """The person slides from left to right across a plain background."""
    out = []
    width = min(person.shape[1], W)
    for i in range(frames):
        canvas = np.full((H, W, 3), 90, dtype=np.uint8)
        x = int((W - width) * i / max(1, frames - 1))
        canvas[H - person.shape[0] :, x : x + width] = person[:, :width]
        out.append(canvas)
    return out


@pytest.fixture(scope="module")
def engine(pack: ModelPack) -> FaceEngine:
    return FaceEngine(pack)


def test_one_decision_per_pass_known_and_unknown(engine: FaceEngine) -> None:
    gallery = Gallery(0.42, 0.05)
    obama_template = engine.observe(read_image(FACES / "faces/barack_obama/barack_obama_01.jpg"))[0].embedding
    gallery.add("barack_obama", obama_template)
    gallery.add("joe_biden", engine.observe(read_image(FACES / "faces/joe_biden/joe_biden_01.jpg"))[0].embedding)
    pipeline = FacePipeline(engine, lambda: gallery, PipelineSettings(embeds_per_track=3, embed_every=2))

    video = walk_past(portrait("faces/barack_obama/barack_obama_04.jpg"), 12)
    video += [np.full((H, W, 3), 90, dtype=np.uint8)] * 10
    video += walk_past(portrait("faces/paul_rudd/paul_rudd_01.jpg"), 12)
    video += [np.full((H, W, 3), 90, dtype=np.uint8)] * 10
    decisions = []
    for index, frame in enumerate(video):
        decisions += pipeline.process(frame, now=index * 0.2)
    decisions += pipeline.flush(now=len(video) * 0.2)

    assert [(d.person, d.accepted) for d in decisions] == [("barack_obama", True), (None, False)]
    assert decisions[0].score > 0.5 and decisions[1].score < 0.42
    assert pipeline.stats["embeddings"] <= 2 * 3, pipeline.stats  # a few per pass, not one per frame
    assert pipeline.stats["skipped"] >= 10, pipeline.stats  # empty, still frames are not even detected


def test_recent_embeddings_expire(engine: FaceEngine) -> None:
    gallery = Gallery(0.42, 0.05)
    pipeline = FacePipeline(engine, lambda: gallery, PipelineSettings(recent_seconds=2.0))
    for index, frame in enumerate(walk_past(portrait("faces/joe_biden/joe_biden_02.jpg"), 4)):
        pipeline.process(frame, now=float(index))
    assert len(pipeline.recent_embeddings(now=3.0)) >= 1
    assert pipeline.recent_embeddings(now=10.0) == []


# Tracking at walking speed: each lost track costs an embedding and, for a stranger, another unknown_face event.
WIDE = 1280
FACE = 100  # face box width in the scenes below, in pixels


def head(engine: FaceEngine, path: str, face_width: int = FACE) -> np.ndarray:
    """Head and shoulders cut out of a photo, scaled so that the face box is ``face_width`` pixels wide."""
    image = read_image(FACES / path)
    x, y, w, h = max(engine.detect(image), key=lambda face: face.size).box
    left, top = int(max(0, x - 0.3 * w)), int(max(0, y - 0.4 * h))
    right, bottom = int(min(image.shape[1], x + 1.3 * w)), int(min(image.shape[0], y + 1.5 * h))
    scale = face_width / w
    crop = image[top:bottom, left:right]
    return cv2.resize(crop, (round(crop.shape[1] * scale), round(crop.shape[0] * scale)), interpolation=cv2.INTER_AREA)


def scene(*heads: tuple[np.ndarray, int]) -> np.ndarray:
    """A plain 1280x480 frame with each head drawn at its x (clipped to the frame)."""
    canvas = np.full((H, WIDE, 3), 90, dtype=np.uint8)
    for pixels, x in heads:
        left, right = max(0, x), min(WIDE, x + pixels.shape[1])
        if right > left:
            canvas[100 : 100 + pixels.shape[0], left:right] = pixels[:, left - x : right - x]
    return canvas


def run(pipeline: FacePipeline, frames: list[np.ndarray], fps: float = 10.0) -> list[tuple[str | None, bool]]:
    decisions = []
    for index, frame in enumerate(frames):
        decisions += pipeline.process(frame, now=index / fps)
    decisions += pipeline.flush(now=len(frames) / fps + 5.0)
    return [(d.person, d.accepted) for d in decisions]


@pytest.fixture(scope="module")
def enrolled(engine: FaceEngine) -> Gallery:
    gallery = Gallery(0.42, 0.05)
    for person, photo in (("barack_obama", "barack_obama_01.jpg"), ("joe_biden", "joe_biden_01.jpg")):
        gallery.add(person, engine.observe(read_image(FACES / "faces" / person / photo))[0].embedding)
    return gallery


def test_face_moving_more_than_its_width_per_frame_stays_one_track(engine: FaceEngine, enrolled: Gallery) -> None:
    obama = head(engine, "faces/barack_obama/barack_obama_04.jpg")
    frames = [scene((obama, 40 + 140 * i)) for i in range(8)]
    boxes = [engine.detect(frame) for frame in frames]
    assert all(len(found) == 1 for found in boxes)
    steps = [b[0].box[0] - a[0].box[0] for a, b in pairwise(boxes)]
    assert min(steps) > max(found[0].box[2] for found in boxes)  # each frame, further than the face is wide
    pipeline = FacePipeline(engine, lambda: enrolled, PipelineSettings(embeds_per_track=3, embed_every=1))

    assert run(pipeline, frames) == [("barack_obama", True)]
    assert pipeline.stats["tracks"] == 1 and pipeline.stats["embeddings"] == 1, pipeline.stats


def test_two_people_side_by_side_stay_two_tracks(engine: FaceEngine, enrolled: Gallery) -> None:
    obama = head(engine, "faces/barack_obama/barack_obama_04.jpg")
    biden = head(engine, "faces/joe_biden/joe_biden_02.jpg")
    frames = [scene((obama, 20 + 70 * i), (biden, 20 + 70 * i + obama.shape[1])) for i in range(10)]
    found = engine.detect(frames[0])
    assert len(found) == 2
    settings = PipelineSettings(embeds_per_track=3, embed_every=1)
    assert abs(found[0].box[0] - found[1].box[0]) / FACE < settings.min_reach + settings.max_speed / 10  # in reach
    pipeline = FacePipeline(engine, lambda: enrolled, settings)

    decisions, lanes = [], set()
    for index, frame in enumerate(frames):
        decisions += pipeline.process(frame, now=index / 10)
        left, right = sorted(pipeline._tracks, key=lambda track: track.box[0])
        lanes.add((left.id, right.id))  # each track keeps following its own person, frame after frame
    decisions += pipeline.flush(now=5.0)

    assert sorted((d.person, d.accepted) for d in decisions) == [("barack_obama", True), ("joe_biden", True)]
    assert len(lanes) == 1 and pipeline.stats["tracks"] == 2, (lanes, pipeline.stats)


def test_stranger_hidden_for_two_frames_keeps_the_track(engine: FaceEngine, enrolled: Gallery) -> None:
    stranger = head(engine, "faces/paul_rudd/paul_rudd_01.jpg")
    frames = [scene((stranger, 40 + 90 * i)) for i in range(12)]
    frames[4] = frames[5] = scene()  # walked behind someone: no face for two frames, then on along the same line
    pipeline = FacePipeline(engine, lambda: enrolled, PipelineSettings(embeds_per_track=3, embed_every=3))

    assert run(pipeline, frames) == [(None, False)]  # one unknown_face, not one per piece of the pass
    assert pipeline.stats["tracks"] == 1 and pipeline.stats["embeddings"] == 3, pipeline.stats
