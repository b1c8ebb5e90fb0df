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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance import __version__
from appliance.clock import Clock
from appliance.config import ConfigError, GateConfig, load_config
from appliance.events import Event, EventDraft, Kind, Method
from appliance.feedback import Ack, MultiFeedback, Outcome, build_feedback
from appliance.journal import EventJournal, open_database
from appliance.journal.db import Database
from appliance.journal.events import JournalWriteError, journal_stats
from appliance.journal.roster_store import RosterStore
from appliance.policy import AttendancePolicy
from appliance.readers.base import CardReader, ReaderHealth, Tap
from appliance.readers.factory import build_readers
from appliance.roster.model import Role
from appliance.sdnotify import Notifier
from appliance.status import STATUS_INTERVAL, disk_state, health_dicts, status_path, write_status
from appliance.vision.decisions import FaceDecision, Verdict

if TYPE_CHECKING:
    from appliance.face_gate import FaceGate
    from appliance.sync.service import SyncService

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class _Reconfigure:
    config: GateConfig
    feedback: MultiFeedback
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


PRUNE_INTERVAL = 3600.0
FACE_READER = "camera"
DISK_WARN_INTERVAL = 600.0
SALVAGE_EXTEND_SECONDS = 30.0  # asked for at each salvage progress report (sent at least every 2 s)


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
        feedback: MultiFeedback,
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
        self.listeners: list[Callable[[Tap | FaceDecision, Ack], None]] = []
        self.faces: FaceGate | None = None
        self._queue: queue.Queue[Any] = queue.Queue()
        self._worker: threading.Thread | None = None

    def reconfigure(self, config: GateConfig, timeout: float = 10.0) -> None:
        """New policy and feedback from the hub or a reload, applied by the tap worker between two taps.

        The new feedback is built first, on the caller's thread: if it cannot be built (a GPIO pin
        taken, a library missing) this raises and nothing changes.
        """
        feedback = self.feedback
        if config.feedback != self.config.feedback:
            feedback = build_feedback(config.feedback, config.device.language, previous=self.feedback)
        change = _Reconfigure(config, feedback)
        if self._worker is None or not self._worker.is_alive():
            self._apply(change)
        else:
            self._queue.put(change)
            if not change.done.wait(timeout):
                raise TimeoutError("the tap worker did not take the new configuration in time")
        if change.error is not None:
            if feedback is not self.feedback:
                feedback.close_unless_in(self.feedback)
            raise change.error

    def _apply(self, change: _Reconfigure) -> None:
        """On the worker: rebuild the policy's memory of today and swap, with no tap in between."""
        try:
            policy = AttendancePolicy(change.config.policy)
            now = self.clock.now()
            policy.remember(self.journal.day_rows(now.date().isoformat()), now)
            old_feedback = self.feedback
            self.policy, self.feedback, self.config = policy, change.feedback, change.config
            if self.feedback is not old_feedback:
                old_feedback.close_unless_in(self.feedback)
        except Exception as exc:
            change.error = exc  # nothing swapped: the caller refuses the change and closes what it built
        finally:
            change.done.set()

    def submit(self, tap: Tap) -> None:
        """Called from reader threads; never blocks them."""
        self._queue.put(tap)

    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="gate", daemon=True)
        self._worker.start()
        for reader in self.readers:
            reader.start(self.submit)
        if self.faces is not None:
            self.faces.start()

    def stop(self) -> None:
        for reader in self.readers:
            reader.stop()
        if self.faces is not None:
            self.faces.stop()
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
                if isinstance(item, _Reconfigure):
                    self._apply(item)
                    continue
                self.handle(item)
            except Exception as exc:
                log.exception("tap handling failed")
                self.counters.errors += 1
                self.last_error = f"tap handling failed: {exc}"
                reader = item.reader if isinstance(item, Tap) else FACE_READER
                detected = item.detected if isinstance(item, Tap) else None
                now = self.clock.now().strftime("%H:%M")
                self._acknowledge(item, Ack(Outcome.ERROR, reader, now, detected=detected))
            finally:
                self._queue.task_done()

    def handle(self, item: Tap | FaceDecision) -> Ack | None:
        """Decide, commit, then acknowledge: the student hears OK only for a committed event."""
        if isinstance(item, FaceDecision):
            return self._handle_face(item)
        tap = item
        self.counters.taps += 1
        now = self.clock.now()
        person = self.roster.by_card(tap.uid)
        decision = self.policy.decide(
            tap.uid, person, tap.reader, tap.direction, now, self.clock.synced(), tap.detected
        )
        name = person.full_name if person else None
        base = Ack(Outcome.OK, tap.reader, now.strftime("%H:%M"), name=name, card_uid=tap.uid, detected=tap.detected)
        if decision.draft is None:
            self.counters.repeats += 1
            outcome = (
                Outcome.UNKNOWN
                if person is None
                else (Outcome.REJECTED if decision.repeat_of is Kind.REJECTED else Outcome.REPEAT)
            )
            ack = replace(base, outcome=outcome, kind=decision.repeat_of)
            log.info("tap on %s: repeat within debounce, no new event", tap.reader)
            self._acknowledge(tap, ack)
            return ack
        drafts, refused = self._with_face_check(decision.draft)
        if refused:
            self.policy.forget(tap.uid, decision.draft)
        return self._commit(tap, base, drafts, refused, forget=lambda d: self.policy.forget(tap.uid, d))

    def _with_face_check(self, draft: EventDraft) -> tuple[list[EventDraft], bool]:
        """Card + face: verify 1:1 that the face at the camera is the cardholder's (when faces are on)."""
        if self.faces is None or draft.person is None or draft.kind in (Kind.REJECTED, Kind.UNKNOWN_CARD):
            return [draft], False
        check = self.faces.verify(draft.person)
        if check.verdict is Verdict.MATCH:
            return [replace(draft, method=Method.CARD_FACE, face_score=check.score)], False
        if check.verdict is not Verdict.MISMATCH:
            return [draft], False
        mismatch = replace(draft, kind=Kind.CARD_FACE_MISMATCH, face_score=check.score, late=None, minutes_late=None)
        log.warning("tap on %s: the face does not match the cardholder (score %.2f)", draft.reader, check.score)
        if self.config.vision.card_face == "refuse":
            return [mismatch], True
        return [replace(draft, face_score=check.score), mismatch], False

    def _handle_face(self, decision: FaceDecision) -> Ack | None:
        now = self.clock.now()
        direction = self.config.vision.camera_direction
        if not decision.accepted:
            if not self.config.vision.unknown_face_events:
                return None
            draft = EventDraft(
                kind=Kind.UNKNOWN_FACE,
                ts=now.isoformat(timespec="milliseconds"),
                clock_ok=self.clock.synced(),
                method=Method.FACE,
                reader=FACE_READER,
                direction=direction,
                face_score=round(decision.score, 4),
            )
            self._append(draft)
            return None
        person = self.roster.get(decision.person) if decision.person else None
        if person is None or person.role is not Role.STAFF:
            return None  # students check in with their card; their face only verifies it
        result = self.policy.decide_face(person, direction, now, self.clock.synced(), decision.score, FACE_READER)
        base = Ack(Outcome.OK, FACE_READER, now.strftime("%H:%M"), name=person.full_name)
        if result.draft is None:
            return None  # the same staff member still in front of the camera: nothing to say again
        return self._commit(decision, base, [result.draft], False, forget=lambda _d: None)

    def _append(self, draft: EventDraft) -> Event | None:
        try:
            event = self.journal.append(draft)
        except JournalWriteError as exc:
            self.counters.errors += 1
            self.last_error = str(exc)
            log.error("%s on %s NOT recorded: %s", draft.kind.value, draft.reader, exc)
            return None
        self.last_error = None
        self.counters.events += 1
        self.counters.by_kind[event.kind.value] = self.counters.by_kind.get(event.kind.value, 0) + 1
        log.info("%s on %s: %s recorded as seq %d", event.draft.method.value, draft.reader, event.kind.value, event.seq)
        log.debug("seq %d: person=%s card=%s", event.seq, event.person, draft.card_uid)
        return event

    def _commit(
        self,
        item: Tap | FaceDecision,
        base: Ack,
        drafts: list[EventDraft],
        refused: bool,
        forget: Callable[[EventDraft], None],
    ) -> Ack:
        """Journal the drafts in order; acknowledge by the first one (the check-in itself)."""
        first: Event | None = None
        for draft in drafts:
            event = self._append(draft)
            if event is None:
                forget(draft)
                ack = replace(base, outcome=Outcome.ERROR, kind=draft.kind)
                self._acknowledge(item, ack)
                return ack
            first = first or event
        assert first is not None
        kind = first.kind
        outcome = {
            Kind.UNKNOWN_CARD: Outcome.UNKNOWN,
            Kind.REJECTED: Outcome.REJECTED,
            Kind.CARD_FACE_MISMATCH: Outcome.REJECTED,
        }.get(kind, Outcome.OK)
        ack = replace(
            base,
            outcome=outcome,
            kind=kind,
            minutes_late=first.draft.minutes_late or 0,
            seq=first.seq,
            event_id=first.id,
        )
        self._acknowledge(item, ack)
        return ack

    def _acknowledge(self, item: Tap | FaceDecision, ack: Ack) -> None:
        self.feedback.show(ack)
        for listener in self.listeners:
            listener(item, ack)

    def reader_health(self) -> list[ReaderHealth]:
        return [h for reader in self.readers for h in reader.health()]


