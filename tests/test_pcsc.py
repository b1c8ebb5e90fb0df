"""PC/SC readers against the real stack: pcscd + vsmartcard's vpcd driver + a virtual card on its socket.

Everything uses the session's private pcscd (libpcsclite caches PCSCLITE_CSOCK_NAME), restarts
it in place when a test needs pcscd to die or the reader to vanish, and leaves it running and
plugged in. pcscd polls card presence about every 400 ms, so every step waits for what it
expects (a tap, a health state, or pcscd itself seeing the card come or go) instead of sleeping.
"Exactly one tap" is checked with a barrier: a later card whose tap must be the next one in
the list, which proves nothing extra arrived in between.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import REPO, DaemonProcess, send_taps, write_config
from smartcard import scard

from appliance.config import ReaderConfig
from appliance.events import Direction
from appliance.readers.base import ReaderState, Tap
from appliance.readers.pcsc import PcscReaders
from appliance.readers.virtual import PrivatePcscd, VirtualCard
from appliance.status import status_path

TIMEOUT = 15.0  # generous: pcscd restarts and reconnect backoff on a loaded shared machine


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class TapLog:
    """Thread-safe list of taps delivered by the reader thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taps: list[Tap] = []

    def __call__(self, tap: Tap) -> None:
        with self._lock:
            self._taps.append(tap)

    @property
    def taps(self) -> list[Tap]:
        with self._lock:
            return list(self._taps)

    def uids(self) -> list[str]:
        return [t.uid for t in self.taps]

    def wait_count(self, count: int, timeout: float = TIMEOUT) -> list[Tap]:
        wait_until(lambda: len(self.taps) >= count, f"{count} tap(s), have {self.uids()}", timeout)
        return self.taps


def same(hresult: int, code: int) -> bool:
    """pyscard may hand back HRESULTs signed or unsigned; compare the 32-bit codes."""
    return (hresult & 0xFFFFFFFF) == (code & 0xFFFFFFFF)


def reader_name(slot: int) -> str | None:
    """The full PC/SC name of a vpcd slot as pcscd lists it now (None while pcscd or the reader is away)."""
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if not same(hresult, scard.SCARD_S_SUCCESS):
        return None
    try:
        hresult, names = scard.SCardListReaders(context, [])
        if not same(hresult, scard.SCARD_S_SUCCESS):
            return None
        return next((n for n in names if PrivatePcscd.slot_name(slot) in n), None)
    finally:
        scard.SCardReleaseContext(context)


def wait_card_seen(slot: int, present: bool, timeout: float = TIMEOUT) -> None:
    """Block until pcscd itself reports the card on ``slot`` as present/absent (its poll is ~400 ms)."""
    deadline = time.monotonic() + timeout
    while True:
        name = reader_name(slot)
        if name is not None:
            hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
            try:
                known = scard.SCARD_STATE_UNAWARE
                while same(hresult, scard.SCARD_S_SUCCESS):
                    left_ms = int((deadline - time.monotonic()) * 1000)
                    if left_ms <= 0:
                        break
                    hresult, states = scard.SCardGetStatusChange(context, min(left_ms, 1000), [(name, known)])
                    if same(hresult, scard.SCARD_E_TIMEOUT):
                        hresult = scard.SCARD_S_SUCCESS
                        continue
                    if not same(hresult, scard.SCARD_S_SUCCESS):
                        break
                    event_state = states[0][1]
                    if bool(event_state & scard.SCARD_STATE_PRESENT) == present:
                        return
                    known = event_state & ~scard.SCARD_STATE_CHANGED
            finally:
                scard.SCardReleaseContext(context)
        if time.monotonic() > deadline:
            raise AssertionError(f"pcscd did not see the card on slot {slot} {'arrive' if present else 'leave'}")
        time.sleep(0.05)


def binding(name: str, slot: int, direction: Direction) -> ReaderConfig:
    return ReaderConfig(name=name, type="pcsc", match=PrivatePcscd.slot_name(slot), direction=direction)


def states(readers: PcscReaders) -> dict[str, tuple[ReaderState, str]]:
    return {h.name: (h.state, h.detail) for h in readers.health()}


