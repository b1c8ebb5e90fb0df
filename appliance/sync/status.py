"""The retained status message a gate keeps on ``{prefix}/{school}/{device}/status``.

The hub and IT see at a glance which gates are online, how far behind they are and what is
degraded. Nothing personal goes in it: counts and states only, and the gate's public keys (for
sealed rosters and face templates, appliance.sync.sealed_transport, and for the signature the
status carries, appliance.sync.gate_keys: the hub believes only a status signed with the key IT
registered for the gate).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from appliance import __version__

STATUS_SCHEMA = 1

# Adds the gate's signing key and signature to a status (appliance.sync.gate_keys.sign_status).
Signer = Callable[[dict[str, Any]], dict[str, Any]]


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
    template_key: str | None = None,
    signer: Signer | None = None,
    school: str | None = None,
) -> bytes:
    """``school`` is the gate's own (device.school): inside the signature, so the status cannot be replayed as a
    gate of another school's."""
    age = None
    if oldest_unsynced is not None:
        age = max(0, round((datetime.now(UTC) - datetime.fromisoformat(oldest_unsynced)).total_seconds()))
    return _encode(
        _with_key(
            template_key,
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
            },
        ),
        signer,
        school,
    )


def offline_status(
    device: str, reason: str, template_key: str | None = None, signer: Signer | None = None, school: str | None = None
) -> bytes:
    """The last will (``connection lost``, signed when the connection is made) and the clean-shutdown message
    (``stopped``). They keep the template key: the hub can still seal templates for a gate that is away.
    """
    return _encode(
        _with_key(
            template_key, {"schema": STATUS_SCHEMA, "device": device, "online": False, "ts": _now(), "reason": reason}
        ),
        signer,
        school,
    )


def _with_key(template_key: str | None, data: dict[str, Any]) -> dict[str, Any]:
    """The gate's public transport key, when it has one (a public key: nothing personal)."""
    return data if template_key is None else {**data, "template_key": template_key}


def _encode(data: dict[str, Any], signer: Signer | None = None, school: str | None = None) -> bytes:
    if school is not None:
        data = {**data, "school": school}
    if signer is not None:
        data = signer(data)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")
