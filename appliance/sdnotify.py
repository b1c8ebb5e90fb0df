"""systemd's sd_notify protocol: one datagram to $NOTIFY_SOCKET (READY=1, WATCHDOG=1, STATUS=, EXTEND_TIMEOUT_USEC=).

Written here because the protocol is a single sendto() and the PyPI wrappers are either
unmaintained or need libsystemd headers to build on the Pi.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET")
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address
        usec = os.environ.get("WATCHDOG_USEC")
        self.watchdog_seconds = int(usec) / 1_000_000 if usec and usec.isdigit() else None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def extend_start(self, seconds: float, status: str) -> bool:
        """Ask systemd for ``seconds`` more before READY=1 is due (EXTEND_TIMEOUT_USEC), saying why (STATUS):
        a long salvage at start must not be killed by TimeoutStartSec and restarted from the beginning."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}", f"STATUS={status}")

    def notify(self, *lines: str) -> bool:
        if not self.address:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto("\n".join(lines).encode(), self.address)
            except OSError:
                return False
        return True