def wait_all(readers: PcscReaders, state: ReaderState, detail: str | None = None) -> None:
    def reached() -> bool:
        return all(s == state and (detail is None or detail in d) for s, d in states(readers).values())

    wait_until(reached, f"all readers {state.value} {detail or ''} (now {states(readers)})")


class Lab:
    """Starts PcscReaders and virtual cards for one test, and cleans both up (cards off, reader thread stopped)."""

    def __init__(self, pcscd: PrivatePcscd) -> None:
        self.pcscd = pcscd
        self.readers: list[PcscReaders] = []
        self.cards: list[VirtualCard] = []

    def start(self, *bindings: ReaderConfig, wait_ok: bool = True) -> tuple[PcscReaders, TapLog]:
        log = TapLog()
        readers = PcscReaders(list(bindings))
        readers.start(log)
        self.readers.append(readers)
        if wait_ok:
            wait_all(readers, ReaderState.OK)
        return readers, log

    def card(self, uid: str, slot: int = 0, status_word: bytes = b"\x90\x00") -> VirtualCard:
        card = VirtualCard(self.pcscd.slot_port(slot), uid, status_word=status_word)
        self.cards.append(card)
        return card

    def close(self) -> None:
        for card in self.cards:
            card.remove()
        for readers in self.readers:
            started = time.monotonic()
            readers.stop()
            assert readers._thread is not None and not readers._thread.is_alive(), "reader thread outlived stop()"
            assert time.monotonic() - started < 2.0


@pytest.fixture
def lab(pcscd_running: PrivatePcscd) -> Iterator[Lab]:
    lab = Lab(pcscd_running)
    try:
        yield lab
    finally:
        lab.close()
        # Leave the session pcscd as the next test expects it: running, plugged in, no card on it.
        if pcscd_running.proc is None or pcscd_running.proc.poll() is not None or not pcscd_running.plugged:
            pcscd_running.stop()
            pcscd_running.configure(True)
            pcscd_running.start()
        for slot in (0, 1):
            wait_card_seen(slot, present=False)


def tap_card(card: VirtualCard, log: TapLog, slot: int = 0) -> Tap:
    """Insert, wait for the tap, remove, wait until pcscd saw the card go (so the next insert is a new event)."""
    before = len(log.taps)
    card.insert()
    tap = log.wait_count(before + 1)[before]
    card.remove()
    wait_card_seen(slot, present=False)
    return tap


def test_insert_gives_one_tap_and_reinsert_another(lab: Lab) -> None:
    """The basic promise: one card on the reader is one Tap with the UID, lane name and direction."""
    readers, log = lab.start(binding("gate-in", 0, Direction.IN))
    card = lab.card("04A1B2C3D4E5F6")
    started = time.monotonic()
    first = tap_card(card, log)
    assert (first.reader, first.direction, first.uid) == ("gate-in", Direction.IN, "04A1B2C3D4E5F6")
    assert started <= first.detected <= time.monotonic()
    assert card.apdus == [bytes.fromhex("FFCA000000")]
    second = tap_card(card, log)
    assert second.uid == first.uid and second.detected > first.detected
    tap_card(lab.card("0A0B0C0D"), log)  # barrier: nothing else arrived before this card
    assert log.uids() == ["04A1B2C3D4E5F6", "04A1B2C3D4E5F6", "0A0B0C0D"]
    assert states(readers)["gate-in"] == (ReaderState.OK, "ready")


def test_card_already_on_reader_at_start_is_read_once(lab: Lab) -> None:
    """A card lying on the reader when the daemon starts is read once, not on every status change."""
    resting = lab.card("11223344")
    resting.insert()
    wait_card_seen(0, present=True)
    _readers, log = lab.start(binding("gate-in", 0, Direction.IN), wait_ok=False)
    assert log.wait_count(1)[0].uid == "11223344"
    resting.remove()
    wait_card_seen(0, present=False)
    tap_card(lab.card("55667788"), log)
    assert log.uids() == ["11223344", "55667788"]


