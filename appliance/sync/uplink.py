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

import contextlib
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from appliance.journal.events import EventJournal
from appliance.sync.transport import NO_SUBSCRIBERS, MqttTransport

log = logging.getLogger(__name__)

MARK_EVERY = 0.05  # seconds: acks are written to the journal at most this late...
MARK_BATCH = 256  # ...or as soon as this many are waiting
REJECTED_PAUSE = 30.0  # seconds before retrying events the broker refused (an ACL problem needs IT)
NO_SUBSCRIBER_PAUSE = 5.0  # seconds before retrying events nobody was subscribed to (the hub is starting)


@dataclass
class _Resync:
    first: int
    last: int | None
    done: threading.Event = field(default_factory=threading.Event)
    count: int = 0
    error: BaseException | None = None


class Uplink:
    """All uplink state belongs to the uplink thread; other threads only queue acks and requests.

    paho may deliver a PUBACK before ``publish()`` has returned its mid to us, so acks are queued
    and matched on this thread, after the mid was registered. Rewinds (a resync, a refused
    event) are applied here too, between two reads, so none is overwritten by a read in flight.
    """

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
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._acks: queue.SimpleQueue[tuple[int, str | None]] = queue.SimpleQueue()
        self._requests: queue.SimpleQueue[_Resync] = queue.SimpleQueue()
        self._inflight: dict[int, int] = {}  # mid -> seq
        self._acked: list[int] = []
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
        """From paho's network thread: queue it for the uplink thread."""
        self._acks.put((mid, error))
        self._wake.set()

    def on_online(self, session_present: bool) -> None:
        if not session_present:
            log.info("sync: the broker had no session for this gate; in-flight events are sent again")
        self._wake.set()

    def resync(self, from_seq: int, to_seq: int | None = None, timeout: float = 30.0) -> int:
        """Send events ``from_seq``..``to_seq`` again (the hub lost them); returns how many."""
        request = _Resync(from_seq, to_seq)
        self._requests.put(request)
        self._wake.set()
        if not request.done.wait(timeout):
            raise TimeoutError("the uplink did not take the resync request in time")
        if request.error is not None:
            raise request.error
        return request.count

    def inflight(self) -> int:
        return len(self._inflight)

    # -- the uplink thread ----------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._take_acks()
        with contextlib.suppress(sqlite3.Error):
            self._flush_acks()
        self._reader.close()

    def _run(self) -> None:
        last_mark = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(MARK_EVERY if self._acked else 1.0)
            self._wake.clear()
            try:
                self._take_acks()
                self._take_requests()
                now = time.monotonic()
                if len(self._acked) >= MARK_BATCH or (self._acked and now - last_mark >= MARK_EVERY):
                    self._flush_acks()
                    last_mark = now
                self._pump()
            except sqlite3.Error as exc:
                self.last_error = f"journal: {exc}"
                log.error("sync: cannot read or mark the journal: %s", exc)
                self._stop.wait(1.0)

    def _take_acks(self) -> None:
        while True:
            try:
                mid, error = self._acks.get_nowait()
            except queue.Empty:
                return
            seq = self._inflight.pop(mid, None)
            if seq is None:
                continue  # a status or result message, not an event
            if error is None:
                self._acked.append(seq)
                if self.last_error is not None and not self.last_error.startswith("journal"):
                    self.last_error = None
                self._logged_cause = None
                continue
            # Not delivered (refused by the ACL, or nobody subscribed): keep it unsynced, retry later.
            self._next_seq = 0
            if error == NO_SUBSCRIBERS:
                self._paused_until = time.monotonic() + NO_SUBSCRIBER_PAUSE
                self.last_error = f"event seq {seq} not delivered: {error}"
            else:
                self._paused_until = time.monotonic() + REJECTED_PAUSE
                self.last_error = f"broker refused event seq {seq}: {error}; check the broker's ACL for this gate"
            if error != self._logged_cause:
                self._logged_cause = error
                log.error("sync: %s", self.last_error)

    def _take_requests(self) -> None:
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                self._flush_acks()  # else acks flushed after the reset would mark the range synced again
                request.count = self.journal.mark_unsynced(request.first, request.last)
                self._next_seq = 0
            except BaseException as exc:
                request.error = exc
            finally:
                request.done.set()

    def _pump(self) -> None:
        """Publish unsynced events until the window is full, the link drops or nothing is left."""
        while not self._stop.is_set() and self.transport.connected.is_set():
            if time.monotonic() < self._paused_until:
                return
            room = self.window - len(self._inflight)
            if room <= 0:
                return
            rows = self._read(self._next_seq, min(room, self.batch))
            if not rows:
                return
            for seq, payload in rows:
                mid = self.transport.publish(self.topic, payload)
                if mid is None:
                    return  # link went down: resume from this seq when it is back
                self._inflight[mid] = seq
                self._next_seq = seq + 1
                self.published += 1
            self._take_acks()
            if len(self._acked) >= MARK_BATCH:
                self._flush_acks()

    def _read(self, start: int, limit: int) -> list[tuple[int, bytes]]:
        if start == 0:
            row = self._reader.execute("SELECT MIN(seq) FROM events WHERE synced_at IS NULL").fetchone()
            if row[0] is None:
                return []
            start = row[0]
            # What is still in flight is unsynced too; it is not read again (paho resends it itself).
            flying = set(self._inflight.values())
            rows = self._reader.execute(
                "SELECT seq, payload FROM events WHERE synced_at IS NULL AND seq >= ? ORDER BY seq LIMIT ?",
                [start, limit + len(flying)],
            ).fetchall()
            return [(seq, payload.encode("utf-8")) for seq, payload in rows if seq not in flying][:limit]
        rows = self._reader.execute(
            "SELECT seq, payload FROM events WHERE synced_at IS NULL AND seq >= ? ORDER BY seq LIMIT ?",
            [start, limit],
        ).fetchall()
        return [(seq, payload.encode("utf-8")) for seq, payload in rows]

    def _flush_acks(self) -> None:
        """Write the acks to the journal; if that fails they stay queued for the next try."""
        if not self._acked:
            return
        seqs = self._acked
        self.journal.mark_synced(seqs, datetime.now(UTC).isoformat(timespec="seconds"))
        self._acked = []
        self.acked_total += len(seqs)
        self.last_synced_seq = max(self.last_synced_seq, max(seqs))
