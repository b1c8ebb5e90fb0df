"""Test support for rosters at the hub: the office's CSV, a hub.toml on the test's database, the CLI, face vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from click.testing import CliRunner, Result
from hub_support import hub_mqtt, write_hub_config
from mqtt_broker import Broker, Pki
from sync_support import SCHOOL

from appliance.cli import main
from appliance.hub.store import Store

MODEL = "sface-test"
HEADER = "STT,Mã học sinh,Họ và tên,Lớp,Vai trò,Mã thẻ,SĐT phụ huynh,Email phụ huynh,Trạng thái\n"
ROWS = {
    "HS001": "1,HS001,Nguyễn Văn An,6A,Học sinh,04A1B2C3,0912 345 678,me.an@example.vn,Đang học\n",
    "HS002": "2,HS002,Trần Thị Bình,6A,Học sinh,04A1B2C4,0987654321,,Đang học\n",
    "HS003": "3,HS003,Lê Hoàng Cường,7B,Học sinh,04:a1:b2:c5,,bo.cuong@example.vn,Đang học\n",
    "GV001": "4,GV001,Phạm Thu Hà,,Giáo viên,04A1B2C6,,,\n",
}


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text(HEADER + "".join(rows), encoding="utf-8")
    return path


def hub_toml(
    tmp_path: Path,
    store: Store,
    broker: Broker | None = None,
    pki: Pki | None = None,
    schools: tuple[str, ...] = (SCHOOL,),
    catch_up_every: float = 0,
) -> Path:
    """hub.toml on the test's database, with a signing key made by `edugate sync keygen`."""
    key_file = tmp_path / "hub-signing.key"
    if not key_file.exists():
        result = cli("sync", "keygen", "--out", str(key_file))
        assert result.exit_code == 0, result.output
    database: dict[str, Any] = {"url": store.url}
    if store.config.password_file is not None:
        database["password_file"] = str(store.config.password_file)
    sections: dict[str, dict[str, Any]] = {
        "hub": {"id": "hub-test", "schools": list(schools)},
        "database": database,
        "signing": {
            "key_file": str(key_file),
            "template_key_file": str(tmp_path / "hub-templates.key"),
            "catch_up_every": catch_up_every,
        },
        "api": {"enabled": False},
    }
    if broker is not None:
        assert pki is not None
        sections["mqtt"] = hub_mqtt(tmp_path, broker, pki)
    return write_hub_config(tmp_path / "hub.toml", sections)


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def vectors(seed: int, count: int = 3, dim: int = 128) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)