def test_fast_repeated_taps_each_give_exactly_one(lab: Lab) -> None:
    """Cards put on and taken off as fast as pcscd can notice: no tap lost, none doubled, order kept."""
    _readers, log = lab.start(binding("gate-in", 0, Direction.IN), binding("marker", 1, Direction.OUT))
    uids = [f"04C0FFEE{i:02X}" for i in range(10)]
    started = time.monotonic()
    for uid in uids:
        tap_card(lab.card(uid), log)
    elapsed = time.monotonic() - started
    tap_card(lab.card("0BA441E4", slot=1), log, slot=1)  # barrier on the other lane, same reader thread
    assert log.uids() == [*uids, "0BA441E4"]
    assert elapsed < 10 * 2.0, f"{elapsed:.1f}s for 10 taps"


def test_two_lanes_at_once_keep_their_direction(lab: Lab) -> None:
    """Entry and exit lanes on one pcscd: simultaneous cards each reach the sink tagged with their own lane."""
    _readers, log = lab.start(binding("lane-in", 0, Direction.IN), binding("lane-out", 1, Direction.OUT))
    entering, leaving = lab.card("0400000001", slot=0), lab.card("0400000002", slot=1)
    entering.insert()
    leaving.insert()
    got = {t.reader: (t.direction, t.uid) for t in log.wait_count(2)}
    assert got == {"lane-in": (Direction.IN, "0400000001"), "lane-out": (Direction.OUT, "0400000002")}
    entering.remove()
    leaving.remove()
    wait_card_seen(0, present=False)
    tap_card(lab.card("0400000003", slot=1), log, slot=1)
    assert len(log.taps) == 3


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_pcscd_restart_mid_run_recovers_without_restarting_readers(lab: Lab, sig: signal.Signals) -> None:
    """pcscd dying (cleanly or killed) shows as ERROR, then OK again, and the same PcscReaders reads the next card."""
    readers, log = lab.start(binding("gate-in", 0, Direction.IN), binding("gate-out", 1, Direction.OUT))
    tap_card(lab.card("0401010101"), log)
    thread = readers._thread
    lab.pcscd.stop(sig)
    wait_all(readers, ReaderState.ERROR, "pcscd")
    lab.pcscd.start()
    wait_all(readers, ReaderState.OK, "ready")
    tap = tap_card(lab.card("0402020202"), log)
    assert (tap.reader, tap.uid) == ("gate-in", "0402020202")
    assert readers._thread is thread and thread is not None and thread.is_alive()
    assert log.uids() == ["0401010101", "0402020202"]


def test_reader_unplugged_then_replugged(lab: Lab) -> None:
    """No reader -> WAITING "not connected" (not an endless error); plugged back -> OK and cards read again."""
    readers, log = lab.start(binding("gate-in", 0, Direction.IN))
    lab.pcscd.configure(False)
    lab.pcscd.restart()
    wait_all(readers, ReaderState.WAITING, "not connected")
    lab.pcscd.configure(True)
    lab.pcscd.restart()
    wait_all(readers, ReaderState.OK, "ready")
    assert tap_card(lab.card("04ABCDEF01"), log).uid == "04ABCDEF01"
    assert log.uids() == ["04ABCDEF01"]


def test_stop_right_after_a_tap_is_prompt(lab: Lab) -> None:
    """stop() while the thread is between a card event and its next SCardGetStatusChange must not hang:
    a lost SCardCancel used to leave it blocked for WAIT_MS and let the old thread read the next card."""
    resting = lab.card("04AB0000FF")
    resting.insert()
    wait_card_seen(0, present=True)
    for _ in range(5):
        tapped = threading.Event()
        readers = PcscReaders([binding("gate-in", 0, Direction.IN)])
        readers.start(lambda _tap, tapped=tapped: tapped.set())
        assert tapped.wait(TIMEOUT), "card on the reader was not read at start"
        started = time.monotonic()
        readers.stop()
        assert time.monotonic() - started < 1.0
        assert readers._thread is not None and not readers._thread.is_alive()


def test_card_refusing_get_uid_gives_no_tap_and_a_health_detail(lab: Lab) -> None:
    """A card answering GET UID with an error (6A81: not supported) is not a tap; status says why; next card works."""
    readers, log = lab.start(binding("gate-in", 0, Direction.IN))
    refusing = lab.card("0499999999", status_word=b"\x6a\x81")
    refusing.insert()
    wait_until(lambda: "6A81" in states(readers)["gate-in"][1], f"6A81 in health ({states(readers)})")
    assert states(readers)["gate-in"][0] is ReaderState.OK
    assert refusing.apdus == [bytes.fromhex("FFCA000000")]
    refusing.remove()
    wait_card_seen(0, present=False)
    assert tap_card(lab.card("0455555555"), log).uid == "0455555555"
    assert log.uids() == ["0455555555"]
    assert states(readers)["gate-in"] == (ReaderState.OK, "ready")


