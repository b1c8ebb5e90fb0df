"""``edugate bench memory``: resident memory of a real ``edugate run`` with the models loaded and a school enrolled.

A Raspberry Pi gate shares its RAM with the camera stack and the OS, so the daemon must stay small with every
student enrolled (target: <= 300 MB RSS with 5,000 people). This writes a journal with ``people`` people on the
roster (one card each) and their face templates sealed through :class:`TemplateStore` with a real key file,
makes a short walk-past video (the camera is that file, so the pipeline detects, embeds and matches while it is
measured), starts ``edugate run`` on it, waits until the daemon is ready, has loaded the gallery and has
embedded a face (so the gallery's matrix is built), then samples ``/proc/PID/status`` for ``seconds``.

The template vectors are random unit vectors: memory does not depend on what they mean, and the test photos
hold only nine people. In the same run, as baselines: the same daemon with nobody enrolled (the difference is
the gallery's cost) and a bare interpreter that only imports numpy, onnxruntime and cv2 (the floor any Python
face pipeline pays). ``within_limit`` is judged on VmHWM, the peak, since "stays under" means at every moment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from appliance.bench.daemon_process import end, start_daemon, wait_settled
from appliance.bench.errors import BenchError
from appliance.bench.stats import emit, machine_info, progress
from appliance.status import status_path

if TYPE_CHECKING:
    from appliance.config import VisionConfig

LIMIT_MB = 300.0
READY_TIMEOUT = 180.0
SEED = 20242
VIDEO_PEOPLE = 2  # walkers in the camera's video (plus the stranger)
VIDEO_SECONDS = 20.0  # the camera replays it when it ends
STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
BARE_IMPORTS = "import numpy, onnxruntime, cv2"


def proc_status(pid: int) -> dict[str, float]:
    """Memory lines of /proc/PID/status, in MB (the kernel reports kB)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in STATUS_FIELDS:
            values[name] = int(rest.split()[0]) / 1024
    return values


@dataclass
class Sample:
    """What one process used over the measuring window."""

    name: str
    pid: int
    rss_mb: list[float]
    last: dict[str, float]

    def fields(self) -> dict[str, Any]:
        return {
            "process": self.name,
            "vm_rss_mb": round(self.last["VmRSS"], 1),
            "vm_rss_max_mb": round(max(self.rss_mb), 1),
            "vm_hwm_mb": round(self.last["VmHWM"], 1),
            "rss_anon_mb": round(self.last.get("RssAnon", 0.0), 1),
            "rss_file_mb": round(self.last.get("RssFile", 0.0), 1),
            "samples": len(self.rss_mb),
        }


def watch(name: str, proc: subprocess.Popen[bytes], seconds: float, log: Path | None = None) -> Sample:
    """Sample the process's memory twice a second for ``seconds``."""
    rss: list[float] = []
    last: dict[str, float] = {}
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            where = f"; log: {log}" if log else ""
            raise BenchError(f"{name} exited with {proc.returncode} while it was measured{where}")
        last = proc_status(proc.pid)
        rss.append(last["VmRSS"])
        if time.monotonic() >= deadline:
            return Sample(name, proc.pid, rss, last)
        time.sleep(0.5)


# --------------------------------------------------------------------------------------------- the journal


def write_journal(journal: Path, key_file: Path, model: str, dim: int, people: int, per_person: int) -> None:
    """A roster of ``people`` students with a card each, and ``per_person`` sealed templates for everyone."""
    from appliance.journal import open_database
    from appliance.journal.roster_store import RosterStore
    from appliance.journal.sealing import Sealer
    from appliance.journal.template_store import TemplateStore
    from appliance.roster.model import Person
    from appliance.vision.gallery import normalise

    database = open_database(journal, writer=True)
    try:
        roster = [
            Person(
                f"HS{i:05d}", f"Học sinh {i:05d}", class_name=f"{6 + i % 4}A{i % 10}", cards=(f"{0x04A00000 + i:08X}",)
            )
            for i in range(people)
        ]
        RosterStore(database).apply(roster, replace=True)
        store = TemplateStore(database, Sealer.from_file(key_file))
        rng = np.random.default_rng(SEED)
        for person in roster:
            store.add(person.id, model, normalise(rng.standard_normal((per_person, dim), dtype=np.float32)))
    finally:
        database.close()


def gate_toml(journal: Path, vision: VisionConfig, camera: Path, key_file: Path) -> str:
    """A card-reader-free gate whose camera is the video file; faces on (with the given models), names off."""
    settings: dict[str, Any] = {
        "enabled": True,
        "camera": str(camera),
        "key_file": str(key_file),
        "models_dir": str(vision.models_dir.resolve()),
        "pack": vision.pack,
        "intra_op_threads": vision.intra_op_threads,
        "detect_max_side": vision.detect_max_side,
        "providers": list(vision.providers),
    }
    if vision.insightface_dir is not None:
        settings["insightface_dir"] = str(vision.insightface_dir.resolve())
    return (
        '[device]\nid = "bench-memory"\nschool = "bench"\n\n'
        f"[journal]\npath = {json.dumps(str(journal))}\nmin_free_mb = 1\n\n"
        '[feedback]\noutputs = ["console"]\nshow_names = false\n\n'
        '[logging]\nlevel = "INFO"\n\n'
        "[vision]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())
    )


# ------------------------------------------------------------------------------------------------ processes


