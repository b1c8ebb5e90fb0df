"""The error of the benches that start their own broker and daemons (sync, hub): the CLI prints its message."""

from __future__ import annotations


class BenchError(RuntimeError):
    """The bench could not run or something was lost; the message says what."""
