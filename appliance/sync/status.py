"""The retained status message a gate keeps on ``{prefix}/{school}/{device}/status``.

The hub and IT see at a glance which gates are online, how far behind they are and what is
degraded. Nothing personal goes in it: counts and states only.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from appliance import __version__

STATUS_SCHEMA = 1


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def online_status(
    device: str,
    readers: list[dict[str, Any]],
    camera: dict[str, Any] | None,
    clock_ok: bool,
    backlog: int,
    oldest_unsynced: str | None,
    last_seq: int,
    journal: str,
) -> bytes:
    age = None
    if oldest_unsynced is not None:
        age = max(0, round((datetime.now(UTC) - datetime.fromisoformat(oldest_unsynced)).total_seconds()))
    return _encode(
        {
            "schema": STATUS_SCHEMA,
            "device": device,
            "online": True,
            "ts": _now(),
            "version": __version__,
            "readers": [{"name": r["name"], "state": r["state"]} for r in readers],
            "camera": camera,
            "clock_ok": clock_ok,
            "backlog": backlog,
            "oldest_unsynced_age_s": age,
            "last_seq": last_seq,
            "journal": journal,
        }
    )


def offline_status(device: str, reason: str) -> bytes:
    """The last will (``connection lost``) and the clean-shutdown message (``stopped``)."""
    return _encode({"schema": STATUS_SCHEMA, "device": device, "online": False, "ts": _now(), "reason": reason})


def _encode(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")
