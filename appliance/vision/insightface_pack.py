"""InsightFace model packs (buffalo_s, buffalo_l, antelopev2 ...) loaded through insightface's ``model_zoo``.

Licence: InsightFace's pretrained packs are for non-commercial research only; deploying one at a school needs
a commercial licence from InsightFace (README, "Other model packs"). Nothing is downloaded here: IT copies a
pack folder onto the gate and points ``vision.insightface_dir`` at it.

Which file is what: every ``*.onnx`` of the folder is shown to ``insightface.model_zoo.get_model``, which
routes it by its graph and says what it is (``taskname``). The gate needs exactly one SCRFD detector with 5
keypoints and one ArcFace-style recognizer with 112x112 input; landmark, gender/age and other models are
skipped. The folder is probed on the CPU, so a Jetson does not build TensorRT engines for models it drops.

Input conventions, as insightface 2.1's source has them:

* ``SCRFD.detect`` takes a BGR uint8 image (it swaps to RGB and normalises itself), letterboxes it into
  ``input_size`` and returns boxes ``[N, 5]`` (x1, y1, x2, y2, score) and keypoints ``[N, 5, 2]`` in image
  pixels, in the ArcFace template's order: image-left eye, image-right eye, nose, image-left and image-right
  mouth corner. That is YuNet's order, so :func:`appliance.vision.align.align_face` takes them unchanged.
* ``ArcFaceONNX.get_feat`` takes BGR crops and swaps them to RGB; our aligned crops are already RGB, so they
  go through ``ArcFaceONNX.forward``, which takes NCHW in the model's channel order (RGB) and computes
  ``(x - input_mean) / input_std``. insightface guesses mean/std from the graph's first nodes (0 and 1 when
  the graph subtracts and multiplies itself, else 127.5 and 127.5). A recognizer that normalises inside its
  graph without being recognised as such (OpenCV's SFace) needs ``normalisation=(0, 1)``: with the guess its
  embeddings are wrong (cosine about 0.08 to the right ones on the test photos).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.vision.detect import Face
from appliance.vision.models import (
    FACE_SIZE,
    ModelError,
    Provider,
    _provider_options,
    _session_options,
    check_aligned_faces,
    resolve_providers,
    sha256_file,
)

log = logging.getLogger(__name__)

# insightface declares opencv-python (the GUI build) as a dependency, which would replace the headless cv2
# this project uses; so insightface goes in without its dependencies and the `insightface` extra brings the
# ones its import needs (scipy, scikit-image, requests).
INSTALL_HINT = (
    'from the edugate checkout: pip install ".[insightface]" && pip install --no-deps "insightface>=2.1,<2.2"'
)
DETECTOR_EXAMPLES = "det_10g.onnx, det_500m.onnx or scrfd_10g_bnkps.onnx"
RECOGNIZER_EXAMPLES = "w600k_r50.onnx, w600k_mbf.onnx or glintr100.onnx"
_SCRFD_OUTPUTS_WITH_KEYPOINTS = (9, 15)
_ROUND = 32


def model_zoo() -> Any:
    """insightface's ``model_zoo`` module, or a ModelError saying how to install insightface."""
    try:
        from insightface import model_zoo as zoo
    except ImportError as exc:
        raise ModelError(f'vision.pack = "insightface" needs the insightface package ({exc}); {INSTALL_HINT}') from None
    return zoo


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def get_model(path: Path, threads: int, providers: list[str], cache_dir: Path) -> Any:
    """``model_zoo.get_model`` on one file with this project's session settings (threads, no spinning ...).

    ``static_shape_sessions=False`` keeps SCRFD on the one session created here, with these settings;
    insightface 2.1 would otherwise build one more fixed-size session per input size (more memory).
    """
    zoo = model_zoo()
    try:
        return zoo.get_model(
            str(path),
            providers=providers,
            provider_options=_provider_options(providers, cache_dir),
            sess_options=_session_options(threads),
            static_shape_sessions=False,
        )
    except Exception as exc:  # onnxruntime and insightface raise many exception types
        raise ModelError(f"{path}: insightface cannot load it: {_first_line(exc)}") from None


def _detector_problem(model: Any) -> str | None:
    """Why a model insightface calls a detector cannot serve here (None when it can)."""
    outputs = list(getattr(model, "output_names", []))
    if type(model).__name__ != "SCRFD":
        return f"a {type(model).__name__} detector, not SCRFD"
    if len(outputs) not in _SCRFD_OUTPUTS_WITH_KEYPOINTS or not getattr(model, "use_kps", False):
        yunet = "kps_8" in outputs and "obj_8" in outputs
        hint = '; this is YuNet, the default pack\'s detector: use vision.pack = "default"' if yunet else ""
        return f"not SCRFD with 5 keypoints: {len(outputs)} outputs, SCRFD has 9 or 15{hint}"
    return None


