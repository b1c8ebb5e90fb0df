"""InsightFace packs through insightface's model_zoo, tested with the real SFace file and the real photos.

No InsightFace pack can be downloaded here, so the recognizer path (model_zoo routing, our session settings,
normalisation, batching, template names) runs on the default pack's prepared SFace (models/sface.onnx)
routed through ``model_zoo.get_model``. Not tested here: SCRFD detection (no file) and GPU providers (no GPU).
insightface must be installed (scripts/dev test installs it): without it these tests fail, they do not skip.
"""

from __future__ import annotations

import csv
import itertools
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from conftest import FACES

from appliance.config import VisionConfig, parse_config
from appliance.journal import open_database
from appliance.journal.roster_store import RosterStore
from appliance.roster.model import Person, Role
from appliance.vision.align import align_face
from appliance.vision.detect import DEFAULT_SCORE_THRESHOLD, Face
from appliance.vision.insightface_pack import (
    INSTALL_HINT,
    InsightFacePack,
    InsightFaceRecognizer,
    scan,
)
from appliance.vision.models import Manifest, ModelError, ModelPack, load_pack
from appliance.vision.service import FaceService

ROWS = list(csv.DictReader((FACES / "manifest.csv").open(encoding="utf-8")))
SINGLE = [r for r in ROWS if r["category"] in {"single", "edge"}]
GATE_SIDE = 640
SFACE_RIGHT = (0.0, 1.0)  # SFace normalises inside its graph: raw 0..255 pixels go in


@pytest.fixture(scope="module")
def zoo() -> object:
    try:
        from insightface import model_zoo
    except ImportError as exc:
        pytest.fail(f"insightface is not installed ({exc}); {INSTALL_HINT}")
    return model_zoo


@pytest.fixture(scope="module")
def sface(models_dir: Path) -> Path:
    return models_dir / Manifest.load().models["recognizer"].file


@pytest.fixture(scope="module")
def crops(pack: ModelPack) -> tuple[list[str], np.ndarray]:
    """Identities and aligned RGB crops of every single-face photo, detected by the default pack's YuNet."""
    identities, faces = [], []
    for row in SINGLE:
        image = cv2.imread(str(FACES / row["path"]), cv2.IMREAD_COLOR)
        face = pack.detect(image, DEFAULT_SCORE_THRESHOLD, GATE_SIDE)[0]
        faces.append(align_face(image, face.landmarks))
        identities.append(row["identity"])
    return identities, np.stack(faces)


@pytest.fixture(scope="module")
def recognizer(zoo: object, sface: Path) -> InsightFaceRecognizer:
    return InsightFaceRecognizer.load(sface, threads=2, normalisation=SFACE_RIGHT)


def _rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


# ----------------------------------------------------------------------------------------- the recognizer


def test_model_zoo_routes_sface_as_an_arcface_recognizer(zoo: object, sface: Path) -> None:
    model = zoo.get_model(str(sface), providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]
    assert type(model).__name__ == "ArcFaceONNX" and model.taskname == "recognition"
    assert tuple(model.input_size) == (112, 112)
    # The fact behind normalisation=(0, 1): insightface does not see SFace's in-graph normalisation.
    assert (model.input_mean, model.input_std) == (127.5, 127.5)


def test_sface_through_model_zoo_embeds_like_our_pack(
    zoo: object, pack: ModelPack, recognizer: InsightFaceRecognizer, crops: tuple[list[str], np.ndarray]
) -> None:
    _, faces = crops
    ours = pack.embed(faces)
    theirs = recognizer.embed(faces)
    assert theirs.shape == ours.shape == (len(faces), 128) and theirs.dtype == np.float32
    assert np.allclose(np.linalg.norm(theirs, axis=1), 1.0, atol=1e-5)
    assert _rowwise_cosine(ours, theirs).min() > 0.99
    # insightface's own get_feat takes BGR crops and swaps them: the same embeddings as our RGB path.
    bgr = [cv2.cvtColor(face, cv2.COLOR_RGB2BGR) for face in faces]
    assert _rowwise_cosine(ours, recognizer.model.get_feat(bgr)).min() > 0.99
    # The session is ours: deliberate thread settings, the configured provider.
    options = recognizer.model.session.get_session_options()
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert recognizer.providers == ["CPUExecutionProvider"]
    assert recognizer.embed(np.zeros((0, 112, 112, 3), np.uint8)).shape == (0, 128)
    with pytest.raises(ValueError, match="uint8"):
        recognizer.embed(faces.astype(np.float32))


