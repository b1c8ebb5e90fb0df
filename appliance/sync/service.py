"""The gate's side of sync, built from the config: transport + uplink + status (+ downlink).

The daemon creates one SyncService, wakes it after every commit and reads its health for
``edugate status``; everything MQTT stays in this package.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from appliance.config import GateConfig
from appliance.journal.db import open_database
from appliance.journal.events import EventJournal, journal_stats
from appliance.sync.downlink import Downlink, Hooks
from appliance.sync.gate_keys import sign_status
from appliance.sync.sealed_transport import gate_private_key, gate_signing_key, public_text
from appliance.sync.signing import SigningKeyError, load_public_key
from appliance.sync.status import Signer, offline_status, online_status
from appliance.sync.topics import Topics
from appliance.sync.transport import MqttTransport
from appliance.sync.uplink import Uplink

log = logging.getLogger(__name__)

# What the daemon knows and sync does not: readers' and camera's health, clock state.
StatusSource = Callable[[], dict[str, Any]]


def _gate_keys(config: GateConfig) -> tuple[str | None, Signer | None]:
    """The public key the hub seals this gate's roster and face templates to, and what signs its status; without
    them the hub believes no status of this gate and sends it neither roster nor templates."""
    try:
        template_key = public_text(gate_private_key(config.vision.key_file))
        private = gate_signing_key(config.vision.key_file)
    except Exception as exc:
        log.warning(
            "sync: no gate keys (%s): the hub refuses this gate's status and sends it no roster or templates", exc
        )
        return None, None
    return template_key, lambda status: sign_status(private, status)


class SyncService:
    def __init__(
        self,
        config: GateConfig,
        journal: EventJournal,
        status_source: StatusSource,
        hooks: Hooks | None = None,
        clock_ok: Callable[[], bool] = lambda: True,
        base_config: Callable[[], GateConfig] | None = None,
    ) -> None:
        sync = config.sync
        self.config = config
        self.device = config.device.id
        self.school = config.device.school
        self.topics = Topics(sync.topic_prefix, config.device.school, config.device.id)
        self.status_source = status_source
        self._stats_db = open_database(config.journal.path, readonly=True)
        self.template_key, self.signer = _gate_keys(config)
        self.transport = MqttTransport(
            sync,
            client_id=sync.client_id or f"edugate-{self.device}",
            username=sync.username or self.device,
            will=(self.topics.status, self._offline("connection lost")),
            subscriptions=(self.topics.downlink,),
            manual_ack=True,
        )
        self.uplink = Uplink(journal, config.journal.path, self.transport, self.topics.events, sync.window, sync.batch)
        self.downlink_error: str | None = None
        try:
            hub_key = load_public_key(sync.hub_public_key, sync.hub_public_key_file)
        except SigningKeyError as exc:
            hub_key = None
            self.downlink_error = f"downlink disabled: {exc}"
            log.error("sync: %s", self.downlink_error)
        if hub_key is None and self.downlink_error is None:
            self.downlink_error = "no sync.hub_public_key: hub messages are refused"
        self._downlink_db = open_database(config.journal.path)
        hooks = hooks or Hooks()
        if hooks.resync is None:
            hooks.resync = self.uplink.resync
        self.downlink = Downlink(
            self.topics,
            self._downlink_db,
            hub_key,
            base_config or config,
            publish=lambda topic, data: self.transport.publish(topic, data),
            clock_ok=clock_ok,
            hooks=hooks,
        )
        self.transport.on_ack = self.uplink.on_ack
        self.transport.on_online = self._online
        self.transport.on_message = self._message
        self._stop = threading.Event()
        self._status_now = threading.Event()
        self._status_thread: threading.Thread | None = None

    def start(self) -> None:
        self.downlink.start()
        self.uplink.start()
        self.transport.start()
        self._status_thread = threading.Thread(target=self._status_loop, name="sync-status", daemon=True)
        self._status_thread.start()

    def stop(self) -> None:
        """Send what is acknowledged to the journal, say "stopped" on the status topic, disconnect."""
        self._stop.set()
        self._status_now.set()
        if self._status_thread is not None:
            self._status_thread.join(5)
        self.uplink.stop()
        self.downlink.stop()
        self.transport.stop(final=(self.topics.status, self._offline("stopped")))
        self._stats_db.close()
        self._downlink_db.close()

    def _offline(self, reason: str) -> bytes:
        """The signed status that says this gate is away (its last will, or its clean stop)."""
        return offline_status(self.device, reason, self.template_key, self.signer, self.school)

    def wake(self, *_: object) -> None:
        """Gate listener: an event was just committed."""
        self.uplink.wake()

    def _online(self, session_present: bool) -> None:
        self.uplink.on_online(session_present)
        self._status_now.set()

    def _message(self, topic: str, payload: bytes, ack: Callable[[], None]) -> None:
        self.downlink.submit(topic, payload, ack)

    def _status_loop(self) -> None:
        while not self._stop.is_set():
            self._status_now.wait(self.config.sync.status_interval)
            self._status_now.clear()
            if self._stop.is_set():
                return
            if self.transport.connected.is_set():
                try:
                    self.transport.publish(self.topics.status, self.status_payload(), retain=True)
                except Exception as exc:
                    log.warning("sync: cannot publish status: %s", exc)

    def status_payload(self) -> bytes:
        stats = journal_stats(self._stats_db)
        local = self.status_source()
        return online_status(
            device=self.device,
            readers=local.get("readers", []),
            camera=local.get("camera"),
            clock_ok=bool(local.get("clock_ok")),
            backlog=stats.unsynced,
            oldest_unsynced=stats.oldest_unsynced_ts,
            last_seq=stats.last_seq,
            journal=self._stats_db.journal_id,
            template_key=self.template_key,
            signer=self.signer,
            school=self.school,
        )

    def health(self) -> dict[str, Any]:
        """For the status file: the link and the uplink's progress (no backlog query: status adds it)."""
        return {
            **self.transport.link.as_dict(),
            "broker": f"{self.config.sync.host}:{self.config.sync.port}",
            "inflight": self.uplink.inflight(),
            "published": self.uplink.published,
            "acknowledged": self.uplink.acked_total,
            "last_synced_seq": self.uplink.last_synced_seq,
            "uplink_error": self.uplink.last_error,
            "downlink": {
                "applied": self.downlink.applied,
                "refused": self.downlink.refused,
                "last_refusal": self.downlink.last_refusal,
                "error": self.downlink_error,
            },
        }
