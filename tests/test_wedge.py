"""Keyboard-wedge readers: key codes -> UIDs, and the reader thread around a device that comes and goes.

The decoder is fed real Linux key codes taken from python-evdev's ``ecodes`` (not the numbers
copied from wedge.py), so a wrong entry in its key table fails here. The reader thread gets
its keys from a scripted KeySource, because this machine has no /dev/input.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import pytest
from evdev import ecodes

from appliance.config import ReaderConfig
from appliance.events import Direction
from appliance.readers.base import ReaderState, Tap
from appliance.readers.wedge import INTER_KEY_TIMEOUT, MAX_CHARS, KeyDecoder, KeySource, WedgeReader

KEY_DOWN, KEY_UP, KEY_REPEAT = 1, 0, 2
TOP_ROW = {str(d): getattr(ecodes, f"KEY_{d}") for d in range(10)}
KEYPAD = {str(d): getattr(ecodes, f"KEY_KP{d}") for d in range(10)}
LETTERS = {c: getattr(ecodes, f"KEY_{c}") for c in "ABCDEF"}
STEP = 0.008  # a wedge reader types about one key per USB poll

Event = tuple[int, int, float]


def typed(text: str, start: float = 100.0, keypad: bool = False, enter: int = ecodes.KEY_ENTER) -> list[Event]:
    """Key-down and key-up events a wedge reader sends for ``text`` and Enter (shift held for letters)."""
    events: list[Event] = []
    at = start
    for char in text:
        at += STEP
        if char in LETTERS:
            code = LETTERS[char]
            events += [(ecodes.KEY_LEFTSHIFT, KEY_DOWN, at), (code, KEY_DOWN, at), (code, KEY_UP, at)]
            events.append((ecodes.KEY_LEFTSHIFT, KEY_UP, at))
        elif char.lower() in {c.lower() for c in LETTERS}:
            code = LETTERS[char.upper()]
            events += [(code, KEY_DOWN, at), (code, KEY_UP, at)]
        elif char.isdigit():
            code = (KEYPAD if keypad else TOP_ROW)[char]
            events += [(code, KEY_DOWN, at), (code, KEY_UP, at)]
        else:
            code = {"-": ecodes.KEY_MINUS, ".": ecodes.KEY_DOT, "G": ecodes.KEY_G, "Z": ecodes.KEY_Z}[char]
            events += [(code, KEY_DOWN, at), (code, KEY_UP, at)]
    at += STEP
    events += [(enter, KEY_DOWN, at), (enter, KEY_UP, at)]
    return events


def decode(decoder: KeyDecoder, events: Iterable[Event]) -> list[str]:
    """Every UID the decoder produced for these events."""
    return [uid for code, value, at in events if (uid := decoder.feed(code, value, at)) is not None]


def make_decoder(uid_format: str) -> tuple[KeyDecoder, list[str]]:
    garbage: list[str] = []
    return KeyDecoder(uid_format, garbage.append), garbage


# 040E9358 read as a big-endian number is 68064088, as a little-endian one 0x58930E04 = 1486032388.
CARD = "040E9358"
assert int.from_bytes(bytes.fromhex(CARD), "big") == 68064088
assert int.from_bytes(bytes.fromhex(CARD), "little") == 1486032388


@pytest.mark.parametrize(
    ("text", "uid_format", "expected"),
    [
        ("0068064088", "dec10", CARD),
        ("1486032388", "dec10_reversed", CARD),
        ("0068064088", "dec10_reversed", "58930E04"),
        ("1486032388", "dec10", "58930E04"),
        ("0068069720", "dec10", "040EA958"),
    ],
)
def test_decimal_number_and_enter_give_canonical_uid(text: str, uid_format: str, expected: str) -> None:
    """The 10-digit number a wedge reader types maps to the same UID a PC/SC reader reads, in either byte order."""
    decoder, garbage = make_decoder(uid_format)
    assert decode(decoder, typed(text)) == [expected]
    assert garbage == []


def test_keypad_digits_and_keypad_enter() -> None:
    """Some readers type on the numeric keypad (KEY_KP0..9, KEY_KPENTER): every digit maps like the top row."""
    decoder, garbage = make_decoder("dec10_reversed")
    assert decode(decoder, typed("1486032388", keypad=True, enter=ecodes.KEY_KPENTER)) == [CARD]
    decoder, garbage = make_decoder("dec10")
    top = decode(decoder, typed("0123456789"))
    pad = decode(decoder, typed("0123456789", start=200.0, keypad=True, enter=ecodes.KEY_KPENTER))
    assert top == pad == [f"{123456789:08X}"]
    assert garbage == []


@pytest.mark.parametrize("text", ["04A1B2C3", "04a1b2c3", "04A1b2C3D4E5F6"])
def test_hex_with_and_without_shift(text: str) -> None:
    """Hex readers type letters with or without shift; shift keys themselves are not characters."""
    decoder, garbage = make_decoder("hex")
    assert decode(decoder, typed(text)) == [text.upper()]
    assert garbage == []


def test_key_up_and_autorepeat_events_are_ignored() -> None:
    """Only key-down counts: a key held long enough to auto-repeat must not add digits."""
    decoder, garbage = make_decoder("hex")
    events: list[Event] = []
    at = 10.0
    for char in "04A1B2C3":
        at += STEP
        code = LETTERS.get(char) or TOP_ROW[char]
        events += [(code, KEY_DOWN, at), (code, KEY_REPEAT, at), (code, KEY_REPEAT, at), (code, KEY_UP, at)]
    events += [(ecodes.KEY_ENTER, KEY_DOWN, at + STEP), (ecodes.KEY_ENTER, KEY_REPEAT, at + STEP)]
    events.append((ecodes.KEY_ENTER, KEY_UP, at + STEP))
    assert decode(decoder, events) == ["04A1B2C3"]
    assert garbage == []


def _pause_mid_number() -> list[Event]:
    """The reader stalls after five digits; the other five and Enter come after the inter-key timeout."""
    head = typed("00680", start=10.0)[:-2]
    return head + typed("64088", start=head[-1][2] + INTER_KEY_TIMEOUT + 0.2)


@pytest.mark.parametrize(
    ("uid_format", "events"),
    [
        pytest.param("hex", typed("04A1G2C3", start=10.0), id="letter-outside-A-F"),
        pytest.param("hex", typed("04Z1B2C3", start=10.0), id="letter-Z"),
        pytest.param("dec10", typed("0068-64088", start=10.0), id="minus"),
        pytest.param("hex", typed("04.1B2C3", start=10.0), id="dot"),
        pytest.param("dec10", typed("99999999999", start=10.0), id="not-a-dec10-number"),
        pytest.param("dec10", typed("1" * (MAX_CHARS + 5), start=10.0), id="overlong"),
        pytest.param("dec10", typed("1" * (MAX_CHARS + 1), start=10.0), id="overlong-by-one"),
        pytest.param("dec10", _pause_mid_number(), id="pause-mid-number"),
    ],
)
def test_garbage_is_rejected_and_decoder_recovers(uid_format: str, events: list[Event]) -> None:
    """Malformed input never becomes a UID (not even its tail after a pause or overflow), is reported
    through on_garbage, and the next good card still reads."""
    decoder, garbage = make_decoder(uid_format)
    assert decode(decoder, events) == []
    assert len(garbage) == 1, garbage
    good, expected = ("0068064088", CARD) if uid_format == "dec10" else ("04A1B2C3", "04A1B2C3")
    assert decode(decoder, typed(good, start=events[-1][2] + 5.0)) == [expected]
    assert len(garbage) == 1


def test_stale_partial_input_costs_one_read() -> None:
    """Keys left without Enter are reported when the next burst starts; that burst cannot be told apart
    from the tail of a stalled number, so it is dropped too, and the card after it reads normally."""
    decoder, garbage = make_decoder("dec10")
    assert decode(decoder, typed("00680", start=10.0)[:-2]) == []
    assert decode(decoder, typed("0068064088", start=20.0)) == []
    assert garbage == ["input stopped before Enter"]
    assert decode(decoder, typed("0068064088", start=30.0)) == [CARD]


def test_enter_alone_is_ignored() -> None:
    """Stray Enter presses (empty input) are neither a card nor garbage."""
    decoder, garbage = make_decoder("dec10")
    assert decode(decoder, typed("", start=1.0)) == []
    assert garbage == []


# --- WedgeReader around a scripted KeySource --------------------------------------------------------


class ScriptedSource:
    """A KeySource that plays batches of key events; an exception in the script is raised from read()."""

    def __init__(self, script: Iterable[list[Event] | BaseException]) -> None:
        self._script = list(script)
        self._lock = threading.Lock()
        self._more = threading.Event()
        self.closed = threading.Event()

    def feed(self, item: list[Event] | BaseException) -> None:
        with self._lock:
            self._script.append(item)
        self._more.set()

    def read(self, timeout: float) -> list[Event]:
        with self._lock:
            item = self._script.pop(0) if self._script else None
            if item is None:
                self._more.clear()
        if item is None:
            self._more.wait(timeout)
            return []
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.closed.set()


class Opener:
    """open_source for WedgeReader: hands out scripted results (a source, an exception, or a gate to wait on)."""

    def __init__(self, results: Iterable[KeySource | BaseException | threading.Event]) -> None:
        self.results = list(results)
        self.calls: list[float] = []

    def __call__(self) -> KeySource:
        self.calls.append(time.monotonic())
        result = self.results.pop(0)
        while isinstance(result, threading.Event):
            result.wait(10)
            result = self.results.pop(0)
        if isinstance(result, BaseException):
            raise result
        return result


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def wedge_config(direction: Direction = Direction.IN) -> ReaderConfig:
    return ReaderConfig(name="lane-w", type="wedge", device="/dev/input/by-id/fake-kbd", direction=direction)


def state(reader: WedgeReader) -> tuple[ReaderState, str]:
    (health,) = reader.health()
    return health.state, health.detail


@pytest.fixture
def taps() -> list[Tap]:
    return []


def test_taps_reach_sink_with_configured_direction(taps: list[Tap]) -> None:
    """Each card typed on the device becomes one Tap carrying the lane's name, direction and canonical UID."""
    source = ScriptedSource([typed("1486032388", start=time.monotonic())])
    reader = WedgeReader(wedge_config(Direction.OUT), Opener([source]))
    reader.start(taps.append)
    try:
        wait_until(lambda: len(taps) == 1, what="first tap")
        source.feed(typed("0068064088", start=time.monotonic()))
        wait_until(lambda: len(taps) == 2, what="second tap")
        assert [(t.reader, t.direction, t.uid) for t in taps] == [
            ("lane-w", Direction.OUT, CARD),
            ("lane-w", Direction.OUT, "58930E04"),
        ]
        assert state(reader) == (ReaderState.OK, "ready")
        source.feed(typed("04A1G2", start=time.monotonic()))
        wait_until(lambda: reader.garbage == 1, what="garbage counted")
        assert state(reader)[0] is ReaderState.OK and "malformed" in state(reader)[1]
        assert len(taps) == 2
    finally:
        reader.stop()


