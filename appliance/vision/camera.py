"""The gate camera: a capture thread that always holds the newest frame, reconnects after loss, and reports health.

Why a thread: OpenCV and network streams buffer frames. A consumer that reads only when it is ready (face
detection takes tens of milliseconds) would otherwise be served old frames from that buffer, and a card tap
would be checked against the face of whoever stood there a second ago. The thread reads as fast as the camera
delivers and keeps only the latest frame; consumers ask for "a frame newer than the one I had".

Sources: a V4L2 device ("/dev/video0" or "0"), a video file (played at its own frame rate, optionally looped for
the demo), an rtsp:// or http(s):// URL (MJPEG over HTTP works), or "picamera2" on a Raspberry Pi.

Privacy: nothing here logs or stores images; logs carry state transitions and the source's name with any
password or query string in a URL masked.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from appliance.vision.images import ImageError, to_bgr

log = logging.getLogger(__name__)

CameraState = Literal["ok", "reconnecting", "error"]
SourceKind = Literal["device", "file", "url", "picamera2"]

PICAMERA2_MISSING = "picamera2 is not available (Raspberry Pi OS: apt install python3-picamera2)"
MAX_READ_FAILURES = 5  # consecutive failed reads of a live source before it counts as lost
READ_RETRY_PAUSE = 0.02  # between failed reads of a live source, so a dead device does not spin a core
DEFAULT_FILE_FPS = 25.0  # pace for a video file that does not say its frame rate


class CameraError(RuntimeError):
    """The camera cannot deliver now (unplugged, unreachable, busy); the message says why, for status."""


class CameraUnavailable(CameraError):
    """The camera can never work on this machine as configured (retrying will not help)."""


@dataclass(frozen=True)
class CameraSettings:
    """What the camera thread needs; the daemon maps its config onto this.

    ``timeout`` bounds opening and reading a network stream, so a dead server cannot hang the thread.
    """

    source: str = "/dev/video0"
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    loop: bool = False
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    timeout: float = 5.0

    def __post_init__(self) -> None:
        if not self.source or not self.source.strip():
            raise ValueError("camera source is empty: give a device (/dev/video0), a file, a URL or picamera2")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"camera {name} must be positive, not {value}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"camera fps must be positive, not {self.fps}")
        if self.reconnect_min <= 0:
            raise ValueError(f"camera reconnect_min must be positive, not {self.reconnect_min}")
        if self.reconnect_max < self.reconnect_min:
            raise ValueError(
                f"camera reconnect_max ({self.reconnect_max}) must not be below reconnect_min ({self.reconnect_min})"
            )
        if self.timeout <= 0:
            raise ValueError(f"camera timeout must be positive, not {self.timeout}")

    @property
    def kind(self) -> SourceKind:
        return source_kind(self.source)


@dataclass(frozen=True, eq=False)
class Frame:
    """One captured image: BGR uint8, read-only because every consumer shares the same array.

    ``ts`` is wall-clock ``time.time()`` (for events), ``mono`` is ``time.monotonic()`` (for ages and
    intervals), ``index`` counts frames since the camera started, across reconnections.
    """

    image: np.ndarray
    ts: float
    mono: float
    index: int


@dataclass(frozen=True)
class CameraHealth:
    """The camera's line in ``edugate status``; ``since`` is the wall-clock time of the last state change.

    ``attempts`` counts failed (re)connection attempts since frames last flowed and ``backoff`` is the wait
    before the next one; ``reconnects`` counts recoveries since start.
    """

    state: CameraState
    detail: str
    since: float
    source: str
    frames: int = 0
    attempts: int = 0
    backoff: float = 0.0
    reconnects: int = 0
    last_frame_ts: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class FrameSource(Protocol):
    """Something that yields frames; opened again by the camera thread after a loss.

    ``open`` raises ``CameraError`` with a message fit for status; ``read`` blocks for the next frame and returns
    None when the source failed or ended. ``frame_interval`` paces sources that can be read faster than real
    time (video files); it is None for live cameras.
    """

    description: str
    frame_interval: float | None

    def open(self) -> None: ...

    def read(self) -> Frame | None: ...

    def close(self) -> None: ...


def source_kind(source: str) -> SourceKind:
    """What a configured source string names (decides how to open it and what "it ended" means)."""
    text = source.strip()
    if text == "picamera2":
        return "picamera2"
    if text.isdigit() or text.startswith("/dev/"):
        return "device"
    if "://" in text:
        return "url"
    return "file"


def describe_source(source: str) -> str:
    """The source for logs and status, with a URL's password and query (often a token) masked."""
    text = source.strip()
    if source_kind(text) != "url":
        return text
    try:
        parts = urlsplit(text)
        netloc = parts.netloc
        if "@" in netloc:
            netloc = "***@" + netloc.rsplit("@", 1)[1]
        return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))
    except ValueError:
        return "<unparseable URL>"