def _recognizer_problem(model: Any) -> str | None:
    """Why a model insightface calls a recognizer cannot serve here (None when it can)."""
    if tuple(model.input_size) != (FACE_SIZE, FACE_SIZE):
        return f"input {model.input_size[0]}x{model.input_size[1]}, the gate aligns faces to 112x112"
    if len(model.output_shape) != 2:
        return f"output shaped {model.output_shape}, expected [batch, embedding]"
    return None


@dataclass
class _Found:
    path: Path
    model: Any


def scan(folder: Path, threads: int = 1) -> tuple[_Found, _Found]:
    """The pack's detector and recognizer, loaded on the CPU; a ModelError naming the folder and what is missing.

    Each ``*.onnx`` is routed by ``model_zoo.get_model``; exactly one usable detector and one usable
    recognizer must be found (two of a kind would make the choice of model, and so the templates, a guess).
    """
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such folder (vision.insightface_dir); copy the InsightFace pack there")
    files = sorted(folder.glob("*.onnx"))
    if not files:
        raise ModelError(f"{folder}: no .onnx files; copy the InsightFace pack's files into this folder")
    detectors: list[_Found] = []
    recognizers: list[_Found] = []
    notes: list[str] = []
    cpu = ["CPUExecutionProvider"]
    for path in files:
        model = get_model(path, threads, cpu, folder)
        task = getattr(model, "taskname", None) if model is not None else None
        if task == "detection":
            problem = _detector_problem(model)
            if problem:
                notes.append(f"{path.name} (detection, but {problem})")
            else:
                detectors.append(_Found(path, model))
        elif task == "recognition":
            problem = _recognizer_problem(model)
            if problem:
                notes.append(f"{path.name} (recognition, but {problem})")
            else:
                recognizers.append(_Found(path, model))
        else:
            notes.append(f"{path.name} ({task or 'not a model insightface knows'}, not used)")
    usable = [f"{d.path.name} (detection)" for d in detectors] + [f"{r.path.name} (recognition)" for r in recognizers]
    found = ", ".join(usable + notes)
    if len(detectors) != 1 or len(recognizers) != 1:
        missing = []
        if not detectors:
            missing.append(f"no SCRFD face detector with keypoints (such as {DETECTOR_EXAMPLES})")
        if not recognizers:
            missing.append(f"no 112x112 face recognizer (such as {RECOGNIZER_EXAMPLES})")
        if len(detectors) > 1:
            missing.append("more than one detector (keep one)")
        if len(recognizers) > 1:
            missing.append("more than one recognizer (keep one)")
        raise ModelError(f"{folder}: {' and '.join(missing)}; found: {found}")
    return detectors[0], recognizers[0]


class InsightFaceRecognizer:
    """An ArcFace-style recognizer loaded by insightface, embedding our aligned RGB crops."""

    def __init__(self, path: Path, model: Any, normalisation: tuple[float, float] | None = None) -> None:
        self.path = path
        self.model = model
        if normalisation is not None:
            self.model.input_mean, self.model.input_std = (float(v) for v in normalisation)
        self.normalisation = (float(model.input_mean), float(model.input_std))
        self.sha256 = sha256_file(path)
        name = f"insightface:{path.stem}#{self.sha256[:12]}"
        if normalisation is not None:
            name += f"/mean{self.normalisation[0]:g}std{self.normalisation[1]:g}"
        self._name = name
        batch = model.input_shape[0]
        self._fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
        size = model.output_shape[1]
        self._size = size if isinstance(size, int) else int(self._run(np.zeros((1, 3, 112, 112), np.float32)).shape[1])

    @classmethod
    def load(
        cls,
        path: Path,
        threads: int = 2,
        providers: Sequence[Provider | str] = ("cpu",),
        normalisation: tuple[float, float] | None = None,
    ) -> InsightFaceRecognizer:
        """One recognizer file through ``model_zoo.get_model``; refused unless insightface routes it as one."""
        model = get_model(path, threads, resolve_providers(providers), path.parent)
        if model is None or getattr(model, "taskname", None) != "recognition":
            raise ModelError(f"{path}: insightface does not take it for a face recognizer")
        problem = _recognizer_problem(model)
        if problem:
            raise ModelError(f"{path}: {problem}")
        return cls(path, model, normalisation)

    @property
    def model_name(self) -> str:
        """``insightface:<file stem>#<sha256 prefix>``: the digest keeps templates of different files apart."""
        return self._name

    @property
    def embedding_size(self) -> int:
        return self._size

    @property
    def providers(self) -> list[str]:
        return list(self.model.session.get_providers())

    def _run(self, blob: np.ndarray) -> np.ndarray:
        if self._fixed_batch is None or blob.shape[0] == self._fixed_batch:
            return np.asarray(self.model.forward(blob), dtype=np.float32)
        if self._fixed_batch != 1:
            raise ModelError(f"{self.path}: fixed batch size {self._fixed_batch} is not supported")
        return np.concatenate([np.asarray(self.model.forward(blob[i : i + 1]), np.float32) for i in range(len(blob))])

    def embed(self, aligned_rgb_112: np.ndarray) -> np.ndarray:
        """L2-normalised float32 ``[N, embedding_size]`` of aligned RGB uint8 faces ``[N, 112, 112, 3]``.

        RGB NCHW goes to ``forward`` as is: ArcFace models take RGB (insightface's ``get_feat`` swaps its
        BGR crops to RGB for them), and ``forward`` applies the model's input_mean/input_std.
        """
        faces = check_aligned_faces(aligned_rgb_112)
        if faces.shape[0] == 0:
            return np.zeros((0, self._size), dtype=np.float32)
        features = self._run(np.ascontiguousarray(faces.transpose(0, 3, 1, 2), dtype=np.float32))
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        return features / np.maximum(norms, 1e-12)


