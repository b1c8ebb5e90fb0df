"""Detection, alignment and embeddings on the real photos of ../shared/data/faces (manifest.csv).

Decoding is checked against OpenCV's own FaceDetectorYN on the same model file, alignment and embeddings
against OpenCV's FaceRecognizerSF; counts and similarities against the labels in manifest.csv.
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import FACES

from appliance.vision.align import ARCFACE_TEMPLATE, align_face, similarity_transform
from appliance.vision.detect import DEFAULT_SCORE_THRESHOLD, decode, detect_faces
from appliance.vision.models import ModelPack

ROWS = list(csv.DictReader((FACES / "manifest.csv").open(encoding="utf-8")))
SINGLE = [r for r in ROWS if r["category"] in {"single", "edge"}]
GROUP = [r for r in ROWS if r["category"] == "group"]
NOFACE = [r for r in ROWS if r["category"] == "noface"]
# Detection runs at gate-camera scale: photos are shrunk to this longest side, as frames would be.
GATE_SIDE = 640


def _read(row: dict[str, str]) -> np.ndarray:
    image = cv2.imread(str(FACES / row["path"]), cv2.IMREAD_COLOR)  # RGBA PNGs come back as BGR
    assert image is not None, row["path"]
    return image


@pytest.fixture(scope="module")
def single_embeddings(pack: ModelPack) -> dict[str, np.ndarray]:
    result = {}
    for row in SINGLE:
        image = _read(row)
        faces = detect_faces(pack, image, max_side=GATE_SIDE)
        result[row["path"]] = pack.embed(align_face(image, faces[0].landmarks)[None])[0]
    return result


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r["path"])
def test_decoding_matches_opencv_face_detector(pack: ModelPack, models_dir: Path, row: dict[str, str]) -> None:
    image = _read(row)
    height, width = image.shape[:2]
    threshold = 0.3  # low, so that many weak candidates and NMS are compared too
    opencv = cv2.FaceDetectorYN.create(str(models_dir / "yunet.onnx"), "", (width, height), threshold, 0.3, 5000)
    _, expected = opencv.detect(image)
    expected = np.zeros((0, 15), np.float32) if expected is None else expected[np.argsort(-expected[:, 14])]
    ours = decode(pack.raw_detect(image), threshold, 0.3)
    assert len(ours) == len(expected)
    for face, reference in zip(ours, expected, strict=True):
        assert np.abs(np.array(face.box) - reference[:4]).max() < 2.0
        assert np.abs(face.landmarks.reshape(-1) - reference[4:14]).max() < 2.0
        assert abs(face.score - reference[14]) < 0.01


@pytest.mark.parametrize("row", SINGLE + GROUP, ids=lambda r: r["path"])
def test_face_counts_at_the_default_threshold(pack: ModelPack, row: dict[str, str]) -> None:
    faces = detect_faces(pack, _read(row), max_side=GATE_SIDE)
    assert len(faces) == int(row["expected_faces"])
    assert all(f.score >= DEFAULT_SCORE_THRESHOLD for f in faces)


@pytest.mark.parametrize("row", NOFACE, ids=lambda r: r["path"])
def test_no_faces_where_there_are_none(pack: ModelPack, row: dict[str, str]) -> None:
    faces = detect_faces(pack, _read(row), max_side=GATE_SIDE)
    if row["path"] == "noface/dogs.jpg":
        # Known limit: at gate scale YuNet scores one dog face 0.86, as high as real faces (0.88..0.95 here),
        # so no score threshold removes it; the recognizer keeps it unknown (test below).
        assert len(faces) <= 1
    else:
        assert faces == []


def test_threshold_choice_documented_in_detect(pack: ModelPack) -> None:
    """At full resolution and OpenCV's sample threshold 0.6 the false positives in manifest.csv's notes appear."""
    by_path = {r["path"]: r for r in ROWS}
    dogs = detect_faces(pack, _read(by_path["noface/dogs.jpg"]), score_threshold=0.6)
    clock = detect_faces(pack, _read(by_path["group/voc_2008_004176.jpg"]), score_threshold=0.6)
    assert len(dogs) == 2 and len(clock) == 8  # 7 people + the wall clock
    assert detect_faces(pack, _read(by_path["noface/dogs.jpg"])) == []
    assert len(detect_faces(pack, _read(by_path["group/voc_2008_004176.jpg"]))) == 7


def test_same_person_close_different_people_far(single_embeddings: dict[str, np.ndarray]) -> None:
    identity = {r["path"]: r["identity"] for r in SINGLE}
    same, different = [], []
    for a, b in itertools.combinations(single_embeddings, 2):
        cosine = float(single_embeddings[a] @ single_embeddings[b])
        (same if identity[a] == identity[b] else different).append((cosine, a, b))
    assert len(same) >= 20 and len(different) >= 150
    assert min(same)[0] >= 0.5, min(same)
    assert max(different)[0] <= 0.29, max(different)


def test_group_photo_faces_are_the_labelled_people(
    pack: ModelPack,
    single_embeddings: dict[str, np.ndarray],
) -> None:
    image = _read({"path": "group/two_people_obama_biden.jpg"})
    faces = sorted(detect_faces(pack, image, max_side=GATE_SIDE), key=lambda f: f.box[0])
    left, right = pack.embed(np.stack([align_face(image, f.landmarks) for f in faces]))
    obama = single_embeddings["faces/barack_obama/barack_obama_01.jpg"]
    biden = single_embeddings["faces/joe_biden/joe_biden_01.jpg"]
    assert left @ obama >= 0.5 and right @ biden >= 0.5
    assert left @ biden <= 0.29 and right @ obama <= 0.29


def test_the_dog_face_matches_nobody(pack: ModelPack, single_embeddings: dict[str, np.ndarray]) -> None:
    image = _read({"path": "noface/dogs.jpg"})
    faces = detect_faces(pack, image, score_threshold=0.3, max_side=GATE_SIDE)
    assert faces
    dogs = pack.embed(np.stack([align_face(image, f.landmarks) for f in faces]))
    people = np.stack(list(single_embeddings.values()))
    assert float((dogs @ people.T).max()) <= 0.29


@pytest.mark.parametrize("row", SINGLE[:6], ids=lambda r: r["path"])
def test_alignment_and_embedding_match_opencv(pack: ModelPack, models_dir: Path, row: dict[str, str]) -> None:
    image = _read(row)
    face = detect_faces(pack, image, max_side=GATE_SIDE)[0]
    ours = align_face(image, face.landmarks)
    assert ours.shape == (112, 112, 3) and ours.dtype == np.uint8

    recognizer = cv2.FaceRecognizerSF.create(str(models_dir / "sface.onnx"), "")
    opencv_row = np.array([*face.box, *face.landmarks.reshape(-1), face.score], np.float32)[None]
    opencv_crop = recognizer.alignCrop(image, opencv_row)  # BGR
    assert np.abs(ours[..., ::-1].astype(int) - opencv_crop.astype(int)).mean() < 1.0
    reference = recognizer.feature(opencv_crop).reshape(-1)
    reference /= np.linalg.norm(reference)
    assert float(pack.embed(ours[None])[0] @ reference) > 0.999

    # The warp puts the landmarks where the template wants them.
    matrix = similarity_transform(face.landmarks)
    warped = face.landmarks @ matrix[:, :2].T + matrix[:, 2]
    assert np.abs(warped - ARCFACE_TEMPLATE).max() < 8.0


def test_detect_faces_maps_shrunk_coordinates_back(pack: ModelPack) -> None:
    image = _read({"path": "group/kit_with_rose.jpg"})
    full = detect_faces(pack, image)
    small = detect_faces(pack, image, max_side=320)
    assert len(full) == len(small) == 2
    for a, b in zip(sorted(full, key=lambda f: f.box[0]), sorted(small, key=lambda f: f.box[0]), strict=True):
        assert np.abs(np.array(a.box) - np.array(b.box)).max() < 0.1 * a.size
        assert np.abs(a.landmarks - b.landmarks).max() < 0.1 * a.size
