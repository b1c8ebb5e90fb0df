"""The gate: readers -> policy -> journal -> feedback, plus the daemon's lifecycle around it.

A tap is acknowledged only after its event is committed. All decisions and writes happen
on one worker thread, in arrival order, so the policy needs no locks and seq stays ordered.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance import __version__
from appliance.clock import Clock
from appliance.config import GateConfig
from appliance.events import Kind
from appliance.feedback import Ack, Feedback, Outcome, build_feedback
from appliance.journal import EventJournal, open_database
from appliance.journal.db import Database
from appliance.journal.events import JournalWriteError, journal_stats
from appliance.journal.roster_store import RosterStore
from appliance.policy import AttendancePolicy
from appliance.readers.base import CardReader, ReaderHealth, Tap
from appliance.readers.factory import build_readers
from appliance.sdnotify import Notifier
from appliance.status import STATUS_INTERVAL, disk_state, health_dicts, status_path, write_status

log = logging.getLogger(__name__)

_STOP = object()
PRUNE_INTERVAL = 3600.0
DISK_WARN_INTERVAL = 600.0


@dataclass
class Counters:
    taps: int = 0
    events: int = 0
    repeats: int = 0
    errors: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class Gate:
    """The tap pipeline, usable in-process (demo, bench, tests) and by the daemon."""

    def __init__(
        self,
        config: GateConfig,
        database: Database,
        feedback: Feedback,
        clock: Clock,
        readers: list[CardReader] | None = None,
    ) -> None:
        self.config = config
        self.database = database
        self.feedback = feedback
        self.clock = clock
        self.readers = readers or []
        self.journal = EventJournal(database, config.device.id)
        self.roster = RosterStore(database)
        self.policy = AttendancePolicy(config.policy)
        now = clock.now()
        self.policy.remember(self.journal.day_rows(now.date().isoformat()), now)
        self.counters = Counters()
        self.last_error: str | None = None
        self.listeners: list[Callable[[Tap, Ack], None]] = []
        self._queue: queue.Queue[Any] = queue.Queue()
        self._worker: threading.Thread | None = None

    def submit(self, tap: Tap) -> None:
        """Called from reader threads; never blocks them."""
        self._queue.put(tap)

    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="gate", daemon=True)
        self._worker.start()
        for reader in self.readers:
            reader.start(self.submit)

    def stop(self) -> None:
        for reader in self.readers:
            reader.stop()
        self._queue.put(_STOP)
        if self._worker is not None:
            self._worker.join(timeout=10)
        self.feedback.close()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every submitted tap has been handled (for scripts and tests)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._queue.unfinished_tasks

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                self.handle(item)
            except Exception as exc:
                log.exception("tap handling failed")
                self.counters.errors += 1
                self.last_error = f"tap handling failed: {exc}"
                self._acknowledge(
                    item, Ack(Outcome.ERROR, item.reader, self.clock.now().strftime("%H:%M"), detected=item.detected)
                )
            finally:
                self._queue.task_done()

    def handle(self, tap: Tap) -> Ack:
        """Decide, commit, then acknowledge: the student hears OK only for a committed event."""
        self.counters.taps += 1
        now = self.clock.now()
        time_text = now.strftime("%H:%M")
        person = self.roster.by_card(tap.uid)
        decision = self.policy.decide(
            tap.uid, person, tap.reader, tap.direction, now, self.clock.synced(), tap.detected
        )
        name = person.full_name if person else None
        if decision.draft is None:
            self.counters.repeats += 1
            outcome = (
                Outcome.UNKNOWN
                if person is None
                else (Outcome.REJECTED if decision.repeat_of is Kind.REJECTED else Outcome.REPEAT)
            )
            ack = Ack(outcome, tap.reader, time_text, decision.repeat_of, name, card_uid=tap.uid, detected=tap.detected)
            log.info("tap on %s: repeat within debounce, no new event", tap.reader)
        else:
            try:
                event = self.journal.append(decision.draft)
            except JournalWriteError as exc:
                self.counters.errors += 1
                self.last_error = str(exc)
                log.error("tap on %s NOT recorded: %s", tap.reader, exc)
                self.policy.forget(tap.uid, decision.draft)
                ack = Ack(
                    Outcome.ERROR,
                    tap.reader,
                    time_text,
                    decision.draft.kind,
                    name,
                    card_uid=tap.uid,
                    detected=tap.detected,
                )
                self._acknowledge(tap, ack)
                return ack
            self.last_error = None
            self.counters.events += 1
            kind = event.kind
            self.counters.by_kind[kind.value] = self.counters.by_kind.get(kind.value, 0) + 1
            outcome = {Kind.UNKNOWN_CARD: Outcome.UNKNOWN, Kind.REJECTED: Outcome.REJECTED}.get(kind, Outcome.OK)
            ack = Ack(
                outcome,
                tap.reader,
                time_text,
                kind,
                name,
                decision.draft.minutes_late or 0,
                event.seq,
                event.id,
                tap.uid,
                tap.detected,
            )
            log.info("tap on %s: %s recorded as seq %d", tap.reader, kind.value, event.seq)
            log.debug("seq %d: person=%s card=%s", event.seq, event.person, tap.uid)
        self._acknowledge(tap, ack)
        return ack

    def _acknowledge(self, tap: Tap, ack: Ack) -> None:
        self.feedback.show(ack)
        for listener in self.listeners:
            listener(tap, ack)

    def reader_health(self) -> list[ReaderHealth]:
        return [h for reader in self.readers for h in reader.health()]


class Daemon:
    """``edugate run``: the gate plus signals, systemd notifications, status file, pruning, disk checks."""

    def __init__(self, config: GateConfig) -> None:
        self.config = config
        self.database = open_database(config.journal.path, writer=True)
        self.clock = Clock(config.zone, config.clock.assume_synced)
        feedback = build_feedback(config.feedback, config.device.language)
        self.gate = Gate(config, self.database, feedback, self.clock, build_readers(config.readers))
        self.notifier = Notifier()
        self.status_file = status_path(config.journal.path)
        self.started = time.time()
        self._stop = threading.Event()
        self._last_prune = 0.0
        self._last_disk_warning = 0.0

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.request_stop)
        if self.database.salvaged_from is not None:
            log.error("journal was damaged and rebuilt; the damaged file is kept at %s", self.database.salvaged_from)
        self.gate.start()
        log.info(
            "edugate %s started: device %s, %d reader(s), journal %s",
            __version__,
            self.config.device.id,
            len(self.config.readers),
            self.config.journal.path,
        )
        self.notifier.notify("READY=1", f"STATUS=serving {len(self.config.readers)} reader(s)")
        interval = STATUS_INTERVAL
        if self.notifier.watchdog_seconds:
            interval = min(interval, self.notifier.watchdog_seconds / 2)
        try:
            while not self._stop.is_set():
                self.tick()
                self._stop.wait(interval)
        finally:
            self.notifier.notify("STOPPING=1")
            self.gate.stop()
            self.write_status(stopping=True)
            self.database.close()
            log.info("edugate stopped")

    def tick(self) -> None:
        """Periodic work: watchdog (only while the worker lives), status file, disk, retention."""
        worker = self.gate._worker
        if worker is not None and worker.is_alive():
            self.notifier.notify("WATCHDOG=1")
        now = time.monotonic()
        disk = disk_state(self.config.journal.path, self.config.journal.min_free_mb)
        if disk.low and now - self._last_disk_warning > DISK_WARN_INTERVAL:
            self._last_disk_warning = now
            log.warning(
                "DISK NEARLY FULL: %d MB free under %s (limit %d MB); unsynced events are kept, "
                "free space or sync soon",
                disk.free_mb,
                self.config.journal.path.parent,
                self.config.journal.min_free_mb,
            )
        if now - self._last_prune > PRUNE_INTERVAL:
            self._last_prune = now
            try:
                pruned = self.gate.journal.prune_synced(self.config.journal.retention_days, self.clock.now())
                if pruned:
                    log.info("pruned %d synced events older than %d days", pruned, self.config.journal.retention_days)
            except Exception as exc:
                log.warning("pruning failed: %s", exc)
        try:
            self.write_status()
        except OSError as exc:
            log.warning("cannot write status file %s: %s", self.status_file, exc)

    def write_status(self, stopping: bool = False) -> None:
        disk = disk_state(self.config.journal.path, self.config.journal.min_free_mb)
        counters = self.gate.counters
        write_status(
            self.status_file,
            {
                "version": __version__,
                "pid": 0 if stopping else os.getpid(),
                "device": self.config.device.id,
                "started": self.started,
                "updated": time.time(),
                "readers": health_dicts(self.gate.reader_health()),
                "clock_ok": self.clock.synced(),
                "disk": {
                    "free_mb": disk.free_mb,
                    "total_mb": disk.total_mb,
                    "low": disk.low,
                    "min_free_mb": self.config.journal.min_free_mb,
                },
                "journal": {
                    "last_error": self.gate.last_error,
                    "salvaged_from": str(self.database.salvaged_from or "") or None,
                },
                "counters": {
                    "taps": counters.taps,
                    "events": counters.events,
                    "repeats": counters.repeats,
                    "errors": counters.errors,
                },
            },
        )


def stats_dict(database: Database) -> dict[str, Any]:
    stats = journal_stats(database)
    return {
        "events": stats.events,
        "unsynced": stats.unsynced,
        "last_seq": stats.last_seq,
        "oldest_unsynced": stats.oldest_unsynced_ts,
        "bytes": stats.file_bytes,
    }
