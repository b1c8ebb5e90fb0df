"""Test support for MQTT: a throwaway PKI, a real Mosquitto broker, MQTT peers (gate and hub stand-ins), a TCP proxy.

No tests here. The broker runs the production rules: its config is built from config/mosquitto/edugate.conf
(paths, listeners and users replaced) and its ACL is config/mosquitto/acl itself, so the tests exercise what a
school installs. Fixtures ``pki``, ``broker``, ``broker_factory`` and ``subscriber_factory`` are made available
to every test through tests/conftest.py.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import getpass
import ipaddress
import os
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from appliance.bench.daemon_process import end
from appliance.bench.mqtt_broker import free_port, mosquitto_missing, mosquitto_tool
from appliance.bench.mqtt_pki import private_pem, write_pem

REPO = Path(__file__).resolve().parent.parent
PRODUCTION_CONF = REPO / "config" / "mosquitto" / "edugate.conf"
PRODUCTION_ACL = REPO / "config" / "mosquitto" / "acl"

# The users of the ``broker`` fixture: the hub and two gates.
BROKER_USERS = {"hub": "hub-secret", "gate-01": "gate-01-secret", "gate-02": "gate-02-secret"}
# What the hub subscribes to (several hub instances share the events).
HUB_TOPICS = ("$share/hub/edugate/+/+/events", "edugate/+/+/status", "edugate/+/+/result")

# Options of edugate.conf that name host paths or choose the listener/identity mode; Broker sets its own.
_REPLACED_OPTIONS = {
    "pid_file",
    "log_dest",
    "log_type",
    "user",
    "password_file",
    "acl_file",
    "persistence_location",
    "listener",
    "cafile",
    "capath",
    "certfile",
    "keyfile",
    "crlfile",
    "require_certificate",
    "use_identity_as_username",
    "include_dir",
}


MOSQUITTO = mosquitto_tool("mosquitto")
MOSQUITTO_PASSWD = mosquitto_tool("mosquitto_passwd")


def require_mosquitto() -> None:
    """Skip without mosquitto on a developer machine; fail in CI, where a skipped broker test hides a gap."""
    why = mosquitto_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide mosquitto: {why}")
        pytest.skip(why)


# --------------------------------------------------------------------------------------------------- PKI


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edugate test"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


@dataclass
class _Issuer:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _make_ca(cn: str) -> _Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Issuer(key, cert)


def _issue(
    issuer: _Issuer, cn: str, *, server: bool, names: Sequence[str] = (), expired: bool = False
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A leaf certificate: server (SAN from ``names``) or client (CN only), valid now or expired yesterday."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = (
        (now - dt.timedelta(days=10), now - dt.timedelta(days=1))
        if expired
        else (now - dt.timedelta(hours=1), now + dt.timedelta(days=30))
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    if names:
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return key, builder.sign(issuer.key, hashes.SHA256())


class ServerFiles(Protocol):
    """What a TLS broker needs: the CA it trusts for client certificates and its own certificate and key."""

    ca: Path
    server_cert: Path
    server_key: Path


@dataclass
class PkiFiles:
    """ServerFiles from elsewhere, e.g. made by scripts/make-school-ca."""

    ca: Path
    server_cert: Path
    server_key: Path


class Pki:
    """A school CA, the broker's certificate for 127.0.0.1/localhost, client certificates on demand, and an
    unrelated CA for wrong-CA tests. EC P-256 keeps generation in the milliseconds."""

    SERVER_NAMES = ("127.0.0.1", "localhost")

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._ca = _make_ca("edugate test school CA")
        self.ca = write_pem(directory / "ca.pem", self._ca.cert.public_bytes(serialization.Encoding.PEM))
        self.ca_key = write_pem(directory / "ca.key", private_pem(self._ca.key), private=True)
        self.server_cert, self.server_key = self._write_leaf(
            "server", *_issue(self._ca, "localhost", server=True, names=self.SERVER_NAMES)
        )
        self._wrong = _make_ca("some other CA")
        self.wrong_ca = write_pem(directory / "wrong-ca.pem", self._wrong.cert.public_bytes(serialization.Encoding.PEM))

    def _write_leaf(self, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
        cert_path = write_pem(self.dir / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, write_pem(self.dir / f"{stem}.key", private_pem(key), private=True)

    def client_cert(self, cn: str, expired: bool = False, wrong_ca: bool = False) -> tuple[Path, Path]:
        """(certificate, key) for a client whose CN is ``cn``, signed by the school CA (or the unrelated one)."""
        issuer = self._wrong if wrong_ca else self._ca
        stem = f"client-{cn}" + ("-expired" if expired else "") + ("-wrongca" if wrong_ca else "")
        return self._write_leaf(stem, *_issue(issuer, cn, server=False, expired=expired))

    def expired_server(self) -> tuple[Path, Path]:
        """(certificate, key) for 127.0.0.1/localhost, signed by the school CA but expired: gates must refuse it."""
        return self._write_leaf(
            "server-expired", *_issue(self._ca, "localhost", server=True, names=self.SERVER_NAMES, expired=True)
        )


# --------------------------------------------------------------------------------------------------- broker


def production_options() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(global options, TLS listener options) of edugate.conf in file order, without the ones Broker replaces."""
    global_options: list[tuple[str, str]] = []
    listener_options: list[tuple[str, str]] = []
    target = global_options
    for raw in PRODUCTION_CONF.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if key == "listener":
            target = listener_options
        if key not in _REPLACED_OPTIONS:
            target.append((key, value.strip()))
    return global_options, listener_options


