"""Small helpers shared by the benchmarks: percentiles, JSON-lines output, machine description."""

from __future__ import annotations

import json
import math
import os
import platform
import sqlite3
import statistics
import sys
from collections.abc import Iterable, Sequence
from typing import Any


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), so small samples still give a p99."""
    if not values:
        raise ValueError("percentile of an empty sample")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Sequence[float], prefix: str, pcts: Iterable[int] = (50, 90, 99)) -> dict[str, float]:
    """``{prefix}_p50``, ``_p90``, ``_p99``, ``_max``, ``_mean`` of a sample, rounded for reading.

    An empty sample gives no keys rather than invented zeros.
    """
    if not values:
        return {}
    out = {f"{prefix}_p{p}": round(percentile(values, p), 3) for p in pcts}
    out[f"{prefix}_max"] = round(max(values), 3)
    out[f"{prefix}_mean"] = round(statistics.fmean(values), 3)
    return out


def emit(**fields: Any) -> None:
    """One JSON object on one stdout line, keys sorted, flushed at once (readers parse line by line)."""
    sys.stdout.write(json.dumps(fields, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def progress(message: str) -> None:
    """Human progress goes to stderr so stdout stays pure JSON lines."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def machine_info() -> dict[str, Any]:
    """What the figures depend on, without the host name (results get pasted into tickets)."""
    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable_cpus = os.cpu_count() or 0
    try:
        load1 = round(os.getloadavg()[0], 2)
    except OSError:
        load1 = None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus,
        "machine": platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "loadavg_1m": load1,
    }


def latency_legs(
    moments: Iterable[tuple[float, float | None, float | None]],
) -> tuple[list[float], list[float], list[float]]:
    """Milliseconds start -> end, start -> middle and middle -> end, for each (start, end, middle) where known."""
    to_end: list[float] = []
    to_middle: list[float] = []
    middle_to_end: list[float] = []
    for began, end, middle in moments:
        if end is not None:
            to_end.append((end - began) * 1000)
        if middle is not None:
            to_middle.append((middle - began) * 1000)
        if end is not None and middle is not None:
            middle_to_end.append((end - middle) * 1000)
    return to_end, to_middle, middle_to_end