def test_genuine_pairs_score_high_and_different_people_low(
    recognizer: InsightFaceRecognizer, crops: tuple[list[str], np.ndarray]
) -> None:
    identities, faces = crops
    embeddings = recognizer.embed(faces)
    genuine, impostor = [], []
    for i, j in itertools.combinations(range(len(faces)), 2):
        score = float(embeddings[i] @ embeddings[j])
        (genuine if identities[i] == identities[j] else impostor).append(score)
    assert len(genuine) >= 20 and len(impostor) >= 100
    assert min(genuine) >= 0.5, min(genuine)
    assert max(impostor) <= 0.3, max(impostor)


def test_wrong_normalisation_or_channel_order_gives_wrong_embeddings(
    zoo: object, pack: ModelPack, sface: Path, crops: tuple[list[str], np.ndarray]
) -> None:
    identities, faces = crops
    ours = pack.embed(faces)
    guessed = InsightFaceRecognizer.load(sface, threads=1)  # insightface's own guess: 127.5 / 127.5
    assert guessed.normalisation == (127.5, 127.5)
    wrong = guessed.embed(faces)
    assert np.abs(_rowwise_cosine(ours, wrong)).max() < 0.3
    # What that would do at a gate: different people look alike (impostor pairs score 0.75-0.98 here).
    impostor = [
        float(wrong[i] @ wrong[j])
        for i, j in itertools.combinations(range(len(faces)), 2)
        if identities[i] != identities[j]
    ]
    assert min(impostor) > 0.5, min(impostor)
    # RGB crops handed to get_feat as if BGR: red and blue swapped, visibly different embeddings.
    right = InsightFaceRecognizer.load(sface, threads=1, normalisation=SFACE_RIGHT)
    assert _rowwise_cosine(ours, right.model.get_feat(list(faces))).mean() < 0.95


def test_template_name_is_the_recognizer_file_and_its_normalisation(
    zoo: object, pack: ModelPack, sface: Path, tmp_path: Path, recognizer: InsightFaceRecognizer
) -> None:
    assert recognizer.model_name.startswith(f"insightface:{sface.stem}#{recognizer.sha256[:12]}")
    assert recognizer.model_name != pack.model_name == "sface-2021dec"
    copied = tmp_path / "copy" / sface.name
    copied.parent.mkdir()
    shutil.copyfile(sface, copied)
    assert InsightFaceRecognizer.load(copied, threads=1, normalisation=SFACE_RIGHT).model_name == recognizer.model_name
    assert InsightFaceRecognizer.load(copied, threads=1).model_name != recognizer.model_name
    changed = onnx.load(str(sface))
    changed.doc_string = "another build"
    onnx.save(changed, str(copied))
    assert InsightFaceRecognizer.load(copied, threads=1, normalisation=SFACE_RIGHT).model_name != recognizer.model_name


