"""The error of the benches that start their own services (pcscd, broker, daemons): the CLI prints its message."""

from __future__ import annotations


class BenchError(RuntimeError):
    """The bench could not run or something was lost; the message says what."""
