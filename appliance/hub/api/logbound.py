"""Keeping the API's log bounded whatever clients do: repeats are counted, not written.

With 1,010 idle sockets against the API, asyncio's accept loop failed with "too many open files"
thousands of times a second and logged a traceback each time (91 MB in 45 s). A connection flood or
a stream of malformed requests must cost the log a line a minute, not a line each.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import time
from collections.abc import Hashable
from typing import Any

log = logging.getLogger("appliance.hub.api.server")

EVERY = 60.0  # seconds: at most one line per kind of repeat in this time
OUT_OF_FILES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Throttle:
    """At most one message per ``every`` seconds for each key; the ones in between are only counted."""

    def __init__(self, every: float = EVERY) -> None:
        self.every = every
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def ready(self, key: Hashable) -> int | None:
        """``None`` while ``key`` is held back; else how many were held back since its last message (0 or more)."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


class BoundedLog(logging.Filter):
    """A logger filter: each kind of message at most once a minute, with the count of those left out."""

    def __init__(self, every: float = EVERY) -> None:
        super().__init__("edugate-bounded")
        self.throttle = Throttle(every)

    def filter(self, record: logging.LogRecord) -> bool:
        # The first line only: asyncio's messages go on with object addresses that differ every time.
        held = self.throttle.ready((record.name, record.levelno, str(record.msg).split("\n", 1)[0][:200]))
        if held is None:
            return False
        if held:
            record.msg = f"{record.getMessage()} ({held} more like this in the last {self.throttle.every:.0f} s)"
            record.args = None
        return True


def bound(*names: str) -> None:
    """Put a :class:`BoundedLog` on these loggers (once: the API may be started again in one process)."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, BoundedLog) for f in logger.filters):
            logger.addFilter(BoundedLog())


def open_file_limit() -> int:
    """This process's soft limit on open files (each connection takes one)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class LoopErrors:
    """The API loop's exception handler: accept() out of file descriptors is one line a minute saying what to do.

    asyncio retries accept() a second later by itself; everything else goes to asyncio's own handler,
    whose logger is bounded too.
    """

    def __init__(self, max_connections: int, every: float = EVERY) -> None:
        self.max_connections = max_connections
        self.throttle = Throttle(every)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in OUT_OF_FILES and "accept" in str(context.get("message", "")):
            held = self.throttle.ready("accept")
            if held is not None:
                log.error(
                    "hub API: cannot accept connections: %s (this process may open %d, api.max_connections is %d)%s; "
                    "lower api.max_connections or raise LimitNOFILE in the hub's systemd unit",
                    exc.strerror,
                    open_file_limit(),
                    self.max_connections,
                    f", {held} more times since the last such line" if held else "",
                )
            return
        loop.default_exception_handler(context)
