"""The MQTT connection of a gate, and only that: connect, stay connected, say why not.

paho-mqtt's own reconnect loop has no jitter and hides why a connection failed, so this
class runs its own network thread: connect (TLS with a pinned CA, password or client
certificate), run paho's loop until the link drops, wait an exponentially growing,
jittered delay, reconnect. A school's gates all lose the network together when its
router reboots; jitter keeps them from reconnecting in lockstep.

Other threads publish through :meth:`publish`. paho writes to the socket only from this
network thread (a no-op ``on_socket_register_write`` keeps ``publish`` from writing
itself), so a TLS socket is never written by two threads at once.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from appliance.config import MqttLink

log = logging.getLogger(__name__)

PASSWORD_ENV = "EDUGATE_MQTT_PASSWORD"
NO_MATCHING_SUBSCRIBERS = 0x10
NO_SUBSCRIBERS = "no subscriber: the broker dropped it because the hub is not subscribed"


class TransportConfigError(Exception):
    """Settings that can never connect (missing CA file, unreadable password); fix the config."""


@dataclass
class LinkState:
    """What ``edugate status`` and the status message say about the connection."""

    state: str = "starting"  # starting | connecting | online | offline | stopped
    since: float = field(default_factory=time.time)
    last_error: str | None = None
    connects: int = 0
    failures: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "since": datetime.fromtimestamp(self.since, UTC).isoformat(timespec="seconds"),
            "last_error": self.last_error,
            "connects": self.connects,
            "failures": self.failures,
        }


def backoff_delay(attempt: int, low: float, high: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [low, min(high, low * 2**attempt)]."""
    ceiling = min(high, low * (2 ** min(attempt, 30)))
    return rng.uniform(low, max(low, ceiling))


def read_password(config: MqttLink) -> str | None:
    """The broker password from ``password_file`` or the environment (never from the config text)."""
    if config.password_file is not None:
        try:
            return config.password_file.read_text("utf-8").strip()
        except OSError as exc:
            raise TransportConfigError(
                f"sync.password_file {config.password_file}: cannot read: {exc.strerror}"
            ) from None
    return os.environ.get(PASSWORD_ENV) or None


def _check_files(config: MqttLink) -> None:
    for name in ("ca_file", "cert_file", "key_file"):
        path: Path | None = getattr(config, name)
        if path is not None and not os.access(path, os.R_OK):
            raise TransportConfigError(f"sync.{name} {path}: missing or not readable by this user")


def client_certificate_expiry(config: MqttLink) -> datetime | None:
    """When the client certificate stops being valid (checked locally: brokers only say 'handshake failed')."""
    if config.cert_file is None:
        return None
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(config.cert_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise TransportConfigError(f"sync.cert_file {config.cert_file}: not a PEM certificate: {exc}") from None
    return cert.not_valid_after_utc


def describe_connect_error(exc: BaseException, config: MqttLink) -> str:
    """One line an IT person can act on, for the usual ways a connection fails."""
    where = f"{config.host}:{config.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS: the broker at {where} presented a certificate not trusted by sync.ca_file "
            f"({exc.verify_message}); check ca_file and the broker's certificate and host name"
        )
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if "EXPIRED" in str(reason).upper():
            return f"TLS: the broker refused the client certificate as expired ({reason}); issue a new one"
        return f"TLS handshake with {where} failed: {reason}; check tls, ca_file, cert_file"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {where}: is the broker running and the port right?"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {config.host}: {exc.strerror}"
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"no answer from {where} (timed out): network down or firewall"
    if isinstance(exc, OSError):
        return f"cannot reach {where}: {exc.strerror or exc}"
    return f"cannot connect to {where}: {exc}"


def describe_refusal(reason: ReasonCode) -> str:
    name = str(reason)
    if reason.value in (0x86, 0x87, 0x04, 0x05):
        return f"the broker refused the login ({name}): check sync.username and the password file"
    return f"the broker refused the connection ({name})"


Callback = Callable[..., None]


