"""The school hub's stand-in for ``edugate bench sync``: a paho QoS 1 subscriber in its own process.

The hub is another machine in a school; run inside the bench's process its paho loop would take the
GIL from the gate's uplink and slow both the drain and the baseline publisher. So it runs as
``python -m appliance.bench.mqtt_hub`` and talks to the bench over stdin/stdout, one JSON object
per line. The first line in is its settings (the password travels here, not in argv); it answers
``{"ready": true}`` once subscribed. Then, per command line, one answer line:

- ``{"cmd": "wait", "topic": T, "count": N, "stall": S}``: wait until N distinct seqs arrived on T,
  or nothing new arrived for S seconds; answer the topic's tally (``complete_at`` is when the last
  missing seq arrived, ``time.monotonic()``, which is one clock for all processes on Linux).
- ``{"cmd": "arrivals", "topic": T}``: first arrival time of each card UID seen on T.
- ``{"cmd": "status", "device": D, "timeout": S}``: wait for an online status of device D.
- ``{"cmd": "stop"}``: disconnect and exit.
"""

from __future__ import annotations

import json
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

# What the production hub subscribes to: events shared among hub instances, status of every gate.
EVENTS_FILTER = "$share/hub/edugate/+/+/events"
STATUS_FILTER = "edugate/+/+/status"


@dataclass
class Tally:
    """What one events topic delivered: every seq once, in order, is the goal."""

    received: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    max_seq: int = 0
    first_at: float | None = None
    last_new_at: float | None = None
    seqs: set[int] = field(default_factory=set)
    cards: dict[str, float] = field(default_factory=dict)

    def add(self, seq: int, card_uid: str | None, now: float) -> None:
        self.received += 1
        if self.first_at is None:
            self.first_at = now
        if seq in self.seqs:
            self.duplicates += 1
            return
        if seq < self.max_seq:
            self.out_of_order += 1
        self.seqs.add(seq)
        self.max_seq = max(self.max_seq, seq)
        self.last_new_at = now
        if card_uid is not None:
            self.cards.setdefault(card_uid, now)

    def report(self, count: int) -> dict[str, Any]:
        distinct = len(self.seqs)
        return {
            "received": self.received,
            "distinct": distinct,
            "duplicates": self.duplicates,
            "out_of_order": self.out_of_order,
            "min_seq": min(self.seqs) if self.seqs else None,
            "max_seq": self.max_seq or None,
            "exact": self.seqs == set(range(1, count + 1)),
            "first_at": self.first_at,
            "complete_at": self.last_new_at if distinct >= count else None,
        }


class Hub:
    """Counts events per topic and remembers the last status per device (paho's network thread writes)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.cond = threading.Condition()
        self.tallies: dict[str, Tally] = {}
        self.online: dict[str, bool] = {}
        self.subscribed = threading.Event()
        self.errors: list[str] = []
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id="bench-hub",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.username_pw_set(settings["username"], settings["password"])
        if settings.get("ca"):
            context = ssl.create_default_context(cafile=settings["ca"])
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            client.tls_set_context(context)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self.client = client

    def start(self, timeout: float = 10.0) -> None:
        self.client.connect(self.settings["host"], self.settings["port"], keepalive=30)
        self.client.loop_start()
        if not self.subscribed.wait(timeout):
            raise RuntimeError(f"no SUBACK within {timeout} s: {self.errors or 'no answer from the broker'}")
        if self.errors:
            raise RuntimeError("; ".join(self.errors))

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.errors.append(f"the broker refused the hub: {reason}")
            self.subscribed.set()
            return
        client.subscribe([(EVENTS_FILTER, 1), (STATUS_FILTER, 1)])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        self.errors += [f"subscription refused: {r}" for r in reasons if r.is_failure]
        self.subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        topic = message.topic
        data = json.loads(message.payload)
        with self.cond:
            if topic.endswith("/events"):
                tally = self.tallies.get(topic)
                if tally is None:
                    tally = self.tallies[topic] = Tally()
                tally.add(int(data["seq"]), data.get("card_uid"), now)
            elif topic.endswith("/status"):
                self.online[str(data.get("device"))] = bool(data.get("online"))
            self.cond.notify_all()

    def wait(self, topic: str, count: int, stall: float) -> dict[str, Any]:
        """Block until ``count`` distinct seqs, or until ``stall`` seconds pass without a new one."""
        with self.cond:
            while True:
                tally = self.tallies.setdefault(topic, Tally())
                if len(tally.seqs) >= count:
                    break
                seen = len(tally.seqs)
                self.cond.wait_for(lambda t=tally, n=seen: len(t.seqs) != n, stall)
                if len(tally.seqs) == seen:
                    break
            return tally.report(count)

    def arrivals(self, topic: str) -> dict[str, float]:
        with self.cond:
            return dict(self.tallies.get(topic, Tally()).cards)

    def wait_online(self, device: str, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.online.get(device, False), timeout)


def _answer(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def main() -> int:
    settings = json.loads(sys.stdin.readline())
    hub = Hub(settings)
    try:
        hub.start()
    except (OSError, RuntimeError, ssl.SSLError) as exc:
        _answer({"ready": False, "error": str(exc)})
        return 1
    _answer({"ready": True})
    try:
        for line in sys.stdin:
            command = json.loads(line)
            name = command["cmd"]
            if name == "wait":
                _answer(hub.wait(command["topic"], int(command["count"]), float(command["stall"])))
            elif name == "arrivals":
                _answer({"arrivals": hub.arrivals(command["topic"])})
            elif name == "status":
                _answer({"online": hub.wait_online(command["device"], float(command["timeout"]))})
            elif name == "stop":
                break
            else:
                _answer({"error": f"unknown command {name!r}"})
    finally:
        hub.stop()
    _answer({"stopped": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
