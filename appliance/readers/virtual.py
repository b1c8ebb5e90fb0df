"""A virtual card and a private pcscd, so tests, the demo and ``bench tap`` drive the real PC/SC stack.

The card side speaks vsmartcard's vpcd socket protocol: connecting to a reader's TCP port
is inserting the card, closing is removing it; every frame is a 2-byte big-endian length
and a payload; a 1-byte payload is a control code, anything else a command APDU.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
DEFAULT_ATR = bytes.fromhex("3B8F8001804F0CA000000306030001000000006A")
GET_UID = bytes.fromhex("FFCA000000")
_CTRL_POWER_OFF, _CTRL_POWER_ON, _CTRL_RESET, _CTRL_ATR = 0, 1, 2, 4


class VirtualCard:
    """A contactless card with a chosen UID, presented on a vpcd reader slot.

    ``status_word`` lets a test make the card answer GET UID with an error instead.
    """

    def __init__(self, port: int, uid: str, host: str = "127.0.0.1", status_word: bytes = b"\x90\x00") -> None:
        self.port = port
        self.host = host
        self.uid = bytes.fromhex(uid)
        self.status_word = status_word
        self.apdus: list[bytes] = []
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def insert(self, timeout: float = 5.0) -> None:
        """Put the card on the reader (retries while pcscd is still starting)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=1.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, args=(sock,), daemon=True, name=f"vicc-{self.port}")
        self._thread.start()

    def remove(self) -> None:
        """Take the card away (close the connection)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    @property
    def inserted(self) -> bool:
        return self._sock is not None

    def _recv_exact(self, sock: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            # vpcd writes the length and the payload separately: acknowledge at once so that
            # Nagle on its side does not hold the payload back for a delayed-ACK period (40 ms).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _answer(self, payload: bytes) -> bytes | None:
        if len(payload) == 1:
            return DEFAULT_ATR if payload[0] == _CTRL_ATR else None
        self.apdus.append(payload)
        if payload[:2] == GET_UID[:2]:
            return (self.uid if self.status_word == b"\x90\x00" else b"") + self.status_word
        return b"\x6d\x00"

    def _serve(self, sock: socket.socket) -> None:
        try:
            while True:
                (length,) = struct.unpack(">H", self._recv_exact(sock, 2))
                reply = self._answer(self._recv_exact(sock, length))
                if reply is not None:
                    sock.sendall(struct.pack(">H", len(reply)) + reply)
        except (EOFError, OSError):
            return


class PrivatePcscd:
    """A pcscd of our own with one vpcd reader: two slots ("lanes") on ``base_port`` and ``base_port + 1``.

    (vpcd keeps one state per slot number, so several vpcd readers in one pcscd share their
    slots; two lanes is what it can give.) ``configure(False)`` takes the reader away at the
    next start, as if it were unplugged.

    pcscd's socket path is fixed at /run/pcscd, so it runs in its own mount namespace with a
    private directory bound there; clients reach it through PCSCLITE_CSOCK_NAME. Needs root
    (or unprivileged user namespaces), the ``pcscd`` binary and Debian's ``vsmartcard-vpcd``.
    """

    def __init__(self, base_port: int, workdir: Path | None = None) -> None:
        self.base_port = base_port
        self.plugged = True
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="edugate-pcscd-"))
        self.rundir = self.workdir / "run"
        self.confdir = self.workdir / "conf"
        self.log_path = self.workdir / "pcscd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> str | None:
        """None when a private pcscd can run here, else why not."""
        if shutil.which("pcscd") is None:
            return "pcscd is not installed (apt-get install pcscd)"
        if not VPCD_DRIVER.exists():
            return "the vpcd driver is not installed (apt-get install vsmartcard-vpcd)"
        if shutil.which("unshare") is None:
            return "unshare (util-linux) is missing"
        return None

    @property
    def socket_path(self) -> Path:
        return self.rundir / "pcscd.comm"

    def slot_port(self, slot: int) -> int:
        return self.base_port + slot

    @staticmethod
    def slot_name(slot: int) -> str:
        """The PC/SC reader name of a slot, as a pcsc binding's ``match``."""
        return f"Virtual PCD 00 {slot:02d}"

    def configure(self, plugged: bool) -> None:
        """Write reader.conf with or without the vpcd reader (takes effect at the next start)."""
        self.plugged = plugged
        self.confdir.mkdir(parents=True, exist_ok=True)
        conf = self.confdir / "vpcd"
        conf.unlink(missing_ok=True)
        (self.confdir / "empty").write_text("# no readers\n")
        if plugged:
            conf.write_text(
                f'FRIENDLYNAME "Virtual PCD"\nDEVICENAME /dev/null:0x{self.base_port:04X}\n'
                f"LIBPATH {VPCD_DRIVER}\nCHANNELID 0x{self.base_port:04X}\n"
            )

    def start(self, timeout: float = 10.0) -> None:
        self.rundir.mkdir(parents=True, exist_ok=True)
        if not (self.confdir / "empty").exists():
            self.configure(self.plugged)
        Path("/run/pcscd").mkdir(parents=True, exist_ok=True)
        for stale in self.rundir.iterdir():
            stale.unlink()
        script = f'mount --bind "{self.rundir}" /run/pcscd && exec pcscd -f -i -c "{self.confdir}"'
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
        if os.geteuid() != 0:
            cmd.insert(1, "-r")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pcscd exited at start; see {self.log_path}")
            if self.socket_path.exists() and (not self.plugged or _port_listening(self.slot_port(1))):
                return
            time.sleep(0.05)
        raise RuntimeError(f"pcscd did not come up within {timeout}s; see {self.log_path}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def env(self) -> dict[str, str]:
        """Environment for a client process that should talk to this pcscd."""
        return {**os.environ, "PCSCLITE_CSOCK_NAME": str(self.socket_path)}

    def __enter__(self) -> PrivatePcscd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _port_listening(port: int) -> bool:
    """Whether something listens on ``port``, read from /proc (connecting would insert a card)."""
    needle = f":{port:04X} "
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and (fields[1] + " ").endswith(needle) and fields[3] == "0A":
                return True
    return False
