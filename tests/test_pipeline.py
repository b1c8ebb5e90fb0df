"""The face pipeline on a synthetic walk-past video made from real photos: one decision per person per pass."""

from __future__ import annotations

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