def test_recognizer_with_a_fixed_batch_of_one(
    zoo: object, sface: Path, tmp_path: Path, recognizer: InsightFaceRecognizer, crops: tuple[list[str], np.ndarray]
) -> None:
    model = onnx.load(str(sface))
    for value in (model.graph.input[0], model.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = 1
    path = tmp_path / "sface_batch1.onnx"
    onnx.save(model, str(path))
    fixed = InsightFaceRecognizer.load(path, threads=1, normalisation=SFACE_RIGHT)
    _, faces = crops
    assert _rowwise_cosine(fixed.embed(faces[:5]), recognizer.embed(faces[:5])).min() > 0.9999


# -------------------------------------------------------------------------------------- folder scanning


def _folder(tmp_path: Path, name: str, *files: Path) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for path in files:
        shutil.copyfile(path, folder / path.name)
    return folder


def _one_line_error(folder: Path) -> str:
    with pytest.raises(ModelError) as caught:
        InsightFacePack.load(folder, threads=1)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{folder}: ")
    return message


def test_folder_with_a_recognizer_but_no_detector_is_refused(zoo: object, sface: Path, tmp_path: Path) -> None:
    message = _one_line_error(_folder(tmp_path, "buffalo_x", sface))
    assert "no SCRFD face detector with keypoints (such as det_10g.onnx" in message
    assert "no 112x112 face recognizer" not in message
    assert f"found: {sface.name} (recognition)" in message


def test_folder_with_yunet_only_is_refused(zoo: object, models_dir: Path, tmp_path: Path) -> None:
    yunet = models_dir / Manifest.load().models["detector"].file
    message = _one_line_error(_folder(tmp_path, "yunet_only", yunet))
    assert "no SCRFD face detector" in message and "no 112x112 face recognizer" in message
    assert f"{yunet.name} (detection, but not SCRFD with 5 keypoints: 12 outputs" in message
    assert 'this is YuNet, the default pack\'s detector: use vision.pack = "default"' in message


def test_default_pack_folder_is_not_an_insightface_pack(zoo: object, models_dir: Path, sface: Path) -> None:
    # YuNet + SFace side by side: the recognizer is usable, the detector is not.
    message = _one_line_error(models_dir)
    assert "no SCRFD face detector" in message and f"{sface.name} (recognition)" in message


def test_two_recognizers_are_refused_rather_than_guessed(zoo: object, sface: Path, tmp_path: Path) -> None:
    folder = _folder(tmp_path, "two", sface)
    shutil.copyfile(sface, folder / "other.onnx")
    with pytest.raises(ModelError, match="more than one recognizer"):
        scan(folder)


def test_missing_or_empty_folder(zoo: object, tmp_path: Path) -> None:
    assert "no such folder" in _one_line_error(tmp_path / "absent")
    assert "no .onnx files" in _one_line_error(_folder(tmp_path, "empty"))


def test_config_picks_the_pack(zoo: object, sface: Path, models_dir: Path, tmp_path: Path) -> None:
    folder = _folder(tmp_path, "buffalo_x", sface)
    with pytest.raises(ModelError, match=f"^{folder}: no SCRFD face detector"):
        load_pack(VisionConfig(pack="insightface", insightface_dir=folder, intra_op_threads=1))
    default = load_pack(VisionConfig(models_dir=models_dir, intra_op_threads=1))
    assert isinstance(default, ModelPack) and (default.model_name, default.embedding_size) == ("sface-2021dec", 128)


def test_models_check_checks_the_pack_the_config_uses(zoo: object, sface: Path, tmp_path: Path) -> None:
    """IT copied a pack folder without its detector: `models check` says so, as `edugate run` would."""
    from click.testing import CliRunner

    from appliance.cli import main

    folder = _folder(tmp_path, "buffalo_x", sface)
    config = tmp_path / "gate.toml"
    config.write_text(f'[vision]\npack = "insightface"\ninsightface_dir = "{folder}"\nintra_op_threads = 1\n')
    result = CliRunner().invoke(main, ["models", "check", "--config", str(config)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"edugate: error: {_one_line_error(folder)}"


# ------------------------------------------------------------------------------- templates are per model


class YuNetAndZooRecognizer:
    """A real two-model pack for FaceService: the default YuNet with the recognizer loaded through model_zoo."""

    def __init__(self, pack: ModelPack, recognizer: InsightFaceRecognizer) -> None:
        self.pack = pack
        self.recognizer = recognizer
        self.model_name = recognizer.model_name
        self.embedding_size = recognizer.embedding_size
        self.providers = recognizer.providers

    def detect(self, image_bgr: np.ndarray, score_threshold: float, max_side: int | None) -> list[Face]:
        return self.pack.detect(image_bgr, score_threshold, max_side)

    def embed(self, aligned_rgb_112: np.ndarray) -> np.ndarray:
        return self.recognizer.embed(aligned_rgb_112)


def test_templates_of_one_model_are_never_loaded_for_another(
    tmp_path: Path, pack: ModelPack, recognizer: InsightFaceRecognizer
) -> None:
    config = parse_config(
        {
            "journal": {"path": str(tmp_path / "journal.db")},
            "vision": {"models_dir": str(pack.models_dir), "key_file": str(tmp_path / "templates.key")},
        }
    )
    database = open_database(config.journal.path)
    RosterStore(database).apply([Person("barack_obama", "Barack Obama", Role.STAFF)], replace=True)
    photos = sorted((FACES / "faces" / "barack_obama").iterdir())

    default = FaceService(config.vision, database, pack)
    assert default.enroller().enroll_files("barack_obama", photos[:1]).added == 1
    other = FaceService(config.vision, database, YuNetAndZooRecognizer(pack, recognizer))
    assert other.engine.model_name == recognizer.model_name
    assert other.gallery.people == 0 and other.gallery.dim == recognizer.embedding_size

    assert other.enroller().enroll_files("barack_obama", photos[:2]).added == 2
    other.reload()
    assert len(other.gallery) == 2
    observation = other.engine.observe(cv2.imread(str(photos[3]), cv2.IMREAD_COLOR))[0]
    assert other.gallery.match(observation.embedding).person == "barack_obama"
    default.reload()
    assert len(default.gallery) == 1
    database.close()
