"""USB keyboard-wedge card readers: they "type" the card number and Enter, read here through evdev.

The device is grabbed exclusively (EVIOCGRAB) so that card numbers never reach a login
console. Decoding key events into a UID is separate from reading the device, so tests feed
real evdev key codes from a list (this machine has no /dev/input).
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
import time
from collections.abc import Callable
from typing import Protocol

from appliance.config import ReaderConfig
from appliance.readers.base import HealthBoard, ReaderHealth, ReaderState, Tap, TapSink
from appliance.readers.uid import UidError, normalise_uid

log = logging.getLogger(__name__)

# Linux input key codes (linux/input-event-codes.h), so decoding needs no evdev import.
_DIGITS = {
    2: "1",
    3: "2",
    4: "3",
    5: "4",
    6: "5",
    7: "6",
    8: "7",
    9: "8",
    10: "9",
    11: "0",
    79: "1",
    80: "2",
    81: "3",
    75: "4",
    76: "5",
    77: "6",
    71: "7",
    72: "8",
    73: "9",
    82: "0",
}
_LETTERS = {30: "A", 48: "B", 46: "C", 32: "D", 18: "E", 33: "F"}
KEY_ENTER, KEY_KPENTER = 28, 96
_SHIFTS = {42, 54}
KEY_DOWN = 1
MAX_CHARS = 40
INTER_KEY_TIMEOUT = 0.3


class KeyDecoder:
    """Turns key-down events into UIDs; a pause, an unknown key or an overlong burst resets it.

    After a pause or an overlong burst the keys up to the next Enter are dropped: they are the
    tail of a broken number, and read on their own they would look like a different (short) card.
    """

    def __init__(self, uid_format: str, on_garbage: Callable[[str], None]) -> None:
        self.uid_format = uid_format
        self.on_garbage = on_garbage
        self._buffer: list[str] = []
        self._last = 0.0
        self._bad = False
        self._skipping = False

    def feed(self, code: int, value: int, at: float) -> str | None:
        if value != KEY_DOWN or code in _SHIFTS:
            return None
        if self._buffer and at - self._last > INTER_KEY_TIMEOUT:
            self._reject("input stopped before Enter")
        self._last = at
        if code in (KEY_ENTER, KEY_KPENTER):
            if self._skipping:
                self._skipping = False
                return None
            return self._finish()
        if self._skipping:
            return None
        char = _DIGITS.get(code) or _LETTERS.get(code)
        if char is None:
            self._bad = True
            char = "?"
        self._buffer.append(char)
        if len(self._buffer) > MAX_CHARS:
            self._reject(f"more than {MAX_CHARS} keys without Enter")
        return None

    def _finish(self) -> str | None:
        text, bad = "".join(self._buffer), self._bad
        self._buffer, self._bad = [], False
        if not text:
            return None
        if bad:
            self.on_garbage(f"unexpected keys in {len(text)}-character input")
            return None
        try:
            return normalise_uid(text, self.uid_format)
        except UidError:
            self.on_garbage(f"{len(text)}-character input is not a {self.uid_format} card number")
            return None

    def _reject(self, why: str) -> None:
        self._buffer, self._bad, self._skipping = [], False, True
        self.on_garbage(why)


class KeySource(Protocol):
    """Where key events come from: a grabbed evdev device in production, a list in tests."""

    def read(self, timeout: float) -> list[tuple[int, int, float]]: ...

    def close(self) -> None: ...


class EvdevSource:
    """A real input device, grabbed so no other program (or console) sees its keys."""

    def __init__(self, path: str) -> None:
        import evdev

        self._ecodes = evdev.ecodes
        self.device = evdev.InputDevice(path)
        self.device.grab()

    def read(self, timeout: float) -> list[tuple[int, int, float]]:
        ready, _, _ = select.select([self.device.fd], [], [], timeout)
        if not ready:
            return []
        now = time.monotonic()
        return [(e.code, e.value, now) for e in self.device.read() if e.type == self._ecodes.EV_KEY]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.device.ungrab()
        self.device.close()


class WedgeReader:
    """One keyboard-wedge reader; reopens its device with backoff after an unplug."""

    def __init__(self, config: ReaderConfig, open_source: Callable[[], KeySource] | None = None) -> None:
        self.config = config
        self.board = HealthBoard("wedge", [config.name])
        self._open = open_source or (lambda: EvdevSource(str(config.device)))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.garbage = 0

    def start(self, sink: TapSink) -> None:
        self._thread = threading.Thread(target=self._run, args=(sink,), name=f"wedge-{self.config.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def health(self) -> list[ReaderHealth]:
        return self.board.snapshot()

    def _garbage(self, why: str) -> None:
        self.garbage += 1
        log.warning("reader %s: ignored malformed input (%s)", self.config.name, why)
        self.board.set(self.config.name, ReaderState.OK, f"ignored malformed input: {why}")

    def _run(self, sink: TapSink) -> None:
        backoff = 0.5
        name = self.config.name
        while not self._stop.is_set():
            try:
                source = self._open()
            except (OSError, ImportError) as exc:
                if self.board.set(name, ReaderState.WAITING, f"cannot open {self.config.device}: {exc}"):
                    log.warning("reader %s: cannot open %s (%s); retrying", name, self.config.device, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            if self.board.set(name, ReaderState.OK, "ready"):
                log.info("reader %s: ready (grabbed)", name)
            decoder = KeyDecoder(self.config.uid_text_format, self._garbage)
            try:
                while not self._stop.is_set():
                    for code, value, at in source.read(0.5):
                        uid = decoder.feed(code, value, at)
                        if uid is not None:
                            sink(Tap(name, self.config.direction, uid, at))
            except (OSError, EOFError) as exc:
                self.board.set(name, ReaderState.WAITING, f"device lost: {exc}")
                log.warning("reader %s: device lost (%s); waiting for it to come back", name, exc)
            finally:
                source.close()
