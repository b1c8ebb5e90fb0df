"""A hub part that works in rounds on its own thread and its own database connection.

The daily jobs and the catch-up publisher both run this way: a round at once when started, then
one every ``every`` seconds; a round that raises is logged and the next one comes as usual; a
connection the database dropped is opened again at the next use.
"""

from __future__ import annotations

import logging
import threading

from appliance.hub.store import Connection, Store

log = logging.getLogger(__name__)


class RoundWorker:
    name = "rounds"  # the thread's name and the log's word for this part

    def __init__(self, store: Store, every: float) -> None:
        self.store = store
        self.every = every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Connection | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
            self._thread = None

    def run_once(self) -> object:
        raise NotImplementedError

    def _connection(self) -> Connection:
        if self._conn is None:
            self._conn = self.store.connect()
        return self._conn

    def _drop_if_broken(self) -> None:
        """After a failure: a connection the database dropped is closed, and opened again at the next use."""
        if self._conn is not None and self._conn.broken:
            self._conn.close()
            self._conn = None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.run_once()
                except Exception:
                    log.exception("hub: %s round failed; next round in %.0f s", self.name, self.every)
                    self._drop_if_broken()
                self._stop.wait(self.every)
        finally:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
