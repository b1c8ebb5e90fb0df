"""The private Mosquitto that ``bench sync`` and ``bench hub`` run against, and the school and topics on it.

It listens on 127.0.0.1 with the production broker's settings that matter for speed (logins, the
per-device ACL, 100 messages in flight per client, no Nagle; TLS 1.2 when given a CA). Persistence is
off, since a production broker writes its database only every 60 s and at shutdown, never per message.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.bench.daemon_process import end
from appliance.bench.errors import BenchError
from appliance.sync.topics import Topics

if TYPE_CHECKING:
    from appliance.bench.mqtt_pki import BrokerPki

SCHOOL = "bench-school"
PREFIX = "edugate"
HUB_USER = "hub"

# The production broker's rules that cost time per message (config/mosquitto/edugate.conf and acl).
BROKER_SETTINGS = {
    "persistence": "false",
    "allow_anonymous": "false",
    "max_inflight_messages": "100",
    "max_queued_messages": "200000",
    "max_queued_bytes": "268435456",
    "set_tcp_nodelay": "true",
}
ACL = """pattern write edugate/+/%u/events
pattern write edugate/+/%u/status
pattern write edugate/+/%u/result
pattern read edugate/+/%u/downlink/#
user hub
topic read edugate/+/+/events
topic read edugate/+/+/status
topic read edugate/+/+/result
topic write edugate/+/+/downlink/#
"""


def events_topic(device: str, school: str = SCHOOL) -> str:
    """Where the device publishes its events, named as the gate's own uplink names it."""
    return Topics(PREFIX, school, device).events


def mosquitto_tool(name: str) -> str | None:
    """Mosquitto's programs live in /usr/sbin and /usr/bin, which a user's PATH may lack."""
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/bin"):
        candidate = Path(folder) / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def mosquitto_missing() -> str | None:
    """Why the bench's broker cannot run here, or None."""
    for name in ("mosquitto", "mosquitto_passwd"):
        if mosquitto_tool(name) is None:
            return f"{name} is not installed (apt-get install mosquitto)"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _user_name() -> str:
    """Mosquitto started as root switches to this user; it must be able to read the bench's files."""
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


class BenchBroker:
    """A private Mosquitto on 127.0.0.1: passwords for ``users``, the production ACL, TLS if a CA is given."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path, users: dict[str, str], pki: BrokerPki | None) -> None:
        self.workdir = workdir
        self.users = users
        self.pki = pki
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "mosquitto.log"
        workdir.mkdir(parents=True, exist_ok=True)

    def _write_files(self) -> Path:
        passwd = self.workdir / "passwd"
        passwd.write_text("".join(f"{user}:{password}\n" for user, password in self.users.items()))
        passwd.chmod(0o600)
        hashed = subprocess.run(
            [mosquitto_tool("mosquitto_passwd") or "", "-U", str(passwd)], capture_output=True, text=True
        )
        if hashed.returncode:
            raise BenchError(f"mosquitto_passwd -U failed: {hashed.stdout}{hashed.stderr}")
        acl = self.workdir / "acl"
        acl.write_text(ACL)
        lines = [
            f"user {_user_name()}",
            f"log_dest file {self.log}",
            "log_type error",
            *(f"{key} {value}" for key, value in BROKER_SETTINGS.items()),
            f"password_file {passwd}",
            f"acl_file {acl}",
            f"listener {self.port} {self.host}",
        ]
        if self.pki is not None:
            lines += [
                f"cafile {self.pki.ca}",
                f"certfile {self.pki.server_cert}",
                f"keyfile {self.pki.server_key}",
                "tls_version tlsv1.2",
            ]
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout: float = 10.0) -> None:
        """Start on a free port; try another port if the chosen one was taken in between."""
        for _ in range(3):
            self.port = free_port()
            conf = self._write_files()
            with (self.workdir / "mosquitto.out").open("ab") as out:
                self.proc = subprocess.Popen(
                    [mosquitto_tool("mosquitto") or "mosquitto", "-c", str(conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                )
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2):
                    return
                time.sleep(0.02)
            self.stop()
        raise BenchError(f"mosquitto did not start: {self.log_tail()}")

    def stop(self) -> None:
        end(self.proc, timeout=10)
        self.proc = None

    def log_tail(self) -> str:
        text = ""
        for name in ("mosquitto.log", "mosquitto.out"):
            with contextlib.suppress(OSError):
                text += (self.workdir / name).read_text(errors="replace")
        return text[-1500:].strip() or "(no log)"

    @property
    def ca(self) -> Path | None:
        """The CA certificate its clients pin, or None when it speaks plaintext."""
        return self.pki.ca if self.pki is not None else None

    def gate_sync(self, device: str, password_file: Path, window: int) -> dict[str, Any]:
        """The ``[sync]`` section of a gate that logs in here as ``device`` (pinning the CA when TLS is on)."""
        ca = self.ca
        return {
            "enabled": True,
            "host": self.host,
            "port": self.port,
            "tls": ca is not None,
            **({"ca_file": str(ca)} if ca is not None else {}),
            "username": device,
            "password_file": str(password_file),
            "window": window,
        }
