"""The camera thread with real OpenCV sources: video files, image sequences and an MJPEG-over-HTTP server.

Every test frame carries its own number as a row of black/white blocks (10 bits, survives JPEG), so tests can
check order and freshness of what the camera hands out.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from camera_support import H, MjpegServer, W, decode, draw

from appliance.vision.camera import (
    PICAMERA2_MISSING,
    Camera,
    CameraHealth,
    CameraSettings,
    Frame,
    OpenCVSource,
    backoff_delay,
    describe_source,
)


def write_video(path: Path, count: int, fps: float = 30.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (W, H))
    assert writer.isOpened(), "this OpenCV cannot write MJPG/AVI"
    for n in range(count):
        writer.write(draw(n))
    writer.release()
    return path


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def wait_state(camera: Camera, state: str, timeout: float = 5.0) -> CameraHealth:
    wait_until(lambda: camera.health().state == state, timeout, f"camera state {state!r} (now {camera.health()})")
    return camera.health()


@pytest.fixture
def mjpeg() -> Iterator[MjpegServer]:
    server = MjpegServer()
    yield server
    server.stop()


@pytest.fixture
def cameras() -> Iterator[list[Camera]]:
    """Cameras a test starts; all stopped at the end even if the test fails."""
    started: list[Camera] = []
    yield started
    for camera in started:
        camera.stop()


@pytest.fixture(autouse=True)
def no_thread_exceptions(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any exception escaping a thread (the capture thread must never raise) fails the test."""
    escaped: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    yield
    assert not escaped, f"exception escaped a thread: {escaped!r}"


def run(cameras: list[Camera], settings: CameraSettings, source: OpenCVSource | None = None) -> Camera:
    camera = Camera(settings, source)
    cameras.append(camera)
    camera.start()
    return camera


def test_test_frames_survive_jpeg() -> None:
    _, jpeg = cv2.imencode(".jpg", draw(0b1011001101))
    assert decode(cv2.imdecode(jpeg, cv2.IMREAD_COLOR)) == 0b1011001101


def test_file_frames_come_in_order_with_timestamps_at_the_file_rate(tmp_path: Path, cameras: list[Camera]) -> None:
    video = write_video(tmp_path / "walk.avi", 40)
    camera = run(cameras, CameraSettings(str(video), fps=80, reconnect_min=5, reconnect_max=5))
    ok = wait_state(camera, "ok")
    assert ok.detail == f"{video} {W}x{H}"
    frames: list[Frame] = []
    last: int | None = None
    while not frames or decode(frames[-1].image) < 39:
        frame = camera.latest(after_index=last, timeout=3)
        assert frame is not None, "frames stopped before the end of the file"
        frames.append(frame)
        last = frame.index
    numbers = [decode(f.image) for f in frames]
    assert numbers == sorted(set(numbers)), "frames out of order or repeated"
    assert len(numbers) >= 30, f"a waiting consumer should see nearly every frame, saw {numbers}"
    assert all(b.index > a.index for a, b in itertools.pairwise(frames))
    assert all(b.ts > a.ts and b.mono > a.mono for a, b in itertools.pairwise(frames))
    assert abs(frames[-1].ts - time.time()) < 2
    first = frames[0]
    assert first.image.shape == (H, W, 3) and first.image.dtype == np.uint8
    assert not first.image.flags.writeable, "frames are shared between consumers"
    # Paced like a camera (80 fps), not decoded as fast as the CPU allows.
    elapsed = frames[-1].mono - first.mono
    expected = (numbers[-1] - numbers[0]) / 80
    assert elapsed >= 0.8 * expected, f"{elapsed:.3f} s for {expected:.3f} s of video"
    # Without loop=True the end of a file is a lost source: reported, and the file reopened after the backoff.
    health = wait_state(camera, "reconnecting")
    assert health.detail == "end of video file" and health.frames >= len(frames) and health.attempts == 0
    assert camera.latest(timeout=0) is None


def test_loop_restarts_a_file_at_its_end(tmp_path: Path, cameras: list[Camera]) -> None:
    video = write_video(tmp_path / "demo.avi", 12)
    camera = run(cameras, CameraSettings(str(video), fps=100, loop=True))
    seen: list[int] = []
    last: int | None = None
    while seen.count(5) < 3:  # three passes over the file
        frame = camera.latest(after_index=last, timeout=3)
        assert frame is not None
        seen.append(decode(frame.image))
        last = frame.index
        assert camera.health().state == "ok", camera.health()
    wraps = sum(1 for a, b in itertools.pairwise(seen) if b < a)
    assert wraps >= 2, seen
    assert camera.health().reconnects == 0  # looping is not a loss