def test_unplugged_device_sets_waiting_and_reader_reopens(taps: list[Tap]) -> None:
    """read() failing with ENODEV (unplug) -> WAITING, the device is closed, reopened, and taps resume."""
    first = ScriptedSource([typed("1486032388", start=time.monotonic()), OSError(19, "No such device")])
    second = ScriptedSource([])
    replugged = threading.Event()
    opener = Opener([first, replugged, second])
    reader = WedgeReader(wedge_config(), opener)
    reader.start(taps.append)
    try:
        wait_until(lambda: state(reader)[0] is ReaderState.WAITING, what="WAITING after unplug")
        assert "device lost" in state(reader)[1]
        wait_until(first.closed.is_set, what="lost device closed")  # health is set just before close()
        assert [t.uid for t in taps] == [CARD]
        replugged.set()
        wait_until(lambda: state(reader) == (ReaderState.OK, "ready"), what="OK after replug")
        second.feed(typed("1486032388", start=time.monotonic()))
        wait_until(lambda: len(taps) == 2, what="tap after replug")
        assert len(opener.calls) == 2
    finally:
        reader.stop()
    assert second.closed.is_set()


def test_open_failures_retry_with_backoff(taps: list[Tap]) -> None:
    """A missing device is retried with growing waits (not a busy loop) and reads once it appears."""
    source = ScriptedSource([])
    missing = FileNotFoundError(2, "No such file or directory")
    opener = Opener([missing, missing, source])
    reader = WedgeReader(wedge_config(), opener)
    reader.start(taps.append)
    try:
        wait_until(lambda: state(reader)[0] is ReaderState.WAITING and "cannot open" in state(reader)[1])
        wait_until(lambda: state(reader) == (ReaderState.OK, "ready"), timeout=10, what="OK after retries")
        first_wait = opener.calls[1] - opener.calls[0]
        second_wait = opener.calls[2] - opener.calls[1]
        assert 0.4 <= first_wait < 2.0
        assert second_wait >= 1.8 * first_wait - 0.05
        source.feed(typed("1486032388", start=time.monotonic()))
        wait_until(lambda: len(taps) == 1, what="tap after device appeared")
    finally:
        reader.stop()


@pytest.mark.parametrize("phase", ["reading", "waiting to reopen"])
def test_stop_returns_promptly(phase: str, taps: list[Tap]) -> None:
    """The daemon's shutdown must not hang on a reader, whether it is reading or backing off."""
    if phase == "reading":
        opener = Opener([ScriptedSource([])])
        reader = WedgeReader(wedge_config(), opener)
        reader.start(taps.append)
        wait_until(lambda: state(reader) == (ReaderState.OK, "ready"))
    else:
        opener = Opener([OSError(13, "Permission denied")] * 10)
        reader = WedgeReader(wedge_config(), opener)
        reader.start(taps.append)
        wait_until(lambda: len(opener.calls) >= 2, what="second open attempt")
    started = time.monotonic()
    reader.stop()
    assert time.monotonic() - started < 1.0
    assert reader._thread is not None and not reader._thread.is_alive()
