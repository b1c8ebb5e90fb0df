"""``edugate bench hub``: a short run end to end against its own Mosquitto, into SQLite and PostgreSQL.

No speed is asserted (the machines are shared; the figures live in the README). What is asserted is
that the figures come from work that happened: every event of the backlog was stored exactly once
on both databases, with no gap in any gate's seq, the baselines wrote the same number of rows, and
the bench leaves no broker, folder or PostgreSQL schema behind.
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

import psycopg
from mqtt_broker import require_mosquitto
from postgres_server import pg_server, pg_url  # noqa: F401

EVENTS = 3000
GATES = 3
TAPS = 10


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "appliance.cli", "bench", "hub", *args]


def bench_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("edugate-bench-hub-*"))


def _broker_port(setup: dict[str, Any]) -> int:
    return int(setup["broker"].split(":")[1].split(",")[0])


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_bench_hub_short_run(pg_url: str) -> None:  # noqa: F811
    require_mosquitto()
    before = bench_dirs()
    env = {k: v for k, v in os.environ.items() if k not in {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}}
    proc = subprocess.run(
        _command("--events", str(EVENTS), "--gates", str(GATES), "--taps", str(TAPS), "--postgres", pg_url),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines and all(item["bench"] == "hub" for item in lines)
    by_measure: dict[str | None, list[dict[str, Any]]] = {}
    for item in lines:
        by_measure.setdefault(item.get("measure"), []).append(item)
    assert set(by_measure) == {"setup", "publish", "ingest", "baseline", "latency", None}

    (setup,) = by_measure["setup"]
    assert setup["events"] == EVENTS and setup["gates"] == GATES and setup["taps"] == TAPS
    assert setup["postgres"] is True

    ingests = {item["database"]: item for item in by_measure["ingest"]}
    baselines = {item["database"]: item for item in by_measure["baseline"]}
    assert (
        set(ingests)
        == set(baselines)
        == {item["database"] for item in by_measure["publish"]}
        == {
            "sqlite",
            "postgresql",
        }
    )
    for database, ingest in ingests.items():
        assert ingest["complete"] is True, ingest
        assert ingest["rows"] == ingest["distinct_ids"] == ingest["stored"] == EVENTS, ingest
        assert ingest["rejected"] == 0 and ingest["gaps"] == 0 and ingest["every_event_once"] is True, ingest
        assert ingest["events_per_s"] > 0 and ingest["seconds"] > 0 and ingest["batches"] >= 1
        assert abs(ingest["events_per_s"] * ingest["seconds"] - EVENTS) < EVENTS * 0.01 + 1
        baseline = baselines[database]
        assert baseline["stored"] == baseline["events"] == EVENTS and baseline["batch"] == 500
        assert baseline["events_per_s"] > 0

    (latency,) = by_measure["latency"]
    assert latency["taps"] == latency["hub_events"] == latency["notified"] == TAPS, latency
    assert latency["missing"] == 0 and latency["duplicates"] == 0 and latency["webhook_requests"] == TAPS
    assert latency["outbox"] == {"sent": TAPS} and latency["daemon_exit_code"] == 0
    for prefix in ("tap_to_webhook_ms", "tap_to_hub_ms", "hub_to_webhook_ms"):
        values = [latency[f"{prefix}_p{p}"] for p in (50, 95, 99)] + [latency[f"{prefix}_max"]]
        assert 0 < values[0] <= values[1] <= values[2] <= values[3], (prefix, values)
    assert latency["tap_to_hub_ms_max"] <= latency["tap_to_webhook_ms_max"]

    (summary,) = by_measure[None]
    for database in ("sqlite", "postgresql"):
        assert summary[f"{database}_events_per_s"] == ingests[database]["events_per_s"]
        assert summary[f"{database}_baseline_events_per_s"] == baselines[database]["events_per_s"]
        assert summary[f"{database}_ratio"] == round(
            ingests[database]["events_per_s"] / baselines[database]["events_per_s"], 3
        )
        assert summary[f"{database}_every_event_once"] is True
    assert summary["target_events_per_s"] == 2000 and summary["target_latency_p95_ms"] == 5000
    assert summary["ingest_target_met"] == (summary["sqlite_events_per_s"] >= 2000)
    assert summary["latency_ms_p95"] == latency["tap_to_webhook_ms_p95"]
    assert summary["latency_target_met"] == (latency["tap_to_webhook_ms_p95"] <= 5000)
    assert summary["target_met"] == (summary["ingest_target_met"] and summary["latency_target_met"])

    assert bench_dirs() <= before, "the bench left its folder behind"
    assert not _listening(_broker_port(setup)), "the bench's mosquitto still runs"
    with psycopg.connect(pg_url) as conn:
        left = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'edugate_bench_%'").fetchall()
    assert left == [], "the bench left PostgreSQL schemas behind"


def test_bench_hub_refuses_an_unreachable_postgres_in_one_line() -> None:
    require_mosquitto()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.run(
        _command("--events", "100", "--postgres", f"postgresql://nobody:x@127.0.0.1:{port}/none"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "--postgres: cannot" in proc.stderr, proc.stderr


def test_bench_hub_stopped_half_way_leaves_nothing_behind() -> None:
    """SIGTERM while the hub drains the backlog: no broker, no folder, exit not 0."""
    require_mosquitto()
    before = bench_dirs()
    proc = subprocess.Popen(
        _command("--events", "30000", "--taps", "5"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    setup = json.loads(proc.stdout.readline())
    for line in proc.stderr:
        if "ingest into sqlite" in line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert bench_dirs() <= before, "the bench left its folder behind"
    assert not _listening(_broker_port(setup)), "the bench's mosquitto still runs"
