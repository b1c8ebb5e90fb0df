"""Parent notifications: planned in the ingest transaction, kept in the outbox, delivered by a worker.

Entry points for the hub service and the daily jobs: :func:`event_hook`, :func:`outbox_worker`,
:func:`plan_absent`.
"""

from appliance.hub.notify.channels import Channel, Outcome, Outgoing, SmtpChannel, WebhookChannel, build_channels
from appliance.hub.notify.planner import event_hook, outbox_key, plan_absent
from appliance.hub.notify.worker import OutboxWorker, backoff, outbox_worker

STATUSES = ("pending", "sending", "sent", "failed", "skipped")

__all__ = [
    "STATUSES",
    "Channel",
    "OutboxWorker",
    "Outcome",
    "Outgoing",
    "SmtpChannel",
    "WebhookChannel",
    "backoff",
    "build_channels",
    "event_hook",
    "outbox_key",
    "outbox_worker",
    "plan_absent",
]