# --- the real daemon process --------------------------------------------------------------------------


def journal_rows(journal: Path) -> list[tuple[str, str, str]]:
    """(reader, direction, card_uid) of every journalled event, read-only."""
    if not journal.exists():
        return []
    with sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5) as db:
        rows = db.execute(
            "SELECT json_extract(payload, '$.reader'), json_extract(payload, '$.direction'), card_uid "
            "FROM events ORDER BY seq"
        ).fetchall()
    db.close()
    return [tuple(r) for r in rows]


def edugate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=60
    )


def status_readers(journal: Path) -> dict[str, str]:
    try:
        data: dict[str, Any] = json.loads(status_path(journal).read_text())
    except (OSError, ValueError):
        return {}
    return {r["name"]: r["state"] for r in data.get("readers", [])}


def test_daemon_keeps_socket_lane_while_pcscd_is_down(pcscd_running: PrivatePcscd, tmp_path: Path) -> None:
    """The real ``edugate run``: losing pcscd degrades only the PC/SC lanes (status says so, exit 1),
    the socket lane keeps recording, and after pcscd returns a card on a PC/SC lane is journalled."""
    pcscd = pcscd_running
    journal = tmp_path / "journal.db"
    lane_socket = tmp_path / "lane.sock"
    config = write_config(
        tmp_path / "gate.toml",
        journal,
        [
            {"name": "pc-in", "type": "pcsc", "match": pcscd.slot_name(0), "direction": "in"},
            {"name": "pc-out", "type": "pcsc", "match": pcscd.slot_name(1), "direction": "out"},
            {"name": "sock", "type": "socket", "path": str(lane_socket), "direction": "in"},
        ],
        clock={"assume_synced": True},
    )
    daemon = DaemonProcess(config, env=dict(os.environ)).start()
    card = VirtualCard(pcscd.slot_port(0), "04D0D0D0D0")
    try:
        all_ok = {"pc-in": "ok", "pc-out": "ok", "sock": "ok"}
        daemon.wait_for(lambda: status_readers(journal) == all_ok, TIMEOUT, "all readers ok")
        healthy = edugate("status", "--journal", str(journal), "--json")
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr

        pcscd.stop()
        daemon.wait_for(
            lambda: status_readers(journal) == {"pc-in": "error", "pc-out": "error", "sock": "ok"},
            TIMEOUT,
            "pcsc readers in error",
        )
        send_taps(lane_socket, ["0A000001"])
        daemon.wait_for(lambda: ("sock", "in", "0A000001") in journal_rows(journal), TIMEOUT, "socket tap")
        degraded = edugate("status", "--journal", str(journal), "--json")
        assert degraded.returncode == 1, degraded.stdout + degraded.stderr
        report = json.loads(degraded.stdout)
        states_now = {r["name"]: r["state"] for r in report["readers"]}
        assert states_now["pc-in"] != "ok" and states_now["pc-out"] != "ok" and states_now["sock"] == "ok"
        assert any("pc-in" in p for p in report["problems"]) and not any("sock" in p for p in report["problems"])

        pcscd.start()
        daemon.wait_for(lambda: status_readers(journal) == all_ok, TIMEOUT, "pcsc readers back")
        card.insert()
        daemon.wait_for(lambda: ("pc-in", "in", "04D0D0D0D0") in journal_rows(journal), TIMEOUT, "pcsc tap")
        listed = edugate("events", "--journal", str(journal), "--json")
        assert listed.returncode == 0, listed.stderr
        events = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [(e["reader"], e["card_uid"]) for e in events] == [("sock", "0A000001"), ("pc-in", "04D0D0D0D0")]
    finally:
        card.remove()
        code = daemon.stop()
        if pcscd.proc is None:
            pcscd.start()
    assert code == 0, "\n".join(daemon.stderr_lines[-20:])
