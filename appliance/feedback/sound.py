"""Beeps (and optionally the spoken name) through an audio player command such as ``aplay``.

Tones are made here as WAV bytes and piped to the player without waiting, so a slow sound
card never delays the next student's tap.
"""

from __future__ import annotations

import io
import logging
import math
import shutil
import struct
import subprocess
import wave

from appliance.config import SoundConfig
from appliance.feedback.base import Ack, Outcome
from appliance.feedback.messages import message

log = logging.getLogger(__name__)

RATE = 16_000
# (frequency Hz, seconds) per tone; a silence is frequency 0.
PATTERNS: dict[Outcome, list[tuple[int, float]]] = {
    Outcome.OK: [(1760, 0.12)],
    Outcome.REPEAT: [(1760, 0.06), (0, 0.05), (1760, 0.06)],
    Outcome.UNKNOWN: [(440, 0.15), (0, 0.08), (440, 0.15), (0, 0.08), (440, 0.15)],
    Outcome.REJECTED: [(330, 0.5)],
    Outcome.ERROR: [(220, 0.2), (0, 0.1), (220, 0.2), (0, 0.1), (220, 0.2), (0, 0.1), (220, 0.2)],
}


def tone_wav(pattern: list[tuple[int, float]], rate: int = RATE) -> bytes:
    """16-bit mono WAV of the pattern, with 5 ms ramps so the beeps do not click."""
    frames = bytearray()
    ramp = int(rate * 0.005)
    for freq, seconds in pattern:
        count = int(rate * seconds)
        for i in range(count):
            gain = min(1.0, i / ramp, (count - i) / ramp) if ramp else 1.0
            sample = 0.0 if freq == 0 else math.sin(2 * math.pi * freq * i / rate) * 0.5 * gain
            frames += struct.pack("<h", int(sample * 32767))
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(frames))
    return out.getvalue()


class SoundFeedback:
    def __init__(self, config: SoundConfig, language: str = "vi") -> None:
        self.config = config
        self.language = language
        self._wavs = {outcome: tone_wav(p) for outcome, p in PATTERNS.items()}
        self._players: list[subprocess.Popen[bytes]] = []
        if shutil.which(config.command[0]) is None:
            log.warning(
                "sound feedback: %s not found; install alsa-utils or set feedback.sound.command", config.command[0]
            )

    def show(self, ack: Ack) -> None:
        self._reap()
        self._play(self.config.command, self._wavs[ack.outcome])
        if self.config.speak and shutil.which("espeak-ng"):
            voice = "vi" if self.language == "vi" else "en"
            text = message(ack, self.language)
            self._players.append(
                subprocess.Popen(["espeak-ng", "-v", voice, text], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )

    def _play(self, command: list[str], wav: bytes) -> None:
        try:
            proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        except OSError as exc:
            raise RuntimeError(f"cannot start {command[0]}: {exc.strerror}") from None
        assert proc.stdin is not None
        try:
            proc.stdin.write(wav)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        self._players.append(proc)

    def _reap(self) -> None:
        self._players = [p for p in self._players if p.poll() is None]

    def close(self) -> None:
        for proc in self._players:
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._players.clear()
