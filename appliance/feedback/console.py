"""Feedback on a terminal or small screen attached to the gate (stdout).

Under systemd the daemon's stdout is not a screen but the system journal, which keeps every line for
weeks and ships them wherever the logs go. So names are shown only where a person at the gate reads
them: on a terminal (stdout is a TTY, e.g. the unit's ``StandardOutput=tty`` on the gate's display),
or on a stream the caller says is a display. Anywhere else the line is the same, without the name.
"""

from __future__ import annotations

import sys
from typing import TextIO

from appliance.feedback.base import Ack, Outcome
from appliance.feedback.messages import message

_MARK = {Outcome.OK: "✔", Outcome.REPEAT: "✔", Outcome.UNKNOWN: "✖", Outcome.REJECTED: "✖", Outcome.ERROR: "!"}


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class ConsoleFeedback:
    """One line per tap. It shows the name to the person at the gate; it is not a log.

    ``stream``: a display the caller vouches for (names as ``show_names`` says). Without it the line goes to
    stdout, with names only if stdout is a terminal.
    """

    def __init__(self, language: str = "vi", show_names: bool = True, stream: TextIO | None = None) -> None:
        self.language = language
        self.stream = stream if stream is not None else sys.stdout
        self.show_names = show_names and (stream is not None or _is_terminal(self.stream))

    def show(self, ack: Ack) -> None:
        self.stream.write(f"{_MARK[ack.outcome]} [{ack.reader}] {message(ack, self.language, self.show_names)}\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()
