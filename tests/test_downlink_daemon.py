"""Hub -> gate messages against the real daemon and a real Mosquitto: what a hostile or broken hub link costs.

A downlink is parsed before its signature can be checked (the signature covers the canonical JSON), so the
gate first refuses what it need not parse: a message over its size limit, or one that carries no signature.
The school's broker (config/mosquitto/edugate.conf) takes no packet over that limit plus 64 KiB; these tests
lift the broker's limit, as on a broker configured otherwise, to test the gate's own check.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mqtt_broker import BROKER_USERS, MqttPeer, Subscriber
from sync_support import BASE, DEVICE, SCHOOL

from appliance.journal import open_database
from appliance.journal.roster_store import RosterStore
from appliance.sync.downlink import MAX_DOWNLINK_BYTES, Downlink, new_message

RESULTS = ("edugate/+/+/result",)
TOPIC = f"{BASE}/downlink/roster"
MB = 1024 * 1024
MQTT_MAX_PACKET = 268_435_455  # what MQTT itself allows


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (the most it was ever resident), in kB, from /proc."""
    found = re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return {name: int(value) for name, value in found}


def unsigned_roster(size: int) -> bytes:
    """An unsigned roster of about ``size`` bytes with people in clear: parsed whole, millions of objects."""
    entry = json.dumps({"id": "HS0000000", "full_name": "Nguyễn Văn An", "role": "student", "cards": ["04A1B2C3"]})
    people = ",".join(entry.replace("0000000", f"{i:07d}") for i in range(size // (len(entry.encode()) + 1)))
    message = new_message("roster.snapshot", SCHOOL, DEVICE, {"people": []}, version=99)
    return json.dumps(message).replace('"people": []', f'"people": [{people}]').encode()


def test_a_60_mb_unsigned_message_is_refused_in_one_line_without_ballooning_and_the_next_signed_one_applies(
    broker_factory: Any, gate_factory: Any
) -> None:
    broker = broker_factory(settings={"max_packet_size": str(MQTT_MAX_PACKET)})
    hub = Subscriber(broker=broker, topics=RESULTS)
    sender = MqttPeer(broker, "hub", BROKER_USERS["hub"])
    sender.connect()
    try:
        gate = gate_factory(broker)
        daemon = gate.start()
        gate.wait(lambda: gate.sync_status().get("state") == "online", 15, "online")
        assert daemon.proc is not None
        pid = daemon.proc.pid
        before = memory_kb(pid)["VmRSS"]
        payload = unsigned_roster(60 * MB)
        size, nonce = len(payload), json.loads(payload)["nonce"]
        assert 60 * MB <= size < 61 * MB and size > MAX_DOWNLINK_BYTES
        sender.publish(TOPIC, payload, timeout=120)
        del payload
        hub.wait_for(lambda m: len(m) >= 1, 120)

        (answer,) = [json.loads(m.payload) for m in hub.messages("/result")]
        assert not answer["ok"] and answer["ref"] == nonce
        assert answer["reason"].startswith(f"message of {size:,} bytes is larger than this gate accepts")
        logged = [line for line in daemon.stderr_lines if "downlink" in line]
        assert logged == [f"WARNING {Downlink.__module__}: downlink: refused a message on {TOPIC}: {answer['reason']}"]
        # MQTT receive buffers hold about three copies of the message for a moment (paho's packet, its payload,
        # the transport's bytes); parsing it whole added five more (a million dicts and strings): +556 MB.
        peak = memory_kb(pid)["VmHWM"] - before
        assert peak < 4 * size / 1024, f"the daemon grew by {peak // 1024} MB for a {size // MB} MB message"
        daemon.wait_for(lambda: memory_kb(pid)["VmRSS"] < before + 40 * 1024, 30, "memory given back")

        person = {"id": "HS1", "full_name": "Phạm Thu Hà", "role": "student", "cards": ["04AABBCC"]}
        signed = gate.command(sender, "roster.snapshot", {"people": [person]}, version=1)
        hub.wait_for(lambda m: any(json.loads(x.payload)["ref"] == signed["nonce"] for x in m), 20)
        assert json.loads(hub.messages("/result")[-1].payload)["ok"]
        database = open_database(gate.journal, readonly=True)
        try:
            assert [(p.id, p.cards) for p in RosterStore(database).all()] == [("HS1", ("04AABBCC",))]
        finally:
            database.close()
    finally:
        sender.close()
        hub.close()
