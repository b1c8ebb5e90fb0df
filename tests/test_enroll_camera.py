"""`edugate enroll PERSON_ID --camera` with real models and a real camera source: video files made from the
shared photos, played by the same capture thread the gate uses (a video file is a camera OpenCV reads).

Videos are built from stills, so every frame of one photo is the same picture; the capture must take its
frames from different photos (spread in time, no repeats), skip frames with no face or several faces, and
refuse a capture in which two different people faced the camera.
"""

from __future__ import annotations

import itertools
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from camera_support import MjpegServer
from conftest import FACES
from daemon_harness import DaemonProcess, write_config

from appliance.config import parse_config
from appliance.journal import open_database
from appliance.journal.events import read_events
from appliance.journal.roster_store import RosterStore
from appliance.roster.model import Person, Role
from appliance.status import status_path
from appliance.vision.enroll_camera import (
    CameraOpenError,
    CaptureError,
    CaptureProgress,
    CaptureRules,
    camera_settings,
    enroll_from_camera,
)
from appliance.vision.images import read_image
from appliance.vision.models import ModelPack
from appliance.vision.service import FaceService

W, H, FPS = 640, 480, 10
PEOPLE = ["barack_obama", "joe_biden", "kit_harington"]
OBAMA = [f"faces/barack_obama/barack_obama_{n:02d}.jpg" for n in range(1, 7)]
BIDEN = "faces/joe_biden/joe_biden_02.jpg"
NO_FACE = ["noface/coffee.png", "noface/rocket.jpg", "noface/mask_blue.jpg", "noface/hubble_deep_field.jpg"]
GROUP = "group/two_people_obama_biden.jpg"
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"BM", b"RIFF")


def letterbox(image: np.ndarray) -> np.ndarray:
    """The photo scaled into a camera-sized frame, as a camera at the office would frame a person."""
    height, width = image.shape[:2]
    scale = min(W / width, H / height)
    resized = cv2.resize(image, (int(width * scale), int(height * scale)))
    frame = np.zeros((H, W, 3), np.uint8)
    top, left = (H - resized.shape[0]) // 2, (W - resized.shape[1]) // 2
    frame[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    return frame


def write_video(path: Path, scenes: list[tuple[str, float]]) -> Path:
    """An MJPG video showing each (photo under FACES, seconds) in turn."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (W, H))
    assert writer.isOpened(), "this OpenCV cannot write MJPG/AVI"
    for photo, seconds in scenes:
        frame = letterbox(read_image(FACES / photo))
        for _ in range(round(seconds * FPS)):
            writer.write(frame)
    writer.release()
    return path


def obama_video(path: Path) -> Path:
    """Five photos of one person, with a coffee cup, a rocket and a two-person photo in between."""
    scenes = [(NO_FACE[0], 0.5), (OBAMA[0], 0.8), (GROUP, 0.5), (OBAMA[1], 0.8), (OBAMA[2], 0.8)]
    scenes += [(NO_FACE[1], 0.3), (OBAMA[3], 0.8), (OBAMA[4], 0.8)]
    return write_video(path, scenes)


@pytest.fixture
def gate(tmp_path: Path, models_dir: Path) -> Path:
    """gate.toml and a journal with the roster under tmp_path/gate; videos go elsewhere in tmp_path."""
    home = tmp_path / "gate"
    home.mkdir()
    database = open_database(home / "journal.db")
    RosterStore(database).apply([Person(p, p.replace("_", " ").title(), Role.STAFF) for p in PEOPLE], replace=True)
    database.close()
    config = home / "gate.toml"
    config.write_text(
        f'[journal]\npath = "{home / "journal.db"}"\n[vision]\nmodels_dir = "{models_dir}"\n'
        f'key_file = "{home / "keys" / "templates.key"}"\nphotos_dir = "{home / "photos"}"\n'
    )
    return config


def keep_photos(config: Path) -> None:
    config.write_text(config.read_text() + "keep_photos = true\n")


def edugate(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def service(config: Path, pack: ModelPack) -> FaceService:
    home = config.parent
    cfg = parse_config(
        {
            "journal": {"path": str(home / "journal.db")},
            "vision": {
                "models_dir": str(pack.models_dir),
                "key_file": str(home / "keys" / "templates.key"),
                "photos_dir": str(home / "photos"),
                "keep_photos": "keep_photos = true" in config.read_text(),
            },
        }
    )
    return FaceService(cfg.vision, open_database(cfg.journal.path), pack)


def image_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` that starts like a JPEG, PNG, BMP or WebP image, whatever its name."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as file:
                if file.read(4).startswith(IMAGE_MAGIC):
                    found.append(path)
    return found


def open_handles(path: Path) -> int:
    """How many of this process's file descriptors point at ``path`` (the camera must let go of it)."""
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(path.resolve()))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("edugate: error:")]


