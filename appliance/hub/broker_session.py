"""A short MQTT 5 session of the hub for publishing to the gates (roster, templates) and reading their keys."""

from __future__ import annotations

import json
import os
import secrets
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from appliance.config import HubConfig
from appliance.sync.transport import (
    TransportConfigError,
    describe_connect_error,
    describe_refusal,
    read_password,
    tls_context,
)


class PublishError(Exception):
    """Nothing could be published (no roster, no broker); the message says what to do."""


class BrokerSession:
    """A short MQTT 5 session of the hub: clean start, no session left at the broker, every PUBACK awaited.

    Not the daemon's MqttTransport: that one keeps a persistent session, which for a one-off
    command would leave the broker queueing gates' results for a client that never returns.
    """

    def __init__(self, config: HubConfig) -> None:
        link = config.mqtt
        self.link = link
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(link, name)
            if path is not None and not os.access(path, os.R_OK):
                raise TransportConfigError(f"mqtt.{name} {path}: missing or not readable by this user")
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"edugate-{config.hub.id}-publish-{os.getpid()}-{secrets.token_hex(3)}",
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,  # a lost connection ends the command; nothing is resent behind its back
        )
        self.client.username_pw_set(link.username or "hub", read_password(link))
        if link.tls:
            self.client.tls_set_context(tls_context(link))
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self._cond = threading.Condition()
        self._connack: ReasonCode | None = None
        self.lost: str | None = None  # why the connection ended, once it has
        self.max_packet: int | None = None
        self._acks: dict[int, ReasonCode] = {}
        self._subacks: set[int] = set()
        self.results: dict[str, dict[str, Any]] = {}
        self.wanted: set[str] = set()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        with self._cond:
            self._connack = reason
            self.max_packet = getattr(props, "MaximumPacketSize", None)
            self._cond.notify_all()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        with self._cond:
            self.lost = str(reason)
            self._cond.notify_all()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
        with self._cond:
            self._acks[mid] = reason
            self._cond.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        with self._cond:
            self._subacks.add(mid)
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            result = json.loads(message.payload)
        except ValueError:
            return
        if isinstance(result, dict) and result.get("ref") in self.wanted:
            with self._cond:
                self.results[result["ref"]] = result
                self._cond.notify_all()

    def _wait(self, done: Any, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(done, timeout)

    def connect(self, timeout: float = 15.0) -> None:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 0
        try:
            self.client.connect(
                self.link.host, self.link.port, keepalive=self.link.keepalive, clean_start=True, properties=properties
            )
        except (OSError, ValueError) as exc:
            raise PublishError(describe_connect_error(exc, self.link)) from None
        self.client.loop_start()
        if not self._wait(lambda: self._connack is not None, timeout):
            self.close()
            raise PublishError(f"no answer from the broker at {self.link.host}:{self.link.port} within {timeout:.0f} s")
        assert self._connack is not None
        if self._connack.is_failure:
            self.close()
            raise PublishError(describe_refusal(self._connack))

    def subscribe(self, topic: str, timeout: float = 10.0) -> None:
        _, mid = self.client.subscribe(topic, qos=1)
        if not self._wait(lambda: mid in self._subacks, timeout):
            raise PublishError(f"the broker did not confirm the subscription to {topic}")

    def publish(self, topic: str, payload: bytes) -> int:
        """Queue a retained QoS 1 message; its mid, whose PUBACK ``acks`` waits for.

        A connection that ended meanwhile is not an error here: the broker may have dropped it over the
        previous message (Mosquitto's answer to one over message_size_limit makes paho drop it), and the
        message is then reported with the others that were not acknowledged.
        """
        info = self.client.publish(topic, payload, qos=1, retain=True)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise PublishError(f"could not queue a message on {topic}: {mqtt.error_string(info.rc)}")
        return info.mid

    def acks(self, mids: list[int], timeout: float) -> dict[int, ReasonCode]:
        self._wait(lambda: all(m in self._acks for m in mids) or self.lost is not None, timeout)
        with self._cond:
            return {m: self._acks[m] for m in mids if m in self._acks}

    def wait_results(self, refs: set[str], timeout: float) -> None:
        self._wait(lambda: refs <= set(self.results), timeout)

    def close(self) -> None:
        if self.client.is_connected():
            self.client.disconnect()
        self.client.loop_stop()
