"""``bench hub``'s ingest: a backlog published while the hub is away, then timed into the hub's database.

The hub's session is made first and closed, so the broker queues the gates' events for it, as it
does for a hub that is down for the night; then the hub's ingest starts on the waiting backlog.
"""

from __future__ import annotations

import random
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.bench.errors import BenchError
from appliance.bench.gate_events import realistic_drafts
from appliance.bench.hub_rig import POLL_SECONDS, STALL_SECONDS, gate_name, hub_transport, register_gates
from appliance.bench.mqtt_broker import BenchBroker, events_topic
from appliance.bench.stats import emit, progress
from appliance.bench.waiting import wait_progress
from appliance.events import Event

PUBLISH_CHUNK = 20_000  # messages a gate publishes before waiting for their PUBACKs (paho's ids are 16-bit)
COUNT_POLL_SECONDS = 0.05  # progress polling of the events table: a query, so less often
NO_MATCHING_SUBSCRIBERS = 0x10


def backlog(count: int, gates: int, seed: int = 5) -> dict[str, list[bytes]]:
    """A school's days at its gates, dealt round-robin to ``gates`` devices, each with its own seq from 1."""
    journals = {gate_name(i): uuid.UUID(int=random.Random(seed + i).getrandbits(128)).hex for i in range(gates)}
    out: dict[str, list[bytes]] = {name: [] for name in journals}
    for index, draft in enumerate(realistic_drafts(count, seed)):
        device = gate_name(index % gates)
        event = Event(uuid.uuid4().hex, device, journals[device], len(out[device]) + 1, draft)
        out[device].append(event.to_json().encode("utf-8"))
    return out


def _publish_gate(broker: BenchBroker, device: str, password: str, payloads: list[bytes], refused: list[str]) -> None:
    """One gate's QoS 1 publisher; any PUBACK that is not a plain success is recorded as refused."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"{device}-{secrets.token_hex(3)}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.username_pw_set(device, password)
    connected = threading.Event()
    acked = [0]
    lock = threading.Lock()

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        connected.set()

    def on_publish(client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with lock:
            acked[0] += 1
            if reason.is_failure or reason.value == NO_MATCHING_SUBSCRIBERS:
                refused.append(f"{device}: {reason}")

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise BenchError(f"{device}: no CONNACK within 10 s")
        topic = events_topic(device)
        for start in range(0, len(payloads), PUBLISH_CHUNK):
            for payload in payloads[start : start + PUBLISH_CHUNK]:
                client.publish(topic, payload, qos=1)
            goal = min(start + PUBLISH_CHUNK, len(payloads))
            if wait_progress(lambda: acked[0], goal, STALL_SECONDS, POLL_SECONDS) is None:
                raise BenchError(f"{device}: stuck at {acked[0]}/{goal} PUBACKs: {broker.log_tail()}")
    finally:
        client.disconnect()
        client.loop_stop()


def publish_backlog(broker: BenchBroker, passwords: dict[str, str], events: dict[str, list[bytes]]) -> float:
    """Every gate publishes its part at once; returns the seconds until the last PUBACK."""
    refused: list[str] = []
    errors: list[BaseException] = []

    def gate(device: str) -> None:
        try:
            _publish_gate(broker, device, passwords[device], events[device], refused)
        except BaseException as exc:
            errors.append(exc)

    began = time.monotonic()
    threads = [threading.Thread(target=gate, args=(device,), name=f"bench-{device}") for device in events]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchError(str(errors[0]))
    if refused:
        raise BenchError(
            f"the broker did not queue {len(refused)} events for the hub ({refused[0]}): is the hub's session there?"
        )
    return time.monotonic() - began


def _count(conn: Any) -> int:
    row = conn.one("SELECT COUNT(*) FROM events")
    return int(row[0]) if row else 0


def open_session(config: Any) -> None:
    """Connect once as the hub (subscribing) and leave: the broker keeps the session and queues for it."""
    transport = hub_transport(config)
    transport.start()
    try:
        if not transport.connected.wait(15):
            raise BenchError(f"the hub could not connect to the bench broker: {transport.link.last_error}")
        time.sleep(0.3)  # the SUBSCRIBEs leave before the DISCONNECT; the publishers' PUBACKs prove they landed
    finally:
        transport.stop()


def run_ingest(config: Any, total: int, label: str, devices: list[str], key_dir: Path) -> dict[str, Any]:
    """Start the hub's ingest on the waiting backlog of the registered ``devices``; time it until ``total``
    events are stored."""
    from appliance.hub.ingest import IngestWorker
    from appliance.hub.store import Store, StoreError

    store = Store(config.database)
    try:
        store.migrate()
    except StoreError as exc:
        raise BenchError(str(exc)) from None
    register_gates(store, {device: key_dir / f"{device}.key" for device in devices})
    worker = IngestWorker(store, config.mqtt.topic_prefix, zone=config.zone)
    transport = hub_transport(config)
    first: list[float] = []
    acked = [0]  # only the ingest thread acknowledges (after the commit)

    def submit(topic: str, payload: bytes, ack: Callable[[], None]) -> None:
        if not first:
            first.append(time.monotonic())

        def counted() -> None:
            ack()
            acked[0] += 1

        worker.submit(topic, payload, counted)

    transport.on_message = submit
    progress(f"bench hub: ingest into {label}: {total} events waiting in the broker")
    began = time.monotonic()
    worker.start()
    transport.start()
    counter = store.connect()
    try:
        assert worker.ingest is not None
        stats = worker.ingest.stats
        # Acknowledged means committed; the table is the judge (a redelivered message is acknowledged too).
        done = wait_progress(lambda: acked[0], total, STALL_SECONDS, POLL_SECONDS)
        if done is not None:
            done = wait_progress(lambda: _count(counter), total, STALL_SECONDS, COUNT_POLL_SECONDS)
        seconds = done - began if done is not None else None
    finally:
        transport.stop()
        worker.stop()
        counter.close()
    conn = store.connect()
    try:
        rows, distinct = conn.one("SELECT COUNT(*), COUNT(DISTINCT id) FROM events") or (0, 0)
        streams = conn.all("SELECT device, contiguous, highest FROM streams ORDER BY device")
    finally:
        conn.close()
    result = {
        "bench": "hub",
        "measure": "ingest",
        "database": label,
        "events": total,
        "complete": done is not None,
        "seconds": round(seconds, 3) if seconds is not None else None,
        "events_per_s": round(total / seconds, 1) if seconds else None,
        "first_message_ms": round((first[0] - began) * 1000, 1) if first else None,
        "stored": stats.stored,
        "rows": rows,
        "distinct_ids": distinct,
        "duplicates": stats.duplicates,
        "rejected": stats.rejected,
        "batches": stats.batches,
        "mean_batch": round((stats.stored + stats.duplicates) / stats.batches, 1) if stats.batches else None,
        "gaps": sum(1 for _, contiguous, highest in streams if contiguous != highest),
        "every_event_once": rows == total and distinct == total and stats.rejected == 0,
    }
    emit(**result)
    return result