def test_file_removed_then_restored_reconnects(tmp_path: Path, cameras: list[Camera]) -> None:
    video = write_video(tmp_path / "gate.avi", 10)
    camera = run(cameras, CameraSettings(str(video), fps=100, loop=True, reconnect_min=0.05, reconnect_max=0.2))
    wait_state(camera, "ok")
    before = camera.latest(timeout=2)
    assert before is not None
    video.rename(tmp_path / "away.avi")
    health = wait_state(camera, "reconnecting")
    assert "no such video file" in health.detail and str(video) in health.detail
    assert camera.latest(timeout=0) is None, "no frame from before the loss while the camera is down"
    wait_until(lambda: camera.health().attempts >= 3, what="several reconnection attempts")
    (tmp_path / "away.avi").rename(video)
    health = wait_state(camera, "ok")
    assert health.attempts == 0 and health.reconnects == 1
    after = camera.latest(after_index=before.index, timeout=2)
    assert after is not None and after.index > before.index


def test_http_stream_lost_and_back_with_visible_backoff(cameras: list[Camera]) -> None:
    server = MjpegServer(first=0)
    port = server.port
    camera = run(cameras, CameraSettings(server.url, reconnect_min=0.05, reconnect_max=0.4, timeout=2))
    try:
        ok = wait_state(camera, "ok")
        assert ok.detail == f"{server.url} {W}x{H}"
        frame = camera.latest(timeout=2)
        assert frame is not None and decode(frame.image) <= server.sent
        server.stop()
        lost = wait_state(camera, "reconnecting")
        assert lost.since >= ok.since

        # Watch the attempts for 2 s: the waits between them grow, stay within [min, max], and are jittered.
        delays: dict[int, float] = {}
        start = time.monotonic()
        while time.monotonic() - start < 2.0:
            h = camera.health()
            if h.attempts and h.backoff:
                delays[h.attempts] = h.backoff
            time.sleep(0.005)
        attempts = camera.health().attempts
        assert 4 <= attempts <= 15, f"{attempts} attempts in 2 s (without backoff at 50 ms it would be ~40)"
        waits = [delays[k] for k in sorted(delays)]
        assert all(0.05 <= d <= 0.4 for d in waits), waits
        assert waits[0] <= 0.1 and max(waits[-3:]) >= 0.2, f"backoff does not grow: {waits}"
        assert "cannot open stream" in camera.health().detail

        server = MjpegServer(port=port, first=500)  # the camera comes back on the same address
        back = wait_state(camera, "ok", timeout=3)
        assert back.reconnects == 1 and back.attempts == 0
        frame = camera.latest(after_index=frame.index, timeout=2)
        assert frame is not None and decode(frame.image) >= 500, "frames flow again from the restarted camera"
    finally:
        server.stop()


def test_slow_consumer_gets_the_newest_frame_not_a_backlog(mjpeg: MjpegServer, cameras: list[Camera]) -> None:
    camera = run(cameras, CameraSettings(mjpeg.url, timeout=2))
    wait_state(camera, "ok")
    first = camera.latest(timeout=2)
    assert first is not None
    for _ in range(3):
        time.sleep(0.3)  # a consumer busy with 0.3 s of face work (15 frames at 50 fps)
        frame = camera.latest(after_index=first.index, timeout=2)
        assert frame is not None
        number = decode(frame.image)
        assert number >= mjpeg.sent - 3, f"stale frame {number}, camera already sent {mjpeg.sent}"
        assert frame.index - first.index >= 10, "a queued backlog would hand out the next frame, not the newest"
        assert time.monotonic() - frame.mono < 0.1
        first = frame


@pytest.mark.parametrize(
    ("source", "detail"),
    [
        ("/dev/video99", "no camera at /dev/video99"),
        ("99", "no camera at /dev/video99"),
        ("{tmp}/missing.avi", "no such video file: {tmp}/missing.avi"),
        ("{tmp}/notes.avi", "cannot open video file {tmp}/notes.avi (not a video"),
        ("http://127.0.0.1:{port}/stream.mjpg", "cannot open stream http://127.0.0.1:{port}/stream.mjpg"),
        (
            "rtsp://admin:s3cret@127.0.0.1:{port}/live?token=abc",
            "cannot open stream rtsp://***@127.0.0.1:{port}/live?***",
        ),
    ],
)
def test_bad_source_reports_reconnecting_and_never_raises(
    source: str, detail: str, tmp_path: Path, cameras: list[Camera]
) -> None:
    (tmp_path / "notes.avi").write_text("not a video at all")
    port = closed_port()
    source = source.format(tmp=tmp_path, port=port)
    detail = detail.format(tmp=tmp_path, port=port)
    camera = run(cameras, CameraSettings(source, reconnect_min=0.05, reconnect_max=0.1, timeout=1))
    wait_until(lambda: camera.health().attempts >= 2, what="two failed attempts")
    health = camera.health()
    assert health.state == "reconnecting"
    assert health.detail.startswith(detail), health.detail
    assert "s3cret" not in json.dumps(health.as_dict()) and "abc" not in health.detail
    assert camera.running, "the capture thread keeps trying"
    assert camera.latest(timeout=0.05) is None


