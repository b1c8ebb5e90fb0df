"""PC/SC card readers through pyscard's low-level ``scard`` API, one thread for all of them.

pyscard's CardMonitor/ReaderMonitor threads die silently when pcscd restarts or a reader is
unplugged, so this module runs its own ``SCardGetStatusChange`` loop: it blocks (no polling),
watches the configured readers plus the PnP pseudo-reader for plug/unplug, and re-establishes
the PC/SC context with backoff whenever pcscd goes away.
"""

from __future__ import annotations

import logging
import threading
import time

from smartcard import scard

from appliance.config import ReaderConfig
from appliance.readers.base import HealthBoard, ReaderHealth, ReaderState, Tap, TapSink
from appliance.readers.uid import uid_from_bytes

log = logging.getLogger(__name__)

PNP_READER = "\\\\?PnP?\\Notification"
GET_UID_APDU = [0xFF, 0xCA, 0x00, 0x00, 0x00]
WAIT_MS = 10_000
_BACKOFF_MIN, _BACKOFF_MAX = 0.2, 5.0

_SERVICE_GONE = {
    scard.SCARD_E_NO_SERVICE,
    scard.SCARD_E_SERVICE_STOPPED,
    scard.SCARD_E_INVALID_HANDLE,
    scard.SCARD_F_COMM_ERROR,
    scard.SCARD_E_NO_READERS_AVAILABLE,
}
_READERS_CHANGED = {scard.SCARD_E_UNKNOWN_READER, scard.SCARD_E_READER_UNAVAILABLE}


def _code(hresult: int) -> int:
    return hresult & 0xFFFFFFFF


def _same(hresult: int, code: int) -> bool:
    return _code(hresult) == _code(code)


def _in(hresult: int, codes: set[int]) -> bool:
    return any(_same(hresult, c) for c in codes)


def describe(hresult: int) -> str:
    try:
        return f"{scard.SCardGetErrorMessage(_code(hresult)).strip()} (0x{_code(hresult):08X})"
    except Exception:
        return f"0x{_code(hresult):08X}"


