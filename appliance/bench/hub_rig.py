"""What every phase of ``bench hub`` shares: its devices, its patience, and the hub wired to the bench's broker.

The hub is built from the same config and the same MQTT session as HubService builds them, so the
figures are those of the production hub and not of a look-alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.bench.mqtt_broker import BROKER_SETTINGS, HUB_USER, SCHOOL, BenchBroker

HUB_ID = "bench-hub"
LIVE_DEVICE = "bench-lane"
STALL_SECONDS = 60.0  # no progress for this long means something is broken, not slow
POLL_SECONDS = 0.005  # progress polling of in-process counters


def gate_name(index: int) -> str:
    return f"bench-gate-{index + 1}"


class QueueBroker(BenchBroker):
    """The bench broker with a queue per client big enough for the whole backlog (the hub is offline)."""

    def __init__(self, workdir: Path, users: dict[str, str], queued: int) -> None:
        super().__init__(workdir, users, None)
        self.queued = queued

    def _write_files(self) -> Path:
        conf = super()._write_files()
        limit = max(self.queued, int(BROKER_SETTINGS["max_queued_messages"]))
        with conf.open("a") as out:  # later lines win in mosquitto.conf
            out.write(f"max_queued_messages {limit}\nmax_queued_bytes {max(limit * 2048, 268435456)}\n")
        return conf


def hub_config(broker: BenchBroker, workdir: Path, database_url: str, **sections: dict[str, Any]) -> Any:
    """hub.toml as a dict, validated like a real one: this broker, plaintext, the hub's password file."""
    from appliance.config import parse_hub_config
    from appliance.sync.signing import generate_private_key

    password_file = workdir / "hub-password"
    if not password_file.exists():
        password_file.write_text(broker.users[HUB_USER] + "\n")
        password_file.chmod(0o600)
    key_file = workdir / "hub-signing.key"
    if not key_file.exists():
        generate_private_key(key_file)
    data: dict[str, Any] = {
        "hub": {"id": HUB_ID, "schools": [SCHOOL]},
        "database": {"url": database_url},
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "tls": False,
            "username": HUB_USER,
            "password_file": str(password_file),
        },
        "signing": {"key_file": str(key_file)},
        **sections,
    }
    return parse_hub_config(data, "<bench hub>")


def register_gates(store: Any, key_files: dict[str, Path]) -> None:
    """Register the bench's gates at its hub as IT does at provisioning, each with the keys of its template key
    file (made if missing; a real gate daemon of the bench uses its own): a hub refuses the others' messages."""
    from appliance.hub import gates
    from appliance.sync.gate_keys import signing_key_text
    from appliance.sync.sealed_transport import gate_private_key, gate_signing_key, public_text

    conn = store.connect()
    try:
        for device, key_file in key_files.items():
            template_key = public_text(gate_private_key(key_file))
            gates.add(conn, device, SCHOOL, template_key, signing_key_text(gate_signing_key(key_file)), replace=True)
    finally:
        conn.close()


def hub_transport(config: Any) -> Any:
    """The hub's MQTT session exactly as HubService opens it (client id, shared subscription, manual acks)."""
    from appliance.hub.service import subscriptions
    from appliance.sync.transport import MqttTransport

    return MqttTransport(
        config.mqtt,
        client_id=config.mqtt.client_id or f"edugate-{config.hub.id}",
        username=config.mqtt.username or HUB_USER,
        subscriptions=subscriptions(config),
        manual_ack=True,
    )
