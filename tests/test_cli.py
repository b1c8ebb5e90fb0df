"""The edugate command as IT uses it: help everywhere, trustworthy exit codes, the demo, events, status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = [
    [],
    ["run"],
    ["demo"],
    ["config"],
    ["config", "check"],
    ["roster"],
    ["roster", "import"],
    ["roster", "list"],
    ["events"],
    ["status"],
    ["bench"],
    ["bench", "tap"],
    ["bench", "journal"],
]


def edugate(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args], capture_output=True, text=True, input=stdin, timeout=120
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "edugate")
def test_help_everywhere(command: list[str]) -> None:
    result = edugate(*command, "--help")
    assert result.returncode == 0 and "Usage:" in result.stdout


def test_usage_error_exit_code() -> None:
    assert edugate("frobnicate").returncode == 2


def test_demo_runs_the_pipeline_and_summarises(tmp_path: Path) -> None:
    keep = tmp_path / "demo"
    result = edugate("demo", "--no-interactive", "--keep", str(keep))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Xin chào Nguyễn Văn An! Đã điểm danh vào lúc" in out
    assert "(muộn 5 phút)" in out
    assert "Thẻ chưa được đăng ký" in out and "Thẻ không còn hiệu lực" in out
    assert "taps: 8, events journalled: 7, repeats acknowledged without a new event: 1" in out
    assert "integrity ok" in out

    listed = edugate("events", "--journal", str(keep / "journal.db"), "--json")
    events = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [e["seq"] for e in events] == list(range(1, 8))
    assert [e["kind"] for e in events] == [
        "arrival",
        "arrival",
        "arrival",
        "unknown_card",
        "rejected",
        "arrival",
        "departure",
    ]
    assert all(e["synced_at"] is None for e in events)
    assert (
        edugate("events", "--journal", str(keep / "journal.db"), "--unsynced", "--limit", "2").stdout.count("\n") == 2
    )
    future = edugate("events", "--journal", str(keep / "journal.db"), "--since", "2999-01-01")
    assert future.returncode == 0 and future.stdout == ""


def test_demo_takes_typed_taps(tmp_path: Path) -> None:
    result = edugate("demo", "--interactive", stdin="9F8E7D6C\nout 0457A3B2C1D0E9\nnot-a-card\n\n")
    assert result.returncode == 0, result.stderr
    assert "not a card UID" in result.stdout
    assert "Tạm biệt Võ Thị Thu Hà" in result.stdout
    assert "taps: 10," in result.stdout


def test_status_of_a_stopped_gate(tmp_path: Path) -> None:
    keep = tmp_path / "demo"
    edugate("demo", "--no-interactive", "--keep", str(keep))
    result = edugate("status", "--journal", str(keep / "journal.db"))
    assert result.returncode == 3
    assert "NOT RUNNING" in result.stdout and "7 events" in result.stdout and "7 unsynced" in result.stdout
    data = json.loads(edugate("status", "--journal", str(keep / "journal.db"), "--json").stdout)
    assert data["running"] is False and data["journal"]["last_seq"] == 7


def test_missing_config_is_one_clear_line(tmp_path: Path) -> None:
    result = edugate("events", "--config", str(tmp_path / "gate.toml"))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "no such file" in result.stderr and "Traceback" not in result.stderr


def test_logs_at_info_carry_no_names_or_card_numbers(tmp_path: Path) -> None:
    keep = tmp_path / "demo"
    edugate("demo", "--no-interactive", "--keep", str(keep))
    sys.path.insert(0, str(Path(__file__).parent))
    from daemon_harness import DaemonProcess, send_taps, write_config

    sock = Path(tmp_path / "t.sock")
    config = write_config(
        tmp_path / "gate.toml",
        keep / "journal.db",
        [{"name": "lane", "type": "socket", "path": str(sock), "direction": "in"}],
    )
    daemon = DaemonProcess(config).start()
    try:
        send_taps(sock, ["0457A3B2C1D0E9", "CAFEBABE"])
        daemon.wait_for(lambda: len(daemon.stdout_lines) >= 2, what="two acks")
    finally:
        daemon.stop()
    logs = "\n".join(daemon.stderr_lines)
    assert "recorded as seq" in logs
    for secret in ("0457A3B2C1D0E9", "CAFEBABE", "Võ Thị", "HS005"):
        assert secret not in logs


def test_low_disk_is_loud_in_logs_and_status(tmp_path: Path) -> None:
    """Below journal.min_free_mb the daemon keeps recording but warns, and status exits 1 saying why."""
    sys.path.insert(0, str(Path(__file__).parent))
    from daemon_harness import DaemonProcess, send_taps, write_config

    sock = tmp_path / "t.sock"
    journal = tmp_path / "journal.db"
    config = write_config(
        tmp_path / "gate.toml", journal, [{"name": "lane", "type": "socket", "path": str(sock), "direction": "in"}]
    )
    config.write_text(config.read_text().replace("min_free_mb = 1", "min_free_mb = 100000000"))
    daemon = DaemonProcess(config).start()
    try:
        send_taps(sock, ["CAFEBABE"])
        daemon.wait_for(lambda: len(daemon.stdout_lines) >= 1, what="ack")
        daemon.wait_for(lambda: any("DISK NEARLY FULL" in line for line in daemon.stderr_lines), what="warning")
        status = edugate("status", "--journal", str(journal))
        assert status.returncode == 1
        assert "disk nearly full" in status.stdout and "limit 100000000 MB" in status.stdout
        assert "1 events" in status.stdout
    finally:
        daemon.stop()