class PcscReaders:
    """All configured PC/SC readers; each binding's ``match`` picks a reader by name substring."""

    def __init__(self, bindings: list[ReaderConfig]) -> None:
        self.bindings = bindings
        self.board = HealthBoard("pcsc", [b.name for b in bindings])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._context: int | None = None
        self._context_lock = threading.Lock()
        self._sink: TapSink | None = None

    def start(self, sink: TapSink) -> None:
        self._sink = sink
        self._thread = threading.Thread(target=self._run, name="pcsc", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        # SCardCancel only interrupts a call that is already blocked: a cancel sent while the thread is
        # between its stop check and SCardGetStatusChange is lost, so repeat it until the thread ends.
        deadline = time.monotonic() + 5
        while self._thread is not None and self._thread.is_alive() and time.monotonic() < deadline:
            with self._context_lock:
                if self._context is not None:
                    scard.SCardCancel(self._context)
            self._thread.join(timeout=0.05)

    def health(self) -> list[ReaderHealth]:
        return self.board.snapshot()

    def _set_all(self, state: ReaderState, detail: str) -> None:
        for binding in self.bindings:
            if self.board.set(binding.name, state, detail):
                log.warning("reader %s: %s", binding.name, detail)

    def _run(self) -> None:
        backoff = _BACKOFF_MIN
        while not self._stop.is_set():
            hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
            if not _same(hresult, scard.SCARD_S_SUCCESS):
                self._set_all(ReaderState.ERROR, f"pcscd unavailable: {describe(hresult)}")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            with self._context_lock:
                self._context = context
            try:
                if self._watch(context):
                    backoff = _BACKOFF_MIN
            except Exception:
                log.exception("PC/SC watcher failed; restarting it")
            finally:
                with self._context_lock:
                    self._context = None
                scard.SCardReleaseContext(context)
            if not self._stop.is_set():
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)

    def _bind(self, context: int) -> dict[str, ReaderConfig]:
        """Map present PC/SC reader names to bindings; mark the missing ones."""
        hresult, names = scard.SCardListReaders(context, [])
        if _same(hresult, scard.SCARD_E_NO_READERS_AVAILABLE):
            names = []
        elif not _same(hresult, scard.SCARD_S_SUCCESS):
            raise ConnectionError(describe(hresult))
        bound: dict[str, ReaderConfig] = {}
        for binding in self.bindings:
            name = next((n for n in names if binding.match in n and n not in bound), None)
            if name is None:
                if self.board.set(binding.name, ReaderState.WAITING, "reader not connected"):
                    log.warning("reader %s: not connected (waiting for it to be plugged in)", binding.name)
            else:
                bound[name] = binding
                if self.board.set(binding.name, ReaderState.OK, "ready"):
                    log.info("reader %s: ready", binding.name)
        return bound

    def _watch(self, context: int) -> bool:
        """Watch until pcscd goes away or stop; returns whether the context ever worked."""
        worked = False
        bound = self._bind(context)
        worked = True
        states = [(name, scard.SCARD_STATE_UNAWARE) for name in bound] + [(PNP_READER, scard.SCARD_STATE_UNAWARE)]
        counters: dict[str, int] = {}
        while not self._stop.is_set():
            hresult, new_states = scard.SCardGetStatusChange(context, WAIT_MS, states)
            if _same(hresult, scard.SCARD_E_TIMEOUT):
                continue
            if _same(hresult, scard.SCARD_E_CANCELLED):
                return worked
            if _in(hresult, _READERS_CHANGED):
                bound = self._bind(context)
                states = [(n, scard.SCARD_STATE_UNAWARE) for n in bound] + [(PNP_READER, scard.SCARD_STATE_UNAWARE)]
                continue
            if not _same(hresult, scard.SCARD_S_SUCCESS):
                self._set_all(ReaderState.ERROR, f"pcscd connection lost: {describe(hresult)}")
                return worked
            relist = False
            next_states = []
            for name, event_state, _atr in new_states:
                if name == PNP_READER:
                    relist = relist or bool(event_state & scard.SCARD_STATE_CHANGED)
                    next_states.append((name, event_state & ~scard.SCARD_STATE_CHANGED))
                    continue
                if event_state & (scard.SCARD_STATE_UNKNOWN | scard.SCARD_STATE_UNAVAILABLE):
                    relist = True
                counter = event_state >> 16
                present = bool(event_state & scard.SCARD_STATE_PRESENT)
                mute = bool(event_state & scard.SCARD_STATE_MUTE)
                new_card = present and counters.get(name) != counter and not (event_state & scard.SCARD_STATE_INUSE)
                counters[name] = counter
                if new_card and not mute and name in bound:
                    self._read_card(context, name, bound[name])
                elif new_card and mute and name in bound:
                    log.warning("reader %s: card does not answer (mute); ask to tap again", bound[name].name)
                next_states.append((name, event_state & ~scard.SCARD_STATE_CHANGED))
            states = next_states
            if relist:
                bound = self._bind(context)
                states = [(n, scard.SCARD_STATE_UNAWARE) for n in bound] + [(PNP_READER, scard.SCARD_STATE_UNAWARE)]
                counters.clear()
        return worked

    def _read_card(self, context: int, name: str, binding: ReaderConfig) -> None:
        detected = time.monotonic()
        hresult, handle, protocol = scard.SCardConnect(
            context, name, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
        )
        if not _same(hresult, scard.SCARD_S_SUCCESS):
            log.info("reader %s: card left before it could be read (%s)", binding.name, describe(hresult))
            return
        try:
            hresult, response = scard.SCardTransmit(handle, protocol, GET_UID_APDU)
        finally:
            scard.SCardDisconnect(handle, scard.SCARD_LEAVE_CARD)
        if not _same(hresult, scard.SCARD_S_SUCCESS):
            log.info("reader %s: card left while reading (%s)", binding.name, describe(hresult))
            return
        if len(response) < 2 or response[-2:] != [0x90, 0x00] or len(response) < 3:
            sw = bytes(response[-2:]).hex().upper() if len(response) >= 2 else "none"
            log.warning("reader %s: card refused GET UID with status word %s; tap ignored", binding.name, sw)
            self.board.set(binding.name, ReaderState.OK, f"last card refused GET UID ({sw})")
            return
        self.board.set(binding.name, ReaderState.OK, "ready")
        if self._sink is not None:
            self._sink(Tap(binding.name, binding.direction, uid_from_bytes(response[:-2]), detected))