class Daemon:
    """``edugate run``: the gate plus signals, systemd notifications, status file, pruning, disk checks."""

    def __init__(self, config: GateConfig, config_path: Path | None = None) -> None:
        self.config_path = config_path
        self.file_config = config
        self.notifier = Notifier()
        # A damaged journal is salvaged right here, before READY=1: each sign of progress buys time from systemd.
        self.database = open_database(
            config.journal.path,
            writer=True,
            progress=lambda status: self.notifier.extend_start(SALVAGE_EXTEND_SECONDS, status),
        )
        config = self._with_hub_config(config)
        try:
            feedback = build_feedback(config.feedback, config.device.language)
        except Exception as exc:
            if config is self.file_config:
                raise
            log.error("the hub's feedback settings cannot be used here (%s); using gate.toml's", exc)
            config = self.file_config
            feedback = build_feedback(config.feedback, config.device.language)
        self.config = config
        self.clock = Clock(config.zone, config.clock.assume_synced)
        self.gate = Gate(config, self.database, feedback, self.clock, build_readers(config.readers))
        self.vision_error: str | None = None
        if config.vision.enabled:
            self._attach_faces()
        self.sync: SyncService | None = None
        self.sync_error: str | None = None
        if config.sync.enabled:
            self._attach_sync()
        self.status_file = status_path(config.journal.path)
        self.started = time.time()
        self._stop = threading.Event()
        self._last_prune = 0.0
        self._last_disk_warning = 0.0

    def _attach_faces(self) -> None:
        """Models, gallery and camera; any failure leaves a card-only gate and says so in status."""
        try:
            from appliance.face_gate import FaceGate
            from appliance.vision.camera import Camera, CameraSettings

            readonly = open_database(self.config.journal.path, readonly=True)
            camera = Camera(CameraSettings(source=self.config.vision.camera))
            self.gate.faces = FaceGate.from_config(self.config.vision, readonly, camera, self.gate.submit)
        except Exception as exc:
            self.vision_error = f"face recognition unavailable, cards only: {exc}"
            log.error("%s", self.vision_error)

    def _attach_sync(self) -> None:
        """The MQTT uplink; a sync that cannot start leaves events safe in the journal and says why."""
        try:
            from appliance.sync.downlink import Hooks
            from appliance.sync.service import SyncService

            hooks = Hooks(
                config_changed=self.apply_config,
                reload=self.reload,
                rotate_logs=reopen_log_files,
                template_size=self._template_size,
            )
            self.sync = SyncService(
                self.config,
                self.gate.journal,
                self._sync_status_source,
                hooks,
                clock_ok=self.clock.synced,
                base_config=lambda: self.file_config,
            )
            self.gate.listeners.append(self.sync.wake)
        except Exception as exc:
            self.sync_error = f"sync unavailable, events stay in the journal: {exc}"
            log.error("%s", self.sync_error)

    def _with_hub_config(self, config: GateConfig) -> GateConfig:
        """gate.toml with the sections the hub set laid over it (a bad overlay is ignored, loudly)."""
        from appliance.sync.downlink import hub_config_sections, overlay

        try:
            return overlay(config, hub_config_sections(self.database.conn))
        except ConfigError as exc:
            log.error("the hub's config no longer fits gate.toml, using gate.toml alone: %s", exc)
            return config

    def apply_config(self, config: GateConfig) -> None:
        """Raises (and changes nothing) if the new settings cannot run here."""
        self.gate.reconfigure(config)
        self.config = config
        log.info("configuration changed: policy and feedback applied")

    def reload(self) -> str:
        """Read gate.toml again (plus the hub's sections) and apply what can change live."""
        if self.config_path is None:
            return "nothing to reload: started without a config file"
        fresh = load_config(self.config_path)
        for section in ("device", "journal", "readers", "sync"):
            if getattr(fresh, section) != getattr(self.file_config, section):
                log.warning("reload: [%s] changed in %s; restart edugate to apply it", section, self.config_path)
        self.file_config = fresh
        self.apply_config(self._with_hub_config(fresh))
        return "policy and feedback reloaded"

    def _template_size(self, model: str) -> int | None:
        """Values per template of ``model`` when it is the face model running here (else unknown)."""
        faces = self.gate.faces
        if faces is None or faces.service.engine.model_name != model:
            return None
        return faces.service.pack.embedding_size

    def _sync_status_source(self) -> dict[str, Any]:
        return {
            "readers": health_dicts(self.gate.reader_health()),
            "camera": self._vision_status(),
            "clock_ok": self.clock.synced(),
        }

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def _on_hup(self, *_: object) -> None:
        threading.Thread(target=self._reload_logged, name="reload", daemon=True).start()

    def _reload_logged(self) -> None:
        try:
            log.info("SIGHUP: %s", self.reload())
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.request_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        if self.database.salvaged_from is not None:
            log.error("journal was damaged and rebuilt; the damaged file is kept at %s", self.database.salvaged_from)
        self.gate.start()
        if self.sync is not None:
            self.sync.start()
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
            if self.sync is not None:
                self.sync.stop()
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
                "vision": self._vision_status(),
                "sync": self._sync_health(),
                "counters": {
                    "taps": counters.taps,
                    "events": counters.events,
                    "repeats": counters.repeats,
                    "errors": counters.errors,
                },
            },
        )

    def _sync_health(self) -> dict[str, Any] | None:
        if self.sync_error:
            return {"state": "error", "last_error": self.sync_error}
        return self.sync.health() if self.sync is not None else None

    def _vision_status(self) -> dict[str, Any] | None:
        if self.vision_error:
            return {"state": "error", "detail": self.vision_error}
        return self.gate.faces.health() if self.gate.faces is not None else None


def reopen_log_files() -> str:
    """Close file log handlers so the next line reopens the file (after logrotate moved it)."""
    reopened = 0
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                handler.close()
            finally:
                handler.release()
            reopened += 1
    if not reopened:
        return "logs go to stderr (the systemd journal rotates them); nothing to reopen"
    return f"{reopened} log file(s) reopened"


def stats_dict(database: Database) -> dict[str, Any]:
    stats = journal_stats(database)
    return {
        "events": stats.events,
        "unsynced": stats.unsynced,
        "last_seq": stats.last_seq,
        "oldest_unsynced": stats.oldest_unsynced_ts,
        "bytes": stats.file_bytes,
    }
