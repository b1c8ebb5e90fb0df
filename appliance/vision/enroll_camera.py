"""Enrollment from a live camera: a few good frames of one person, spread over a few seconds, or nothing.

Why spread out: consecutive frames are nearly the same picture, so five of them add little over one; frames
a fraction of a second apart catch the small changes of pose and expression the gate will see later.
Why the agreement check: when someone else steps in front of the camera during the capture, their face must
never become a template of the person being enrolled. There is no telling from the pictures alone which of the
two is the right one (the operator leaning in first, or a colleague stepping in later), so faces of two
different people stop the enrollment and nothing is stored.

Frames with no face or several faces, and faces refused by the quality gate, are skipped and counted, so a
capture that runs out of time can say what went wrong most often.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from appliance.vision.camera import PICAMERA2_MISSING, Camera, CameraSettings, Frame
from appliance.vision.detect import Face
from appliance.vision.engine import FaceEngine
from appliance.vision.enroll import Enroller, EnrollError, EnrollReport
from appliance.vision.gallery import normalise
from appliance.vision.quality import Quality, QualityRules

log = logging.getLogger(__name__)

# What a skipped frame had wrong: (what the operator is told, what the person in front of the camera should do).
PROBLEMS: dict[str, tuple[str, str]] = {
    "no_face": ("no face in view", "look at the camera, with light on the face"),
    "several_faces": ("several faces in view", "only the person being enrolled should be in front of the camera"),
    "too_small": ("face too small", "come closer to the camera"),
    "turned": ("head turned or tilted", "look straight at the camera"),
    "blurred": ("face blurred", "hold still; clean the lens or add light if it stays blurred"),
    "unusable": ("face not usable", "look straight at the camera, in good light"),
    "unchanged": ("same picture as an earlier frame", "is the camera stream frozen?"),
}
NO_REPLAY = 3600.0  # reconnect delay for a video file: once it ends, the capture ends instead of replaying it


class CaptureError(EnrollError):
    """The camera capture ended without a usable set of frames; nothing was enrolled."""


class CameraOpenError(CaptureError):
    """The camera did not deliver a single frame (missing, busy, unreachable); ``kind`` is the source kind."""

    def __init__(self, detail: str, kind: str) -> None:
        super().__init__(f"cannot use the camera: {detail}")
        self.detail = detail
        self.kind = kind

    @property
    def maybe_busy(self) -> bool:
        """A local camera that exists but would not deliver: most often another program (the daemon) has it.

        V4L2 devices and libcamera are opened by one process at a time; a network camera serves several.
        """
        if self.kind == "device":
            return not self.detail.startswith(("no camera at", "permission denied"))
        return self.kind == "picamera2" and self.detail != PICAMERA2_MISSING


class DifferentPeopleError(CaptureError):
    """Two good faces that do not belong to one person were seen during one capture."""


@dataclass(frozen=True)
class CaptureRules:
    """How many frames to keep and how far apart; ``min_agreement`` None means the gallery's match threshold.

    ``max_likeness`` catches the same picture delivered again (a frozen stream): a live face never gives the
    same embedding twice, even when the person stands still (sensor noise alone brings it below 0.99).
    """

    frames: int = 5
    seconds: float = 20.0
    min_interval: float = 0.5
    min_agreement: float | None = None
    max_likeness: float = 0.995

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"frames must be at least 1, not {self.frames}")
        if self.seconds <= 0:
            raise ValueError(f"seconds must be positive, not {self.seconds}")
        if self.min_interval < 0:
            raise ValueError(f"min_interval must not be negative, not {self.min_interval}")


@dataclass(frozen=True, eq=False)
class Pick:
    """A frame chosen for enrollment: its unit-length embedding, and the frame kept only until the end."""

    embedding: np.ndarray
    frame: Frame
    face: Face
    elapsed: float

    @property
    def label(self) -> str:
        return f"camera frame {self.frame.index} at {self.elapsed:.1f} s"

    @property
    def name(self) -> str:
        """A file name stem for a kept frame: when it was taken, and which frame it was."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.frame.ts))
        return f"camera-{stamp}-{self.frame.index:05d}"

    def crop(self, margin: float = 0.6) -> np.ndarray:
        """The face with room around it (enough to detect it again), not the whole room behind the person."""
        return face_crop(self.frame.image, self.face.box, margin)


