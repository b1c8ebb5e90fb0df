"""The feedback interface and the acknowledgement it shows."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, TextIO

from appliance.config import FeedbackConfig
from appliance.events import Kind

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    OK = "ok"
    REPEAT = "repeat"
    UNKNOWN = "unknown"
    REJECTED = "rejected"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Ack:
    """One answer to one tap; ``seq``/``event_id`` are set only when an event was committed."""

    outcome: Outcome
    reader: str
    time_text: str
    kind: Kind | None = None
    name: str | None = None
    minutes_late: int = 0
    seq: int | None = None
    event_id: str | None = None
    card_uid: str | None = None
    detected: float | None = None


class Feedback(Protocol):
    def show(self, ack: Ack) -> None: ...

    def close(self) -> None: ...


class MultiFeedback:
    """Fans an ack out to every output; one broken output (a missing speaker) must not stop the others."""

    def __init__(self, outputs: list[Feedback]) -> None:
        self.outputs = outputs

    def show(self, ack: Ack) -> None:
        for output in self.outputs:
            try:
                output.show(ack)
            except Exception as exc:
                log.warning("feedback %s failed: %s", type(output).__name__, exc)

    def close(self) -> None:
        for output in self.outputs:
            output.close()

    def close_unless_in(self, successor: MultiFeedback) -> None:
        """Close the outputs the successor does not carry on (those it kept, e.g. GPIO pins, stay open)."""
        for output in self.outputs:
            if not any(output is kept for kept in successor.outputs):
                output.close()


def build_feedback(
    config: FeedbackConfig, language: str, previous: MultiFeedback | None = None, console: TextIO | None = None
) -> MultiFeedback:
    """The outputs named in ``feedback.outputs``; GPIO is imported only when asked for.

    A live change (from the hub, or a reload) passes the ``previous`` feedback: its GPIO output is
    carried over when the pins are the same, since the pins cannot be opened twice. ``console``: a
    stream that is a display (the demo's), where names may show even if it is not a terminal; the
    daemon passes none, so its stdout (the system journal under systemd) never carries a name.
    """
    outputs: list[Feedback] = []
    for name in config.outputs:
        if name == "console":
            from appliance.feedback.console import ConsoleFeedback

            outputs.append(ConsoleFeedback(language, show_names=config.show_names, stream=console))
        elif name == "sound":
            from appliance.feedback.sound import SoundFeedback

            outputs.append(SoundFeedback(config.sound, language))
        elif name == "gpio":
            from appliance.feedback.gpio import GpioFeedback

            kept = next((o for o in (previous.outputs if previous else []) if isinstance(o, GpioFeedback)), None)
            if kept is not None and kept.same_pins(config.gpio):
                kept.config = config.gpio
                outputs.append(kept)
            else:
                outputs.append(GpioFeedback(config.gpio))
    return MultiFeedback(outputs)
