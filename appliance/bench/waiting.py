"""Waiting on work another thread or process does: done when its count reaches the goal, broken when it stops moving."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_progress(done: Callable[[], int], total: int, stall: float, poll: float) -> float | None:
    """Poll ``done()`` until it reaches ``total``: time.monotonic() then, or None after ``stall`` seconds without
    progress (stuck, not slow). ``poll`` should be coarse enough not to take the GIL from the threads measured."""
    last, last_change = -1, time.monotonic()
    while True:
        now_done = done()
        now = time.monotonic()
        if now_done >= total:
            return now
        if now_done != last:
            last, last_change = now_done, now
        elif now - last_change > stall:
            return None
        time.sleep(poll)
