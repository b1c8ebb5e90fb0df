"""``bench sync``'s end-to-end latency: card UIDs written to a real ``edugate run``'s lane -> the hub has the event.

The console acknowledgement is timed in between; everything is on one clock (CLOCK_MONOTONIC).
"""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path
from typing import Any

from appliance.bench.errors import BenchError
from appliance.bench.gate_events import live_uid
from appliance.bench.lane_daemon import READY_TIMEOUT, DaemonRun, connect_lane, daemon_toml, enroll
from appliance.bench.mqtt_broker import BenchBroker, events_topic
from appliance.bench.stats import emit, latency_legs, progress, summary
from appliance.bench.sync_rig import LIVE_DEVICE, TAP_GAP, HubProcess, delivery


def _students(taps: int) -> list[Any]:
    """One student per live tap, named so the console acknowledgement says which tap it was."""
    from appliance.roster.model import Person, Role

    return [
        Person(f"HS{i + 1:05d}", f"Học sinh {i:05d}", Role.STUDENT, f"{6 + i % 4}A", True, (live_uid(i),))
        for i in range(taps)
    ]


def run_daemon_latency(
    workdir: Path, broker: BenchBroker, hub: HubProcess, password: Path, window: int, taps: int
) -> dict[str, Any]:
    """Card UIDs written to a real daemon's socket lane -> the hub has the event (one clock: CLOCK_MONOTONIC)."""
    from appliance.journal import open_database
    from appliance.journal.events import journal_stats

    workdir.mkdir(parents=True, exist_ok=True)
    journal = workdir / "journal.db"
    lane_path = workdir / "lane.sock"
    enroll(journal, _students(taps))
    config = workdir / "gate.toml"
    config.write_text(daemon_toml(journal, lane_path, broker, password, LIVE_DEVICE, window=window))
    progress(f"bench sync: live end to end: edugate run, {taps} taps on a socket lane")
    daemon = DaemonRun(config, workdir)
    written: dict[int, float] = {}
    lane: socket.socket | None = None
    try:
        daemon.wait_ready()
        if not hub.wait_online(LIVE_DEVICE, READY_TIMEOUT):
            raise BenchError(f"the daemon never said online on its status topic: {daemon.log_tail()}")
        lane = connect_lane(lane_path)
        rng = random.Random(13)
        for index in range(taps):
            time.sleep(rng.uniform(*TAP_GAP))
            line = f"{live_uid(index)}\n".encode()
            written[index] = time.monotonic()
            lane.sendall(line)
        topic = events_topic(LIVE_DEVICE)
        tally = hub.wait(topic, taps)
        arrivals = hub.arrivals(topic)
    finally:
        if lane is not None:
            lane.close()
        exit_code = daemon.stop()
    database = open_database(journal, readonly=True)
    try:
        stats = journal_stats(database)
    finally:
        database.close()
    to_hub, to_ack, ack_to_hub = latency_legs(
        (began, arrivals.get(live_uid(index)), daemon.acks.get(index)) for index, began in written.items()
    )
    result = {
        "bench": "sync",
        "measure": "latency",
        "taps": taps,
        "acked": len(to_ack),
        "daemon_events": stats.events,
        "daemon_unsynced_after_stop": stats.unsynced,
        "daemon_exit_code": exit_code,
        **delivery(tally, taps),
        **summary(to_hub, "tap_to_hub_ms"),
        **summary(to_ack, "tap_to_ack_ms"),
        **summary(ack_to_hub, "ack_to_hub_ms"),
    }
    emit(**result)
    return result
