"""Config validation: a school's typo must be an error that names the file, the key and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from datetime import time
from pathlib import Path

import pytest

from appliance.config import ConfigError, GateConfig, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gate.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("example", sorted((REPO / "config").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_examples_pass_the_check(example: Path) -> None:
    command = ["hub", "check"] if example.name.startswith("hub") else ["config", "check"]
    result = subprocess.run(
        [sys.executable, "-m", "appliance.cli", *command, str(example)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_defaults_are_usable() -> None:
    config = GateConfig()
    assert config.device.timezone == "Asia/Ho_Chi_Minh"
    assert config.policy.student.start == time(7, 15)
    assert config.feedback.outputs == ["console"]


def test_unknown_key_names_file_key_and_allowed_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, '[device]\nid = "g1"\ntimezon = "Asia/Ho_Chi_Minh"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "device.timezon" in message
    assert "unknown key" in message and "timezone" in message


def test_unknown_top_level_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt: unknown key; allowed here: .*device"):
        load_config(_write(tmp_path, "[mqtt]\nhost = 'x'\n"))


def test_bad_values_each_reported_on_its_own_line(tmp_path: Path) -> None:
    text = """
[[readers]]
name = "lane-in"
type = "pcsc"
match = "ACR"
direction = "inward"

[policy.student]
arrival_window = ["08:00", "07:00"]
departure_window = ["11:00", "18:00"]
start = "25:61"
"""
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    lines = str(info.value).splitlines()
    assert any("readers[0].direction" in line and "'in', 'out' or 'auto'" in line for line in lines)
    assert any("policy.student.arrival_window" in line and "start before it ends" in line for line in lines)
    assert any("policy.student.start" in line and "HH:MM" in line for line in lines)
    assert len(lines) == 3


def test_reader_needs_its_address() -> None:
    with pytest.raises(ConfigError, match="a wedge reader needs 'device'"):
        parse_config({"readers": [{"name": "w", "type": "wedge"}]})


def test_duplicate_reader_names_rejected() -> None:
    reader = {"name": "a", "type": "socket", "path": "/tmp/a.sock"}
    with pytest.raises(ConfigError, match="repeated: a"):
        parse_config({"readers": [reader, reader]})


def test_unknown_timezone(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown time zone 'Asia/Hanoi_City'"):
        load_config(_write(tmp_path, '[device]\ntimezone = "Asia/Hanoi_City"\n'))


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[device\n"))
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")


def test_class_start_overrides_parsed() -> None:
    config = parse_config({"policy": {"class_start": {"6A": "13:00"}}})
    assert config.policy.class_start == {"6A": time(13, 0)}


def test_config_check_cli_exit_code_and_one_line_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "[journal]\nretention_days = 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "config", "check", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.startswith("edugate: error: ")
    assert "journal.retention_days" in result.stderr
    assert "Traceback" not in result.stderr


def test_vision_pack_default_and_insightface(tmp_path: Path) -> None:
    assert (GateConfig().vision.pack, GateConfig().vision.insightface_dir) == ("default", None)
    path = _write(
        tmp_path, '[vision]\npack = "insightface"\ninsightface_dir = "/var/lib/edugate/insightface/buffalo_l"\n'
    )
    vision = load_config(path).vision
    assert vision.pack == "insightface" and vision.insightface_dir == Path("/var/lib/edugate/insightface/buffalo_l")


@pytest.mark.parametrize(
    ("vision", "message"),
    [
        (
            'pack = "buffalo_l"',
            "vision.pack: unknown pack 'buffalo_l': use \"default\" (YuNet + SFace from `edugate models install`) "
            'or "insightface" with insightface_dir',
        ),
        ("pack = 2", "vision.pack: Input should be 'default' or 'insightface' (got 2)"),
        ('pack = "insightface"', 'vision: pack = "insightface" needs insightface_dir, the folder IT copied'),
        ('insightface_dir = "/x/buffalo_l"', 'vision: insightface_dir is used only with pack = "insightface"'),
    ],
)
def test_vision_pack_errors_say_what_to_write(tmp_path: Path, vision: str, message: str) -> None:
    path = _write(tmp_path, f"[vision]\n{vision}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_sync_refuses_plaintext_to_another_host_unless_allowed() -> None:
    from appliance.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="plaintext"):
        parse_config({"sync": {"enabled": True, "host": "10.0.0.5", "tls": False}})
    allowed = parse_config({"sync": {"enabled": True, "host": "10.0.0.5", "tls": False, "allow_plaintext": True}})
    assert allowed.sync.allow_plaintext
    assert not parse_config({"sync": {"enabled": True, "host": "127.0.0.1", "tls": False}}).sync.tls
    with pytest.raises(ConfigError, match="ca_file"):
        parse_config({"sync": {"enabled": True, "host": "hub.local"}})
    with pytest.raises(ConfigError, match="cert_file and key_file go together"):
        parse_config({"sync": {"enabled": True, "ca_file": "/ca.pem", "cert_file": "/c.pem"}})
    with pytest.raises(ConfigError, match=r"sync\.hostname: unknown key"):
        parse_config({"sync": {"hostname": "x"}})


def test_config_check_points_a_hub_file_to_hub_check() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "config", "check", str(REPO / "config" / "hub.example.toml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "edugate hub check" in result.stderr


def test_hub_check_warns_of_names_a_gate_could_guess(tmp_path: Path) -> None:
    """The example's shared_group and derived client id are public; hub check says so, and stops
    saying so once both are names only the hub servers know."""

    def check(mqtt: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "hub.toml"
        path.write_text(f'[hub]\nid = "hub-1"\n[mqtt]\ntls = false\n{mqtt}\n', encoding="utf-8")
        command = [sys.executable, "-m", "appliance.cli", "hub", "check", str(path)]
        return subprocess.run(command, capture_output=True, text=True)

    guessable = check("")
    assert guessable.returncode == 0 and "OK" in guessable.stdout
    warnings = guessable.stderr.splitlines()
    assert len(warnings) == 2
    assert 'mqtt.shared_group is the default "hub"' in warnings[0]
    assert "mqtt.client_id is not set" in warnings[1]
    secret = check('shared_group = "hub-3f9c41d27a0be865"\nclient_id = "edugate-hub-b41e07c9d2a3f516"')
    assert secret.returncode == 0 and secret.stderr == ""
