"""Checks for the deployment files: installer, systemd unit and udev rules.

Self-contained on purpose (no imports from ``appliance``). Nothing here changes the host:
the installer only runs with --help or --dry-run, and a PATH of tripwire stubs makes any
real apt-get/useradd/install/systemctl/... call fail the test instead of touching the host.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALL_SH = REPO / "firmware_scripts" / "install.sh"
UDEV_RULES = REPO / "firmware_scripts" / "99-edugate-readers.rules"
UNIT = REPO / "systemd" / "edugate.service"

# Host paths a real install would create; a dry run must leave all of them as they were.
HOST_PATHS = [
    Path("/etc/edugate"),
    Path("/opt/edugate"),
    Path("/var/lib/edugate"),
    Path("/etc/udev/rules.d/99-edugate-readers.rules"),
    Path("/etc/systemd/system/edugate.service"),
]
# Commands that change the system; in a dry run none of them may be executed.
TRIPWIRE_COMMANDS = [
    "apt-get",
    "apt",
    "dpkg",
    "groupadd",
    "useradd",
    "usermod",
    "install",
    "cp",
    "mv",
    "rm",
    "mkdir",
    "chown",
    "chmod",
    "ln",
    "sed",
    "systemctl",
    "udevadm",
    "python3",
    "pip",
    "pip3",
]


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def tripwire(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """Environment whose PATH starts with stubs that log their call and fail."""
    stub_dir = tmp_path / "stubs"
    stub_dir.mkdir()
    log = tmp_path / "tripwire.log"
    for name in TRIPWIRE_COMMANDS:
        stub = stub_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\nexit 97\n')
        stub.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{stub_dir}:{env.get('PATH', '/usr/bin:/bin')}"
    env.pop("EDUGATE_MODEL_FILE", None)
    return env, log


def run_installer(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL_SH), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def host_state() -> dict[str, object]:
    state: dict[str, object] = {str(p): p.exists() for p in HOST_PATHS}
    passwd = Path("/etc/passwd").read_text(encoding="utf-8", errors="replace")
    state["user edugate"] = any(line.startswith("edugate:") for line in passwd.splitlines())
    state["repo entries"] = sorted(p.name for p in REPO.iterdir())
    return state


def unit_directives(path: Path) -> dict[str, dict[str, list[str]]]:
    """Parse a unit file keeping repeated keys (systemd allows e.g. several DeviceAllow=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"avoid line continuations in the unit: {raw!r}"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


# --------------------------------------------------------------------------- install.sh


def test_install_sh_is_executable_bash_script() -> None:
    assert INSTALL_SH.is_file()
    assert os.access(INSTALL_SH, os.X_OK), "install.sh must be executable (sudo ./firmware_scripts/...)"
    text = INSTALL_SH.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n") or text.startswith("#!/bin/bash\n")
    assert "set -euo pipefail" in text


def test_install_sh_parses() -> None:
    result = subprocess.run(["bash", "-n", str(INSTALL_SH)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_install_sh_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (CI installs it with apt-get install shellcheck)")
    result = subprocess.run(
        [shellcheck, "--shell=bash", "--severity=style", str(INSTALL_SH)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_install_sh_help() -> None:
    result = run_installer("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--prefix", "--no-apt", "--dry-run"):
        assert option in result.stdout


@pytest.mark.parametrize("args", [["--bogus"], ["--prefix", "relative/dir"], ["--prefix"]])
def test_install_sh_rejects_bad_arguments(args: list[str], tripwire: tuple[dict[str, str], Path]) -> None:
    env, log = tripwire
    result = run_installer("--dry-run", *args, env=env)
    assert result.returncode != 0
    assert "error" in result.stderr
    assert not log.exists(), log.read_text() if log.exists() else ""


def test_install_sh_dry_run_changes_nothing(tripwire: tuple[dict[str, str], Path]) -> None:
    env, log = tripwire
    env["EDUGATE_MODEL_FILE"] = "/nonexistent/model"  # generic Debian host branch
    before = host_state()
    result = run_installer("--dry-run", "--no-apt", env=env)
    after = host_state()

    assert result.returncode == 0, result.stdout + result.stderr
    assert not log.exists(), "dry run executed real commands:\n" + log.read_text()
    assert after == before, "dry run changed the host"
    for path in (Path("/etc/edugate"), Path("/opt/edugate")):
        if not before[str(path)]:
            assert not path.exists(), f"dry run created {path}"

    out = result.stdout
    assert "[dry-run]" in out
    assert not re.search(r"^\+ ", out, re.MULTILINE), "dry run printed an executed command"
    assert "apt-get" not in "\n".join(line for line in out.splitlines() if line.startswith("[dry-run]"))
    assert "useradd" in out
    assert "-m venv" in out
    assert "/opt/edugate/venv" in out
    assert "--system-site-packages" not in out
    assert "pip install" in out
    assert "config check /etc/edugate/gate.toml" in out
    assert "udev" in out and "99-edugate-readers.rules" in out
    assert "/etc/systemd/system/edugate.service" in out
    assert "systemctl" in out
    assert "journalctl -u edugate -f" in out
    assert "edugate status" in out


def test_install_sh_dry_run_raspberry_pi(tmp_path: Path, tripwire: tuple[dict[str, str], Path]) -> None:
    env, log = tripwire
    model = tmp_path / "model"
    model.write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\x00")
    env["EDUGATE_MODEL_FILE"] = str(model)
    prefix = tmp_path / "prefix"
    before = host_state()
    result = run_installer("--dry-run", f"--prefix={prefix}", env=env)
    after = host_state()

    assert result.returncode == 0, result.stdout + result.stderr
    assert not log.exists(), "dry run executed real commands:\n" + log.read_text()
    assert after == before
    assert not prefix.exists()

    out = result.stdout
    assert "Raspberry Pi" in out
    apt_lines = [line for line in out.splitlines() if line.startswith("[dry-run]") and "apt-get" in line]
    assert any("install" in line for line in apt_lines), out
    for pkg in (
        "pcscd",
        "libpcsclite-dev",
        "swig",
        "espeak-ng",
        "python3-picamera2",
        "python3-gpiozero",
        "python3-lgpio",
    ):
        assert any(re.search(rf"(^|\s){re.escape(pkg)}(\s|$)", line) for line in apt_lines), pkg
    assert "--system-site-packages" in out
    assert f"{prefix}/venv" in out
    # printf %q prints the extra as /repo\[pi\] (shell-safe); accept it quoted or not.
    assert re.search(r"\\?\[pi\\?\]", out), out


# --------------------------------------------------------------------------- systemd unit


def test_unit_file_parses_with_configparser() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None, empty_lines_in_values=False)
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    assert parser.sections() == ["Unit", "Service", "Install"]
    assert parser["Install"]["WantedBy"] == "multi-user.target"


def test_unit_file_settings() -> None:
    unit = unit_directives(UNIT)
    service = {key: values[-1] for key, values in unit["Service"].items()}

    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert int(service["WatchdogSec"]) == 30
    assert service["Restart"] == "always"
    assert service["RestartSec"] == "2"
    assert service["TimeoutStopSec"] == "15"
    assert service["ExecStart"] == "/opt/edugate/venv/bin/edugate run --config /etc/edugate/gate.toml"
    assert service["User"] == "edugate"
    assert service["Group"] == "edugate"
    assert "input" in service["SupplementaryGroups"].split()
    assert service["StateDirectory"] == "edugate"
    assert service["RuntimeDirectory"] == "edugate"
    assert service["ConfigurationDirectory"] == "edugate"
    assert service["UMask"] == "0077"

    assert service["ProtectSystem"] == "strict"
    for key in (
        "ProtectHome",
        "PrivateTmp",
        "NoNewPrivileges",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "RestrictNamespaces",
        "LockPersonality",
    ):
        assert service[key] == "yes", key
    assert service["SystemCallArchitectures"] == "native"
    assert service["CapabilityBoundingSet"] == ""
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}

    # Card readers, sound and GPIO must stay reachable.
    assert "PrivateDevices" not in service, "PrivateDevices hides /dev/input and /dev/snd"
    assert service["DevicePolicy"] == "closed"
    allowed = unit["Service"]["DeviceAllow"]
    for device in ("char-input rw", "char-alsa rw", "/dev/gpiochip0 rw", "/dev/gpiomem rw", "char-video4linux rw"):
        assert device in allowed, device
    assert "video" in service["SupplementaryGroups"].split()  # /dev/video* is root:video 0660
    # The daemon reads the clock state with adjtimex(2); ProtectClock= would make that EPERM.
    assert service.get("ProtectClock", "no") == "no"


def test_unit_file_hardening_keeps_what_the_gate_needs() -> None:
    service = unit_directives(UNIT)["Service"]
    one = {key: values[-1] for key, values in service.items()}
    # Allow-list first, then remove, then add back the clock read (glibc's adjtimex is clock_adjtime) and mbind.
    assert service["SystemCallFilter"] == [
        "@system-service",
        "~@privileged @resources @setuid",
        "adjtimex clock_adjtime clock_adjtime64 mbind",
    ]
    assert one["SystemCallErrorNumber"] == "EPERM"  # a call left out fails; it does not kill the gate
    assert one["ProtectProc"] == "invisible" and one["RemoveIPC"] == "yes" and one["PrivateMounts"] == "yes"
    assert one["LimitNOFILE"] == "1024"
    assert "ProcSubset" not in one, "onnxruntime reads /proc/cpuinfo to choose its kernels on ARM"
    assert "MemoryDenyWriteExecute" not in one, "CUDA/TensorRT on a Jetson compile kernels at run time"
    # The school's network only: the broker on the school's server, an IP camera; never the internet.
    assert one["IPAddressDeny"] == "any"
    allowed = one["IPAddressAllow"].split()
    assert {"localhost", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"} <= set(allowed)
    assert "any" not in allowed and "0.0.0.0/0" not in allowed


def test_the_display_drop_in_of_the_security_doc_loads_with_the_unit(tmp_path: Path) -> None:
    """docs/security/gate.md's drop-in that puts the console (with names) on the gate's display."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    doc = (REPO / "docs" / "security" / "gate.md").read_text(encoding="utf-8")
    (drop_in,) = re.findall(r"```ini\n(.*?)```", doc, re.S)
    assert "StandardOutput=tty" in drop_in and "StandardError=journal" in drop_in
    shutil.copy(UNIT, tmp_path / "edugate.service")
    (tmp_path / "edugate.service.d").mkdir()
    (tmp_path / "edugate.service.d" / "display.conf").write_text(drop_in, encoding="utf-8")
    problems = verify_problems(analyze, tmp_path / "edugate.service", tmp_path)
    assert not problems, "\n".join(problems)
    assert exposure(tmp_path / "edugate.service") < 2.5


def verify_problems(analyze: str, unit: Path, cwd: Path) -> list[str]:
    """What `systemd-analyze verify` finds wrong with a unit file (the venv only exists on an installed machine)."""
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
        cwd=cwd,
    )
    return [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and "/opt/edugate/venv/bin/edugate" not in line
    ]


def exposure(unit: Path) -> float:
    """systemd-analyze's overall exposure of a unit file (0 best, 10 worst)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_COLORS": "0"},
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert found, result.stdout[-2000:] + result.stderr
    return float(found.group(1))


@pytest.mark.parametrize("unit", [UNIT, REPO / "systemd" / "edugate-hub.service"], ids=lambda u: u.name)
def test_units_exposure_stays_below_2_5(unit: Path) -> None:
    """Debian 12's systemd-analyze: 3.6 (gate) and 3.2 (hub) before the hardening; 2.0 and 1.4 after."""
    assert exposure(unit) < 2.5


def test_unit_file_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    problems = verify_problems(analyze, UNIT, tmp_path)
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- udev rules


def test_udev_rules() -> None:
    text = UDEV_RULES.read_text(encoding="utf-8")
    rules = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert rules, "no rules"
    ids = set()
    for line in rules:
        assert not line.rstrip().endswith("\\"), f"keep each rule on one line: {line!r}"
        assert 'GROUP="edugate"' in line, line
        assert 'SUBSYSTEM=="input"' in line, line
        assert 'KERNEL=="event*"' in line, line
        assert 'MODE="0640"' in line, line
        assert 'SYMLINK+="edugate-wedge-%n"' in line, line
        vendor = re.search(r'ATTRS\{idVendor\}=="([0-9a-f]{4})"', line)
        product = re.search(r'ATTRS\{idProduct\}=="([0-9a-f]{4})"', line)
        assert vendor and product, f"ids must be 4 lower-case hex digits: {line!r}"
        ids.add(f"{vendor.group(1)}:{product.group(1)}")
        # Every key is either a match (==) or an assignment (= or +=) with a quoted value.
        for part in (p.strip() for p in line.split(",")):
            assert re.fullmatch(r'[A-Z]+(\{[A-Za-z_]+\})?(==|\+=|=)"[^"]*"', part), part
    assert {"ffff:0035", "08ff:0009", "16c0:27db"} <= ids
    assert "lsusb" in text and "udevadm info -a /dev/input/event" in text


# --------------------------------------------------------------------------- the hub's files

HUB_UNIT = REPO / "systemd" / "edugate-hub.service"


def test_hub_unit_runs_the_hub_hardened() -> None:
    unit = unit_directives(HUB_UNIT)
    service = {key: values[-1] for key, values in unit["Service"].items()}
    assert service["Type"] == "notify" and service["Restart"] == "always"
    assert service["ExecStart"] == "/opt/edugate/venv/bin/edugate hub run --config /etc/edugate/hub.toml"
    assert service["User"] == "edugate-hub" and service["StateDirectory"] == "edugate-hub"
    assert service["ProtectSystem"] == "strict" and service["CapabilityBoundingSet"] == ""
    assert unit["Service"]["SystemCallFilter"] == ["@system-service", "~@privileged @resources @setuid", "mbind"]
    assert service["SystemCallErrorNumber"] == "EPERM" and service["MemoryDenyWriteExecute"] == "yes"
    assert service["ProtectProc"] == "invisible" and service["ProcSubset"] == "pid"
    assert service["RemoveIPC"] == "yes" and service["PrivateMounts"] == "yes"
    assert service["LimitNOFILE"] == "1024"  # paho's select() cannot take a descriptor of 1024 or more


def test_hub_unit_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    problems = verify_problems(analyze, HUB_UNIT, tmp_path)
    assert not problems, "\n".join(problems)


def test_hub_example_config_is_valid() -> None:
    from appliance.config import load_hub_config

    config = load_hub_config(REPO / "config" / "hub.example.toml")
    assert config.mqtt.tls and config.attendance.absent_after_minutes == 15