def test_camera_enrollment_recognises_another_photo_and_keeps_no_image(
    gate: Path, tmp_path: Path, pack: ModelPack
) -> None:
    video = obama_video(tmp_path / "obama.avi")
    result = edugate(gate, "enroll", "barack_obama", "--camera", "--camera-source", str(video))
    assert result.returncode == 0, result.stderr
    assert "barack_obama: 5 template(s) enrolled" in result.stdout
    assert "5/5 good frames" in result.stderr and "look at the camera" in result.stderr
    assert "no face in view" in result.stderr and "several faces in view" in result.stderr
    assert "WARNING" not in result.stderr and "Traceback" not in result.stderr

    faces = service(gate, pack)
    assert faces.gallery.people == 1 and len(faces.gallery) == 5
    unseen = faces.engine.observe(read_image(FACES / OBAMA[5]))[0]
    match = faces.gallery.match(unseen.embedding)
    assert match.accepted and match.person == "barack_obama", match
    for other in (BIDEN, "faces/paul_rudd/paul_rudd_01.jpg"):
        observation = faces.engine.observe(read_image(FACES / other))[0]
        assert not faces.gallery.match(observation.embedding).accepted, other

    assert image_files(gate.parent) == []  # templates only: no frame, crop or photo next to the journal
    assert not (gate.parent / "photos").exists()


def test_picks_are_spread_in_time_distinct_and_of_one_person(gate: Path, tmp_path: Path, pack: ModelPack) -> None:
    video = obama_video(tmp_path / "obama.avi")
    faces = service(gate, pack)
    seen: list[CaptureProgress] = []
    rules = CaptureRules(frames=5, seconds=20, min_interval=0.5)
    result = enroll_from_camera(faces.enroller(), "barack_obama", camera_settings(str(video)), rules, seen.append)

    assert result.report.added == 5 and result.kept == []
    times = [pick.elapsed for pick in result.picks]
    assert all(later - earlier >= 0.5 for earlier, later in itertools.pairwise(times)), times
    vectors = np.stack([pick.embedding for pick in result.picks])
    similarity = vectors @ vectors.T
    upper = similarity[np.triu_indices(5, k=1)]
    assert upper.max() < rules.max_likeness, "two picks are the same picture"
    assert upper.min() >= faces.gallery.threshold, "picks disagree about who this is"
    assert result.skipped["no_face"] > 0 and result.skipped["several_faces"] > 0
    assert result.frames == sum(result.skipped.values()) + sum(1 for p in seen if p.problem is None)
    assert seen[-1].picked == 5 and seen[-1].wanted == 5
    assert open_handles(video) == 0


def test_camera_released_when_the_capture_fails(gate: Path, tmp_path: Path, pack: ModelPack) -> None:
    video = write_video(tmp_path / "noface.avi", [(photo, 2.0) for photo in NO_FACE])
    enroller = service(gate, pack).enroller()
    with pytest.raises(CaptureError, match="only 0 of 5 good frames in 2 s"):
        enroll_from_camera(enroller, "joe_biden", camera_settings(str(video)), CaptureRules(seconds=2))
    assert open_handles(video) == 0
    assert enroller.templates.counts() == (0, 0)


@pytest.mark.parametrize(
    ("scenes", "seconds", "expected"),
    [
        ([(photo, 2.5) for photo in NO_FACE], "3", "only 0 of 5 good frames in 3 s"),
        ([(NO_FACE[0], 1.0), (NO_FACE[1], 1.0)], "20", "the video ended: only 0 of 5 good frames"),
    ],
    ids=["timeout", "video-ended"],
)
def test_no_face_video_ends_with_one_clear_error_and_enrolls_nothing(
    gate: Path, tmp_path: Path, pack: ModelPack, scenes: list[tuple[str, float]], seconds: str, expected: str
) -> None:
    video = write_video(tmp_path / "noface.avi", scenes)
    started = time.monotonic()
    result = edugate(gate, "enroll", "joe_biden", "--camera", "--camera-source", str(video), "--seconds", seconds)
    assert result.returncode == 1
    assert time.monotonic() - started < 15
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert expected in errors[0]
    assert "most often: no face in view (look at the camera" in errors[0]
    assert errors[0].endswith("nothing enrolled")
    assert "0/5 good frames" in result.stderr and "Traceback" not in result.stderr
    assert service(gate, pack).templates.counts() == (0, 0)


