"""``edugate bench idle``: CPU used by a real, idle ``edugate run`` watching two PC/SC lanes.

A gate spends nearly all of its life waiting for cards, on a Raspberry Pi that may also run
the face pipeline, so the daemon must block (SCardGetStatusChange, queue waits) rather than
poll. This starts a private pcscd with the virtual reader, a daemon subprocess on a temporary
config, waits until it is READY and both lanes are bound, then reads its CPU time
(utime + stime in /proc/PID/stat) across ``seconds`` of wall time. A sleeping Python child
measured over the same window is the baseline, so accounting noise on a shared machine
shows up next to the figure instead of inside it. pcscd's own CPU (it polls each slot for
card presence) is reported separately.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from appliance.bench.daemon_process import end, start_daemon, wait_settled
from appliance.bench.errors import BenchError
from appliance.readers.virtual import PrivatePcscd
from appliance.status import status_path

TARGET_PERCENT = 2.0
READY_TIMEOUT = 60.0
# What systemd gives the service (WatchdogSec=30 in systemd/edugate.service): the daemon then ticks every 5 s.
WATCHDOG_USEC = "30000000"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may contain spaces: split after the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLK_TCK


def _gate_toml(journal: Path, pcscd: PrivatePcscd) -> str:
    lanes = "".join(
        f'[[readers]]\nname = "lane-{slot}"\ntype = "pcsc"\nmatch = "{pcscd.slot_name(slot)}"\n'
        f'direction = "{direction}"\n\n'
        for slot, direction in ((0, "in"), (1, "out"))
    )
    return (
        '[device]\nid = "bench-idle"\nschool = "bench"\n\n'
        f'[journal]\npath = "{journal}"\nmin_free_mb = 1\n\n'
        '[feedback]\noutputs = ["console"]\nshow_names = false\n\n'
        '[logging]\nlevel = "WARNING"\n\n' + lanes
    )


def _lanes_bound(journal: Path) -> bool:
    readers = json.loads(status_path(journal).read_text()).get("readers", [])
    return len(readers) == 2 and all(r["state"] == "ok" for r in readers)


def _wait_ready(notify: socket.socket, proc: subprocess.Popen[bytes], journal: Path, log: Path) -> None:
    """READY=1 over sd_notify, then a status file showing both lanes bound (so the readers are idle, not starting)."""
    if not wait_settled(proc, notify, log, READY_TIMEOUT, lambda: _lanes_bound(journal), pause=0.1):
        raise BenchError(f"edugate run was not ready with both lanes within {READY_TIMEOUT:.0f}s; see {log}")


def run(seconds: float, port: int) -> None:
    """Measure and print one JSON line; everything started here is stopped and removed again."""
    why = PrivatePcscd.available()
    if why:
        raise BenchError(why)
    workdir = Path(tempfile.mkdtemp(prefix="edugate-bench-idle-"))
    pcscd = PrivatePcscd(port, workdir=workdir / "pcscd")
    daemon: subprocess.Popen[bytes] | None = None
    baseline: subprocess.Popen[bytes] | None = None
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        pcscd.start()
        journal = workdir / "journal.db"
        config = workdir / "gate.toml"
        config.write_text(_gate_toml(journal, pcscd))
        notify_path = workdir / "notify.sock"
        notify.bind(str(notify_path))
        # Started first, so its interpreter start-up is long over when the window opens.
        baseline = subprocess.Popen(
            [sys.executable, "-c", f"import time; time.sleep({seconds + READY_TIMEOUT + 30})"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        log = workdir / "daemon.log"
        env = {
            **pcscd.env(),
            "NOTIFY_SOCKET": str(notify_path),
            "WATCHDOG_USEC": WATCHDOG_USEC,
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("WATCHDOG_PID", None)
        daemon = start_daemon(config, env, workdir, log)
        _wait_ready(notify, daemon, journal, log)
        pids = {"daemon": daemon.pid, "baseline": baseline.pid, "pcscd": _pcscd_pid(pcscd)}
        wall0 = time.monotonic()
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        time.sleep(seconds)
        cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        wall = time.monotonic() - wall0
        if daemon.poll() is not None:
            raise BenchError(f"edugate run exited during the measurement; see {log}")
        percent = {n: round(100 * (cpu1[n] - cpu0[n]) / wall, 3) for n in cpu0}
        print(
            json.dumps(
                {
                    "bench": "idle",
                    "readers": 2,
                    "seconds": round(wall, 2),
                    "cpu_percent": percent["daemon"],
                    "target_percent": TARGET_PERCENT,
                    "baseline_cpu_percent": percent["baseline"],
                    "pcscd_cpu_percent": percent["pcscd"],
                    "clock_ticks_per_second": _CLK_TCK,
                }
            ),
            flush=True,
        )
    finally:
        end(daemon)
        end(baseline, signal.SIGKILL)
        notify.close()
        pcscd.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _pcscd_pid(pcscd: PrivatePcscd) -> int:
    """pcscd's own pid: ``unshare`` and ``sh -c '... && exec pcscd'`` normally exec into it; else its child."""
    assert pcscd.proc is not None
    pid = pcscd.proc.pid
    for _ in range(3):
        if Path(f"/proc/{pid}/comm").read_text().strip() == "pcscd":
            return pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if not children:
            break
        pid = int(children[0])
    raise BenchError("cannot find the pcscd process")
