"""The wall clock and whether it can be trusted: a Pi has no RTC and boots with a stale time."""

from __future__ import annotations

import ctypes
import ctypes.util
from datetime import datetime
from zoneinfo import ZoneInfo

_TIME_ERROR = 5  # adjtimex(2): clock not synchronised


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_padding", ctypes.c_int * 11),
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def kernel_clock_synced() -> bool:
    """What the kernel says (the same flag timedatectl's "System clock synchronized" shows).

    A read-only adjtimex call (modes = 0) needs no privilege.
    """
    buf = _Timex()
    state = _libc.adjtimex(ctypes.byref(buf))
    return state not in (-1, _TIME_ERROR)


class Clock:
    """Local time in the school's zone plus the synchronised flag recorded with every event."""

    def __init__(self, zone: ZoneInfo, assume_synced: bool = False) -> None:
        self.zone = zone
        self.assume_synced = assume_synced

    def now(self) -> datetime:
        return datetime.now(self.zone)

    def synced(self) -> bool:
        return self.assume_synced or kernel_clock_synced()