@dataclass(frozen=True)
class CaptureProgress:
    """Where the capture stands after one frame; ``problem`` is what that frame had wrong (None: it was good)."""

    picked: int
    wanted: int
    frames: int
    elapsed: float
    problem: str | None


@dataclass
class CameraEnrollment:
    """What a camera enrollment did: the usual report, the frames it used and what it skipped."""

    report: EnrollReport
    picks: list[Pick]
    frames: int
    skipped: Counter[str]
    seconds: float
    kept: list[Path] = field(default_factory=list)


def face_crop(image: np.ndarray, box: tuple[float, float, float, float], margin: float) -> np.ndarray:
    """A square around the face box, ``margin`` box sizes wider on each side, clipped to the image."""
    x, y, w, h = box
    side = max(w, h) * (1 + 2 * margin)
    cx, cy = x + w / 2, y + h / 2
    height, width = image.shape[:2]
    left, top = max(0, int(cx - side / 2)), max(0, int(cy - side / 2))
    right, bottom = min(width, int(cx + side / 2)), min(height, int(cy + side / 2))
    return np.ascontiguousarray(image[top:bottom, left:right])


def problem_of(quality: Quality, rules: QualityRules) -> str:
    """The one thing to tell the person about a face the quality gate refused (the most actionable first)."""
    if quality.size < rules.min_face_px:
        return "too_small"
    if abs(quality.yaw) > rules.max_yaw or abs(quality.roll_degrees) > rules.max_roll_degrees:
        return "turned"
    if quality.sharpness < rules.min_sharpness:
        return "blurred"
    return "unusable"


def describe_problem(key: str) -> str:
    what, advice = PROBLEMS[key]
    return f"{what} ({advice})"


class FramePicker:
    """Decides frame by frame which camera frames become templates; raises when two people were seen."""

    def __init__(self, engine: FaceEngine, rules: CaptureRules, agreement: float) -> None:
        self.engine = engine
        self.rules = rules
        self.agreement = agreement
        self.picks: list[Pick] = []
        self.skipped: Counter[str] = Counter()
        self.frames = 0

    @property
    def done(self) -> bool:
        return len(self.picks) >= self.rules.frames

    def offer(self, frame: Frame, elapsed: float) -> str | None:
        """Look at one frame; returns what was wrong with it, or None when it was good (picked or not)."""
        self.frames += 1
        faces = self.engine.detect(frame.image)
        if len(faces) != 1:
            return self._skip("no_face" if not faces else "several_faces")
        observation = self.engine.observe(frame.image, faces)[0]
        if observation.embedding is None:
            return self._skip(problem_of(observation.quality, self.engine.rules))
        embedding = normalise(observation.embedding)[0]
        if self.picks:
            scores = np.stack([p.embedding for p in self.picks]) @ embedding
            worst = float(scores.min())
            if worst < self.agreement:
                raise DifferentPeopleError(
                    f"faces of two different people were seen (similarity {worst:.2f}, same person needs "
                    f"{self.agreement:.2f}); only the person being enrolled should face the camera"
                )
            if elapsed - self.picks[-1].elapsed < self.rules.min_interval:
                return None  # good, but too close in time to the last pick to add anything
            if float(scores.max()) >= self.rules.max_likeness:
                return self._skip("unchanged")
        self.picks.append(Pick(embedding, frame, faces[0], elapsed))
        return None

    def shortfall(self, seconds: float) -> str:
        """One line for a capture that ended short (time up, video over): how far it got, the most common problem."""
        line = f"only {len(self.picks)} of {self.rules.frames} good frames in {seconds:.0f} s ({self.frames} looked at)"
        if not self.skipped:
            return line
        key, _count = self.skipped.most_common(1)[0]
        return f"{line}; most often: {describe_problem(key)}"

    def _skip(self, key: str) -> str:
        self.skipped[key] += 1
        return key