_LIVE: set[Broker] = set()


@atexit.register
def _kill_leftovers() -> None:
    """A guard for interrupted sessions: no mosquitto may outlive the test process."""
    for broker in list(_LIVE):
        broker.kill()


class Broker:
    """A real Mosquitto on 127.0.0.1 with the production settings and ACL, private files under ``workdir``.

    ``settings`` overrides or adds global options (e.g. ``{"autosave_interval": "1"}``); ``acl_extra`` is
    appended to the production ACL. ``verbose`` logs every packet (``log_type all``), which helps reading a
    failure but slows a throughput test. The persistence database lives in ``workdir/data`` and survives
    ``stop``/``kill``/``restart``.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        workdir: Path,
        pki: ServerFiles | None,
        users: dict[str, str],
        port: int | None = None,
        tls: bool = True,
        require_certificate: bool = False,
        plain_port: int | None = None,
        *,
        use_identity_as_username: bool | None = None,
        server_cert: tuple[Path, Path] | None = None,
        settings: dict[str, str] | None = None,
        acl_extra: str = "",
        verbose: bool = True,
    ) -> None:
        if tls and pki is None:
            raise ValueError("a TLS broker needs a Pki")
        self.workdir = workdir
        self.pki = pki
        self.tls = tls
        self.require_certificate = require_certificate
        self.use_identity_as_username = (
            require_certificate if use_identity_as_username is None else use_identity_as_username
        )
        self.server_cert = server_cert
        self.port = port or free_port()
        self.plain_port = plain_port
        self.settings = dict(settings or {})
        self.verbose = verbose
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "data").mkdir(exist_ok=True)
        self.conf_path = workdir / "mosquitto.conf"
        self.passwd_path = workdir / "passwd"
        self.acl_path = workdir / "acl"
        self.log_path = workdir / "mosquitto.log"
        acl = PRODUCTION_ACL.read_text(encoding="utf-8")
        self.acl_path.write_text(acl + ("\n" + acl_extra + "\n" if acl_extra else ""), encoding="utf-8")
        self.write_users(users)
        self.conf_path.write_text(self.config_text(), encoding="utf-8")

    def write_users(self, users: dict[str, str]) -> None:
        """Replace the password file (hashed by mosquitto_passwd -U); call ``reload()`` if running."""
        if MOSQUITTO_PASSWD is None:
            raise RuntimeError(mosquitto_missing())
        self.passwd_path.write_text(
            "".join(f"{user}:{password}\n" for user, password in users.items()), encoding="utf-8"
        )
        self.passwd_path.chmod(0o600)
        if users:
            result = subprocess.run([MOSQUITTO_PASSWD, "-U", str(self.passwd_path)], capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"mosquitto_passwd -U failed: {result.stdout}{result.stderr}")

    def use_password_file(self, path: Path) -> None:
        """Use a password file made elsewhere (e.g. by scripts/provision-gate)."""
        shutil.copyfile(path, self.passwd_path)

    def config_text(self) -> str:
        global_options, listener_options = production_options()
        options = dict(global_options)
        merged = [(key, self.settings.get(key, value)) for key, value in global_options]
        merged += [(key, value) for key, value in self.settings.items() if key not in options]
        lines = [
            "# Generated by tests/mqtt_broker.py from config/mosquitto/edugate.conf; paths and listeners replaced.",
            f"user {getpass.getuser()}",
            f"log_dest file {self.log_path}",
            *(
                ["log_type all"]
                if self.verbose
                else ["log_type error", "log_type warning", "log_type notice", "log_type information"]
            ),
            *(f"{key} {value}" for key, value in merged),
            f"password_file {self.passwd_path}",
            f"acl_file {self.acl_path}",
            f"persistence_location {self.workdir / 'data'}/",
            f"listener {self.port} {self.host}",
        ]
        if self.tls:
            assert self.pki is not None
            cert, key = self.server_cert or (self.pki.server_cert, self.pki.server_key)
            lines += [f"{key_} {value}" for key_, value in listener_options]
            lines += [
                f"cafile {self.pki.ca}",
                f"certfile {cert}",
                f"keyfile {key}",
                f"require_certificate {str(self.require_certificate).lower()}",
                f"use_identity_as_username {str(self.use_identity_as_username).lower()}",
            ]
        if self.plain_port:
            lines += [f"listener {self.plain_port} {self.host}", "protocol mqtt"]
        return "\n".join(lines) + "\n"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> Broker:
        """Start and wait until every listener accepts connections; raise with the broker's log if it dies."""
        if MOSQUITTO is None:
            raise RuntimeError(mosquitto_missing())
        if self.running:
            return self
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf_path)], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        _LIVE.add(self)
        deadline = time.monotonic() + timeout
        for port in [self.port] + ([self.plain_port] if self.plain_port else []):
            while True:
                if self.proc.poll() is not None:
                    _LIVE.discard(self)
                    raise RuntimeError(f"mosquitto exited with {self.proc.returncode}:\n{self.log_text()}")
                with contextlib.suppress(OSError), socket.create_connection((self.host, port), timeout=0.2):
                    break
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"mosquitto did not listen on {port} within {timeout} s:\n{self.log_text()}")
                time.sleep(0.02)
        return self

    def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> None:
        end(self.proc, sig, timeout)
        _LIVE.discard(self)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: a clean stop, which writes the persistence database."""
        self._signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash or power cut; only the last autosave survives."""
        self._signal_and_wait(signal.SIGKILL, 5.0)

    def restart(self, kill: bool = False) -> Broker:
        """Stop (or kill) and start again on the same port with the same persistence."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def reload(self, timeout: float = 5.0) -> None:
        """SIGHUP, as ``systemctl reload mosquitto``: re-read the password file and ACL.

        Returns once the broker has logged the reload; it handles no client traffic in between (one thread),
        so a connection made afterwards meets the new files.
        """
        if self.proc is None or not self.running:
            raise RuntimeError("the broker is not running")
        before = self.log_text().count("Reloading config.")
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self.log_text().count("Reloading config.") <= before:
            if time.monotonic() > deadline:
                raise TimeoutError(f"mosquitto did not reload within {timeout} s:\n{self.log_text()}")
            time.sleep(0.02)

    def wait_for_log(self, needle: str, timeout: float = 5.0) -> str:
        """Wait until the log contains ``needle`` (the broker may log just after the client saw the effect)."""
        deadline = time.monotonic() + timeout
        while needle not in (text := self.log_text()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{needle!r} not in the broker log within {timeout} s:\n{text}")
            time.sleep(0.02)
        return text

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""


# --------------------------------------------------------------------------------------------------- MQTT peers


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int


class ConnectFailed(Exception):
    """The broker refused the CONNECT (``reason_code`` set) or the connection ended before a CONNACK
    (TLS failure, ``reason_code`` None, the cause chained)."""

    def __init__(self, message: str, reason_code: ReasonCode | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class MqttPeer:
    """One MQTT 5 client (paho 2.x, VERSION2 callbacks) with blocking helpers: a gate or hub stand-in.

    ``address`` overrides where to connect (e.g. a TcpProxy's); TLS uses ``ca`` (default: the broker's CA)
    and, for certificate logins, ``cert`` = (certificate, key). ``persistent`` asks for a session that
    survives disconnects (clean_start False, ``session_expiry`` seconds). Received messages are collected.
    """

    POLL = 0.05  # seconds between two looks of wait_for at what arrived

    def __init__(
        self,
        broker: Broker,
        username: str | None,
        password: str | None = None,
        *,
        client_id: str | None = None,
        address: tuple[str, int] | None = None,
        ca: Path | None = None,
        cert: tuple[Path, Path] | None = None,
        keepalive: int = 30,
        persistent: bool = False,
        session_expiry: int = 3600,
        will: tuple[str, bytes] | None = None,
        reconnect: bool = False,
    ) -> None:
        self.broker = broker
        self.address = address or (broker.host, broker.port)
        self.keepalive = keepalive
        self.persistent = persistent
        self.session_expiry = session_expiry
        self.client_id = client_id or f"test-{username}-{os.getpid()}-{id(self):x}"
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=reconnect,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if broker.tls:
            assert broker.pki is not None
            certfile, keyfile = cert if cert else (None, None)
            self.client.tls_set(
                ca_certs=str(ca or broker.pki.ca),
                certfile=str(certfile) if certfile else None,
                keyfile=str(keyfile) if keyfile else None,
            )
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.reconnect_delay_set(1, 2)
        self._cond = threading.Condition()
        self._received: list[Received] = []
        self._acks: dict[int, Any] = {}
        self.connack: ReasonCode | None = None
        self.connack_properties: Properties | None = None
        self.connects = 0
        self.disconnects: list[ReasonCode] = []
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe

    # paho callbacks (network thread)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        with self._cond:
            self.connack = reason_code
            self.connack_properties = properties
            if not reason_code.is_failure:
                self.connects += 1
            self._cond.notify_all()
        if not reason_code.is_failure:
            self.on_connected()

    def on_connected(self) -> None:
        """Hook for subclasses: runs after every successful CONNACK (reconnects too)."""

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        with self._cond:
            self.disconnects.append(reason_code)
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self._received.append(Received(message.topic, bytes(message.payload), bool(message.retain), message.qos))
            self._cond.notify_all()

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Any
    ) -> None:
        with self._cond:
            self._acks[mid] = reason_code
            self._cond.notify_all()

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode], properties: Any
    ) -> None:
        with self._cond:
            self._acks[mid] = list(reason_codes)
            self._cond.notify_all()

    # blocking helpers (test thread)

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise TimeoutError(f"{what} within {timeout} s")

    def connect(self, timeout: float = 5.0) -> ReasonCode:
        """Connect and wait for the CONNACK; raise ConnectFailed if refused or cut before it."""
        properties = None
        if self.persistent:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self.session_expiry
        before = len(self.disconnects)
        try:
            self.client.connect(
                self.address[0],
                self.address[1],
                keepalive=self.keepalive,
                clean_start=not self.persistent,
                properties=properties,
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(f"connection failed before CONNACK: {exc!r}") from exc
        self.client.loop_start()
        try:
            self._wait(lambda: self.connack is not None or len(self.disconnects) > before, timeout, "no CONNACK")
        except TimeoutError:
            self.close()
            raise
        if self.connack is None or self.connack.is_failure:
            self.close()
            if self.connack is None:
                raise ConnectFailed(f"connection closed before CONNACK ({self.disconnects[-1]})")
            raise ConnectFailed(f"CONNACK refused: {self.connack}", self.connack)
        return self.connack

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False, timeout: float = 5.0
    ) -> ReasonCode | None:
        """Publish and, for QoS 1, wait for the PUBACK and return its reason code."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            return None
        self._wait(lambda: info.mid in self._acks, timeout, f"no PUBACK for {topic}")
        return self._acks.pop(info.mid)

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> ReasonCode:
        """Subscribe and wait for the SUBACK; return its reason code (granted QoS or a failure)."""
        result, mid = self.client.subscribe(topic, qos=qos)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectionError(f"SUBSCRIBE {topic} not sent: {result}")
        self._wait(lambda: mid in self._acks, timeout, f"no SUBACK for {topic}")
        return self._acks.pop(mid)[0]

    def messages(self, topic_suffix: str = "") -> list[Received]:
        """Messages received so far whose topic ends with ``topic_suffix``."""
        with self._cond:
            return [m for m in self._received if m.topic.endswith(topic_suffix)]

    def wait_for(
        self, predicate_or_count: int | Callable[[list[Received]], bool], timeout: float = 5.0
    ) -> list[Received]:
        """Wait until ``count`` messages arrived or ``predicate(messages)`` holds; return the messages.

        The predicate runs on a snapshot, outside the lock and at most every ``POLL`` seconds: a
        predicate that looks at every message, run under the lock on every arrival, slowed paho's
        network thread to a few dozen messages a second in a 10,000-event drain.
        """
        if isinstance(predicate_or_count, int):
            count = predicate_or_count

            def ready(messages: list[Received]) -> bool:
                return len(messages) >= count
        else:
            ready = predicate_or_count
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                snapshot = list(self._received)
            if ready(snapshot):
                return snapshot
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"condition not met within {timeout} s; {len(snapshot)} messages received, "
                    f"the last ones: {snapshot[-3:]!r}"
                )
            seen = len(snapshot)
            with self._cond:
                self._cond.wait_for(lambda seen=seen: len(self._received) > seen, min(remaining, self.POLL))
            time.sleep(self.POLL / 5)  # let a burst arrive before looking again

    def wait_disconnected(self, timeout: float = 10.0) -> ReasonCode:
        """Wait for paho to notice the connection is gone (keepalive, RST, broker stop)."""
        self._wait(lambda: bool(self.disconnects), timeout, "no disconnect")
        return self.disconnects[-1]

    def close(self) -> None:
        """DISCONNECT (a persistent session stays on the broker) and stop the network thread."""
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


