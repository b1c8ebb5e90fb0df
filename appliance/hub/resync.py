"""Ask gates for the events the hub is missing.

A broker crash, a hub that was away while nobody held its subscription, or a gate's journal
salvaged after damage can each leave holes in a gate's seq. The hub sees them (``streams``:
``highest`` above ``contiguous``, the tail known from the gate's status) and, once a hole has
stayed open for ``resync_after`` seconds, sends that gate a signed ``resync`` command for
exactly the missing ranges; it asks again if they are still missing after another period.

Each request is kept (``resync_requests``) with its range: a gate that answers the top range with
no events has nothing from there on, and the ingest stops waiting for it. The count of requests
starts again only once the range asked for first is filled (appliance.hub.ingest), so a gap no
gate can fill is given up after MAX_ATTEMPTS instead of holding the school's absence notices
for ever (appliance.hub.jobs.notice_holds says which gate holds them and why).
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
MAX_ATTEMPTS = 8  # requests for one gap that made no progress before the hub gives up on it


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

    def run_once(self, now: datetime | None = None) -> int:
        """Send the resync commands that are due; returns how many ranges were asked for.

        A gap is asked for once it has been open, and the gate's stream has not moved forward, for
        ``resync_after``; again after twice as long each time, at most MAX_ATTEMPTS times (a gap
        the gate cannot fill any more, e.g. pruned or salvaged away, is then reported and left).
        Only the gate's current journal can be resent. Several hub instances claim a gap with a
        compare-and-set, so only one of them asks.
        """
        if self.key is None:
            return 0
        now = now or datetime.now(UTC)
        stamp = now.isoformat(timespec="milliseconds")
        due = (now - self.after).isoformat(timespec="milliseconds")
        rows = self.conn.all(
            "SELECT s.device, s.journal, s.school, s.contiguous, s.highest, s.resync_requested_at, "
            "s.resync_attempts, d.status FROM streams s LEFT JOIN devices d ON d.device = s.device "
            "WHERE s.highest > s.contiguous AND s.gap_since <= ? AND COALESCE(s.progress_at, s.gap_since) <= ? "
            "AND s.resync_attempts <= ?",
            [due, due, MAX_ATTEMPTS],
        )
        asked = 0
        for device, journal, school, contiguous, highest, requested, attempts, status in rows:
            if attempts >= MAX_ATTEMPTS:
                self._give_up(device, journal, contiguous, highest, attempts)
                continue
            if requested is not None:
                wait = self.after * (2**attempts)
                if datetime.fromisoformat(requested) + wait > now:
                    continue
            current = current_journal(status)
            if current is not None and current != journal:
                continue  # an earlier journal of this gate (rebuilt after damage): it can no longer resend it
            ranges = missing_ranges(self.conn, device, journal, contiguous, highest)
            if not ranges:
                continue
            claimed = self.conn.execute(
                "UPDATE streams SET resync_requested_at = ?, resync_attempts = resync_attempts + 1, resync_upto = ? "
                "WHERE device = ? AND journal = ? AND resync_attempts = ?",
                [stamp, ranges[0][1], device, journal, attempts],
            ).rowcount
            if claimed != 1:
                continue  # another hub instance took it
            topic = Topics(self.prefix, school, device).downlink_topic("command")
            for first, last in ranges:
                body = {"name": "resync", "from_seq": first, "to_seq": last, "journal": journal}
                message = sign(self.key, new_message("command", school, device, body))
                # Kept so that the gate's answer (how many events it sent again) can close a gap it has nothing for.
                self.conn.execute(
                    "INSERT INTO resync_requests(device, nonce, school, journal, from_seq, to_seq, sent_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(device, nonce) DO NOTHING",
                    [device, message["nonce"], school, journal, first, last, stamp],
                )
                self.publish(topic, json.dumps(message, ensure_ascii=False).encode("utf-8"))
                asked += 1
            log.warning(
                "hub: %d range(s) of %s's events are missing; asked the gate to send them again (request %d of %d)",
                len(ranges),
                device,
                attempts + 1,
                MAX_ATTEMPTS,
            )
        return asked

    def _give_up(self, device: str, journal: str, contiguous: int, highest: int, attempts: int) -> None:
        self.conn.execute(
            "UPDATE streams SET resync_attempts = ? WHERE device = ? AND journal = ? AND resync_attempts = ?",
            [attempts + 1, device, journal, attempts],
        )
        log.error(
            "hub: %s still misses events between seq %d and %d after %d requests; the gate no longer has them "
            "(see edugate hub gates / the API); giving up on this gap",
            device,
            contiguous + 1,
            highest,
            attempts,
        )


def current_journal(status: str | None) -> str | None:
    """The journal a gate's last status names (its seq stream that can still be resent)."""
    if not status:
        return None
    try:
        journal = json.loads(status).get("journal")
    except ValueError:
        return None
    return journal if isinstance(journal, str) else None
