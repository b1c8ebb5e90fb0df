"""``edugate bench``: each benchmark runs end to end, prints only JSON lines, and measured real work.

Speed targets are not asserted: the machines are shared and noisy. What is asserted is that the
numbers come from work that really happened (rows written with contiguous seq, every inserted
card acknowledged with a committed event) and that they are self-consistent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port_pair

from appliance.readers.virtual import PrivatePcscd


def _edugate() -> list[str]:
    script = Path(sys.executable).with_name("edugate")
    return [str(script)] if script.exists() else [sys.executable, "-m", "appliance.cli"]


def run_bench(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> list[dict[str, Any]]:
    """Run ``edugate bench ...``; every stdout line must be a JSON object."""
    env = dict(env or os.environ)
    env.pop("PCSCLITE_CSOCK_NAME", None)  # the bench must pick its own pcscd, not the session's
    proc = subprocess.run([*_edugate(), "bench", *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    assert lines, proc.stderr
    parsed = [json.loads(line) for line in lines]
    assert all(isinstance(item, dict) for item in parsed)
    return parsed


def _ordered(item: dict[str, Any], prefix: str) -> None:
    """p50 <= p90 <= p99 <= max, all positive."""
    values = [item[f"{prefix}_p50"], item[f"{prefix}_p90"], item[f"{prefix}_p99"], item[f"{prefix}_max"]]
    assert 0 < values[0] <= values[1] <= values[2] <= values[3], (prefix, values)


def test_bench_journal_measures_durable_commits(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    lines = run_bench(["journal", "--events", "300", "--dir", str(disk)])
    assert all(item["bench"] == "journal" for item in lines)
    setup = next(item for item in lines if item.get("measure") == "setup")
    assert setup["events"] == 300 and setup["cpu_count"] >= 1 and setup["sqlite"]
    warmup = setup["warmup"]

    rounds = [item for item in lines if item.get("measure") in ("baseline", "journal")]
    assert sorted(item["measure"] for item in rounds) == ["baseline"] * 3 + ["journal"] * 3
    for item in rounds:
        assert item["events"] == 300
        assert item["rows"] == 300 + warmup and item["seq_contiguous"] is True
        # The baseline is only fair if it commits with the journal's durability.
        assert item["journal_mode"] == "wal" and item["synchronous"] == 2
        assert item["events_per_s"] > 0 and item["seconds"] > 0
        assert item["events_per_s"] == pytest.approx(300 / item["seconds"], rel=0.01)
        _ordered(item, "ms")

    breakdown = next(item for item in lines if item.get("measure") == "cpu_breakdown")
    assert breakdown["commit_us"] > 0 and breakdown["event_to_json_us"] > 0

    summary = lines[-1]
    assert "measure" not in summary
    assert summary["events"] == 300 and summary["all_rows_ok"] is True
    assert summary["events_per_s"] > 0 and summary["baseline_events_per_s"] > 0
    assert summary["overhead_ratio"] == pytest.approx(
        summary["baseline_events_per_s"] / summary["events_per_s"], rel=0.01
    )
    assert summary["events_per_s"] == sorted(i["events_per_s"] for i in rounds if i["measure"] == "journal")[1]
    assert summary["target_events_per_s"] == 2000 and summary["target_overhead_ratio"] == 1.5
    assert 0 < summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    assert 0 < summary["baseline_p50_ms"] <= summary["baseline_p99_ms"]
    assert list(disk.iterdir()) == [], "the bench must remove its databases"


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_bench_tap_acknowledges_every_card() -> None:
    why = PrivatePcscd.available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide pcscd: {why}")
        pytest.skip(why)
    # A short private TMPDIR: the bench's pcscd socket lives under it (unix socket paths are short),
    # and it must be empty again afterwards.
    tmp = Path(tempfile.mkdtemp(prefix="eb-"))
    try:
        port = free_port_pair()
        lines = run_bench(["tap", "--taps", "20", "--port", str(port)], env={**os.environ, "TMPDIR": str(tmp)})
        assert list(tmp.iterdir()) == [], "the bench must remove its pcscd and journal folders"
        assert _processes_mentioning(str(tmp)) == [], "the bench's pcscd is still running"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    assert all(item["bench"] == "tap" for item in lines)
    setup = next(item for item in lines if item.get("measure") == "setup")
    assert setup["port"] == port and setup["taps"] >= 20

    lanes = [item for item in lines if item.get("measure") == "lane"]
    assert sorted(item["lane"] for item in lanes) == ["lane0", "lane1"]
    for lane in lanes:
        assert lane["acked"] == lane["insertions"] >= 10 and lane["missed"] == 0 and lane["stray_acks"] == 0
        _ordered(lane, "tap_ms")
        _ordered(lane, "insert_to_ack_ms")

    baseline = next(item for item in lines if item.get("measure") == "pcsc_read_baseline")
    assert baseline["reads"] == 200
    _ordered(baseline, "pcsc_read_ms")

    breakdown = next(item for item in lines if item.get("measure") == "breakdown")
    for prefix in ("uid_read_ms", "gate_ms", "commit_ms"):
        _ordered(breakdown, prefix)

    summary = lines[-1]
    assert "measure" not in summary
    taps = summary["taps"]
    assert taps >= 20 and summary["missed"] == 0 and summary["insertions"] == taps
    assert summary["ok_acks"] == taps and summary["stray_acks"] == 0
    # Every acknowledged tap is one committed event, seq 1..N without gaps, in a sound journal.
    assert summary["events"] == taps and summary["seq_first"] == 1 and summary["seq_last"] == taps
    assert summary["seq_contiguous"] is True and summary["journal_integrity"] == "ok"
    assert 0 < summary["tap_ms_p50"] <= summary["tap_ms_p99"] <= summary["tap_ms_max"]
    # The card is inserted before pcscd notices it, so insert->ack includes the whole tap.
    assert summary["tap_ms_p50"] < summary["insert_to_ack_ms_p50"] <= summary["insert_to_ack_ms_p99"]
    assert 0 < summary["pcsc_read_ms_p50"] <= summary["pcsc_read_ms_p99"]
    assert summary["target_tap_ms_p99"] == 50
    assert summary["seconds"] > 0 and summary["taps_per_s"] > 0