def test_a_stream_camera_lost_mid_capture_is_named_in_the_error(gate: Path, tmp_path: Path, pack: ModelPack) -> None:
    """A network camera that delivered frames, then lost power: the one error line says the camera stopped,
    not only that no face was seen; nothing is enrolled."""
    camera = MjpegServer(fps=15)
    command = [sys.executable, "-m", "appliance.cli", "enroll", "joe_biden", "--camera", "--camera-source",
               camera.url, "--seconds", "8", "--config", str(gate)]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while camera.sent < 15 and time.monotonic() < deadline:  # the capture is reading frames
            time.sleep(0.05)
        assert camera.sent >= 15, "the enrollment never read the stream"
    finally:
        camera.stop()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr
    assert "the camera stopped delivering" in errors[0] and errors[0].endswith("nothing enrolled")
    assert service(gate, pack).templates.counts() == (0, 0)


def test_group_photo_video_says_several_faces(gate: Path, tmp_path: Path) -> None:
    video = write_video(tmp_path / "group.avi", [(GROUP, 1.5), ("group/kit_with_rose.jpg", 1.5)])
    result = edugate(gate, "enroll", "joe_biden", "--camera", "--camera-source", str(video))
    assert result.returncode == 1
    assert "most often: several faces in view (only the person being enrolled" in error_lines(result.stderr)[0]


@pytest.mark.parametrize("first", ["barack_obama", "joe_biden"])
def test_two_people_in_one_capture_enrolls_nobody(gate: Path, tmp_path: Path, pack: ModelPack, first: str) -> None:
    """Never a template of the wrong person: whoever came first, two different faces stop the enrollment."""
    obama = [(photo, 0.8) for photo in OBAMA[:4]]
    scenes = [*obama[:2], (BIDEN, 0.8), *obama[2:]] if first == "barack_obama" else [(BIDEN, 0.8), *obama]
    video = write_video(tmp_path / "mixed.avi", scenes)
    result = edugate(gate, "enroll", "barack_obama", "--camera", "--camera-source", str(video))
    assert result.returncode == 1
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "two different people" in errors[0] and "nothing enrolled" in errors[0], result.stderr
    assert "template(s) enrolled" not in result.stdout
    assert service(gate, pack).templates.counts() == (0, 0)


def test_keep_photos_keeps_the_chosen_face_crops_and_remove_erases_them(
    gate: Path, tmp_path: Path, pack: ModelPack
) -> None:
    keep_photos(gate)
    video = obama_video(tmp_path / "obama.avi")
    result = edugate(gate, "enroll", "barack_obama", "--camera", "--camera-source", str(video))
    assert result.returncode == 0, result.stderr
    assert "kept 5 face crop(s)" in result.stderr
    folder = gate.parent / "photos" / "barack_obama"
    kept = sorted(folder.iterdir())
    assert len(kept) == 5 and sorted(image_files(gate.parent)) == kept
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    faces = service(gate, pack)
    areas = []
    for path in kept:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        crop = read_image(path)
        areas.append(crop.shape[0] * crop.shape[1])
        observations = faces.engine.observe(crop)
        assert len(observations) == 1 and observations[0].embedding is not None, path.name
    assert max(areas) <= H * W and min(areas) < H * W / 4  # crops around the face, not the frames
    again = edugate(gate, "enroll", "barack_obama", "--photos", str(folder))  # the kept crops can re-enroll
    assert again.returncode == 0 and "5 template(s) enrolled" in again.stdout, again.stderr

    removed = edugate(gate, "enroll", "barack_obama", "--remove")
    assert removed.returncode == 0 and "10 template(s) erased" in removed.stdout
    assert image_files(gate.parent) == []


def test_duplicate_enrollment_warned_once_per_other_person(gate: Path, tmp_path: Path) -> None:
    assert edugate(gate, "enroll", "barack_obama", "--photos", str(FACES / OBAMA[5])).returncode == 0
    video = obama_video(tmp_path / "obama.avi")
    result = edugate(gate, "enroll", "joe_biden", "--camera", "--camera-source", str(video))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "5 faces" in warnings[0] and "already match barack_obama" in warnings[0]