class Subscriber(MqttPeer):
    """The hub stand-in: user ``hub``, (re)subscribes to ``topics`` at QoS 1 on every connect.

    Connected and subscribed when the constructor returns; raises if refused. Reconnects by itself (e.g.
    after ``Broker.restart``); with ``persistent=True`` the broker queues QoS 1 messages while it is away.
    """

    def __init__(
        self,
        broker: Broker,
        topics: Sequence[str] = HUB_TOPICS,
        *,
        username: str | None = "hub",
        password: str | None = BROKER_USERS["hub"],
        client_id: str | None = None,
        persistent: bool = False,
        session_expiry: int = 3600,
        qos: int = 1,
        timeout: float = 5.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            broker,
            username,
            password,
            client_id=client_id,
            persistent=persistent,
            session_expiry=session_expiry,
            reconnect=True,
            **kwargs,
        )
        self.topics = tuple(topics)
        self.qos = qos
        self.subscribed = threading.Event()
        self.suback: list[ReasonCode] = []
        self.connect(timeout)
        if not self.subscribed.wait(timeout):
            self.close()
            raise TimeoutError(f"no SUBACK for {self.topics} within {timeout} s")
        failed = [(t, rc) for t, rc in zip(self.topics, self.suback, strict=True) if rc.is_failure]
        if failed:
            self.close()
            raise PermissionError(f"subscriptions refused: {failed}")

    def on_connected(self) -> None:
        self.subscribed.clear()
        result, mid = self.client.subscribe([(t, self.qos) for t in self.topics])
        if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            threading.Thread(target=self._await_suback, args=(mid,), daemon=True).start()

    def _await_suback(self, mid: int) -> None:
        with self._cond:
            if self._cond.wait_for(lambda: mid in self._acks, 10.0):
                self.suback = self._acks.pop(mid)
                self.subscribed.set()


