"""Who is publishing to a school now, and which schools have been published to.

A publish holds a lease on each school it sends to (a ``publish-lock/<school>`` row in ``meta``),
from reading the roster until the broker acknowledged what was sent: IT's command, the hub's
catch-up and a second hub instance take turns instead of racing for the gates' versions. A school
that ``edugate hub roster publish`` ran for is marked (``publish/<school>``, with the templates
model it sent): the catch-up follows those schools only.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from datetime import UTC, datetime, timedelta

from appliance.hub.store import Connection

PUBLISHED_MARK = "publish/"  # meta key prefix: a school whose roster IT has published (catch-up follows it)
LOCK_PREFIX = "publish-lock/"  # meta key prefix: "<holder>|<until>" while a publish to the school is under way
LOCK_MARGIN = 120.0  # seconds a lease outlives the longest a publish should take (a killed one frees it then)


def take_lease(conn: Connection, school: str, seconds: float) -> tuple[bool, str]:
    """Take the school's publish lease: (True, its value), or (False, why not).

    One publish to a school at a time, across CLI commands, the hub's catch-up and hub instances: between
    reading the roster and recording what the broker acknowledged, another one would race it for the gates'
    versions (and could send an older roster last). A lease, not a lock held by a connection, so a publish
    killed half-way frees the school when its time is up.
    """
    now = datetime.now(UTC)
    holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    value = f"{holder}|{(now + timedelta(seconds=seconds)).isoformat(timespec='seconds')}"
    key = LOCK_PREFIX + school
    with conn.transaction():
        added = conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO NOTHING", [key, value]
        ).rowcount
        if added == 1:
            return True, value
        row = conn.one("SELECT value FROM meta WHERE key = ?", [key])
        held = str(row[0]) if row else ""
        other, _, until = held.rpartition("|")
        try:
            expired = datetime.fromisoformat(until) <= now
        except ValueError:
            expired = True
        swap = "UPDATE meta SET value = ? WHERE key = ? AND value = ?"
        if expired and conn.execute(swap, [value, key, held]).rowcount == 1:
            return True, value
    return False, f"another publish to this school is under way ({other}, until {until[11:19]} UTC); run it again then"


def give_back(conn: Connection, school: str, lease: str) -> None:
    with conn.transaction():
        conn.execute("DELETE FROM meta WHERE key = ? AND value = ?", [LOCK_PREFIX + school, lease])


def mark_published(conn: Connection, school: str, model: str | None) -> None:
    """The school's roster (and templates of ``model``) are meant for its gates from now on, even if no gate
    could be sent them yet. A publish without templates keeps the model an earlier one chose."""
    model = model or published_model(conn, school)
    value = json.dumps({"at": datetime.now(UTC).isoformat(timespec="seconds"), "model": model})
    with conn.transaction():
        conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [PUBLISHED_MARK + school, value],
        )


def published_model(conn: Connection, school: str) -> str | None:
    """The templates model the school's last publish sent (catch-up sends the same one)."""
    row = conn.one("SELECT value FROM meta WHERE key = ?", [PUBLISHED_MARK + school])
    try:
        model = json.loads(row[0]).get("model") if row else None
    except (ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None


def published_schools(conn: Connection) -> list[str]:
    """Schools `roster publish` ran for (marked since schema 2; before, a row in ``published`` says so)."""
    rows = conn.all("SELECT key FROM meta WHERE key LIKE ?", [PUBLISHED_MARK + "%"])
    marked = {str(r[0])[len(PUBLISHED_MARK) :] for r in rows}
    return sorted(marked | {str(r[0]) for r in conn.all("SELECT DISTINCT school FROM published")})
