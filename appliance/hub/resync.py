"""Ask gates for the events the hub is missing.

A broker crash, a hub that was away while nobody held its subscription, or a gate's journal
salvaged after damage can each leave holes in a gate's seq. The hub sees them (``streams``:
``highest`` above ``contiguous``, the tail known from the gate's status) and, once a hole has
stayed open for ``resync_after`` seconds, sends that gate a signed ``resync`` command for
exactly the missing ranges; it asks again if they are still missing after another period.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.hub.store import Connection
from appliance.sync.downlink import new_message
from appliance.sync.signing import sign
from appliance.sync.topics import Topics

log = logging.getLogger(__name__)

MAX_RANGES = 20  # per gate and request; the next round asks for the rest


def missing_ranges(conn: Connection, device: str, journal: str, after: int, upto: int) -> list[tuple[int, int]]:
    """Seq ranges in (after, upto] that the hub does not hold, at most MAX_RANGES of them."""
    ranges: list[tuple[int, int]] = []
    expected = after + 1
    rows = conn.all(
        "SELECT seq FROM events WHERE device = ? AND journal = ? AND seq > ? AND seq <= ? ORDER BY seq",
        [device, journal, after, upto],
    )
    for (seq,) in rows:
        if seq > expected:
            ranges.append((expected, seq - 1))
            if len(ranges) >= MAX_RANGES:
                return ranges
        expected = seq + 1
    if expected <= upto:
        ranges.append((expected, upto))
    return ranges[:MAX_RANGES]


class Resyncer:
    def __init__(
        self,
        conn: Connection,
        prefix: str,
        key: Ed25519PrivateKey | None,
        publish: Callable[[str, bytes], object],
        after: float,
    ) -> None:
        self.conn = conn
        self.prefix = prefix
        self.key = key
        self.publish = publish
        self.after = timedelta(seconds=after)
        self.requested = 0

    def run_once(self, now: datetime | None = None) -> int:
        """Send the resync commands that are due; returns how many ranges were asked for."""
        if self.key is None:
            return 0
        now = now or datetime.now(UTC)
        due = (now - self.after).isoformat(timespec="milliseconds")
        rows = self.conn.all(
            "SELECT device, journal, school, contiguous, highest FROM streams WHERE highest > contiguous "
            "AND gap_since <= ? AND (resync_requested_at IS NULL OR resync_requested_at <= ?)",
            [due, due],
        )
        asked = 0
        for device, journal, school, contiguous, highest in rows:
            ranges = missing_ranges(self.conn, device, journal, contiguous, highest)
            topic = Topics(self.prefix, school, device).downlink_topic("command")
            for first, last in ranges:
                body = {"name": "resync", "from_seq": first, "to_seq": last}
                message = sign(self.key, new_message("command", school, device, body))
                self.publish(topic, json.dumps(message, ensure_ascii=False).encode("utf-8"))
                asked += 1
            log.warning(
                "hub: %d range(s) of %s's events are missing; asked the gate to send them again", len(ranges), device
            )
            self.conn.execute(
                "UPDATE streams SET resync_requested_at = ? WHERE device = ? AND journal = ?",
                [now.isoformat(timespec="milliseconds"), device, journal],
            )
        self.requested += asked
        return asked
