"""``edugate bench tap``: card on the reader -> committed event -> feedback, through a real pcscd.

A private pcscd with the vpcd virtual reader gives two lanes; virtual cards are put on and taken
off both lanes in parallel while an in-process Gate (real PcscReaders, policy, journal on disk)
handles them. Two latencies are reported:

- ``tap_ms``: feedback time minus ``Tap.detected`` (when pcscd told our reader thread about the
  card): UID read through pcscd+vpcd, roster lookup, policy, fsynced commit, feedback. Ours.
- ``insert_to_ack_ms``: feedback time minus the moment the card was inserted. It adds pcscd's
  presence polling (a vpcd slot is polled every ~400 ms), which is pcscd's, not ours.

A same-run baseline of bare SCardConnect + GET UID + SCardDisconnect on a present card shows what
the PC/SC transport alone costs. Run it in its own process: libpcsclite reads
PCSCLITE_CSOCK_NAME once, so the bench must set it before anything talks PC/SC.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.bench.errors import BenchError
from appliance.bench.sigterm import sigterm_interrupts
from appliance.bench.stats import emit, machine_info, progress, summary
from appliance.events import EventDraft
from appliance.feedback import Ack, MultiFeedback, Outcome
from appliance.readers.base import Tap
from appliance.readers.virtual import PrivatePcscd, VirtualCard

TARGET_TAP_MS_P99 = 50
ACK_TIMEOUT = 3.0  # a card is noticed within one ~0.4 s poll; far beyond that it was missed
REMOVAL_TIMEOUT = 2.0
POLL_PERIOD = 0.4  # pcscd's presence polling of a vpcd slot
BASELINE_READS = 200
GET_UID_APDU = [0xFF, 0xCA, 0x00, 0x00, 0x00]
LANES = ("lane0", "lane1")


@dataclass
class TapRecord:
    """One insertion on one lane and what became of it (times are ``time.monotonic()``)."""

    lane: str
    uid: str
    inserted: float
    acked: float | None = None
    detected: float | None = None
    submitted: float | None = None
    commit_ms: float | None = None
    seq: int | None = None
    outcome: str | None = None


class RecordingFeedback:
    """The gate's feedback: notes when each ack was shown and hands it to the lane waiting for it."""

    def __init__(self, lanes: tuple[str, ...]) -> None:
        self.queues: dict[str, queue.Queue[tuple[Ack, float]]] = {lane: queue.Queue() for lane in lanes}
        self.unexpected: list[Ack] = []

    def show(self, ack: Ack) -> None:
        shown = time.monotonic()
        target = self.queues.get(ack.reader)
        if target is None:
            self.unexpected.append(ack)
        else:
            target.put((ack, shown))

    def close(self) -> None:
        pass