def camera_settings(source: str) -> CameraSettings:
    """Settings for an enrollment camera; a video file is played once (a replay would repeat the same frames)."""
    settings = CameraSettings(source=source)
    if settings.kind == "file":
        return CameraSettings(source=source, reconnect_min=NO_REPLAY, reconnect_max=NO_REPLAY)
    return settings


def capture(
    settings: CameraSettings,
    picker: FramePicker,
    progress: Callable[[CaptureProgress], None] | None = None,
) -> float:
    """Feed camera frames to ``picker`` until it has enough or time runs out; returns the seconds it took.

    The camera is opened here and released on every way out (success, error, Ctrl-C). A camera that never
    delivers a frame fails fast with the camera's own reason rather than after the whole timeout.
    """
    camera = Camera(settings)
    seconds = picker.rules.seconds
    start = time.monotonic()
    camera.start()
    try:
        index: int | None = None
        while not picker.done:
            elapsed = time.monotonic() - start
            if elapsed >= seconds:
                raise CaptureError(_timeout_message(picker, camera, index is not None, seconds))
            frame = camera.latest(after_index=index, timeout=min(0.25, seconds - elapsed))
            if frame is None:
                health = camera.health()
                if index is None and (health.state == "error" or health.attempts > 0):
                    raise CameraOpenError(health.detail, settings.kind)
                if index is not None and settings.kind == "file" and health.state != "ok":
                    raise CaptureError(f"the video ended: {picker.shortfall(time.monotonic() - start)}")
                continue
            index = frame.index
            elapsed = time.monotonic() - start
            problem = picker.offer(frame, elapsed)
            if progress is not None:
                progress(CaptureProgress(len(picker.picks), picker.rules.frames, picker.frames, elapsed, problem))
        return time.monotonic() - start
    finally:
        if not camera.stop(timeout=2.0):
            log.warning("camera: the capture thread is still closing the source")


def _timeout_message(picker: FramePicker, camera: Camera, seen: bool, seconds: float) -> str:
    health = camera.health()
    if not seen:
        return f"no frames from the camera in {seconds:.0f} s ({health.detail})"
    if health.state != "ok":  # it delivered, then dropped: say so, not just "no face in view"
        return f"{picker.shortfall(seconds)}; the camera stopped delivering: {health.detail}"
    return picker.shortfall(seconds)


def enroll_from_camera(
    enroller: Enroller,
    person_id: str,
    settings: CameraSettings,
    rules: CaptureRules | None = None,
    progress: Callable[[CaptureProgress], None] | None = None,
) -> CameraEnrollment:
    """Capture, then enroll the picked frames through the same path as photos (duplicate check, sealed store).

    The person is checked against the roster before the camera opens, so nobody poses for an unknown id.
    Frames are kept on disk only when the enroller keeps photos, and then only the face crops.
    """
    rules = rules or CaptureRules()
    enroller.check_person(person_id)
    agreement = rules.min_agreement if rules.min_agreement is not None else enroller.gallery.threshold
    picker = FramePicker(enroller.engine, rules, agreement)
    took = capture(settings, picker, progress)
    report = enroller.enroll_embeddings(person_id, [(pick.label, pick.embedding) for pick in picker.picks])
    kept = []
    if report.added and enroller.keep_photos_dir is not None:
        kept = enroller.keep_images(person_id, [(pick.name, pick.crop()) for pick in picker.picks])
    log.info("camera enrollment: %d frames looked at, %d picked in %.1f s", picker.frames, len(picker.picks), took)
    return CameraEnrollment(report, picker.picks, picker.frames, picker.skipped, took, kept)
