"""The API's HTTP server: uvicorn on its own thread and event loop, inside ``edugate hub run``.

The listening socket is opened here rather than by uvicorn, so a port already in use (or a
certificate that cannot be read) is one clear log line instead of an exiting thread, and the
hub's core work (ingest, notifications) goes on: the API tries again every ``retry_every``
seconds until it can listen. uvicorn is told not to touch logging or signals (the hub owns both)
and not to write access logs (URLs carry person ids; tokens are never logged anywhere).

What clients can make the server hold is bounded (docs/security/api.md): the door checks the token
before a body is read (:mod:`~appliance.hub.api.door`), bodies stop at ``api.max_body_bytes``,
headers at 16 KB, connections at ``api.max_connections``, each with ``api.request_timeout`` to send
its request (:mod:`~appliance.hub.api.connections`), and the log at a line a minute per kind of
repeat (:mod:`~appliance.hub.api.logbound`).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from contextlib import suppress
from typing import Any

import uvicorn

from appliance.config import HubConfig
from appliance.hub.api.app import create_app
from appliance.hub.api.auth import NoTokens, TokenFile
from appliance.hub.api.connections import ApiLoop, ConnectionGuard, guarded_protocol
from appliance.hub.api.door import Door
from appliance.hub.api.logbound import LoopErrors, bound, open_file_limit
from appliance.hub.api.pool import ConnectionPool
from appliance.hub.store import Store

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
# Connections the kernel queues before the API accepts them, and how many asyncio accepts in one go: the
# cap acts once a connection is accepted, so a burst can hold this many files beyond api.max_connections.
BACKLOG = 64
MAX_HEADER_BYTES = 16 * 1024  # request line and headers; more is a 400
KEEP_ALIVE = 5  # seconds an idle connection stays open after an answer
# Files the rest of the hub needs besides the API's connections: database connections, the broker, logs.
OTHER_FILES = 128


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket for host:port (IPv4 or IPv6); SO_REUSEADDR so a restart finds the port free."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
        0
    ]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class ApiServer:
    """``start()`` returns once the API listens (or has logged why it cannot yet); ``stop()`` frees the port."""

    def __init__(self, store: Store, config: HubConfig, retry_every: float = 30.0) -> None:
        self.store = store
        self.config = config
        self.retry_every = retry_every
        uvicorn_log = logging.getLogger("uvicorn.error")
        if uvicorn_log.level == logging.NOTSET:
            uvicorn_log.setLevel(logging.WARNING)  # its start/stop chatter; ours says where it listens
        bound("uvicorn.error", "asyncio")  # what clients can make them say, at most a line a minute per kind
        self.tokens = TokenFile(config.api.token_file, config.hub.schools)
        self.pool = ConnectionPool(store, config.api.workers)
        app = create_app(config, self.pool)
        self.app = Door(app, self.tokens, config.api.max_body_bytes, frozenset({app.openapi_url or ""}))
        self.last_error: str | None = None
        self.address: tuple[str, int] | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._settled = threading.Event()  # listening, or the first attempt failed
        self._lock = threading.Lock()

    @property
    def scheme(self) -> str:
        return "https" if self.config.api.tls_cert_file else "http"

    @property
    def url(self) -> str | None:
        """Base URL while listening (``None`` otherwise)."""
        if self.address is None:
            return None
        host, port = self.address
        return f"{self.scheme}://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self) -> None:
        self._stopping.clear()
        self._settled.clear()
        self._thread = threading.Thread(target=self._run, name="hub-api", daemon=True)
        self._thread.start()
        self._settled.wait(START_TIMEOUT)
        try:
            self.tokens.tokens()
        except NoTokens as exc:
            log.warning("hub API: every request is refused: %s", exc)
        limit, wanted = open_file_limit(), self.config.api.max_connections + BACKLOG + OTHER_FILES
        if limit < wanted:
            log.warning(
                "hub API: the hub may open %d files, too few for api.max_connections (%d), %d being accepted and "
                "about %d for the rest of the hub: a flood of connections would leave it without; raise LimitNOFILE "
                "to %d or lower api.max_connections",
                limit,
                self.config.api.max_connections,
                BACKLOG,
                OTHER_FILES,
                wanted,
            )

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            if self._server is not None:
                self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)
            if self._thread.is_alive():
                log.warning("hub API: the server did not stop within %.0f s", STOP_TIMEOUT)
        self.pool.close()

    def _uvicorn_config(self) -> uvicorn.Config:
        api = self.config.api
        guard = ConnectionGuard(api.max_connections, api.request_timeout)
        errors = LoopErrors(api.max_connections)
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            server_header=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
            ssl_certfile=api.tls_cert_file,
            ssl_keyfile=api.tls_key_file,
            http=guarded_protocol(guard),
            # uvicorn takes a loop factory as well as a name (it passes what is not a string through)
            loop=lambda: ApiLoop(api.request_timeout, errors),  # type: ignore[arg-type]
            backlog=BACKLOG,
            timeout_keep_alive=KEEP_ALIVE,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        )
        config.load()  # reads the certificate now: an error here is reported, not an exited thread
        return config

    def _attempt(self) -> tuple[uvicorn.Server, socket.socket] | None:
        api = self.config.api
        where = f"{api.listen}:{api.port}"
        try:
            config = self._uvicorn_config()
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            return self._failed(
                f"cannot serve HTTPS on {where}: TLS certificate {api.tls_cert_file} / key {api.tls_key_file}: "
                f"{reason}",
                "check api.tls_cert_file / api.tls_key_file",
            )
        try:
            sock = listen_socket(api.listen, api.port)
        except OSError as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            return self._failed(f"cannot listen on {where}: {reason}", "change api.listen / api.port in hub.toml?")
        self.last_error = None
        return uvicorn.Server(config), sock

    def _failed(self, message: str, hint: str) -> None:
        """Log why the API cannot serve (once per distinct reason: the retries would repeat it)."""
        if message != self.last_error:
            log.error("hub API: %s; trying again every %.0f s (%s)", message, self.retry_every, hint)
        self.last_error = message

    def _run(self) -> None:
        while not self._stopping.is_set():
            attempt = self._attempt()
            if attempt is None:
                self._settled.set()
                self._stopping.wait(self.retry_every)
                continue
            server, sock = attempt
            with self._lock:
                if self._stopping.is_set():
                    sock.close()
                    return
                self._server = server
            watcher = threading.Thread(target=self._announce, args=(server, sock), name="hub-api-start", daemon=True)
            watcher.start()
            try:
                server.run(sockets=[sock])
            except BaseException as exc:  # uvicorn ends a failed startup with SystemExit
                log.error("hub API: the server stopped: %r", exc)
            finally:
                with suppress(OSError):
                    sock.close()
                self.address = None
                with self._lock:
                    self._server = None
            if not self._stopping.is_set():
                self._stopping.wait(self.retry_every)
        self._settled.set()

    def _announce(self, server: uvicorn.Server, sock: socket.socket) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started and time.monotonic() < deadline and not self._stopping.is_set():
            time.sleep(0.01)
        if server.started:
            address: Any = sock.getsockname()
            self.address = (address[0], address[1])
            log.info("hub API: listening on %s", self.url)
        self._settled.set()


def api_server(store: Store, config: HubConfig) -> ApiServer:
    """The entry point :class:`appliance.hub.service.HubService` starts when ``api.enabled``."""
    return ApiServer(store, config)
