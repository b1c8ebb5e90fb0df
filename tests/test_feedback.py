"""Feedback: the student sees/hears their result, in Vietnamese by default; one broken output spares the rest."""

from __future__ import annotations

import io
import os
import sys
import time
import wave
from pathlib import Path

import pytest

from appliance.config import GpioConfig, SoundConfig
from appliance.events import Kind
from appliance.feedback import Ack, MultiFeedback, Outcome
from appliance.feedback.console import ConsoleFeedback
from appliance.feedback.sound import PATTERNS, SoundFeedback


def ack(outcome: Outcome = Outcome.OK, kind: Kind | None = Kind.ARRIVAL, late: int = 0) -> Ack:
    return Ack(outcome, "lane-in", "07:12", kind, "Nguyễn Văn An", late)


def test_console_vietnamese_by_default_with_name_and_late() -> None:
    out = io.StringIO()
    console = ConsoleFeedback(stream=out)
    console.show(ack())
    console.show(ack(late=7))
    console.show(ack(Outcome.UNKNOWN, Kind.UNKNOWN_CARD))
    console.show(ack(Outcome.ERROR))
    lines = out.getvalue().splitlines()
    assert lines[0] == "✔ [lane-in] Xin chào Nguyễn Văn An! Đã điểm danh vào lúc 07:12"
    assert lines[1].endswith("(muộn 7 phút)")
    assert lines[2].startswith("✖") and "Thẻ chưa được đăng ký" in lines[2]
    assert lines[3].startswith("!") and "chạm thẻ lại" in lines[3]


def test_console_english_and_hidden_names() -> None:
    out = io.StringIO()
    ConsoleFeedback("en", show_names=False, stream=out).show(ack(kind=Kind.DEPARTURE))
    assert out.getvalue() == "✔ [lane-in] Goodbye You! Checked out at 07:12\n"


def test_stdout_shows_names_only_when_it_is_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A terminal (a pty here, the gate's display in the field) is read by the person at the gate; a file or
    the system journal is kept and shipped: the same line goes there without the name."""
    master, replica = os.openpty()
    with os.fdopen(replica, "w", encoding="utf-8") as terminal, (tmp_path / "out").open("w") as log_file:
        monkeypatch.setattr(sys, "stdout", terminal)
        ConsoleFeedback().show(ack())
        monkeypatch.setattr(sys, "stdout", log_file)
        ConsoleFeedback().show(ack())
        ConsoleFeedback(show_names=False).show(ack())
        shown = os.read(master, 4096).decode()
    os.close(master)
    assert shown == "✔ [lane-in] Xin chào Nguyễn Văn An! Đã điểm danh vào lúc 07:12\r\n"
    assert (tmp_path / "out").read_text() == "✔ [lane-in] Xin chào Bạn! Đã điểm danh vào lúc 07:12\n" * 2


def test_a_display_the_caller_names_shows_names_as_configured() -> None:
    from appliance.config import FeedbackConfig
    from appliance.feedback import build_feedback

    display = io.StringIO()  # the demo's screen: not a terminal under a test, still a display
    build_feedback(FeedbackConfig(), "vi", console=display).show(ack())
    build_feedback(FeedbackConfig(show_names=False), "vi", console=display).show(ack())
    assert display.getvalue().splitlines() == [
        "✔ [lane-in] Xin chào Nguyễn Văn An! Đã điểm danh vào lúc 07:12",
        "✔ [lane-in] Xin chào Bạn! Đã điểm danh vào lúc 07:12",
    ]


def test_sound_plays_a_distinct_wav_per_outcome(tmp_path: Path) -> None:
    played = []
    for outcome in (Outcome.OK, Outcome.UNKNOWN):
        target = tmp_path / f"{outcome}.wav"
        sound = SoundFeedback(SoundConfig(command=["sh", "-c", f"cat > {target}"]))
        sound.show(ack(outcome))
        sound.close()
        with wave.open(str(target)) as w:
            seconds = w.getnframes() / w.getframerate()
            assert w.getnchannels() == 1 and w.getsampwidth() == 2
        expected = sum(s for _, s in PATTERNS[outcome])
        assert seconds == pytest.approx(expected, abs=0.01)
        played.append(target.read_bytes())
    assert played[0] != played[1]


def test_broken_output_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    out = io.StringIO()
    broken = SoundFeedback(SoundConfig(command=["/nonexistent/player"]))
    MultiFeedback([broken, ConsoleFeedback(stream=out)]).show(ack())
    assert "Xin chào" in out.getvalue()
    assert "cannot start /nonexistent/player" in caplog.text


def test_gpio_leds_and_buzzer_on_mock_pins() -> None:
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    from appliance.feedback.gpio import GpioFeedback

    previous = Device.pin_factory
    Device.pin_factory = MockFactory()
    try:
        gpio = GpioFeedback(GpioConfig(green_led=17, red_led=27, buzzer=22, on_seconds=0.3))
        green, red, buzzer = (Device.pin_factory.pin(n) for n in (17, 27, 22))
        gpio.show(ack())
        deadline = time.monotonic() + 1
        while not green.state and time.monotonic() < deadline:
            time.sleep(0.01)
        assert green.state and not red.state
        time.sleep(0.5)
        assert not green.state
        gpio.show(ack(Outcome.UNKNOWN, Kind.UNKNOWN_CARD))
        time.sleep(0.8)
        buzzer_highs = sum(1 for change in buzzer.states if change.state)
        assert buzzer_highs == 1 + 3  # one beep for OK, three for the unknown card
        assert any(change.state for change in red.states)
        gpio.close()
    finally:
        Device.pin_factory.close()
        Device.pin_factory = previous


def test_a_live_feedback_change_keeps_the_gpio_pins_it_already_holds(tmp_path: Path) -> None:
    """The hub may change gpio.on_seconds or show_names on a running gate: the GPIO output is carried
    over (its pins cannot be opened twice) instead of the change being refused; dropping GPIO frees them."""
    from gpiozero import LED, Device
    from gpiozero.pins.mock import MockFactory

    from appliance.clock import Clock
    from appliance.config import parse_config
    from appliance.daemon import Gate
    from appliance.feedback import build_feedback
    from appliance.feedback.gpio import GpioFeedback
    from appliance.journal import open_database

    previous = Device.pin_factory
    Device.pin_factory = MockFactory()
    try:
        base = {"device": {"id": "gate-01", "school": "s"}, "journal": {"path": str(tmp_path / "j.db")}}
        config = parse_config({**base, "feedback": {"outputs": ["console", "gpio"]}})
        database = open_database(config.journal.path, writer=True)
        gate = Gate(config, database, build_feedback(config.feedback, "vi"), Clock(config.zone))
        gate.start()
        gpio = next(o for o in gate.feedback.outputs if isinstance(o, GpioFeedback))
        faster = parse_config({**base, "feedback": {"outputs": ["console", "gpio"], "gpio": {"on_seconds": 0.2}}})
        gate.reconfigure(faster)
        assert gate.config.feedback.gpio.on_seconds == 0.2
        kept = next(o for o in gate.feedback.outputs if isinstance(o, GpioFeedback))
        assert kept is gpio and kept.config.on_seconds == 0.2 and kept.green is not None and not kept.green.closed
        gate.reconfigure(parse_config({**base, "feedback": {"outputs": ["console"]}}))
        assert gpio.green is not None and gpio.green.closed
        LED(17).close()  # the pin is free again
        gate.stop()
        database.close()
    finally:
        Device.pin_factory.close()
        Device.pin_factory = previous
