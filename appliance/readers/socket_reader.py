"""A lane fed through a unix socket, one card UID (hex) per line.

For site tests and the demo without hardware (``echo 04A1B2C3 | socat - UNIX-CONNECT:...``),
and for fault tests that need to drive a real daemon process from outside.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

from appliance.config import ReaderConfig
from appliance.readers.base import HealthBoard, ReaderHealth, ReaderState, Tap, TapSink
from appliance.readers.uid import UidError, normalise_uid

log = logging.getLogger(__name__)


class SocketReader:
    def __init__(self, config: ReaderConfig) -> None:
        assert config.path is not None
        self.config = config
        self.path = Path(config.path)
        self.board = HealthBoard("socket", [config.name])
        self._server: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, sink: TapSink) -> None:
        self.path.unlink(missing_ok=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.path))
        os.chmod(self.path, 0o660)
        server.listen(8)
        self._server = server
        self.board.set(self.config.name, ReaderState.OK, "ready")
        thread = threading.Thread(target=self._accept, args=(sink,), name=f"socket-{self.config.name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self, sink: TapSink) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn, sink), daemon=True)
            thread.start()

    def _serve(self, conn: socket.socket, sink: TapSink) -> None:
        with conn, conn.makefile("r", encoding="ascii", errors="replace") as lines:
            for line in lines:
                text = line.strip()
                if not text:
                    continue
                try:
                    uid = normalise_uid(text, self.config.uid_text_format)
                except UidError:
                    log.warning("reader %s: ignored malformed input (%d characters)", self.config.name, len(text))
                    continue
                sink(Tap(self.config.name, self.config.direction, uid, time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()
        self.path.unlink(missing_ok=True)

    def health(self) -> list[ReaderHealth]:
        return self.board.snapshot()
