"""MQTT topic names of one gate: the contract with the hub and with the broker's ACL (config/mosquitto/acl)."""

from __future__ import annotations

from dataclasses import dataclass

DOWNLINK_TYPES = ("roster", "templates", "config", "command")


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str
    school: str
    device: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.school}/{self.device}"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def result(self) -> str:
        return f"{self.base}/result"

    @property
    def downlink(self) -> str:
        """Subscription filter for everything the hub sends this gate."""
        return f"{self.base}/downlink/#"

    def downlink_topic(self, kind: str) -> str:
        if kind not in DOWNLINK_TYPES:
            raise ValueError(f"unknown downlink type {kind!r}")
        return f"{self.base}/downlink/{kind}"

    def downlink_kind(self, topic: str) -> str | None:
        """``roster`` for ``.../downlink/roster``; None for a topic outside this gate's downlink."""
        head = f"{self.base}/downlink/"
        if not topic.startswith(head):
            return None
        kind = topic[len(head) :]
        return kind if kind in DOWNLINK_TYPES else None