def test_picamera2_off_a_pi_is_a_clear_error(cameras: list[Camera]) -> None:
    try:
        import picamera2  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("picamera2 is importable here (a Pi?)")
    camera = run(cameras, CameraSettings("picamera2"))
    health = wait_state(camera, "error")
    assert health.detail == PICAMERA2_MISSING
    wait_until(lambda: not camera.running, what="the thread to give up: retrying cannot help")


def test_stop_returns_promptly_in_every_phase(tmp_path: Path, cameras: list[Camera]) -> None:
    video = write_video(tmp_path / "v.avi", 10)
    streaming = run(cameras, CameraSettings(str(video), fps=30, loop=True))
    wait_state(streaming, "ok")
    backing_off = run(cameras, CameraSettings("/dev/video99", reconnect_min=20, reconnect_max=60))
    wait_until(lambda: backing_off.health().backoff >= 10, what="a long backoff wait")
    # A server that accepts the connection and never answers: the thread is stuck inside FFmpeg's open.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        stuck = run(cameras, CameraSettings(f"http://127.0.0.1:{silent.getsockname()[1]}/x.mjpg", timeout=1.5))
        time.sleep(0.2)
        for camera in (streaming, backing_off, stuck):
            t0 = time.monotonic()
            camera.stop()
            assert time.monotonic() - t0 < 1.0
            assert camera.health().detail == "stopped"
            assert camera.latest(timeout=0.5) is None
    assert not streaming.running and not backing_off.running
    wait_until(lambda: not stuck.running, timeout=4, what="the stuck thread to end at its stream timeout")


def test_grayscale_and_four_channel_frames_come_out_bgr(tmp_path: Path, cameras: list[Camera]) -> None:
    for n in range(3):
        cv2.imwrite(str(tmp_path / f"grey_{n:02d}.png"), cv2.cvtColor(draw(n), cv2.COLOR_BGR2GRAY))
        cv2.imwrite(str(tmp_path / f"rgba_{n:02d}.png"), np.full((H, W, 4), (10, 20, 30, 40), np.uint8))
    grey_pattern = str(tmp_path / "grey_%02d.png")
    rgba_pattern = str(tmp_path / "rgba_%02d.png")
    # OpenCV's image-sequence backend hands these out as they are stored: the odd frames a camera must fix.
    raw = cv2.VideoCapture(grey_pattern, cv2.CAP_IMAGES)
    assert raw.read()[1].shape == (H, W)
    raw = cv2.VideoCapture(rgba_pattern, cv2.CAP_IMAGES)
    assert raw.read()[1].shape == (H, W, 4)

    settings = CameraSettings(grey_pattern, fps=100, loop=True)
    grey = run(cameras, settings, OpenCVSource(settings, api=cv2.CAP_IMAGES))
    settings = CameraSettings(rgba_pattern, fps=100, loop=True)
    rgba = run(cameras, settings, OpenCVSource(settings, api=cv2.CAP_IMAGES))
    frame = grey.latest(timeout=3)
    assert frame is not None and frame.image.shape == (H, W, 3) and frame.image.dtype == np.uint8
    assert np.array_equal(frame.image[..., 0], frame.image[..., 2])
    assert decode(frame.image) in (0, 1, 2)
    frame = rgba.latest(timeout=3)
    assert frame is not None and frame.image.shape == (H, W, 3)
    assert frame.image[0, 0].tolist() == [10, 20, 30]


def test_settings_are_checked_and_urls_masked() -> None:
    with pytest.raises(ValueError, match="empty"):
        CameraSettings(" ")
    with pytest.raises(ValueError, match="reconnect_max"):
        CameraSettings("0", reconnect_min=5, reconnect_max=1)
    with pytest.raises(ValueError, match="width"):
        CameraSettings("0", width=0)
    assert CameraSettings("0").kind == "device"
    assert CameraSettings("/dev/video2").kind == "device"
    assert CameraSettings("rtsp://cam/live").kind == "url"
    assert CameraSettings("demo.mp4").kind == "file"
    assert CameraSettings("picamera2").kind == "picamera2"
    assert describe_source("rtsp://u:p@10.0.0.5:554/s?auth=x") == "rtsp://***@10.0.0.5:554/s?***"
    assert describe_source("/dev/video0") == "/dev/video0"
    waits = [backoff_delay(step, 0.5, 30) for step in range(12)]
    assert all(0.5 <= w <= 30 for w in waits) and waits[-1] >= 15


def closed_port() -> int:
    """A local TCP port with nothing listening (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
