"""Open connections to the API: capped, and each given a deadline to deliver its request.

uvicorn accepts every connection and keeps it until the client closes it: its ``limit_concurrency``
only answers 503 to a request that arrives while too many are open, and its keep-alive timer starts
again at every byte received, so a socket that sends nothing, or a header a byte every few seconds,
holds a file descriptor for ever. 1,010 of them used up the hub's files and the API answered no one.
Here a connection must deliver a whole request within ``api.request_timeout`` of connecting (or of its
previous answer), and at ``api.max_connections`` an idle connection makes room for a new one: one of
the client address that holds the most, so one client flooding the API does not push the others out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol

from appliance.hub.api.logbound import LoopErrors, Throttle

log = logging.getLogger("appliance.hub.api.server")


class ConnectionGuard:
    """One server's limits, and the counts behind its (at most once a minute) log lines."""

    def __init__(self, max_connections: int, request_timeout: float) -> None:
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.made_room = 0
        self.refused = 0
        self.too_slow = 0
        self._throttle = Throttle()

    def admit(self, newcomer: GuardedH11Protocol, connections: set[Any]) -> bool:
        """Whether ``newcomer`` (already among ``connections``) may stay; at the cap an idle one is closed for it."""
        open_now = [c for c in connections if isinstance(c, GuardedH11Protocol) and not c.closing]
        if len(open_now) <= self.max_connections:
            return True
        idle = [c for c in open_now if c is not newcomer and c.idle]
        if not idle:
            self.refused += 1
            self._report_cap()
            return False
        held = Counter(c.client_host for c in open_now)
        victim = max(idle, key=lambda c: (held[c.client_host], -c.idle_since))
        victim.cut()
        self.made_room += 1
        self._report_cap()
        return True

    def timed_out(self) -> None:
        self.too_slow += 1
        if self._throttle.ready("slow") is not None:
            log.info(
                "hub API: %d connection(s) closed for not sending a whole request within api.request_timeout "
                "(%g s) since the last such line",
                self.too_slow,
                self.request_timeout,
            )
            self.too_slow = 0

    def _report_cap(self) -> None:
        if self._throttle.ready("cap") is not None:
            log.warning(
                "hub API: api.max_connections (%d) reached: %d idle connection(s) closed to make room and %d new "
                "one(s) refused while all were busy, since the last such line; many clients at once, or one opening "
                "connections it does not use",
                self.max_connections,
                self.made_room,
                self.refused,
            )
            self.made_room = self.refused = 0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection with the guard's cap and request deadline (one subclass per server)."""

    guard: ClassVar[ConnectionGuard]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self.idle_since = time.monotonic()
        super().connection_made(transport)
        if not self.guard.admit(self, self.connections):
            self.cut()
            return
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        self.idle_since = time.monotonic()
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    @property
    def closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    @property
    def idle(self) -> bool:
        """No request being answered: waiting for one, or for the rest of one."""
        return self.cycle is None or self.cycle.response_complete or self.cycle.more_body

    @property
    def client_host(self) -> str:
        return self.client[0] if self.client else ""

    def cut(self) -> None:
        """Close at once: a connection that is cut is owed no TLS goodbye (which could wait 30 s more)."""
        self._disarm()
        if not self.closing:
            self.transport.abort()

    def _watch(self) -> None:
        """The deadline runs while the connection owes a request (or the rest of one), never while one is answered."""
        if self.closing or not self.idle:
            self._disarm()
        elif self._deadline is None:
            self._deadline = self.loop.call_later(self.guard.request_timeout, self._too_slow)

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.closing and self.idle:
            self.guard.timed_out()
            self.cut()

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn is given (``http=``): the guarded one, bound to this server's guard."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})


class ApiLoop(asyncio.SelectorEventLoop):
    """The API's event loop: TLS handshakes get the request deadline too, and its errors stay bounded in the log.

    asyncio gives a TLS handshake 60 s and uvicorn does not change it; a connection still in its handshake
    is not yet an HTTP connection, so the guard cannot count it.
    """

    def __init__(self, handshake_timeout: float, errors: LoopErrors) -> None:
        super().__init__()
        self.handshake_timeout = handshake_timeout
        self.set_exception_handler(errors)

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:  # type: ignore[override]
        if kwargs.get("ssl") is not None and kwargs.get("ssl_handshake_timeout") is None:
            kwargs["ssl_handshake_timeout"] = self.handshake_timeout
        return await super().create_server(*args, **kwargs)
