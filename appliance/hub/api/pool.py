"""Database connections for the API's request threads: opened on demand, reused, never shared at once.

A PostgreSQL connection costs a server process and a login, so connections are kept between
requests (at most ``size``, the number of requests answered at once) rather than opened per
request; a connection that broke (server restart) is dropped and the next request opens a new one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TypeVar

from appliance.hub.store import Connection, Store

T = TypeVar("T")


class ConnectionPool:
    def __init__(self, store: Store, size: int) -> None:
        self.store = store
        self.size = size
        self._idle: list[Connection] = []
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def connection(self, fresh: bool = False) -> Iterator[Connection]:
        """A connection for this request alone; back to the pool afterwards unless it broke."""
        with self._slots:
            conn = None
            if not fresh:
                with self._lock:
                    conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = self.store.connect()
            try:
                yield conn
            finally:
                self._give_back(conn)

    def run(self, work: Callable[[Connection], T]) -> T:
        """``work(conn)``, once more on a new connection if the first one turned out dead (a server restart).

        Only for work that may run twice: reads, and writes that are idempotent.
        """
        with self.connection() as conn:
            try:
                return work(conn)
            except Exception:
                if not conn.broken:
                    raise
        with self.connection(fresh=True) as conn:
            return work(conn)

    def _give_back(self, conn: Connection) -> None:
        if conn.broken or (conn.dialect == "sqlite" and conn.raw.in_transaction):
            with suppress(Exception):
                conn.close()
            if conn.broken:
                self._drop_idle()  # they were opened to the same server: most likely dead too
            return
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            with suppress(Exception):
                conn.close()

    def close(self) -> None:
        """Close the idle connections; one still in use is closed when its request ends."""
        with self._lock:
            self._closed = True
        self._drop_idle()
