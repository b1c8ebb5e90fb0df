"""``edugate bench sync``: a short run end to end against its own Mosquitto, over TLS and plaintext.

No speed is asserted (the machines are shared; the figures live in the README). What is asserted is
that the figures come from work that happened: the hub stand-in got every seq of the drain exactly
once and in order, every live tap reached it, rates and percentiles are present and consistent, and
the bench leaves no broker, daemon or folder behind, also when it is stopped half-way.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from mqtt_broker import require_mosquitto

EVENTS = 3000
TAPS = 30


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "appliance.cli", "bench", "sync", *args]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}}


def bench_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("edugate-bench-sync-*"))


def _broker_port(setup: dict[str, Any]) -> int:
    return int(setup["broker"].rsplit(":", 1)[1])


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _ordered(item: dict[str, Any], prefix: str) -> None:
    values = [item[f"{prefix}_p50"], item[f"{prefix}_p90"], item[f"{prefix}_p99"], item[f"{prefix}_max"]]
    assert 0 < values[0] <= values[1] <= values[2] <= values[3], (prefix, values)


@pytest.mark.parametrize("tls", ["--tls", "--no-tls"])
def test_bench_sync_short_run(tls: str) -> None:
    require_mosquitto()
    before = bench_dirs()
    proc = subprocess.run(
        _command("--events", str(EVENTS), "--taps", str(TAPS), tls),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines and all(item["bench"] == "sync" for item in lines)
    by_measure: dict[str | None, list[dict[str, Any]]] = {}
    for item in lines:
        by_measure.setdefault(item.get("measure"), []).append(item)
    assert sorted(by_measure, key=str) == sorted(["setup", "raw", "drain", "live_in_process", "latency", None], key=str)

    (setup,) = by_measure["setup"]
    assert setup["events"] == EVENTS and setup["taps"] == TAPS and setup["tls"] == (tls == "--tls")
    assert setup["broker_settings"]["persistence"] == "false" and setup["cpu_count"] >= 1

    (drain,) = by_measure["drain"]
    assert drain["events"] == EVENTS and drain["published"] >= EVENTS
    assert drain["complete"] is True and drain["synced_events"] == EVENTS, drain
    assert drain["unsynced_after"] == 0
    assert drain["hub_distinct"] == EVENTS and drain["missing"] == 0
    assert drain["hub_received"] == EVENTS + drain["duplicates"]
    assert drain["every_seq_once"] == (drain["duplicates"] == 0)
    assert drain["in_order"] is True
    assert drain["synced_events_per_s"] > 0 and drain["received_events_per_s"] > 0

    raws = by_measure["raw"]
    assert [r["run"] for r in raws] == [1, 2]
    for raw in raws:
        assert raw["events"] == EVENTS and raw["missing"] == 0 and raw["events_per_s"] > 0

    (live,) = by_measure["live_in_process"]
    assert live["taps"] == TAPS and live["pubacks"] == TAPS and live["hub_received"] == TAPS
    _ordered(live, "commit_to_puback_ms")
    _ordered(live, "commit_to_hub_ms")

    (latency,) = by_measure["latency"]
    assert latency["taps"] == TAPS and latency["acked"] == TAPS and latency["missing"] == 0
    assert latency["daemon_events"] == TAPS and latency["daemon_unsynced_after_stop"] == 0
    assert latency["daemon_exit_code"] == 0
    _ordered(latency, "tap_to_hub_ms")
    _ordered(latency, "tap_to_ack_ms")

    (final,) = by_measure[None]
    assert final["events"] == EVENTS and final["missing"] == 0 and final["in_order"] is True
    assert final["drain_complete"] is True
    assert final["duplicates"] == drain["duplicates"]
    assert final["drain_events_per_s"] == drain["synced_events_per_s"]
    assert final["raw_runs_events_per_s"] == [r["events_per_s"] for r in raws]
    assert final["ratio"] == pytest.approx(final["drain_events_per_s"] / final["raw_events_per_s"], rel=1e-2)
    assert final["latency_ms_p50"] <= final["latency_ms_p99"] <= final["latency_ms_max"]
    assert final["target_met"] == (
        final["drain_target_met"] and final["ratio_target_met"] and final["latency_target_met"]
    )
    assert final["drain_target_met"] == (final["drain_events_per_s"] >= final["target_events_per_s"])

    assert not _listening(_broker_port(setup)), "the bench's mosquitto outlived the bench"
    assert bench_dirs() <= before, "the bench left its temporary folder behind"


def test_bench_sync_stopped_half_way_cleans_up() -> None:
    """SIGTERM during the drain: the bench exits and takes its broker, hub and folder with it."""
    require_mosquitto()
    before = bench_dirs()
    proc = subprocess.Popen(
        _command("--events", "200000", "--taps", "10", "--no-tls"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        setup = json.loads(proc.stdout.readline())
        assert setup["measure"] == "setup"
        port = _broker_port(setup)
        assert _listening(port)
        for line in proc.stderr:
            if "bench sync: baseline run 1" in line:
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert not _listening(port), "the bench's mosquitto outlived the bench"
    assert bench_dirs() <= before, "the bench left its temporary folder behind"
