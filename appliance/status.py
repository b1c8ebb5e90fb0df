"""The daemon's health as a small JSON file, and the disk check both the daemon and the CLI use.

The daemon rewrites the file every few seconds; ``edugate status`` reads it (and the journal,
read-only), so status works over SSH without talking to the daemon and shows a stale file
as "not running".
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance.readers.base import ReaderHealth

STATUS_INTERVAL = 5.0
STALE_AFTER = 3 * STATUS_INTERVAL + 5


def status_path(journal_path: Path) -> Path:
    return journal_path.with_name(journal_path.name + ".status.json")


@dataclass(frozen=True)
class DiskState:
    free_mb: int
    total_mb: int
    low: bool


def disk_state(journal_path: Path, min_free_mb: int) -> DiskState:
    target = journal_path.parent if journal_path.parent.exists() else Path("/")
    usage = shutil.disk_usage(target)
    free = usage.free // (1024 * 1024)
    return DiskState(free, usage.total // (1024 * 1024), free < min_free_mb)


def write_status(path: Path, data: dict[str, Any]) -> None:
    """Atomic replace, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".status-")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, ensure_ascii=False, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    data["running"] = time.time() - data.get("updated", 0) < STALE_AFTER and _pid_alive(int(data.get("pid", 0)))
    return data


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def health_dicts(items: list[ReaderHealth]) -> list[dict[str, Any]]:
    return [{**asdict(h), "state": h.state.value} for h in items]