def tls_context(link: MqttLink) -> ssl.SSLContext:
    """TLS 1.2 or later, the broker checked against the pinned school CA, the client certificate if any."""
    context = ssl.create_default_context(cafile=str(link.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if link.cert_file is not None:
        context.load_cert_chain(str(link.cert_file), str(link.key_file))
    return context


class MqttTransport:
    """One gate's MQTT session (v5, persistent, QoS 1), reconnected forever until :meth:`stop`."""

    def __init__(
        self,
        config: MqttLink,
        client_id: str,
        username: str,
        will: tuple[str, bytes] | None = None,
        subscriptions: tuple[str, ...] = (),
        rng: random.Random | None = None,
        manual_ack: bool = False,
        max_packet: int | None = None,
    ) -> None:
        """``max_packet`` is announced to the broker at connect (MQTT 5 Maximum Packet Size): it discards a
        bigger message for this client instead of sending it, so nothing larger ever reaches its memory."""
        _check_files(config)
        self.max_packet = max_packet
        self.config = config
        self.username = username
        self.subscriptions = subscriptions
        self.link = LinkState()
        self.connected = threading.Event()
        self.on_online: Callback | None = None  # (session_present: bool)
        self.on_ack: Callback | None = None  # (mid: int, error: str | None)
        self.on_message: Callback | None = None  # (topic: str, payload: bytes, ack: Callable[[], None])
        self.manual_ack = manual_ack
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._attempt = 0
        self._logged_error: str | None = None
        self._client = self._build_client(client_id, will)

    def _build_client(self, client_id: str, will: tuple[str, bytes] | None) -> mqtt.Client:
        config = self.config
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=self.manual_ack,
        )
        client.max_inflight_messages_set(min(config.window, 65535))
        client.max_queued_messages_set(0)
        client.connect_timeout = max(5.0, float(config.keepalive))
        password = read_password(config)
        client.username_pw_set(self.username, password)
        if config.tls:
            client.tls_set_context(tls_context(config))
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        # Keeps publish() from writing to the socket from the caller's thread (see module docstring).
        client.on_socket_register_write = lambda *_: None
        client.enable_logger(logging.getLogger("appliance.sync.paho"))
        return client

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._thread.start()

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Disconnect cleanly, after publishing ``final`` (e.g. a retained offline status) if online."""
        if final is not None and self.connected.is_set():
            info = self._client.publish(final[0], final[1], qos=1, retain=True)
            deadline = time.monotonic() + min(timeout, 2.0)
            while not info.is_published() and time.monotonic() < deadline and self.connected.is_set():
                time.sleep(0.02)
        self._stop.set()
        if self.connected.is_set():
            self._client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout)
        self._set_state("stopped")

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int | None:
        """Queue a QoS 1 message; its mid, or None if the link is down (nothing was queued)."""
        if not self.connected.is_set():
            return None
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            if info.rc == mqtt.MQTT_ERR_NO_CONN:
                return info.mid  # paho keeps it and sends it after the reconnect
            return None
        return info.mid

    def _set_state(self, state: str, error: str | None = None) -> None:
        if state != self.link.state:
            self.link.since = time.time()
        self.link.state = state
        if error is not None:
            self.link.last_error = error

    def _report(self, error: str) -> None:
        """Log a failure once per distinct cause, not at every retry."""
        self.link.failures += 1
        self._set_state("offline", error)
        if error != self._logged_error:
            self._logged_error = error
            log.error("sync: %s (events stay in the journal and are sent later)", error)

    def _run(self) -> None:
        first = True
        while not self._stop.is_set():
            if not first:
                delay = backoff_delay(self._attempt, self.config.backoff_min, self.config.backoff_max, self._rng)
                self._attempt += 1
                if self._stop.wait(delay):
                    break
            first = False
            self._set_state("connecting")
            try:
                expiry = client_certificate_expiry(self.config)
                if expiry is not None and expiry < datetime.now(UTC):
                    self._report(f"the client certificate {self.config.cert_file} expired on {expiry:%Y-%m-%d}")
                    continue
                properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = self.config.session_expiry
                if self.max_packet is not None:
                    properties.MaximumPacketSize = self.max_packet
                self._client.connect(
                    self.config.host,
                    self.config.port,
                    keepalive=self.config.keepalive,
                    clean_start=False,
                    properties=properties,
                )
            except TransportConfigError as exc:
                self._report(str(exc))
                continue
            except (OSError, ValueError) as exc:
                self._report(describe_connect_error(exc, self.config))
                continue
            while not self._stop.is_set():
                rc = self._client.loop(timeout=1.0)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    break
            was_online = self.connected.is_set()
            self.connected.clear()
            if not self._stop.is_set() and self.link.state in ("online", "connecting"):
                self._report("lost the connection to the broker" if was_online else "the broker closed the connection")
        self.connected.clear()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if reason.is_failure:
            self._report(describe_refusal(reason))
            return
        self._attempt = 0
        self._logged_error = None
        self.link.connects += 1
        self.link.last_error = None
        self._set_state("online")
        where = f"{self.config.host}:{self.config.port}"
        log.info("sync: connected to %s (session kept: %s)", where, flags.session_present)
        # Retained messages only for a new subscription: a reconnect into a kept session does not get
        # the hub's multi-MB roster snapshot again.
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        for topic in self.subscriptions:
            client.subscribe(topic, options=options)
        self.connected.set()
        if self.on_online is not None:
            self.on_online(bool(flags.session_present))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        self.connected.clear()
        if reason is not None and reason.is_failure and flags.is_disconnect_packet_from_server:
            self._report(f"the broker disconnected this gate ({reason})")

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
        if self.on_ack is None:
            return
        if reason.is_failure:
            self.on_ack(mid, str(reason))
        elif reason.value == NO_MATCHING_SUBSCRIBERS:
            # A success code in MQTT 5, but the broker dropped the message: nobody (no hub) would get it.
            self.on_ack(mid, NO_SUBSCRIBERS)
        else:
            self.on_ack(mid, None)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        """With ``manual_ack`` the receiver calls ``ack()`` once the message is safely stored."""
        if self.on_message is None:
            if self.manual_ack:
                client.ack(message.mid, message.qos)
            return
        mid, qos = message.mid, message.qos
        self.on_message(message.topic, bytes(message.payload), lambda: client.ack(mid, qos))
