"""The outbox worker: delivers due messages, retries with backoff, records every outcome.

A row is claimed by setting it to ``sending`` with a lease (``next_attempt_at`` = now + the
channel's timeout twice + a margin) and one more attempt, in a short transaction; the network
call happens outside any transaction, and its outcome is written afterwards. A hub killed
mid-delivery leaves the row ``sending``: when the lease runs out it is due again, and the retry
carries the same idempotency key, so a gateway that honours the key delivers it once. The worker
has its own connection and thread: a slow gateway or a dead mail server never holds up ingest.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

from appliance.config import HubConfig
from appliance.hub.notify.channels import Channel, Outcome, Outgoing, build_channels
from appliance.hub.notify.planner import iso, utc_now
from appliance.hub.store import Connection, Store, StoreError

log = logging.getLogger(__name__)

POLL = 0.5  # seconds between looks at the outbox when nothing was due
LEASE_MARGIN = 5.0  # seconds added to twice the channel timeout before a 'sending' row counts as abandoned


@dataclass
class WorkerStats:
    sent: int = 0
    retried: int = 0
    failed: int = 0
    expired: int = 0
    last_error: str | None = None


def backoff(attempts: int, retry_min: float, retry_max: float, rng: random.Random | None = None) -> float:
    """Delay before the next attempt: doubling from retry_min, capped at retry_max, the upper half jittered
    so that many messages failed at once do not come back at once."""
    base = min(retry_max, retry_min * 2 ** max(attempts - 1, 0))
    jittered = base / 2 + (rng or random).uniform(0, base / 2)
    return max(retry_min, min(retry_max, jittered))


@dataclass(frozen=True)
class Claimed:
    message: Outgoing
    channel: str
    attempts: int


class OutboxWorker:
    """Started and stopped by the hub service (``start()``/``stop()``); ``run_once`` is one round."""

    def __init__(self, store: Store, config: HubConfig, channels: Mapping[str, Channel] | None = None) -> None:
        self.store = store
        self.config = config
        self.notify = config.notify
        self.channels = dict(channels) if channels is not None else build_channels(config.notify)
        longest = max((c.timeout for c in self.channels.values()), default=10.0)
        self.lease = 2 * longest + LEASE_MARGIN
        self.batch = 4 * self.notify.concurrency
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Connection | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future[Outcome]] = []  # the round's deliveries; stop() cancels those not started

    # lifecycle

    def start(self) -> None:
        self._stop.clear()
        self._conn = self.store.connect()
        self._pool = ThreadPoolExecutor(self.notify.concurrency, thread_name_prefix="notify-send")
        self._thread = threading.Thread(target=self._run, name="notify-outbox", daemon=True)
        self._thread.start()
        log.info("notify: outbox worker started (channels: %s)", ", ".join(sorted(self.channels)) or "none")

    def stop(self) -> None:
        """Finish the deliveries in flight (bounded by the channel timeouts), record them, then stop."""
        self._stop.set()
        self._cancel_waiting()
        if self._thread is not None:
            self._thread.join(self.lease)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                handled = self.run_once()
                self.stats.last_error = None
            except Exception as exc:
                handled = 0
                self.stats.last_error = str(exc)
                log.exception("notify: outbox round failed; trying again")
                self._reconnect_if_broken()
                self._stop.wait(2.0)
            if not handled:
                self._stop.wait(POLL)

    def _reconnect_if_broken(self) -> None:
        if self._conn is None or not self._conn.broken:
            return
        try:
            conn = self.store.connect()
        except StoreError as exc:
            log.error("notify: %s", exc)
            return
        self._conn.close()
        self._conn = conn

    # one round

    def run_once(self) -> int:
        """Claim what is due, deliver it concurrently, record each outcome; returns the rows handled."""
        conn = self._conn
        if conn is None:
            raise RuntimeError("outbox worker not started")
        claimed = self._claim(conn, utc_now())
        if not claimed:
            return 0
        pool = self._pool
        assert pool is not None
        futures: list[tuple[Claimed, Future[Outcome]]] = []
        for item in claimed:
            channel = self.channels.get(item.channel)
            if channel is None:
                self._record(conn, item, Outcome("failed", f"channel {item.channel} is not configured in hub.toml"))
                continue
            futures.append((item, pool.submit(_safe_send, channel, item.message)))
        self._futures = [f for _, f in futures]
        if self._stop.is_set():
            self._cancel_waiting()
        for item, future in futures:
            if future.cancelled():
                self._release(conn, item)  # not started yet: give it back instead of making stop() wait
                continue
            self._record(conn, item, future.result())
        self._futures = []
        return len(claimed)

    def _cancel_waiting(self) -> None:
        for future in list(self._futures):
            future.cancel()

    def _release(self, conn: Connection, item: Claimed) -> None:
        with conn.transaction():
            conn.execute(
                "UPDATE outbox SET status = 'pending', attempts = attempts - 1, next_attempt_at = ?"
                " WHERE key = ? AND status = 'sending' AND attempts = ?",
                [iso(utc_now()), item.message.key, item.attempts],
            )

    def _claim(self, conn: Connection, now: datetime) -> list[Claimed]:
        """Due rows -> ``sending`` with one more attempt and a lease; rows due for longer than max_age are
        not sent late but marked ``skipped`` (the hub or its worker was stopped meanwhile)."""
        stale_before = iso(now - timedelta(minutes=self.notify.max_age_minutes))
        lease_end = iso(now + timedelta(seconds=self.lease))
        claimed: list[Claimed] = []
        with conn.transaction():
            rows = conn.all(
                "SELECT key, status, next_attempt_at FROM outbox WHERE status IN ('pending', 'sending')"
                " AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?",
                [iso(now), self.batch],
            )
            for key, status, due in rows:
                if due < stale_before:
                    conn.execute(
                        "UPDATE outbox SET status = 'skipped', last_error = ? WHERE key = ? AND status = ?"
                        " AND next_attempt_at = ?",
                        [
                            f"due since {due[:16]}Z, more than notify.max_age_minutes ago (was the hub stopped?):"
                            " not sent late",
                            key,
                            status,
                            due,
                        ],
                    )
                    self.stats.expired += 1
                    log.info("notify: message %s expired unsent (the hub was away)", key[:12])
                    continue
                cur = conn.execute(
                    "UPDATE outbox SET status = 'sending', attempts = attempts + 1, next_attempt_at = ?"
                    " WHERE key = ? AND status = ? AND next_attempt_at = ?",
                    [lease_end, key, status, due],
                )
                if cur.rowcount != 1:
                    continue  # another hub instance took it
                row = conn.one(
                    "SELECT school, person, day, kind, channel, recipients, body, attempts FROM outbox WHERE key = ?",
                    [key],
                )
                assert row is not None
                school, person, day, kind, channel, recipients, body, attempts = row
                message = Outgoing(key, school, person, day, kind, tuple(json.loads(recipients)), json.loads(body))
                claimed.append(Claimed(message, channel, int(attempts)))
        return claimed

    def _record(self, conn: Connection, item: Claimed, outcome: Outcome) -> None:
        now = utc_now()
        key = item.message.key
        where = " WHERE key = ? AND status = 'sending' AND attempts = ?"
        label = f"{item.message.kind} via {item.channel} (message {key[:12]}, attempt {item.attempts})"
        with conn.transaction():
            if outcome.status == "sent":
                conn.execute("UPDATE outbox SET status = 'sent', sent_at = ?" + where, [iso(now), key, item.attempts])
                self.stats.sent += 1
                log.debug("notify: sent %s", label)
                return
            if outcome.status == "retry" and item.attempts < self.notify.max_attempts:
                delay = backoff(item.attempts, self.notify.retry_min, self.notify.retry_max)
                if outcome.retry_after is not None:
                    delay = min(self.notify.retry_max, max(delay, outcome.retry_after))
                conn.execute(
                    "UPDATE outbox SET status = 'pending', next_attempt_at = ?, last_error = ?" + where,
                    [iso(now + timedelta(seconds=delay)), outcome.detail, key, item.attempts],
                )
                self.stats.retried += 1
                log.info("notify: %s not delivered (%s); next try in %.0f s", label, outcome.summary, delay)
                return
            conn.execute(
                "UPDATE outbox SET status = 'failed', last_error = ?" + where, [outcome.detail, key, item.attempts]
            )
            self.stats.failed += 1
            log.warning(
                "notify: %s failed for good (%s); see `edugate hub outbox --status failed`", label, outcome.summary
            )


def _safe_send(channel: Channel, message: Outgoing) -> Outcome:
    """A channel bug must cost one attempt, not the worker."""
    try:
        return channel.send(message)
    except Exception as exc:
        log.exception("notify: channel %s raised", channel.name)
        return Outcome("retry", f"internal error: {type(exc).__name__}: {exc}", "internal error")


def outbox_worker(store: Store, config: HubConfig) -> OutboxWorker:
    """The hub's delivery thread for parent messages (``start()``/``stop()``)."""
    return OutboxWorker(store, config)