# --------------------------------------------------------------------------------------------------- TCP proxy


_LIVE_PROXIES: set[TcpProxy] = set()


@atexit.register
def _close_proxies() -> None:
    for proxy in list(_LIVE_PROXIES):
        proxy.close()


class TcpProxy:
    """A TCP relay on a free 127.0.0.1 port for network faults between a client and the broker.

    ``blackhole()`` stops relaying in both directions while every connection stays open (a partition:
    nothing arrives, nothing is refused; new connections are accepted but go nowhere). ``resume()`` relays
    again, including what was held back. ``cut()`` resets every connection (RST); ``close()`` ends it all.
    """

    host = "127.0.0.1"

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server((self.host, 0))
        self.port = int(self._listener.getsockname()[1])
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self.accepted = 0
        _LIVE_PROXIES.add(self)
        threading.Thread(target=self._accept_loop, name=f"proxy-{self.port}", daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def blackhole(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Close every connection with a TCP RST (SO_LINGER 0), as a rebooted router or NAT would."""
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut()
        _LIVE_PROXIES.discard(self)

    def _track(self, sock: socket.socket) -> bool:
        with self._lock:
            if self._closed.is_set():
                sock.close()
                return False
            self._sockets.add(sock)
            return True

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self._track(client):
                threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        while not self._flowing.wait(0.05):
            if self._closed.is_set() or client.fileno() < 0:
                return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        if not self._track(upstream):
            client.close()
            return
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        """Relay src -> dst; while blackholed, read nothing (the sender's data waits, as in a partition)."""
        try:
            while not self._closed.is_set():
                if not self._flowing.wait(0.05):
                    continue
                readable, _, _ = select.select([src], [], [], 0.05)
                if not readable or not self._flowing.is_set():
                    continue
                data = src.recv(65536)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
        except (OSError, ValueError):
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.close()


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The session's test PKI (CA, broker certificate for 127.0.0.1, client certificates on demand)."""
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker_factory(pki: Pki, tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Make brokers: ``broker_factory(users=None, pki=None, start=True, **Broker options)``.

    Defaults: BROKER_USERS and the session's Pki. All are stopped at teardown, started or not.
    """
    require_mosquitto()
    session_pki = pki
    made: list[Broker] = []

    def make(
        users: dict[str, str] | None = None, pki: ServerFiles | None = None, start: bool = True, **kwargs: Any
    ) -> Broker:
        broker = Broker(
            tmp_path / f"mosquitto-{len(made)}",
            pki or session_pki,
            BROKER_USERS if users is None else users,
            **kwargs,
        )
        made.append(broker)
        return broker.start() if start else broker

    yield make
    for broker in made:
        broker.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., Broker]) -> Broker:
    """A running TLS broker with the production config and ACL; users hub, gate-01, gate-02 (BROKER_USERS)."""
    return broker_factory()


@pytest.fixture
def subscriber_factory(broker: Broker) -> Iterator[Callable[..., Subscriber]]:
    """Make hub stand-ins on the ``broker`` fixture: ``subscriber_factory(topics=HUB_TOPICS, persistent=...)``."""
    made: list[Subscriber] = []

    def make(topics: Sequence[str] = HUB_TOPICS, **kwargs: Any) -> Subscriber:
        kwargs.setdefault("broker", broker)
        subscriber = Subscriber(topics=topics, **kwargs)
        made.append(subscriber)
        return subscriber

    yield make
    for subscriber in made:
        subscriber.close()