def _wait_for_daemon(
    proc: subprocess.Popen[bytes], notify: socket.socket, journal: Path, log: Path, people: int
) -> dict[str, Any]:
    """READY=1, then a status file showing faces working with a face embedded, and the gallery in the log."""
    loaded = re.compile(rf"face gallery loaded: {people} people\b")

    def embedding() -> dict[str, Any] | None:
        vision: dict[str, Any] = json.loads(status_path(journal).read_text()).get("vision") or {}
        stats = vision.get("stats") or {}
        if vision.get("state") == "ok" and stats.get("embeddings", 0) >= 1 and loaded.search(log.read_text()):
            return vision
        return None

    vision = wait_settled(proc, notify, log, READY_TIMEOUT, embedding, pause=0.2)
    if vision is None:
        raise BenchError(
            f"edugate run did not load {people} people and embed a face within {READY_TIMEOUT:.0f}s; see {log}"
        )
    return vision


def measure_daemon(
    workdir: Path,
    vision: VisionConfig,
    video: Path,
    model: str,
    dim: int,
    people: int,
    per_person: int,
    seconds: float,
) -> dict[str, Any]:
    """Enrol ``people``, run the daemon on the video and sample it; returns its JSON line's fields."""
    home = workdir / f"gate-{people}"
    home.mkdir()
    journal, key_file = home / "journal.db", home / "templates.key"
    started = time.monotonic()
    write_journal(journal, key_file, model, dim, people, per_person)
    enrol_s = time.monotonic() - started
    config = home / "gate.toml"
    config.write_text(gate_toml(journal, vision, video, key_file))
    log = home / "daemon.log"
    notify_path = home / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "2000000", "PYTHONUNBUFFERED": "1"}
    env.pop("WATCHDOG_PID", None)
    env.pop("EDUGATE_CONFIG", None)
    daemon: subprocess.Popen[bytes] | None = None
    try:
        started = time.monotonic()
        daemon = start_daemon(config, env, home, log)
        status = _wait_for_daemon(daemon, notify, journal, log, people)
        ready_s = time.monotonic() - started
        sample = watch(f"edugate run, {people} enrolled", daemon, seconds, log)
        final = json.loads(status_path(journal).read_text()).get("vision") or status
        return {
            **sample.fields(),
            "people": people,
            "templates": people * per_person,
            "journal_mb": round(journal.stat().st_size / 1e6, 2),
            "enrol_s": round(enrol_s, 1),
            "ready_s": round(ready_s, 1),
            "pipeline": final.get("stats"),
        }
    finally:
        end(daemon)
        notify.close()


def measure_bare(seconds: float) -> dict[str, Any]:
    """An interpreter that has imported what the face pipeline imports, and nothing else."""
    code = f"{BARE_IMPORTS}; import sys, time; print('ready', flush=True); time.sleep({seconds + 60})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise BenchError(f"`python -c '{BARE_IMPORTS}'` failed (exit {proc.wait()})")
        return watch("bare imports", proc, min(seconds, 2.0)).fields()
    finally:
        end(proc, signal.SIGKILL)


def prepare(faces_dir: Path, vision: VisionConfig, path: Path) -> tuple[str, int]:
    """Write a short walk-past video (see :mod:`appliance.bench.face`) for the daemon's camera; returns the name
    the daemon loads templates under (the recognizer's) and the size of its embeddings."""
    from appliance.bench.face import BACKGROUND, cast_of, choose_walkers, single_face_photos, write_video
    from appliance.vision.engine import FaceEngine
    from appliance.vision.images import read_image
    from appliance.vision.models import load_pack

    engine = FaceEngine(load_pack(vision), max_side=vision.detect_max_side)
    walkers = choose_walkers(single_face_photos(faces_dir), VIDEO_PEOPLE)
    faces = {w.video_photo: engine.detect(read_image(w.video_photo))[0] for w in walkers}
    write_video(path, cast_of(walkers, faces), VIDEO_SECONDS, faces_dir / BACKGROUND)
    return engine.model_name, engine.embedding_size


def run(faces_dir: Path, vision: VisionConfig, people: int, per_person: int, seconds: float) -> None:
    """Bare imports, then the daemon with nobody and with ``people`` enrolled; one line each and a summary."""
    workdir = Path(tempfile.mkdtemp(prefix="edugate-bench-memory-"))
    try:
        progress("bench memory: making the camera's video")
        video = workdir / "walk.avi"
        model, dim = prepare(faces_dir, vision, video)
        progress("bench memory: bare imports")
        bare = measure_bare(seconds)
        emit(bench="memory", measure="process", imports=BARE_IMPORTS, **bare)
        results = {}
        for count in sorted({0, people}):
            progress(f"bench memory: edugate run with {count:,} people enrolled")
            results[count] = measure_daemon(workdir, vision, video, model, dim, count, per_person, seconds)
            emit(bench="memory", measure="process", **results[count])
        ours, empty = results[people], results[0]
        gallery_mb = ours["vm_rss_mb"] - empty["vm_rss_mb"]
        emit(
            bench="memory",
            people=people,
            templates_per_person=per_person,
            vectors="random unit vectors, sealed through TemplateStore with a real key file",
            camera="walk-past video file (faces detected, embedded and matched while measured)",
            rss_mb=ours["vm_rss_mb"],
            hwm_mb=ours["vm_hwm_mb"],
            limit_mb=LIMIT_MB,
            within_limit=ours["vm_hwm_mb"] <= LIMIT_MB,
            baseline_rss_mb=empty["vm_rss_mb"],
            baseline_hwm_mb=empty["vm_hwm_mb"],
            bare_imports_rss_mb=bare["vm_rss_mb"],
            gallery_mb=round(gallery_mb, 1),
            per_person_kb=round(gallery_mb * 1024 / people, 2) if people else None,
            seconds=seconds,
            **machine_info(),
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
