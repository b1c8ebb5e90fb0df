"""``edugate hub run``: the school server's daemon, wired from hub.toml.

Ingest (MQTT, manual acks after commit) and the resync loop are the core; parent
notifications, the daily jobs and the HTTP API are started when configured. Every part runs on
its own thread with its own database connection.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from appliance import __version__
from appliance.config import HubConfig
from appliance.hub.ingest import MAX_BYTES, EventHook, IngestWorker
from appliance.hub.resync import Resyncer
from appliance.hub.store import Store
from appliance.sdnotify import Notifier
from appliance.sync.signing import SigningKeyError, load_private_key
from appliance.sync.transport import MqttTransport

log = logging.getLogger(__name__)

RESYNC_EVERY = 5.0
# Announced to the broker: a message bigger than the largest a gate may send (plus topic and header) is discarded
# by the broker instead of being read into the hub's memory (its own check refuses what passes at 16 KiB).
MAX_PACKET = max(MAX_BYTES.values()) + 4096
CATCH_UP_SECONDS = 30.0  # after a (re)connect, time for the broker to hand over what it queued for the hub
PRUNE_EVERY = 3600.0  # seconds between two prunes of old rejected messages (a full scan of that table)
REJECTED_RETENTION = timedelta(days=30)  # refused payloads may hold personal data: kept for diagnosis only
STATUS_EVERY = 60.0  # seconds between two updates of the status line systemd shows (notices held back, refusals)


class Component(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


def subscriptions(config: HubConfig) -> tuple[str, ...]:
    """Events through the shared group (hub instances split them); status and results to every instance."""
    prefix, group = config.mqtt.topic_prefix, config.mqtt.shared_group
    schools = config.hub.schools or ["+"]
    topics: list[str] = []
    for school in schools:
        topics += [
            f"$share/{group}/{prefix}/{school}/+/events",
            f"{prefix}/{school}/+/status",
            f"{prefix}/{school}/+/result",
        ]
    return tuple(topics)


class HubService:
    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self.store = Store(config.database)
        self.store.migrate()
        self.hooks: list[EventHook] = []
        self.components: list[Component] = []
        self.key = self._signing_key()
        self.ingest = IngestWorker(self.store, config.mqtt.topic_prefix, self.hooks, config.zone)
        self.transport = MqttTransport(
            config.mqtt,
            client_id=config.mqtt.client_id or f"edugate-{config.hub.id}",
            username=config.mqtt.username or "hub",
            subscriptions=subscriptions(config),
            manual_ack=True,
            max_packet=MAX_PACKET,
        )
        self.transport.on_message = self.ingest.submit
        self.resyncer = Resyncer(
            self.store.connect(),
            config.mqtt.topic_prefix,
            self.key,
            lambda topic, data: self.transport.publish(topic, data),
            config.signing.resync_after,
        )
        self._stop = threading.Event()
        self._prune_due = 0.0  # at the first housekeeping round
        self._status_due = 0.0
        self.notifier = Notifier()
        self._add_optional_parts()

    def _signing_key(self) -> Any:
        try:
            return load_private_key(self.config.signing.key_file)
        except SigningKeyError as exc:
            log.error("hub: %s; gates will not be asked to resend missing events, nothing can be published", exc)
            return None

    def _add_optional_parts(self) -> None:
        """Parts that each live in their own module, started only when configured."""
        if self.config.notify.enabled:
            from appliance.hub.notify import event_hook, outbox_worker

            self.hooks.append(event_hook(self.config))
            self.components.append(outbox_worker(self.store, self.config))
        from appliance.hub.jobs import daily_jobs

        self.components.append(daily_jobs(self.store, self.config, ready=self.caught_up))
        if self.key is not None and self.config.signing.catch_up_every > 0:
            from appliance.hub.catch_up import CatchUpWorker

            self.components.append(CatchUpWorker(self.store, self.config, self.key, self.config.signing.catch_up_every))
        if self.config.api.enabled:
            from appliance.hub.api import api_server

            self.components.append(api_server(self.store, self.config))

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.request_stop)
        self.ingest.start()
        self.transport.start()
        for component in self.components:
            component.start()
        log.info(
            "edugate hub %s started: %s, database %s, broker %s:%d",
            __version__,
            self.config.hub.id,
            self.store.describe(),
            self.config.mqtt.host,
            self.config.mqtt.port,
        )
        for reason in self.config.mqtt.guessable_names():
            log.warning("hub: %s", reason)
        self.notifier.notify("READY=1")
        try:
            while not self._stop.wait(RESYNC_EVERY):
                if self.ingest.alive():
                    self.notifier.notify("WATCHDOG=1")  # a dead ingest thread gets the hub restarted by systemd
                self._housekeeping()
        finally:
            self.notifier.notify("STOPPING=1")
            for component in reversed(self.components):
                component.stop()
            self.transport.stop()
            self.ingest.stop()
            self.resyncer.conn.close()
            log.info("edugate hub stopped")

    def _housekeeping(self) -> None:
        """Resync requests and pruning, on a connection that is opened again if the database dropped it."""
        try:
            if self.resyncer.conn.broken:
                self.resyncer.conn.close()
                self.resyncer.conn = self.store.connect()
            if self.transport.connected.is_set():
                self.resyncer.run_once()
            if time.monotonic() >= self._prune_due:
                cutoff = (datetime.now(UTC) - REJECTED_RETENTION).isoformat(timespec="milliseconds")
                self.resyncer.conn.execute("DELETE FROM rejected_messages WHERE received_at < ?", [cutoff])
                self.resyncer.conn.execute("DELETE FROM resync_requests WHERE sent_at < ?", [cutoff])
                self._prune_due = time.monotonic() + PRUNE_EVERY
            if time.monotonic() >= self._status_due:
                self._status_due = time.monotonic() + STATUS_EVERY
                self.notifier.notify(f"STATUS={self.status_line()}")
        except Exception as exc:
            log.error("hub: resync round failed: %s", exc)

    def status_line(self) -> str:
        """One line for ``systemctl status edugate-hub``: what was stored and refused, and any gate holding a
        school's absence notices back (the same as ``notice_holds`` gives ``hub gates list`` and the metrics)."""
        from appliance.hub.jobs import notice_holds

        stats = self.ingest.ingest.stats if self.ingest.ingest is not None else None
        line = f"{stats.stored:,} events stored, {stats.rejected:,} messages refused" if stats else "starting"
        holding = [h for h in notice_holds(self.resyncer.conn, self.config) if h.withholding]
        if holding:
            first = holding[0]
            line += (
                f"; ABSENCE NOTICES HELD BACK by {len(holding)} gate(s), e.g. {first.school}/{first.gate}: "
                f"{first.reason}"
            )
        return line

    def caught_up(self) -> bool:
        """Online for a while with nothing waiting to be stored: what the broker queued for the hub is in."""
        link = self.transport.link
        return (
            link.state == "online"
            and time.time() - link.since >= CATCH_UP_SECONDS
            and self.ingest.backlog() == 0
            and self.ingest.alive()
        )
