"""Test support for PostgreSQL: a private PostgreSQL 15 cluster per test session, a fresh database per test.

No tests here. The cluster lives in a temporary folder owned by the ``postgres`` system user (PostgreSQL
refuses to run as root, so as root every server program runs through ``runuser``), listens on 127.0.0.1
on a free port and on a unix socket in its own folder only, and accepts nothing but SCRAM passwords:
the hub's PostgreSQL code is exercised the way a district installs it (a password, TCP). It is started
on first use, stopped at the end of the session and, as a guard for interrupted sessions, at exit.

Durability is off (``fsync``, ``synchronous_commit``, ``full_page_writes``) because the tests kill the
hub, never the database server; that keeps a database per test cheap. ``PostgresServer(durable=True)``
keeps PostgreSQL's defaults, for measuring (the README's ``bench hub --postgres`` figures).

Without PostgreSQL the tests that need it are skipped on a developer machine and fail in CI (``CI`` set).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ADMIN = "edugate_admin"  # the cluster's superuser; creates and drops the tests' databases
ROLE = "edugate"  # what the hub logs in as: owns its database, nothing more
SERVER_USER = "postgres"  # the system user that runs the server when the tests run as root
START_TIMEOUT = 30


def _bin_dir() -> Path | None:
    """The folder with initdb and pg_ctl: Debian keeps them out of PATH, under /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return versions[-1].parent if versions else None


def postgres_missing() -> str | None:
    """Why a private PostgreSQL cannot run here, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]')"
    if _bin_dir() is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root and there is no {SERVER_USER!r} user to run the server as"
        if shutil.which("runuser") is None:
            return "running as root and runuser (util-linux) is missing"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """One private cluster: ``start()``, ``create_database()`` per test, ``stop()``."""

    host = "127.0.0.1"

    def __init__(self, durable: bool = False) -> None:
        self.durable = durable  # PostgreSQL's own fsync settings (for measurements), not the tests' shortcut
        self.bin = _bin_dir()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed")
        self.workdir = Path(tempfile.mkdtemp(prefix="edugate-test-pg-"))
        self.data = self.workdir / "data"
        self.sockets = self.workdir / "sock"
        self.log = self.workdir / "postgres.log"
        self.port = 0
        self.admin_password = secrets.token_urlsafe(18)
        self.password = secrets.token_urlsafe(18)
        self.password_file = self.workdir / "hub-password"  # the hub's database.password_file
        self.running = False
        self._as_root = os.geteuid() == 0

    # ------------------------------------------------------------------------------------------ lifecycle

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A server program, as the ``postgres`` user when we are root."""
        assert self.bin is not None
        command = [str(self.bin / args[0]), *args[1:]]
        if self._as_root:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, cwd=self.workdir, timeout=timeout)

    def _prepare(self) -> None:
        self.sockets.mkdir()
        admin_pw = self.workdir / "admin-password"
        admin_pw.write_text(self.admin_password + "\n")
        self.password_file.write_text(self.password + "\n")
        for path in (self.workdir, self.sockets, admin_pw, self.password_file):
            path.chmod(0o700 if path.is_dir() else 0o600)
        if self._as_root:
            owner = pwd.getpwnam(SERVER_USER)
            for path in (self.workdir, self.sockets, admin_pw):
                os.chown(path, owner.pw_uid, owner.pw_gid)

    def start(self) -> PostgresServer:
        self._prepare()
        init = self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            ADMIN,
            f"--pwfile={self.workdir / 'admin-password'}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
            "--no-instructions",
        )
        if init.returncode:
            raise RuntimeError(f"initdb failed: {(init.stdout + init.stderr).strip()[-1500:]}")
        (self.workdir / "admin-password").unlink()
        for _ in range(3):  # a free port can be taken between the probe and the bind: try another
            self.port = _free_port()
            settings = [
                "-c listen_addresses=127.0.0.1",
                f"-p {self.port}",
                f"-c unix_socket_directories={self.sockets}",
                "-c max_connections=200",
            ]
            if not self.durable:
                settings += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
            options = " ".join(settings)
            _LIVE.add(self)
            started = self._run(
                "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-w",
                "-t",
                str(START_TIMEOUT),
                "-o",
                options,
                "start",
            )
            if started.returncode == 0:
                self.running = True
                self._create_role()
                return self
            _LIVE.discard(self)
        raise RuntimeError(f"PostgreSQL did not start: {self.log_tail()}")

    def stop(self) -> None:
        """Fast shutdown (open sessions are ended), then the folder goes."""
        if self.running:
            stopped = self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop", timeout=60)
            if stopped.returncode:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
            self.running = False
        _LIVE.discard(self)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-1500:].strip() or "(empty log)"
        return "(no log)"

    # ------------------------------------------------------------------------------------------ databases

    def admin(self, dbname: str = "postgres") -> Any:
        """A superuser connection (autocommit: CREATE/DROP DATABASE cannot run in a transaction)."""
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=ADMIN,
            password=self.admin_password,
            dbname=dbname,
            autocommit=True,
            connect_timeout=10,
        )

    def _create_role(self) -> None:
        from psycopg import sql

        with self.admin() as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                    sql.Identifier(ROLE), sql.Literal(self.password)
                )
            )

    def url(self, dbname: str, with_password: bool = False) -> str:
        """``postgresql://edugate@127.0.0.1:PORT/dbname`` (the password in it only when asked for)."""
        secret = f":{self.password}" if with_password else ""
        return f"postgresql://{ROLE}{secret}@{self.host}:{self.port}/{dbname}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database owned by the hub's role; returns its name."""
        from psycopg import sql

        name = f"{prefix}_{secrets.token_hex(6)}"
        with self.admin() as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0 STRATEGY FILE_COPY").format(
                    sql.Identifier(name), sql.Identifier(ROLE)
                )
            )
        return name

    def drop_database(self, name: str) -> None:
        """Gone even if a test left connections open (FORCE ends them)."""
        from psycopg import sql

        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


_LIVE: set[PostgresServer] = set()
_SESSION: list[PostgresServer] = []


@atexit.register
def _stop_leftovers() -> None:
    """A guard for interrupted sessions: no PostgreSQL may outlive the test process."""
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop()


def require_postgres() -> None:
    """Skip without PostgreSQL on a developer machine; fail in CI, where a skipped backend hides a gap."""
    why = postgres_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide PostgreSQL: {why}")
        pytest.skip(why)


def session_server(config: pytest.Config) -> PostgresServer:
    """The session's cluster, started on first use and stopped when the session ends."""
    if _SESSION:
        return _SESSION[0]
    require_postgres()
    server = PostgresServer().start()
    _SESSION.append(server)

    def _stop() -> None:
        server.stop()
        _SESSION.clear()

    config.add_cleanup(_stop)
    return server


@pytest.fixture(scope="session")
def pg_server(pytestconfig: pytest.Config) -> PostgresServer:
    return session_server(pytestconfig)


@pytest.fixture(scope="session")
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """A database of the session's cluster, password included: for commands that take a URL (bench --postgres)."""
    name = pg_server.create_database("session")
    yield pg_server.url(name, with_password=True)
    with contextlib.suppress(Exception):
        pg_server.drop_database(name)
