"""``bench sync``'s baseline: a bare paho-mqtt QoS 1 publisher sending the drain's bytes as fast as it can.

Run before and after the drain, with the same in-flight window, so the drain's rate is read against
what MQTT itself allows on this machine at that moment.
"""

from __future__ import annotations

import secrets
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from appliance.bench.errors import BenchError
from appliance.bench.mqtt_broker import BenchBroker, events_topic
from appliance.bench.stats import emit, progress
from appliance.bench.sync_rig import POLL_SECONDS, RAW_DEVICE, STALL_SECONDS, HubProcess, delivery, rate
from appliance.bench.waiting import wait_progress

RAW_OUTSTANDING = 30_000  # messages queued in paho at most (its message ids are 16-bit)


def tls_context(ca: Path | None) -> ssl.SSLContext | None:
    """The same client context as the gate's transport: the CA pinned, TLS 1.2 at least."""
    if ca is None:
        return None
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def raw_publish(
    broker: BenchBroker, password: str, window: int, payloads: list[bytes], topic: str
) -> tuple[float, float]:
    """A bare paho-mqtt 2.x QoS 1 publisher: connect, publish everything, wait for every PUBACK.

    paho keeps all but ``window`` messages in its own queue and sends them as PUBACKs free the window.
    It numbers messages with 16-bit ids and silently replaces a pending message whose id comes round
    again, so the loop keeps at most RAW_OUTSTANDING messages published and not yet acknowledged.

    Returns (monotonic start before the connect, monotonic time of the last PUBACK).
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"{RAW_DEVICE}-{secrets.token_hex(3)}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)
    client.username_pw_set(RAW_DEVICE, password)
    context = tls_context(broker.ca)
    if context is not None:
        client.tls_set_context(context)
    connected = threading.Event()
    room = threading.Event()
    acks = [0, 0]  # acknowledged, refused
    published = 0

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        connected.set()

    def on_publish(client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        acks[0] += 1
        acks[1] += reason.is_failure
        if published - acks[0] <= RAW_OUTSTANDING // 2:
            room.set()

    client.on_connect = on_connect
    client.on_publish = on_publish
    began = time.monotonic()
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise BenchError("baseline publisher: no CONNACK within 10 s")
        for payload in payloads:
            if published - acks[0] >= RAW_OUTSTANDING:
                room.clear()
                if published - acks[0] >= RAW_OUTSTANDING and not room.wait(STALL_SECONDS):
                    raise BenchError(f"baseline publisher: no PUBACK for {STALL_SECONDS:.0f} s: {broker.log_tail()}")
            client.publish(topic, payload, qos=1)
            published += 1
        finished = wait_progress(lambda: acks[0], len(payloads), STALL_SECONDS, POLL_SECONDS)
        if finished is None:
            raise BenchError(f"baseline publisher: stuck at {acks[0]}/{len(payloads)} PUBACKs: {broker.log_tail()}")
    finally:
        client.disconnect()
        client.loop_stop()
    if acks[1]:
        raise BenchError(f"the broker refused {acks[1]} baseline messages: {broker.log_tail()}")
    return began, finished


def run_raw(
    broker: BenchBroker, hub: HubProcess, password: str, window: int, payloads: list[bytes], run: int
) -> dict[str, Any]:
    """One baseline run on a topic of its own, so the hub stand-in's tally starts from nothing."""
    topic = events_topic(RAW_DEVICE, school=f"raw-{run}")
    progress(f"bench sync: baseline run {run}: bare paho publisher, {len(payloads)} messages")
    began, acked = raw_publish(broker, password, window, payloads, topic)
    tally = hub.wait(topic, len(payloads))
    seconds = acked - began
    received = tally["complete_at"] - began if tally["complete_at"] is not None else None
    result = {
        "bench": "sync",
        "measure": "raw",
        "run": run,
        "events": len(payloads),
        "seconds": round(seconds, 3),
        "events_per_s": rate(len(payloads), seconds),
        "received_seconds": round(received, 3) if received is not None else None,
        "received_events_per_s": rate(len(payloads), received),
        **delivery(tally, len(payloads)),
    }
    emit(**result)
    return result
