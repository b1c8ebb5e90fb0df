"""What every phase of ``bench sync`` shares: its devices, its pace, and the hub stand-in that judges delivery.

The hub stand-in (:mod:`appliance.bench.mqtt_hub`) runs in its own process, like a real hub on another
machine; :class:`HubProcess` is the bench's end of its line protocol.
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

from appliance.bench.errors import BenchError

DRAIN_DEVICE = "bench-gate"
LIVE_DEVICE = "bench-live"
RAW_DEVICE = "bench-raw"
TAP_GAP = (0.020, 0.050)  # seconds between two live taps
STALL_SECONDS = 30.0  # no progress for this long means something is broken, not slow
POLL_SECONDS = 0.01  # progress polling: coarse enough not to take the GIL from the threads measured


class HubProcess:
    """The hub stand-in child (see mqtt_hub.py): one JSON command line in, one answer line out."""

    def __init__(self, settings: dict[str, Any], workdir: Path) -> None:
        self.stderr_path = workdir / "hub.err"
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance.bench.mqtt_hub"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        ready = self._ask(settings, timeout=30)
        if not ready.get("ready"):
            raise BenchError(f"hub stand-in could not subscribe: {ready.get('error')}")

    def _ask(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if readable else ""
        if not line:
            raise BenchError(f"hub stand-in gave no answer: {self.stderr_path.read_text(errors='replace')[-1500:]}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def wait(self, topic: str, count: int) -> dict[str, Any]:
        """The topic's tally once ``count`` distinct seqs arrived, or after STALL_SECONDS without progress."""
        return self._ask({"cmd": "wait", "topic": topic, "count": count, "stall": STALL_SECONDS}, timeout=86400)

    def arrivals(self, topic: str) -> dict[str, float]:
        arrivals: dict[str, float] = self._ask({"cmd": "arrivals", "topic": topic}, timeout=30)["arrivals"]
        return arrivals

    def wait_online(self, device: str, timeout: float) -> bool:
        return bool(self._ask({"cmd": "status", "device": device, "timeout": timeout}, timeout + 5)["online"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, BenchError):
                self._ask({"cmd": "stop"}, timeout=5)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def delivery(tally: dict[str, Any], count: int) -> dict[str, Any]:
    """What the hub saw of one topic, in the bench's JSON."""
    return {
        "hub_received": tally["received"],
        "hub_distinct": tally["distinct"],
        "missing": count - tally["distinct"],
        "duplicates": tally["duplicates"],
        "out_of_order": tally["out_of_order"],
        "in_order": tally["out_of_order"] == 0,
        "every_seq_once": bool(tally["exact"]) and tally["duplicates"] == 0,
    }


def rate(count: int, seconds: float | None) -> float | None:
    return round(count / seconds, 1) if seconds else None
