"""The daemon's health as a small JSON file, and the disk check both the daemon and the CLI use.

The daemon rewrites the file every few seconds; ``edugate status`` reads it (and the journal,
read-only), so status works over SSH without talking to the daemon and shows a stale file
as "not running".
"""

from __future__ import annotations

import errno
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
    """Atomic replace, so a reader never sees half a file.

    On a full disk (the usual reason the journal fails) no new file can be written; the old
    one is then overwritten in place, so ``edugate status`` still shows the daemon running
    and the journal error instead of a stale file read as "not running".
    """
    text = json.dumps(data, ensure_ascii=False, indent=1)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".status-")
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if exc.errno != errno.ENOSPC or not _overwrite_in_place(path, text.encode()):
            raise
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def _overwrite_in_place(path: Path, data: bytes) -> bool:
    """Rewrite ``path`` inside the blocks it already has, padded with spaces (valid JSON) to its old size."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if len(data) > max(info.st_size, info.st_blocks * 512):
            return False
        os.pwrite(fd, data.ljust(info.st_size, b" "), 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


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