class InsightFacePack:
    """An InsightFace pack: SCRFD detection and ArcFace recognition, with the engine's ``FacePack`` surface."""

    def __init__(self, folder: Path, detector: Any, detector_path: Path, recognizer: InsightFaceRecognizer) -> None:
        self.folder = folder
        self.detector = detector
        self.detector_path = detector_path
        self.recognizer = recognizer

    @classmethod
    def load(
        cls,
        folder: Path,
        threads: int = 2,
        providers: Sequence[Provider | str] = ("cpu",),
        normalisation: tuple[float, float] | None = None,
    ) -> InsightFacePack:
        """Scan ``folder`` (see :func:`scan`) and open the two models on the configured providers."""
        if not 1 <= threads <= 64:
            raise ModelError(f"threads must be between 1 and 64, got {threads}")
        model_zoo()  # a missing insightface is the first thing to fix, whatever the folder holds
        names = resolve_providers(providers)
        detector, recognizer = scan(folder, threads)
        if names != ["CPUExecutionProvider"]:
            detector.model = get_model(detector.path, threads, names, folder)
            recognizer.model = get_model(recognizer.path, threads, names, folder)
        pack = cls(
            folder,
            detector.model,
            detector.path,
            InsightFaceRecognizer(recognizer.path, recognizer.model, normalisation),
        )
        log.info(
            "loaded InsightFace pack %s: detector %s, recognizer %s (%d values) on %s",
            folder,
            detector.path.name,
            recognizer.path.name,
            pack.embedding_size,
            pack.providers[0],
        )
        return pack

    @property
    def model_name(self) -> str:
        return self.recognizer.model_name

    @property
    def embedding_size(self) -> int:
        return self.recognizer.embedding_size

    @property
    def providers(self) -> list[str]:
        return self.recognizer.providers

    def detect(self, image_bgr: np.ndarray, score_threshold: float, max_side: int | None) -> list[Face]:
        """SCRFD on a BGR uint8 image, letterboxed into a square of ``max_side`` (a multiple of 32).

        A square like insightface's own default (640x640): SCRFD packs are used that way everywhere.
        """
        image = np.asarray(image_bgr)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ValueError(f"detect wants a BGR uint8 image [H, W, 3], got {image.dtype} {list(image.shape)}")
        side = max(_ROUND, ((max_side or 640) // _ROUND) * _ROUND)
        boxes, keypoints = self.detector.detect(image, input_size=(side, side), det_thresh=score_threshold)
        faces = [
            Face(
                box=(float(x1), float(y1), float(x2 - x1), float(y2 - y1)),
                landmarks=np.asarray(marks, dtype=np.float32).reshape(5, 2),
                score=float(score),
            )
            for (x1, y1, x2, y2, score), marks in zip(boxes, keypoints, strict=True)
        ]
        return sorted(faces, key=lambda face: -face.score)

    def embed(self, aligned_rgb_112: np.ndarray) -> np.ndarray:
        return self.recognizer.embed(aligned_rgb_112)
