"""Fault tests on the real ``edugate run`` process: crashes, damaged journals, bad paths, full disks, clean stops.

What a school relies on: a tap the student saw acknowledged is in the journal exactly once, whatever happens
to the power, the disk or the file; and when something does go wrong the gate keeps running and says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import REPO, DaemonProcess, send_taps, write_config

ACK_MARKS = ("✔", "✖", "!")
ROUNDS = 6
STORM_SIZE = 300
PAGE = 4096
GARBAGE = b"\xde\xad\xbe\xef"


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for the config and unix sockets (sun_path is limited to 108 bytes, tmp_path is long)."""
    path = Path(tempfile.mkdtemp(prefix="eg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


Spawn = Callable[[Path], DaemonProcess]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start daemons (waiting for READY=1); any still running when the test ends is killed, pass or fail."""
    started: list[DaemonProcess] = []

    def start(config: Path) -> DaemonProcess:
        daemon = DaemonProcess(config)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()


def gate_config(short_dir: Path, journal: Path) -> tuple[Path, Path]:
    """A gate.toml with one socket lane; the clock is trusted so ``status`` is healthy unless something is wrong."""
    sock = short_dir / "lane.sock"
    lane = {"name": "lane", "type": "socket", "path": str(sock)}
    config = write_config(short_dir / "gate.toml", journal, [lane], clock={"assume_synced": True})
    return config, sock


def uids(rng: random.Random, count: int, taken: set[str] | None = None) -> list[str]:
    """Distinct 8-digit hex UIDs (canonical form: uppercase), none of them in ``taken``."""
    taken = taken if taken is not None else set()
    out: list[str] = []
    while len(out) < count:
        uid = f"{rng.getrandbits(32):08X}"
        if uid not in taken:
            taken.add(uid)
            out.append(uid)
    return out


def acks(daemon: DaemonProcess) -> list[str]:
    """The console feedback lines (one per acknowledged tap, in handling order)."""
    return [line for line in list(daemon.stdout_lines) if line.startswith(ACK_MARKS)]


def wait_acks(daemon: DaemonProcess, count: int, timeout: float = 60.0) -> list[str]:
    daemon.wait_for(lambda: len(acks(daemon)) >= count, timeout, f"{count} acknowledgements")
    return acks(daemon)


def tap_and_wait(daemon: DaemonProcess, sock: Path, cards: list[str]) -> list[str]:
    """Tap ``cards`` on the lane and return their acknowledgement lines."""
    before = len(acks(daemon))
    send_taps(sock, cards)
    return wait_acks(daemon, before + len(cards))[before:]


def read_events(journal: Path) -> list[tuple[Any, ...]]:
    """(seq, id, card_uid, payload) of every event, in seq order (the daemon must be stopped)."""
    with contextlib.closing(sqlite3.connect(journal)) as conn:
        return conn.execute("SELECT seq, id, card_uid, payload FROM events ORDER BY seq").fetchall()


def integrity(journal: Path) -> str:
    with contextlib.closing(sqlite3.connect(journal)) as conn:
        return "\n".join(row[0] for row in conn.execute("PRAGMA integrity_check"))


def journal_id(journal: Path) -> str:
    with contextlib.closing(sqlite3.connect(journal)) as conn:
        return conn.execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()[0]


def status_json(journal: Path) -> tuple[int, dict[str, Any]]:
    """``edugate status --journal PATH --json``: exit code and parsed output."""
    proc = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "status", "--journal", str(journal), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )
    assert proc.stdout.strip(), f"status printed nothing (exit {proc.returncode}): {proc.stderr}"
    return proc.returncode, json.loads(proc.stdout)


def assert_contiguous(seqs: list[int], first: int = 1) -> None:
    assert seqs == list(range(first, first + len(seqs))), f"seq not contiguous from {first}: {seqs[:10]}..."


# ---------------------------------------------------------------------------------------------- 1. SIGKILL


def kill_mid_storm(daemon: DaemonProcess, total: int, rng: random.Random) -> float:
    """SIGKILL at a random moment of the storm; returns the delay used after the first acknowledgement.

    The storm's length depends on the disk's fsync speed, so it is measured on the fly: the kill lands at
    a uniformly random fraction of the estimated remaining time (or at 90 % acknowledged, if sooner).
    """
    daemon.wait_for(lambda: len(acks(daemon)) >= 1, 20, "the first acknowledgement")
    start, seen = time.monotonic(), len(acks(daemon))
    sample = seen + max(10, total // 20)
    deadline = start + 5
    while len(acks(daemon)) < sample and time.monotonic() < deadline:
        time.sleep(0.001)
    done = len(acks(daemon))
    rate = max(done - seen, 1) / (time.monotonic() - start)
    delay = rng.uniform(0.05, 0.7) * max(total - done, 0) / rate
    # A stall while sampling makes the estimate too long; never wait for the last tenth of the storm.
    until = time.monotonic() + delay
    while time.monotonic() < until and len(acks(daemon)) < 0.9 * total:
        time.sleep(0.001)
    assert daemon.kill(signal.SIGKILL) == -signal.SIGKILL
    return delay


def test_sigkill_during_tap_storm_loses_and_duplicates_nothing(tmp_path: Path, short_dir: Path, spawn: Spawn) -> None:
    """Power cuts in the middle of the morning rush: no acknowledged tap lost, none counted twice.

    Each round kills the daemon mid-storm; the students whose tap was not acknowledged tap again in the
    next round. A tap committed but killed before its acknowledgement must then be debounced (the policy
    reseeds its memory from the journal), not journalled a second time.
    """
    seed = int(os.environ.get("EDUGATE_FAULT_SEED", time.time_ns() % 2**32))
    print(f"EDUGATE_FAULT_SEED={seed}")
    rng = random.Random(seed)
    journal = tmp_path / "journal.db"
    config, sock = gate_config(short_dir, journal)
    taken: set[str] = set()
    pending: list[str] = []  # sent, not yet acknowledged, in the order first sent
    acked: set[str] = set()
    mid_storm = 0
    repeats = 0
    for round_no in range(ROUNDS):
        batch = pending + uids(rng, STORM_SIZE, taken)
        daemon = spawn(config)
        send_taps(sock, batch)
        delay = kill_mid_storm(daemon, len(batch), rng)
        lines = acks(daemon)
        assert not [line for line in lines if line.startswith("!")], f"journal errors in round {round_no}"
        assert len(lines) <= len(batch)
        acked.update(batch[: len(lines)])
        pending = batch[len(lines) :]
        repeats += sum("repeat within debounce" in line for line in daemon.stderr_lines)
        mid_storm += 0 < len(lines) < len(batch)
        print(f"round {round_no}: sent {len(batch)}, acknowledged {len(lines)}, killed {delay * 1000:.0f} ms in")

    daemon = spawn(config)
    final = tap_and_wait(daemon, sock, pending)
    assert not [line for line in final if line.startswith("!")]
    repeats += sum("repeat within debounce" in line for line in daemon.stderr_lines)
    acked.update(pending)
    assert daemon.stop() == 0
    print(f"{mid_storm}/{ROUNDS} rounds killed mid-storm; {repeats} committed-but-unacknowledged taps debounced")

    assert mid_storm > ROUNDS // 2, "most kills did not land mid-storm: this run proves nothing"
    assert integrity(journal) == "ok"
    assert not list(tmp_path.glob("journal.db.corrupt-*")), "a crash was mistaken for corruption"
    rows = read_events(journal)
    assert_contiguous([row[0] for row in rows])
    assert len({row[1] for row in rows}) == len(rows), "event ids are not unique"
    cards = [row[2] for row in rows]
    duplicated = sorted({c for c in cards if cards.count(c) > 1})
    assert not duplicated, f"{len(duplicated)} cards journalled twice (retry not debounced): {duplicated[:5]}"
    missing, phantom = acked - set(cards), set(cards) - taken
    assert not missing, f"{len(missing)} acknowledged taps are not in the journal: {sorted(missing)[:5]}"
    assert not phantom, f"events for cards never tapped: {sorted(phantom)[:5]}"
    assert acked == taken, "some taps were never acknowledged, even in the clean final round"
    for seq, event_id, card, payload in rows:
        data = json.loads(payload)
        assert (data["seq"], data["id"], data["card_uid"], data["kind"]) == (seq, event_id, card, "unknown_card")


# ---------------------------------------------------------------------------------------------- 2. corruption


def events_pages(journal: Path) -> list[tuple[int, int]]:
    """(page number, cells) of the events table's leaf pages, in key order."""
    with contextlib.closing(sqlite3.connect(journal)) as conn:
        rows = conn.execute(
            "SELECT pageno, ncell FROM dbstat WHERE name = 'events' AND pagetype = 'leaf' ORDER BY path"
        ).fetchall()
    return [(int(page), int(cells)) for page, cells in rows]


def readable_seqs(damaged: Path, work: Path, highest: int) -> set[int]:
    """Seqs whose row can still be read from the damaged file, one lookup each (on a copy, never the original)."""
    probe = work / "probe.db"
    shutil.copyfile(damaged, probe)
    found: set[int] = set()
    with contextlib.closing(sqlite3.connect(f"file:{probe}?mode=ro", uri=True)) as conn:
        for seq in range(1, highest + 1):
            with contextlib.suppress(sqlite3.DatabaseError):
                if conn.execute("SELECT payload FROM events WHERE seq = ?", [seq]).fetchone():
                    found.add(seq)
    probe.unlink()
    return found


def quick_check_fails(path: Path, work: Path) -> bool:
    probe = work / "qc.db"
    shutil.copyfile(path, probe)
    try:
        with contextlib.closing(sqlite3.connect(f"file:{probe}?mode=ro", uri=True)) as conn:
            return conn.execute("PRAGMA quick_check").fetchone()[0] != "ok"
    except sqlite3.DatabaseError:
        return True
    finally:
        probe.unlink()


@pytest.mark.parametrize("damage", ["middle-page", "header"])
def test_corrupted_journal_is_kept_aside_and_salvaged(
    tmp_path: Path, short_dir: Path, spawn: Spawn, damage: str
) -> None:
    """A damaged SD card must not stop the gate: it starts, keeps the evidence, recovers what is readable.

    Middle page: every row still readable in the damaged file comes back unchanged (same seq, id, payload)
    under the same journal id, and new taps never reuse a seq the old journal had given out.
    Header: nothing is readable, so a NEW journal id starts again at seq 1.
    """
    rng = random.Random(f"corrupt-{damage}")
    taken: set[str] = set()
    journal = tmp_path / "journal.db"
    config, sock = gate_config(short_dir, journal)
    daemon = spawn(config)
    tap_and_wait(daemon, sock, uids(rng, 400, taken))
    assert daemon.stop() == 0
    original = {row[0]: row for row in read_events(journal)}
    old_id = journal_id(journal)
    leaves = events_pages(journal)
    assert len(original) == 400 and len(leaves) >= 10

    data = bytearray(journal.read_bytes())
    lost: set[int] = set()
    if damage == "header":
        data[:100] = GARBAGE * 25
    else:
        index = len(leaves) // 2
        page, cells = leaves[index]
        data[(page - 1) * PAGE : page * PAGE] = GARBAGE * (PAGE // len(GARBAGE))
        before = sum(c for _, c in leaves[:index])
        lost = set(range(before + 1, before + cells + 1))
    journal.write_bytes(bytes(data))
    assert quick_check_fails(journal, tmp_path), "the damage did not break the file: the test proves nothing"
    readable = readable_seqs(journal, tmp_path, max(original))
    # What is guaranteed: exactly the rows on the overwritten page are gone (interior pages are intact).
    assert readable == (set() if damage == "header" else set(original) - lost)

    daemon = spawn(config)
    try:
        corrupt = [p for p in tmp_path.glob("journal.db.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
        assert len(corrupt) == 1, f"damaged journal not kept aside: {sorted(p.name for p in tmp_path.iterdir())}"
        assert corrupt[0].read_bytes() == bytes(data), "the damaged file kept aside was modified"
        daemon.wait_for(
            lambda: any(
                line.startswith("ERROR") and "damaged" in line and str(corrupt[0]) in line
                for line in daemon.stderr_lines
            ),
            10,
            "an ERROR line naming the damaged file kept aside",
        )
        assert not [line for line in daemon.stderr_lines if "Traceback" in line]
        new_cards = uids(rng, 5, taken)
        lines = tap_and_wait(daemon, sock, new_cards)
        assert all(line.startswith("✖") for line in lines), lines  # unknown cards, recorded
        code, status = status_json(journal)
        assert code == 0, status
        assert status["running"] is True and status["problems"] == []
        assert status["journal"]["events"] == len(readable) + len(new_cards)
    finally:
        stopped = daemon.stop()
    assert stopped == 0, daemon.stderr_lines[-10:]

    assert integrity(journal) == "ok"
    rows = read_events(journal)
    recovered = {row[0]: row for row in rows if row[2] not in new_cards}
    assert set(recovered) == readable, f"missing after salvage: {sorted(readable - set(recovered))[:10]}"
    assert all(recovered[seq] == original[seq] for seq in readable), "a salvaged event changed"
    new_rows = [row for row in rows if row[2] in new_cards]
    assert [row[2] for row in new_rows] == new_cards
    new_id = journal_id(journal)
    if damage == "header":
        assert new_id != old_id
        assert_contiguous([row[0] for row in new_rows], first=1)
    else:
        assert new_id == old_id
        # Same journal id: a seq already given out (even one lost with the bad page) must never be reused.
        assert_contiguous([row[0] for row in new_rows], first=max(original) + 1)
    assert {json.loads(row[3])["journal"] for row in new_rows} == {new_id}


# ---------------------------------------------------------------------------------------------- 3. bad path


@pytest.mark.parametrize("below", ["journal.db", "sub/journal.db"])
def test_unwritable_journal_path_fails_fast_with_one_clear_line(tmp_path: Path, short_dir: Path, below: str) -> None:
    """A wrong journal.path must make systemd's log say what is wrong in one line, not hang or dump a traceback."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a regular file where the journal directory should be\n")
    config, _ = gate_config(short_dir, blocker / below)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        env={**os.environ, "NOTIFY_SOCKET": ""},
    )
    elapsed = time.monotonic() - start
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0
    assert elapsed < 10, f"took {elapsed:.1f} s to give up"
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("edugate: error:") and str(blocker) in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert blocker.read_text().startswith("a regular file")


# ---------------------------------------------------------------------------------------------- 4. disk full


@pytest.fixture
def small_disk(short_dir: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root only), always unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = short_dir / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(directory: Path) -> Path:
    """Write a filler file until the filesystem says ENOSPC."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out:
        for chunk in (1 << 16, 4096, 512):
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * chunk)
    stats = os.statvfs(directory)
    assert stats.f_bavail == 0, "the disk is not full"
    return filler


def test_disk_full_taps_get_error_and_gate_recovers(short_dir: Path, small_disk: Path, spawn: Spawn) -> None:
    """Disk full at the gate: no false OK, the daemon stays up and says why, and recovers once space is freed."""
    rng = random.Random("disk-full")
    taken: set[str] = set()
    journal = small_disk / "journal.db"
    config, sock = gate_config(short_dir, journal)
    daemon = spawn(config)
    try:
        before = uids(rng, 20, taken)
        assert all(line.startswith("✖") for line in tap_and_wait(daemon, sock, before))

        filler = fill(small_disk)
        failed = uids(rng, 10, taken)
        lines = tap_and_wait(daemon, sock, failed)
        assert all(line.startswith("!") for line in lines), f"a tap was acknowledged on a full disk: {lines}"
        assert daemon.proc is not None and daemon.proc.poll() is None
        watchdogs = daemon.notifications.count("WATCHDOG=1")
        daemon.wait_for(lambda: daemon.notifications.count("WATCHDOG=1") >= watchdogs + 2, 10, "watchdog pings")

        def journal_problem() -> bool:
            code, status = status_json(journal)
            return code == 1 and status["running"] and any(p.startswith("journal:") for p in status["problems"])

        daemon.wait_for(journal_problem, 15, "status to report the journal error (degraded, exit 1)")
        _, status = status_json(journal)
        assert status["journal"]["events"] == len(before) and status["journal"]["last_seq"] == len(before)
        assert any("full" in p for p in status["problems"] if p.startswith("journal:")), status["problems"]
        assert status["counters"]["errors"] == len(failed)
        assert sum("NOT recorded" in line for line in daemon.stderr_lines) == len(failed)

        filler.unlink()
        after = failed + uids(rng, 5, taken)  # the refused students tap again, then others arrive
        assert all(line.startswith("✖") for line in tap_and_wait(daemon, sock, after))

        def journal_ok() -> bool:
            return not [p for p in status_json(journal)[1]["problems"] if p.startswith("journal:")]

        daemon.wait_for(journal_ok, 15, "the journal problem to clear from status")
    finally:
        stopped = daemon.stop()
    assert stopped == 0, daemon.stderr_lines[-10:]

    assert integrity(journal) == "ok"
    rows = read_events(journal)
    assert_contiguous([row[0] for row in rows])
    assert [row[2] for row in rows] == before + after, "events lost, duplicated or reordered around the full disk"


# ---------------------------------------------------------------------------------------------- 5. SIGTERM


def test_sigterm_stops_cleanly(tmp_path: Path, short_dir: Path, spawn: Spawn) -> None:
    """systemctl stop / reboot: exit 0, STOPPING=1 for systemd, an intact journal and status 'not running'."""
    rng = random.Random("sigterm")
    journal = tmp_path / "journal.db"
    config, sock = gate_config(short_dir, journal)
    daemon = spawn(config)
    cards = uids(rng, 50)
    tap_and_wait(daemon, sock, cards)
    assert daemon.stop() == 0
    assert "STOPPING=1" in daemon.notifications
    assert daemon.notifications.index("READY=1") < daemon.notifications.index("STOPPING=1")
    assert not [line for line in daemon.stderr_lines if "Traceback" in line or line.startswith("ERROR")]
    assert integrity(journal) == "ok"
    rows = read_events(journal)
    assert_contiguous([row[0] for row in rows])
    assert [row[2] for row in rows] == cards
    code, status = status_json(journal)
    assert code == 3 and status["running"] is False