def backoff_delay(step: int, low: float, high: float, rng: random.Random | None = None) -> float:
    """Wait before reconnection attempt ``step`` (0-based): doubling from ``low``, capped at ``high``, jittered.

    The jitter (a random point in the upper half of the doubled delay) keeps several gates that lost the same
    network camera server from hammering it in lockstep.
    """
    base = min(high, low * 2 ** min(step, 32))
    value = (rng or random).uniform(base / 2, base)
    return min(high, max(low, value))


class OpenCVSource:
    """A V4L2 device, video file or network stream through ``cv2.VideoCapture``.

    Live sources get a one-frame driver buffer (where the backend supports it) and the requested size and
    frame rate; files are paced at their own frame rate (or ``fps``) so the demo behaves like a camera.
    ``api`` picks an OpenCV backend (e.g. ``cv2.CAP_IMAGES`` for an image sequence); by default the one that
    fits the source kind. RTSP over TCP needs ``OPENCV_FFMPEG_CAPTURE_OPTIONS=rtsp_transport;tcp`` in the
    service's environment (a process-wide FFmpeg option, so it is not set from here).
    """

    def __init__(self, settings: CameraSettings, api: int | None = None) -> None:
        self.settings = settings
        self.kind = settings.kind
        self.description = describe_source(settings.source)
        self.frame_interval: float | None = None
        self._api = api
        self._cap: cv2.VideoCapture | None = None
        self._count = 0

    def open(self) -> None:
        self.close()
        source = self.settings.source.strip()
        target: str | int = source
        api = cv2.CAP_ANY
        params: list[int] = []
        if self.kind == "device":
            target = int(source) if source.isdigit() else source
            api = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
        elif self.kind == "url":
            api = cv2.CAP_FFMPEG
            ms = int(self.settings.timeout * 1000)
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        if self._api is not None:
            api = self._api
        cap = cv2.VideoCapture(target, api, params)
        if not cap.isOpened():
            cap.release()
            raise CameraError(self._why_not_open())
        if self.kind == "file":
            fps = self.settings.fps or cap.get(cv2.CAP_PROP_FPS)
            if not fps or not 0.1 <= fps <= 1000:  # 0 or NaN when the container does not say
                fps = DEFAULT_FILE_FPS
            self.frame_interval = 1.0 / fps
        else:
            self.frame_interval = None
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # fresh frames; backends without a driver queue ignore it
            if self.settings.width:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.settings.width)
            if self.settings.height:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.settings.height)
            if self.settings.fps:
                cap.set(cv2.CAP_PROP_FPS, self.settings.fps)
        self._cap = cap

    def read(self) -> Frame | None:
        cap = self._cap
        if cap is None:
            return None
        ok, image = cap.read()
        if not ok or image is None:
            return None
        frame = Frame(image, time.time(), time.monotonic(), self._count)
        self._count += 1
        return frame

    def close(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()

    def _why_not_open(self) -> str:
        """OpenCV only says "not opened"; look at the source to give status something a technician can act on."""
        source = self.settings.source.strip()
        if self.kind == "device":
            path = f"/dev/video{source}" if source.isdigit() else source
            if not os.path.exists(path):
                return f"no camera at {path} (unplugged, or it has another /dev/video number)"
            if not os.access(path, os.R_OK | os.W_OK):
                return f"permission denied on {path} (add the service user to the 'video' group)"
            return f"cannot open camera {path} (in use by another program, or not a capture device)"
        if self.kind == "file":
            if "%" not in source:  # an image-sequence pattern is not a file name
                if not os.path.exists(source):
                    return f"no such video file: {source}"
                if not os.access(source, os.R_OK):
                    return f"cannot read video file {source} (permission denied)"
            return f"cannot open video file {source} (not a video, or an unsupported codec)"
        return f"cannot open stream {self.description} (unreachable, refused, timed out or not a video stream)"


class Picamera2Source:
    """A Raspberry Pi camera through picamera2 (libcamera); picamera2 is imported only when opened.

    Kept deliberately thin because it cannot be tested off a Pi: there is no libcamera here and
    ``import picamera2`` fails. On Raspberry Pi OS picamera2 comes from apt (python3-picamera2), so the venv
    needs ``--system-site-packages`` and must not shadow the apt numpy with an incompatible one.
    """

    frame_interval: float | None = None

    def __init__(self, settings: CameraSettings) -> None:
        self.settings = settings
        self.description = "picamera2"
        self._cam: Any = None
        self._count = 0

    def open(self) -> None:
        self.close()
        try:
            from picamera2 import Picamera2  # only a Pi has it
        except Exception as exc:  # ImportError, or libcamera failing to load underneath
            raise CameraUnavailable(PICAMERA2_MISSING) from exc
        try:
            cam = Picamera2()
        except Exception as exc:  # IndexError/RuntimeError when no camera is attached
            raise CameraError(f"no Pi camera found by libcamera ({exc})") from exc
        try:
            size = (self.settings.width or 640, self.settings.height or 480)
            controls = {"FrameRate": float(self.settings.fps)} if self.settings.fps else {}
            # libcamera's "RGB888" is B, G, R in memory: what OpenCV calls BGR.
            config = cam.create_video_configuration(main={"size": size, "format": "RGB888"}, controls=controls)
            cam.configure(config)
            cam.start()
        except Exception as exc:
            cam.close()
            raise CameraError(f"cannot start the Pi camera ({exc})") from exc
        self._cam = cam

    def read(self) -> Frame | None:
        if self._cam is None:
            return None
        try:
            image = self._cam.capture_array("main")
        except Exception:
            return None
        frame = Frame(image, time.time(), time.monotonic(), self._count)
        self._count += 1
        return frame

    def close(self) -> None:
        cam, self._cam = self._cam, None
        if cam is not None:
            try:
                cam.stop()
            finally:
                cam.close()


def make_source(settings: CameraSettings) -> FrameSource:
    """The source implementation for a configured source string."""
    if settings.kind == "picamera2":
        return Picamera2Source(settings)
    return OpenCVSource(settings)


class Camera:
    """Owns one source and a capture thread; consumers call ``latest`` and the status writer calls ``health``.

    The thread never raises: every failure becomes a health state. Lost sources (read failures, a stream or
    file that ends) are reopened with jittered exponential backoff; a file with ``loop=True`` restarts at its
    end instead. While the camera is down ``latest`` returns nothing rather than a frame from before the loss.
    """

    def __init__(self, settings: CameraSettings, source: FrameSource | None = None) -> None:
        self.settings = settings
        self._source = source if source is not None else make_source(settings)
        self._loops = settings.loop and settings.kind == "file"
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._next_index = 0
        self._thread: threading.Thread | None = None
        self._ever_delivered = False  # so a later "ok" counts as a reconnect
        self._lock = threading.Lock()
        self._health = CameraHealth("error", "not started", time.time(), self._source.description)

    # -- consumer side -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start capturing in the background; returns at once (the first frame comes later)."""
        if self._thread is not None:
            raise RuntimeError("camera already started (a Camera is started once)")
        self._update("reconnecting", f"opening {self._source.description}", log_it=False)
        log.info("camera: opening %s", self._source.description)
        self._thread = threading.Thread(target=self._run, name="edugate-camera", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 0.5) -> bool:
        """Stop capturing; returns within ``timeout`` even if the thread is blocked inside the driver.

        Returns True when the thread has finished. If it has not (a stream stuck until its own timeout), it
        finishes and closes the source by itself shortly after; it is a daemon thread and delivers nothing more.
        """
        self._stop.set()
        with self._cond:
            self._frame = None  # nothing stale for a consumer that asks after the stop
            self._cond.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._lock:
            self._health = replace(self._health, state="error", detail="stopped", since=time.time(), backoff=0.0)
        log.info("camera: stopped")
        return thread is None or not thread.is_alive()

    @property
    def running(self) -> bool:
        """True while the capture thread is alive (also briefly after ``stop`` if it was stuck in the driver)."""
        return self._thread is not None and self._thread.is_alive()

    def latest(self, after_index: int | None = None, timeout: float | None = 1.0) -> Frame | None:
        """The newest frame, waiting up to ``timeout`` s for one with an index above ``after_index``.

        None when no such frame came in time (camera down or stopped). Pass the previous frame's index to
        never process the same frame twice.
        """

        def ready() -> bool:
            frame = self._frame
            return frame is not None and (after_index is None or frame.index > after_index)

        with self._cond:
            self._cond.wait_for(lambda: ready() or self._stop.is_set(), timeout)
            return self._frame if ready() else None

    def health(self) -> CameraHealth:
        with self._lock:
            return self._health

    def __enter__(self) -> Camera:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- capture thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        step = 0  # consecutive failed attempts: the backoff exponent
        first = True
        try:
            while not self._stop.is_set():
                if not first:
                    delay = backoff_delay(step, self.settings.reconnect_min, self.settings.reconnect_max)
                    self._note_backoff(delay)
                    if self._stop.wait(delay):
                        break
                    step += 1
                first = False
                try:
                    reason, delivered = self._connect_and_pump()
                except CameraUnavailable as exc:
                    self._update("error", str(exc))
                    return
                except Exception as exc:  # a bug or an odd driver error: report it and keep trying
                    log.debug("camera: unexpected failure", exc_info=True)
                    reason, delivered = f"camera failure: {type(exc).__name__}: {exc}", False
                finally:
                    self._close_source()
                if reason is None:
                    break
                if delivered:
                    step = 0
                self._lose(reason, failed_attempt=not delivered)
        finally:
            self._close_source()

    def _connect_and_pump(self) -> tuple[str | None, bool]:
        """Open the source and publish frames until it is lost; returns (why it stopped or None when
        stopping, whether any frame came)."""
        try:
            self._source.open()
        except CameraUnavailable:
            raise
        except CameraError as exc:
            return str(exc), False
        delivered = False
        since_open = 0
        failures = 0
        next_due = time.monotonic()
        while not self._stop.is_set():
            interval = self._source.frame_interval
            if interval:
                wait = next_due - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    return None, delivered
            frame = self._source.read()
            if self._stop.is_set():
                return None, delivered
            if frame is None:
                if self._loops and since_open > 0:
                    self._source.close()
                    try:
                        self._source.open()  # the file may have been removed meanwhile: that is a loss
                    except CameraError as exc:
                        return str(exc), delivered
                    since_open = 0
                    continue
                if self.settings.kind == "file":
                    return ("end of video file" if since_open else "video file gave no frames"), delivered
                failures += 1
                if failures >= MAX_READ_FAILURES:
                    return "camera stopped delivering frames", delivered
                if self._stop.wait(READ_RETRY_PAUSE):
                    return None, delivered
                continue
            failures = 0
            try:
                image = to_bgr(frame.image, "camera frame")
            except ImageError as exc:
                return str(exc), delivered
            self._publish(image, frame.ts, frame.mono)
            since_open += 1
            if not delivered:
                delivered = True
                height, width = image.shape[:2]
                detail = f"{self._source.description} {width}x{height}"
                self._update("ok", detail, attempts=0, recovered=self._ever_delivered)
                self._ever_delivered = True
            if interval:
                now = time.monotonic()
                next_due = max(next_due + interval, now - interval)  # a late frame does not cause a burst
        return None, delivered

    def _publish(self, image: np.ndarray, ts: float, mono: float) -> None:
        image.flags.writeable = False
        with self._cond:
            if self._stop.is_set():
                return
            self._frame = Frame(image, ts, mono, self._next_index)
            self._next_index += 1
            self._cond.notify_all()
        with self._lock:
            self._health = replace(self._health, frames=self._health.frames + 1, last_frame_ts=ts)

    def _lose(self, reason: str, failed_attempt: bool) -> None:
        """The source is gone (or never came): drop the old frame and report it."""
        with self._cond:
            self._frame = None
        with self._lock:
            attempts = self._health.attempts + 1 if failed_attempt else 0
        self._update("reconnecting", reason, attempts=attempts)

    def _note_backoff(self, delay: float) -> None:
        with self._lock:
            self._health = replace(self._health, backoff=delay)

    def _update(
        self, state: CameraState, detail: str, *, attempts: int | None = None, recovered: bool = False,
        log_it: bool = True,
    ) -> None:  # fmt: skip
        """Set the health; only a change of state is logged, so a long outage does not flood the journal."""
        if self._stop.is_set() and self._thread is not None:
            return  # stop() owns the final state
        with self._lock:
            h = self._health
            changed = state != h.state
            self._health = replace(
                h,
                state=state,
                detail=detail,
                since=time.time() if changed else h.since,
                attempts=h.attempts if attempts is None else attempts,
                backoff=0.0 if state == "ok" else h.backoff,
                reconnects=h.reconnects + (1 if recovered else 0),
            )
        if not (changed and log_it):
            return
        if state == "ok":
            log.info("camera: frames flowing (%s)", detail)
        elif state == "reconnecting":
            log.warning("camera: %s; reconnecting with backoff", detail)
        else:
            log.error("camera: %s", detail)

    def _close_source(self) -> None:
        try:
            self._source.close()
        except Exception:
            log.debug("camera: closing the source failed", exc_info=True)
