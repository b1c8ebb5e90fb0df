"""``bench sync``'s drain: a journal's backlog sent by the real SyncService, then live commits through it.

The service is wired as the daemon wires it. The drain is timed until every event is marked synced in
the journal and until the hub has them all; a drain that stops moving for STALL_SECONDS is reported as
such (``complete: false``, ``stuck_in_flight``) and the run goes on. The same running service then
sends events committed one by one, TAP_GAP apart: commit -> PUBACK and commit -> hub.
"""

from __future__ import annotations

import json
import random
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance.bench.gate_events import ZONE, live_uid
from appliance.bench.mqtt_broker import SCHOOL, BenchBroker, events_topic
from appliance.bench.stats import emit, progress, summary
from appliance.bench.sync_rig import (
    DRAIN_DEVICE,
    POLL_SECONDS,
    STALL_SECONDS,
    TAP_GAP,
    HubProcess,
    delivery,
    rate,
)
from appliance.bench.waiting import wait_progress
from appliance.events import Direction, EventDraft, Kind


def _gate_config(journal: Path, device: str, broker: BenchBroker, password: Path, window: int) -> Any:
    from appliance.config import parse_config

    return parse_config(
        {
            "device": {"id": device, "school": SCHOOL},
            "journal": {"path": str(journal), "min_free_mb": 1},
            "sync": broker.gate_sync(device, password, window),
            "vision": {"key_file": str(journal.parent / "templates.key")},  # not the machine's /var/lib/edugate
        },
        "<bench sync>",
    )


class AckClock:
    """Times each event's PUBACK: wraps the transport's publish (mid -> seq) and its on_ack callback."""

    def __init__(self, transport: Any, events_topic: str) -> None:
        self.transport = transport
        self.topic = events_topic
        self.seq_of_mid: dict[int, int] = {}
        self.acked_at: dict[int, float] = {}
        self._publish = transport.publish
        self._on_ack = transport.on_ack

    def install(self) -> None:
        self.transport.publish = self.publish
        self.transport.on_ack = self.on_ack

    def remove(self) -> None:
        self.transport.publish = self._publish
        self.transport.on_ack = self._on_ack

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int | None:
        mid: int | None = self._publish(topic, payload, retain)
        if mid is not None and topic == self.topic:
            self.seq_of_mid[mid] = int(json.loads(payload)["seq"])
        return mid

    def on_ack(self, mid: int, error: str | None) -> None:
        self.acked_at.setdefault(mid, time.monotonic())
        self._on_ack(mid, error)

    def puback_times(self) -> dict[int, float]:
        """seq -> PUBACK time (an ack can arrive before publish() returned, so join at the end)."""
        return {seq: self.acked_at[mid] for mid, seq in self.seq_of_mid.items() if mid in self.acked_at}


def _live_draft(index: int) -> EventDraft:
    return EventDraft(
        Kind.ARRIVAL,
        datetime.now(ZONE).isoformat(timespec="milliseconds"),
        True,
        person=f"HS{index + 1:05d}",
        role="student",
        reader="lane-in",
        direction=Direction.IN,
        card_uid=live_uid(index),
        late=False,
        minutes_late=0,
    )


def run_drain(
    journal_path: Path,
    broker: BenchBroker,
    hub: HubProcess,
    password_file: Path,
    window: int,
    count: int,
    taps: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The drain of ``count`` events, then ``taps`` live commits through the same running service."""
    from appliance.journal import EventJournal, open_database
    from appliance.sync.service import SyncService

    config = _gate_config(journal_path, DRAIN_DEVICE, broker, password_file, window)
    topic = events_topic(DRAIN_DEVICE)
    database = open_database(journal_path, writer=True)
    service: SyncService | None = None
    try:
        journal = EventJournal(database, DRAIN_DEVICE)
        service = SyncService(
            config, journal, lambda: {"readers": [], "camera": None, "clock_ok": True}, clock_ok=lambda: True
        )
        uplink = service.uplink
        progress(f"bench sync: drain: {count} events through SyncService (window {window}, batch {config.sync.batch})")
        began = time.monotonic()
        service.start()
        synced = wait_progress(lambda: uplink.acked_total, count, STALL_SECONDS, POLL_SECONDS)
        if synced is None:
            progress(
                f"bench sync: drain stalled: {uplink.acked_total}/{count} marked synced, {uplink.inflight()} in "
                f"flight for {STALL_SECONDS:.0f} s ({service.health()})"
            )
        tally = hub.wait(topic, count)
        unsynced = database.conn.execute("SELECT COUNT(*) FROM events WHERE synced_at IS NULL").fetchone()[0]
        received = tally["complete_at"] - began if tally["complete_at"] is not None else None
        synced_seconds = synced - began if synced is not None else None
        drain = {
            "bench": "sync",
            "measure": "drain",
            "events": count,
            "window": window,
            "batch": config.sync.batch,
            "complete": synced is not None,
            "synced_events": uplink.acked_total,
            "stuck_in_flight": uplink.inflight() if synced is None else 0,
            "synced_seconds": round(synced_seconds, 3) if synced_seconds is not None else None,
            "synced_events_per_s": rate(count, synced_seconds),
            "received_seconds": round(received, 3) if received is not None else None,
            "received_events_per_s": rate(count, received),
            "unsynced_after": unsynced,
            "published": uplink.published,
            **delivery(tally, count),
        }
        emit(**drain)

        progress(
            f"bench sync: live in process: {taps} commits {TAP_GAP[0] * 1000:.0f}-{TAP_GAP[1] * 1000:.0f} ms apart"
        )
        clock = AckClock(service.transport, topic)
        clock.install()
        rng = random.Random(11)
        committed: dict[int, float] = {}
        uid_seq: dict[str, int] = {}
        for index in range(taps):
            time.sleep(rng.uniform(*TAP_GAP))
            event = journal.append(_live_draft(index))
            committed[event.seq] = time.monotonic()
            uid_seq[live_uid(index)] = event.seq
            service.wake()
        live_tally = hub.wait(topic, count + taps)
        arrivals = hub.arrivals(topic)
        clock.remove()
        pubacks = clock.puback_times()
        to_puback = [(pubacks[seq] - t) * 1000 for seq, t in committed.items() if seq in pubacks]
        to_hub = [(arrivals[uid] - committed[seq]) * 1000 for uid, seq in uid_seq.items() if uid in arrivals]
        live = {
            "bench": "sync",
            "measure": "live_in_process",
            "taps": taps,
            "pubacks": len(to_puback),
            "hub_received": len(to_hub),
            "duplicates": live_tally["duplicates"] - tally["duplicates"],
            "in_order": live_tally["out_of_order"] == 0,
            **summary(to_puback, "commit_to_puback_ms"),
            **summary(to_hub, "commit_to_hub_ms"),
        }
        emit(**live)
        return drain, live
    finally:
        if service is not None:
            service.stop()
        database.close()