class PresenceWatcher:
    """Our own PC/SC client on the lanes, so a lane knows when pcscd has really seen its card leave.

    It tracks each reader's event counter (upper 16 bits of the state: +1 per insertion and per
    removal), which also catches changes that happened between two wake-ups.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self._cond = threading.Condition()
        self._state: dict[str, tuple[int, bool, float]] = {}
        self._stop = threading.Event()
        self._context: int | None = None
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def start(self, timeout: float = 10.0) -> None:
        from smartcard import scard

        hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if hresult != scard.SCARD_S_SUCCESS:
            raise BenchError(f"cannot reach the bench pcscd: 0x{hresult & 0xFFFFFFFF:08X}")
        self._context = context
        self._thread = threading.Thread(target=self._run, name="bench-presence", daemon=True)
        self._thread.start()
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._state) == len(self.names) or self.error, timeout):
                raise BenchError("the presence watcher got no reader state from pcscd")
        if self.error:
            raise BenchError(f"presence watcher: {self.error}")

    def _run(self) -> None:
        from smartcard import scard

        states = [(name, scard.SCARD_STATE_UNAWARE) for name in self.names]
        while not self._stop.is_set():
            hresult, new_states = scard.SCardGetStatusChange(self._context, 2000, states)
            code = hresult & 0xFFFFFFFF
            if code == scard.SCARD_E_TIMEOUT & 0xFFFFFFFF:
                continue
            if code != scard.SCARD_S_SUCCESS:
                with self._cond:
                    if not self._stop.is_set():
                        self.error = f"SCardGetStatusChange failed: 0x{code:08X}"
                    self._cond.notify_all()
                return
            now = time.monotonic()
            with self._cond:
                for name, event_state, _atr in new_states:
                    present = bool(event_state & scard.SCARD_STATE_PRESENT)
                    self._state[name] = (event_state >> 16, present, now)
                self._cond.notify_all()
            states = [(name, event_state & ~scard.SCARD_STATE_CHANGED) for name, event_state, _ in new_states]

    def counter(self, name: str) -> int:
        with self._cond:
            return self._state[name][0]

    def wait(self, name: str, present: bool, since_counter: int, changes: int, timeout: float) -> float | None:
        """Wait until ``name`` shows ``present`` after at least ``changes`` events since ``since_counter``.

        Returns when pcscd reported that state (monotonic), or None on timeout.
        """

        def reached() -> bool:
            counter, now_present, _ = self._state[name]
            return now_present == present and (counter - since_counter) % 0x10000 >= changes

        with self._cond:
            if self._cond.wait_for(lambda: reached() or self.error is not None, timeout) and reached():
                return self._state[name][2]
        return None

    def stop(self) -> None:
        from smartcard import scard

        self._stop.set()
        if self._context is not None:
            scard.SCardCancel(self._context)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._context is not None:
            scard.SCardReleaseContext(self._context)
            self._context = None


def transport_reads(reader: str, uid: str, reads: int) -> list[float]:
    """Bare SCardConnect + GET UID + SCardDisconnect on a present card: the PC/SC floor of a tap, in ms."""
    from smartcard import scard

    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hresult != scard.SCARD_S_SUCCESS:
        raise BenchError(f"cannot reach the bench pcscd: 0x{hresult & 0xFFFFFFFF:08X}")
    expected = [*bytes.fromhex(uid), 0x90, 0x00]
    timings = []
    try:
        for _ in range(reads):
            began = time.perf_counter()
            hresult, handle, protocol = scard.SCardConnect(
                context, reader, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
            )
            if hresult != scard.SCARD_S_SUCCESS:
                raise BenchError(f"baseline SCardConnect failed: 0x{hresult & 0xFFFFFFFF:08X}")
            try:
                hresult, response = scard.SCardTransmit(handle, protocol, GET_UID_APDU)
            finally:
                scard.SCardDisconnect(handle, scard.SCARD_LEAVE_CARD)
            timings.append((time.perf_counter() - began) * 1000.0)
            if hresult != scard.SCARD_S_SUCCESS or response != expected:
                raise BenchError(f"baseline GET UID answered {response!r} (0x{hresult & 0xFFFFFFFF:08X})")
    finally:
        scard.SCardReleaseContext(context)
    return timings


def card_uid(index: int) -> str:
    """A distinct 7-byte NXP-style UID per insertion, so the debounce never swallows a bench tap."""
    return f"04{0xB0_0000_0000 + index:012X}"


def _ports_free(base: int) -> bool:
    """vpcd listens on all interfaces; if something else holds a slot port our cards would go there."""
    for port in (base, base + 1):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("", port))
            except OSError:
                return False
    return True


def _bench_config(journal: Path, pcscd: PrivatePcscd) -> Any:
    from appliance.config import parse_config

    whole_day = ["00:00", "23:59"]
    return parse_config(
        {
            "device": {"id": "bench-gate", "school": "bench-school"},
            "journal": {"path": str(journal), "min_free_mb": 1},
            "readers": [
                {"name": LANES[0], "type": "pcsc", "match": pcscd.slot_name(0), "direction": "in"},
                {"name": LANES[1], "type": "pcsc", "match": pcscd.slot_name(1), "direction": "out"},
            ],
            "policy": {
                "debounce_seconds": 30,
                "student": {"arrival_window": whole_day, "departure_window": whole_day, "start": "07:00"},
                "staff": {"arrival_window": whole_day, "departure_window": whole_day, "start": "07:00"},
            },
            "feedback": {"outputs": []},
        },
        "<bench>",
    )


class Lane:
    """One reader slot driven like a queue of students: insert, wait for the ack, remove, wait, next."""

    def __init__(
        self,
        name: str,
        slot: int,
        pcscd: PrivatePcscd,
        watcher: PresenceWatcher,
        acks: queue.Queue[tuple[Ack, float]],
        uids: list[str],
        stop: threading.Event,
    ) -> None:
        self.name = name
        self.reader = pcscd.slot_name(slot)
        self.port = pcscd.slot_port(slot)
        self.watcher = watcher
        self.acks = acks
        self.uids = uids
        self.stop = stop
        self.records: list[TapRecord] = []
        self.stray: list[Ack] = []
        self.error: BaseException | None = None
        self._random = random.Random(slot)
        self.thread = threading.Thread(target=self._run, name=f"bench-{name}", daemon=True)

    def _run(self) -> None:
        try:
            self._drive()
        except BaseException as exc:
            self.error = exc
            self.stop.set()

    def _drive(self) -> None:
        every = max(1, len(self.uids) // 10)
        for number, uid in enumerate(self.uids, 1):
            if self.stop.is_set():
                return
            before = self.watcher.counter(self.reader)
            # Insert at a random phase of pcscd's poll, as a real student would, so insert_to_ack
            # samples the whole polling delay; inside one period this costs no throughput.
            if self.stop.wait(self._random.uniform(0.0, POLL_PERIOD * 0.85)):
                return
            card = VirtualCard(self.port, uid)
            record = TapRecord(self.name, uid, time.monotonic())
            card.insert()
            try:
                self._await_ack(record)
            finally:
                card.remove()
            self.records.append(record)
            if self.watcher.wait(self.reader, False, before, 2, REMOVAL_TIMEOUT) is None:
                # Never saw it (a missed tap) or the watcher lags: a fixed wait beyond one poll is safe.
                self.stop.wait(POLL_PERIOD + 0.1)
            if number % every == 0 or number == len(self.uids):
                done = [r.acked - r.detected for r in self.records if r.acked is not None and r.detected is not None]
                p50 = summary([d * 1000 for d in done], "tap_ms").get("tap_ms_p50")
                missed = sum(r.acked is None for r in self.records)
                progress(f"bench tap: {self.name} {number}/{len(self.uids)} taps, tap_ms p50 {p50}, missed {missed}")

    def _await_ack(self, record: TapRecord) -> None:
        deadline = record.inserted + ACK_TIMEOUT
        while not self.stop.is_set():
            try:
                ack, shown = self.acks.get(timeout=max(0.0, min(0.25, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    return
                continue
            if ack.card_uid != record.uid:
                self.stray.append(ack)
                continue
            record.acked = shown
            record.detected = ack.detected
            record.seq = ack.seq
            record.outcome = str(ack.outcome)
            return


def _wait_readers_ready(gate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = gate.reader_health()
        if health and all(h.state == "ok" for h in health):
            return
        time.sleep(0.05)
    raise BenchError(f"gate readers not ready: {[(h.name, h.state, h.detail) for h in gate.reader_health()]}")


def _baseline(watcher: PresenceWatcher, pcscd: PrivatePcscd, reads: int) -> list[float]:
    """Put an unregistered card on lane 0, time bare reads, take it off and wait until pcscd saw that."""
    reader = pcscd.slot_name(0)
    uid = "04BA5E11BA5E11"
    before = watcher.counter(reader)
    card = VirtualCard(pcscd.slot_port(0), uid)
    card.insert()
    try:
        if watcher.wait(reader, True, before, 1, ACK_TIMEOUT) is None:
            raise BenchError("pcscd never noticed the baseline card")
        return transport_reads(reader, uid, reads)
    finally:
        card.remove()
        watcher.wait(reader, False, before, 2, REMOVAL_TIMEOUT)


def run(taps: int, port: int) -> None:
    """Run the tap bench on a private pcscd at ``port``/``port + 1``; JSON lines on stdout."""
    why = PrivatePcscd.available()
    if why:
        progress(f"bench tap: cannot run: {why}")
        sys.exit(1)
    if not _ports_free(port):
        progress(f"bench tap: port {port} or {port + 1} is already in use; pick another --port")
        sys.exit(1)
    workdir = Path(tempfile.mkdtemp(prefix="edugate-bench-tap-"))
    pcscd = PrivatePcscd(port, workdir=workdir / "pcscd")
    # Before anything in this process talks PC/SC: libpcsclite reads this once.
    os.environ["PCSCLITE_CSOCK_NAME"] = str(pcscd.socket_path)
    try:
        with sigterm_interrupts():
            _run(taps, pcscd, workdir)
    finally:
        pcscd.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _run(taps: int, pcscd: PrivatePcscd, workdir: Path) -> None:
    from appliance.clock import Clock
    from appliance.daemon import Gate
    from appliance.journal import open_database
    from appliance.journal.roster_store import RosterStore
    from appliance.readers.factory import build_readers
    from appliance.roster.model import Person, Role

    per_lane = math.ceil(taps / len(LANES))
    emit(
        bench="tap",
        measure="setup",
        taps=per_lane * len(LANES),
        lanes=len(LANES),
        port=pcscd.base_port,
        **machine_info(),
    )
    progress(f"bench tap: starting pcscd on ports {pcscd.base_port}/{pcscd.base_port + 1}")
    pcscd.start()
    watcher = PresenceWatcher([pcscd.slot_name(0), pcscd.slot_name(1)])
    watcher.start()
    database = None
    gate = None
    lanes: list[Lane] = []
    stop = threading.Event()
    try:
        baseline = _baseline(watcher, pcscd, BASELINE_READS // 2)

        journal_path = workdir / "journal.db"
        config = _bench_config(journal_path, pcscd)
        database = open_database(journal_path, writer=True)
        uids = [card_uid(i) for i in range(per_lane * len(LANES))]
        school_size = max(1000, len(uids))
        people = [
            Person(
                f"HS{i:05d}",
                f"Học sinh {i:05d}",
                Role.STUDENT,
                f"{6 + i % 4}A",
                True,
                (uids[i],) if i < len(uids) else (card_uid(10**6 + i),),
            )
            for i in range(school_size)
        ]
        RosterStore(database).apply(people, replace=True)

        feedback = RecordingFeedback(LANES)
        gate = Gate(
            config,
            database,
            MultiFeedback([feedback]),
            Clock(config.zone, config.clock.assume_synced),
            build_readers(config.readers),
        )
        submitted: dict[str, float] = {}
        commit_ms: dict[str, float] = {}
        gate_submit = gate.submit
        journal_append = gate.journal.append

        def submit(tap: Tap) -> None:
            submitted[tap.uid] = time.monotonic()
            gate_submit(tap)

        def append(draft: EventDraft) -> Any:
            began = time.monotonic()
            event = journal_append(draft)
            commit_ms[draft.card_uid or ""] = (time.monotonic() - began) * 1000.0
            return event

        gate.submit = submit  # type: ignore[method-assign]
        gate.journal.append = append  # type: ignore[method-assign]
        gate.start()
        _wait_readers_ready(gate)

        began = time.monotonic()
        for slot, name in enumerate(LANES):
            lane_uids = uids[slot :: len(LANES)]
            lanes.append(Lane(name, slot, pcscd, watcher, feedback.queues[name], lane_uids, stop))
        for lane in lanes:
            lane.thread.start()
        while any(lane.thread.is_alive() for lane in lanes):
            for lane in lanes:
                lane.thread.join(timeout=0.2)
        elapsed = time.monotonic() - began
        errors = [lane.error for lane in lanes if lane.error is not None]
        if errors:
            raise BenchError(f"a lane failed: {errors[0]!r}") from errors[0]
        gate.wait_idle()
        gate.stop()
        gate = None
        baseline += _baseline(watcher, pcscd, BASELINE_READS - BASELINE_READS // 2)

        records = [r for lane in lanes for r in lane.records]
        for record in records:
            record.submitted = submitted.get(record.uid)
            record.commit_ms = commit_ms.get(record.uid)
        _report(lanes, records, baseline, database, elapsed, len(feedback.unexpected))
    finally:
        stop.set()
        for lane in lanes:
            lane.thread.join(timeout=ACK_TIMEOUT + REMOVAL_TIMEOUT)
        if gate is not None:
            with contextlib.suppress(Exception):
                gate.stop()
        watcher.stop()
        if database is not None:
            database.close()


def _ms(records: list[TapRecord], start: str, end: str) -> list[float]:
    values = []
    for record in records:
        a, b = getattr(record, start), getattr(record, end)
        if a is not None and b is not None:
            values.append((b - a) * 1000.0)
    return values


def _report(
    lanes: list[Lane], records: list[TapRecord], baseline: list[float], database: Any, elapsed: float, unexpected: int
) -> None:
    for lane in lanes:
        emit(
            bench="tap",
            measure="lane",
            lane=lane.name,
            reader=lane.reader,
            insertions=len(lane.records),
            acked=sum(r.acked is not None for r in lane.records),
            missed=sum(r.acked is None for r in lane.records),
            stray_acks=len(lane.stray),
            **summary(_ms(lane.records, "detected", "acked"), "tap_ms"),
            **summary(_ms(lane.records, "inserted", "acked"), "insert_to_ack_ms"),
        )
    emit(bench="tap", measure="pcsc_read_baseline", reads=len(baseline), **summary(baseline, "pcsc_read_ms"))
    commits = [r.commit_ms for r in records if r.commit_ms is not None]
    emit(
        bench="tap",
        measure="breakdown",
        **summary(_ms(records, "detected", "submitted"), "uid_read_ms"),
        **summary(_ms(records, "submitted", "acked"), "gate_ms"),
        **summary(commits, "commit_ms"),
    )

    acked = [r for r in records if r.acked is not None]
    seqs = sorted(r.seq for r in acked if r.seq is not None)
    rows, low, high = database.conn.execute("SELECT COUNT(*), MIN(seq), MAX(seq) FROM events").fetchone()
    integrity = database.conn.execute("PRAGMA integrity_check").fetchone()[0]
    tap_ms = _ms(records, "detected", "acked")
    insert_ms = _ms(records, "inserted", "acked")
    tap_summary = summary(tap_ms, "tap_ms")
    insert_summary = summary(insert_ms, "insert_to_ack_ms")
    pcsc_summary = summary(baseline, "pcsc_read_ms")
    emit(
        bench="tap",
        taps=len(acked),
        insertions=len(records),
        missed=len(records) - len(acked),
        ok_acks=sum(r.outcome == Outcome.OK for r in acked),
        stray_acks=sum(len(lane.stray) for lane in lanes) + unexpected,
        seconds=round(elapsed, 3),
        taps_per_s=round(len(acked) / elapsed, 2) if elapsed else None,
        tap_ms_p50=tap_summary.get("tap_ms_p50"),
        tap_ms_p90=tap_summary.get("tap_ms_p90"),
        tap_ms_p99=tap_summary.get("tap_ms_p99"),
        tap_ms_max=tap_summary.get("tap_ms_max"),
        insert_to_ack_ms_p50=insert_summary.get("insert_to_ack_ms_p50"),
        insert_to_ack_ms_p99=insert_summary.get("insert_to_ack_ms_p99"),
        insert_to_ack_ms_max=insert_summary.get("insert_to_ack_ms_max"),
        pcsc_read_ms_p50=pcsc_summary.get("pcsc_read_ms_p50"),
        pcsc_read_ms_p99=pcsc_summary.get("pcsc_read_ms_p99"),
        target_tap_ms_p99=TARGET_TAP_MS_P99,
        meets_target=bool(tap_ms) and tap_summary["tap_ms_p99"] <= TARGET_TAP_MS_P99,
        events=rows,
        seq_first=low,
        seq_last=high,
        seq_contiguous=bool(seqs) and seqs == list(range(1, len(seqs) + 1)) and rows == len(seqs) == high,
        journal_integrity=integrity,
    )
