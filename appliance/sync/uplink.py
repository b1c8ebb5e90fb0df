"""Journal -> broker: every event, in seq order, marked synced only when the broker has it.

The journal is the queue. The uplink keeps at most ``window`` events published but not yet
acknowledged (PUBACK); everything else stays on disk, so a backlog of days costs no memory.
It reads the journal in batches from the first unsynced seq, and a commit at the gate wakes
it at once (the live path). An event is marked synced only after its PUBACK, in batched
transactions, so a crash between the two resends a few events (the hub drops duplicates by
id) and never loses one. After a reconnect paho resends what was in flight itself, so the
uplink just continues; after a restart it starts again from the first unsynced seq.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

from appliance.journal.events import EventJournal
from appliance.sync.transport import NO_SUBSCRIBERS, MqttTransport

log = logging.getLogger(__name__)

MARK_EVERY = 0.05  # seconds: acks are written to the journal at most this late...
MARK_BATCH = 256  # ...or as soon as this many are waiting
REJECTED_PAUSE = 30.0  # seconds before retrying events the broker refused (an ACL problem needs IT)
NO_SUBSCRIBER_PAUSE = 5.0  # seconds before retrying events nobody was subscribed to (the hub is starting)


class Uplink:
    def __init__(
        self,
        journal: EventJournal,
        journal_path: Path,
        transport: MqttTransport,
        topic: str,
        window: int,
        batch: int,
    ) -> None:
        self.journal = journal
        self.transport = transport
        self.topic = topic
        self.window = window
        self.batch = batch
        self._reader = sqlite3.connect(f"file:{journal_path}?mode=ro", uri=True, check_same_thread=False)
        self._reader.execute("PRAGMA busy_timeout = 5000")
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._inflight: dict[int, int] = {}  # mid -> seq
        self._acked: deque[int] = deque()
        self._next_seq = 0  # next seq to read; 0 = from the first unsynced
        self._paused_until = 0.0
        self._thread: threading.Thread | None = None
        self.published = 0
        self.acked_total = 0
        self.last_synced_seq = 0
        self.last_error: str | None = None
        self._logged_cause: str | None = None

    # -- called from other threads -------------------------------------------------------
    def wake(self) -> None:
        """A new event was committed (or the link came back): publish without waiting."""
        self._wake.set()

    def on_ack(self, mid: int, error: str | None) -> None:
        log_it = False
        with self._lock:
            seq = self._inflight.pop(mid, None)
            if seq is None:
                return  # a status or result message, not an event
            if error is None:
                self._acked.append(seq)
                self.last_error = None
                self._logged_cause = None
            else:
                # Not delivered (refused by the ACL, or nobody subscribed): keep it unsynced, retry later.
                self._next_seq = 0
                if error == NO_SUBSCRIBERS:
                    self._paused_until = time.monotonic() + NO_SUBSCRIBER_PAUSE
                    self.last_error = f"event seq {seq} not delivered: {error}"
                else:
                    self._paused_until = time.monotonic() + REJECTED_PAUSE
                    self.last_error = f"broker refused event seq {seq}: {error}; check the broker's ACL for this gate"
                log_it, self._logged_cause = error != self._logged_cause, error
        if log_it:
            log.error("sync: %s", self.last_error)
        self._wake.set()

    def on_online(self, session_present: bool) -> None:
        with self._lock:
            if not session_present:
                log.info("sync: the broker had no session for this gate; in-flight events are sent again")
        self._wake.set()

    def resync(self, from_seq: int, to_seq: int | None = None) -> int:
        """Send events ``from_seq``..``to_seq`` again (the hub lost them); returns how many."""
        self._flush_acks()
        count = self.journal.mark_unsynced(from_seq, to_seq)
        with self._lock:
            self._next_seq = 0
        self._wake.set()
        return count

    # -- the uplink thread ----------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._flush_acks()
        self._reader.close()

    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def _run(self) -> None:
        last_mark = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(MARK_EVERY if self._acked else 1.0)
            self._wake.clear()
            try:
                now = time.monotonic()
                if len(self._acked) >= MARK_BATCH or (self._acked and now - last_mark >= MARK_EVERY):
                    self._flush_acks()
                    last_mark = now
                self._pump()
            except sqlite3.Error as exc:
                self.last_error = f"journal: {exc}"
                log.error("sync: cannot read or mark the journal: %s", exc)
                self._stop.wait(1.0)

    def _pump(self) -> None:
        """Publish unsynced events until the window is full, the link drops or nothing is left."""
        while not self._stop.is_set() and self.transport.connected.is_set():
            with self._lock:
                if time.monotonic() < self._paused_until:
                    return
                room = self.window - len(self._inflight)
                start = self._next_seq
            if room <= 0:
                return
            rows = self._read(start, min(room, self.batch))
            if not rows:
                return
            for seq, payload in rows:
                mid = self.transport.publish(self.topic, payload)
                if mid is None:
                    return  # link went down: resume from this seq when it is back
                with self._lock:
                    self._inflight[mid] = seq
                    self._next_seq = seq + 1
                    self.published += 1
            if len(self._acked) >= MARK_BATCH:
                self._flush_acks()

    def _read(self, start: int, limit: int) -> list[tuple[int, bytes]]:
        if start == 0:
            row = self._reader.execute("SELECT MIN(seq) FROM events WHERE synced_at IS NULL").fetchone()
            if row[0] is None:
                return []
            start = row[0]
        rows = self._reader.execute(
            "SELECT seq, payload FROM events WHERE synced_at IS NULL AND seq >= ? ORDER BY seq LIMIT ?",
            [start, limit],
        ).fetchall()
        return [(seq, payload.encode("utf-8")) for seq, payload in rows]

    def _flush_acks(self) -> None:
        with self._lock:
            seqs = list(self._acked)
            self._acked.clear()
        if not seqs:
            return
        self.journal.mark_synced(seqs, datetime.now(UTC).isoformat(timespec="seconds"))
        self.acked_total += len(seqs)
        self.last_synced_seq = max(self.last_synced_seq, max(seqs))