def test_camera_that_cannot_open_fails_at_once_and_says_why(gate: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    busy = edugate(gate, "enroll", "joe_biden", "--camera", "--camera-source", "/dev/null")
    assert busy.returncode == 1
    assert "cannot open camera /dev/null" in busy.stderr
    assert "stop edugate" in busy.stderr and "--camera-source" in busy.stderr and "nothing enrolled" in busy.stderr

    missing = edugate(gate, "enroll", "joe_biden", "--camera", "--camera-source", str(tmp_path / "none.avi"))
    assert missing.returncode == 1 and "no such video file" in missing.stderr
    assert "stop edugate" not in missing.stderr  # nothing holds a missing file: no misleading hint
    absent = edugate(gate, "enroll", "joe_biden", "--camera", "--camera-source", "/dev/video63")
    assert absent.returncode == 1 and "no camera at /dev/video63" in absent.stderr
    assert time.monotonic() - started < 30  # no waiting out the 20 s capture time
    for result in (busy, missing, absent):
        assert len(error_lines(result.stderr)) == 1 and "Traceback" not in result.stderr


def test_busy_hint_only_for_local_cameras_that_exist() -> None:
    assert CameraOpenError("cannot open camera /dev/video0 (in use by another program)", "device").maybe_busy
    assert CameraOpenError("camera stopped delivering frames", "device").maybe_busy
    assert not CameraOpenError("no camera at /dev/video0 (unplugged)", "device").maybe_busy
    assert not CameraOpenError("cannot open stream rtsp://cam/1", "url").maybe_busy


def test_camera_usage_errors_and_unknown_person(gate: Path, tmp_path: Path) -> None:
    both = edugate(gate, "enroll", "joe_biden", "--camera", "--photos", str(FACES / BIDEN))
    assert both.returncode == 2 and "enroll PERSON_ID --camera" in both.stderr
    stray = edugate(gate, "enroll", "joe_biden", "--photos", str(FACES / BIDEN), "--seconds", "5")
    assert stray.returncode == 2 and "go with --camera" in stray.stderr
    nobody = edugate(gate, "enroll", "nobody", "--camera", "--camera-source", str(tmp_path / "never-opened.avi"))
    assert nobody.returncode == 1 and "nobody: not on the roster" in nobody.stderr
    assert "look at the camera" not in nobody.stderr


def test_enroll_by_camera_while_the_daemon_runs(tmp_path: Path, models_dir: Path, pack: ModelPack) -> None:
    """The daemon keeps running: it reloads the gallery by itself and then knows the new face at the gate."""
    home = tmp_path / "gate"
    home.mkdir()
    journal = home / "journal.db"
    database = open_database(journal)
    RosterStore(database).apply([Person("barack_obama", "Barack Obama", Role.STAFF)], replace=True)
    database.close()
    gate_camera = write_video(tmp_path / "gate-camera.avi", [(NO_FACE[0], 0.5), (OBAMA[5], 1.5)])
    config = write_config(
        home / "gate.toml",
        journal,
        [],
        vision={
            "enabled": True,
            "camera": str(gate_camera),
            "camera_direction": "in",
            "models_dir": str(models_dir),
            "key_file": str(home / "keys" / "templates.key"),
        },
    )
    Path(home / "keys").mkdir(mode=0o700)
    enroll_video = obama_video(tmp_path / "obama.avi")
    daemon = DaemonProcess(config).start()
    try:
        status = status_path(journal)
        daemon.wait_for(lambda: '"0 people enrolled"' in _read(status), 30, "the daemon's face gate")
        result = edugate(config, "enroll", "barack_obama", "--camera", "--camera-source", str(enroll_video))
        assert result.returncode == 0, result.stderr
        daemon.wait_for(lambda: '"1 people enrolled"' in _read(status), 30, "the daemon to reload the gallery")
        daemon.wait_for(lambda: _face_arrivals(journal) == ["barack_obama"], 30, "an arrival by face")
    finally:
        daemon.stop()


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _face_arrivals(journal: Path) -> list[str]:
    database = open_database(journal, readonly=True)
    try:
        return [e["person"] for e in read_events(database) if e["kind"] == "arrival" and e["method"] == "face"]
    finally:
        database.close()


def test_failed_capture_keeps_nothing_even_with_keep_photos(gate: Path, tmp_path: Path, pack: ModelPack) -> None:
    keep_photos(gate)
    video = write_video(tmp_path / "three.avi", [(OBAMA[0], 0.8), (OBAMA[1], 0.8), (OBAMA[2], 0.8)])  # 3 stills
    result = edugate(gate, "enroll", "barack_obama", "--camera", "--camera-source", str(video))
    assert result.returncode == 1
    assert re.search(r"the video ended: only [1-4] of 5 good frames", error_lines(result.stderr)[0]), result.stderr
    assert service(gate, pack).templates.counts() == (0, 0)
    assert not (gate.parent / "photos").exists()
