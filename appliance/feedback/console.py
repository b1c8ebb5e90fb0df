"""Feedback on a terminal or small screen attached to the gate (stdout)."""

from __future__ import annotations

import sys
from typing import TextIO

from appliance.feedback.base import Ack, Outcome
from appliance.feedback.messages import message

_MARK = {Outcome.OK: "✔", Outcome.REPEAT: "✔", Outcome.UNKNOWN: "✖", Outcome.REJECTED: "✖", Outcome.ERROR: "!"}


class ConsoleFeedback:
    """One line per tap. It shows the name to the person at the gate; it is not a log."""

    def __init__(self, language: str = "vi", show_names: bool = True, stream: TextIO | None = None) -> None:
        self.language = language
        self.show_names = show_names
        self.stream = stream or sys.stdout

    def show(self, ack: Ack) -> None:
        self.stream.write(f"{_MARK[ack.outcome]} [{ack.reader}] {message(ack, self.language, self.show_names)}\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()
