"""``edugate bench match``: 1:N time per query through ``Gallery.match`` against a bare numpy baseline.

A gate identifies every face against everyone enrolled, so the matcher must stay fast at the largest school
(target: <= 5 ms per query at 100k templates). The gallery holds random unit vectors (timing does not depend
on what the vectors mean); half the queries are noisy copies of enrolled templates, half are strangers.

The baseline is ``matrix @ q`` + ``argmax`` on the very same matrix the gallery built, timed query by query in
alternating order with ``Gallery.match`` so that machine noise hits both sides alike: the difference is the
cost of our decision rule (normalising the query, the runner-up pass, the margin), not of the machine.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np

from appliance.bench.stats import emit, machine_info, progress, summary
from appliance.vision.gallery import Gallery, normalise

DIM = 128
SEED = 20240
WARMUP = 10
TARGET_MS = 5.0
TARGET_SIZE = 100_000
NEAR_NOISE = 0.08  # per-coordinate noise of a "known" query: cosine to its template ~ 0.74
TEMPLATE_NOISE = 0.05  # spread of one person's templates around their face
MAX_SIZE = 5_000_000


def parse_sizes(text: str) -> list[int]:
    """``"1000,10000,100000"`` as ints; a clear ValueError for anything else."""
    sizes = []
    for part in text.split(","):
        part = part.strip().replace("_", "")
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"{part!r} is not a whole number of templates") from None
        if not 1 <= value <= MAX_SIZE:
            raise ValueError(f"{value}: gallery size must be between 1 and {MAX_SIZE:,}")
        sizes.append(value)
    if not sizes:
        raise ValueError("give at least one gallery size, e.g. 1000,10000,100000")
    return sizes


def blas_info() -> dict[str, Any]:
    """Which BLAS numpy uses and the thread settings it sees: the matrix-vector product runs there."""
    info: dict[str, Any] = {"numpy": np.__version__}
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]  # type: ignore[index]
        info["blas"] = f"{blas.get('name')} {blas.get('version')}"
    except (AttributeError, KeyError, TypeError):  # older numpy: no dict mode
        info["blas"] = "unknown"
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if name in os.environ:
            info[name.lower()] = os.environ[name]
    return info


def random_templates(rng: np.random.Generator, size: int, per_person: int) -> tuple[list[str], np.ndarray]:
    """Person names and ``size`` unit template rows, ``per_person`` consecutive rows per person (the last may
    have fewer)."""
    people = math.ceil(size / per_person)
    faces = normalise(rng.standard_normal((people, DIM), dtype=np.float32))
    rows = np.repeat(faces, per_person, axis=0)[:size]
    if per_person > 1:
        rows = normalise(rows + TEMPLATE_NOISE * rng.standard_normal(rows.shape, dtype=np.float32))
    return [f"P{i:07d}" for i in range(people)], rows


def random_queries(rng: np.random.Generator, templates: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit queries: even ones near a random enrolled template, odd ones strangers; and the source row (-1)."""
    source = np.where(np.arange(count) % 2 == 0, rng.integers(0, len(templates), count), -1)
    queries = rng.standard_normal((count, DIM), dtype=np.float32)
    known = source >= 0
    queries[known] = templates[source[known]] + NEAR_NOISE * queries[known]
    return normalise(queries), source


def measure(size: int, count: int, per_person: int, threshold: float, margin: float) -> dict[str, Any]:
    """Build a gallery of ``size`` templates, then time ``count`` queries through it and through the baseline."""
    rng = np.random.default_rng(SEED + size)
    names, rows = random_templates(rng, size, per_person)
    queries, source = random_queries(rng, rows, count + WARMUP)

    gallery = Gallery(threshold=threshold, margin=margin, dim=DIM)
    started = time.perf_counter()
    for index, name in enumerate(names):
        gallery.add(name, rows[index * per_person : (index + 1) * per_person])
    add_s = time.perf_counter() - started
    started = time.perf_counter()
    gallery.match(queries[0])  # the first match reads the matrix from cold caches
    first_match_ms = (time.perf_counter() - started) * 1e3
    matrix = gallery._matrix  # the same memory Gallery.match reads: the baseline must not get a luckier copy
    held = matrix.nbytes + gallery._owners.nbytes  # each template once, and whose it is (templates() copies)

    ours: list[float] = []
    bare: list[float] = []
    same_best = accepted = known_accepted = 0
    for i, query in enumerate(queries):
        if i % 2:
            t0 = time.perf_counter_ns()
            best = int(np.argmax(matrix @ query))
            t1 = time.perf_counter_ns()
            result = gallery.match(query)
            t2 = time.perf_counter_ns()
            bare_ns, ours_ns = t1 - t0, t2 - t1
        else:
            t0 = time.perf_counter_ns()
            result = gallery.match(query)
            t1 = time.perf_counter_ns()
            best = int(np.argmax(matrix @ query))
            t2 = time.perf_counter_ns()
            ours_ns, bare_ns = t1 - t0, t2 - t1
        if i < WARMUP:
            continue
        ours.append(ours_ns / 1e6)
        bare.append(bare_ns / 1e6)
        same_best += int(result.person == names[best // per_person])
        accepted += int(result.accepted)
        known_accepted += int(
            bool(result.accepted and source[i] >= 0 and result.person == names[source[i] // per_person])
        )

    ours_p50, bare_p50 = float(np.median(ours)), float(np.median(bare))
    return {
        "size": size,
        "people": len(names),
        "templates_per_person": per_person,
        "dim": DIM,
        "queries": count,
        "known_queries": int((source[WARMUP:] >= 0).sum()),
        "add_s": round(add_s, 3),
        "first_match_ms": round(first_match_ms, 2),
        "matrix_mb": round(matrix.nbytes / 1e6, 2),
        "held_mb": round(held / 1e6, 2),
        **summary(ours, "ms"),
        **summary(bare, "baseline_ms"),
        "overhead_ms_p50": round(ours_p50 - bare_p50, 3),
        "overhead_ratio_p50": round(ours_p50 / bare_p50, 3) if bare_p50 > 0 else None,
        "same_best": same_best,
        "accepted": accepted,
        "known_accepted": known_accepted,
    }


def run(sizes: list[int], count: int, per_person: int) -> None:
    """One JSON line of setup, one per gallery size, then a verdict on the 100k target."""
    from appliance.config import VisionConfig

    vision = VisionConfig()
    emit(
        bench="match",
        measure="setup",
        sizes=sizes,
        queries=count,
        warmup=WARMUP,
        templates_per_person=per_person,
        threshold=vision.match_threshold,
        margin=vision.match_margin,
        **blas_info(),
        **machine_info(),
    )
    results = {}
    for size in sizes:
        progress(f"bench match: {size:,} templates")
        results[size] = measure(size, count, per_person, vision.match_threshold, vision.match_margin)
        emit(bench="match", measure="size", **results[size])
    at_target = results.get(TARGET_SIZE)
    emit(
        bench="match",
        target_ms=TARGET_MS,
        target_size=TARGET_SIZE,
        p50_ms=at_target["ms_p50"] if at_target else None,
        p99_ms=at_target["ms_p99"] if at_target else None,
        baseline_p50_ms=at_target["baseline_ms_p50"] if at_target else None,
        target_met_p50=at_target["ms_p50"] <= TARGET_MS if at_target else None,
        target_met_p99=at_target["ms_p99"] <= TARGET_MS if at_target else None,
        sizes=sizes,
    )
