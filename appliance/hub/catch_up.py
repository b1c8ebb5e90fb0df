"""Gates that missed a publish get it without waiting for IT: ``edugate hub run`` looks every
``signing.catch_up_every`` seconds.

A gate registered after the last ``edugate hub roster publish`` (``edugate hub gates add``) was not
sent the roster and templates. A gate whose key change IT approved (``edugate hub gates approve``)
holds messages it can no longer open. Either way the
school's current roster and templates are published to that gate, and only to it (unchanged streams
are not sent again, so a round with nothing due sends nothing and does not even connect).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.config import HubConfig
from appliance.hub.publish import PublishError, PublishReport, known_devices, publish, stored_gate_keys
from appliance.hub.publish_lease import published_model, published_schools
from appliance.hub.roster import template_models
from appliance.hub.rounds import RoundWorker
from appliance.hub.store import Connection, Store
from appliance.sync.transport import TransportConfigError

log = logging.getLogger(__name__)

RETRY_FAILED_AFTER = 600.0  # seconds before a school whose catch-up failed is tried again


def gates_to_catch_up(conn: Connection, config: HubConfig) -> dict[str, list[str]]:
    """school -> gates that lack a stream of a school IT has published to, or hold a roster or templates sealed to
    a key they replaced.

    A school is published to once ``edugate hub roster publish`` ran for it, even if no gate could be sent
    anything then (none had said its key). Its streams are the roster, and the
    templates when the hub holds some or sent some. A gate with no registered key is not due: nothing is sealed
    to it, and it is not tried every round; a key it presents counts once IT approved it.
    """
    due: dict[str, list[str]] = {}
    schools = [s for s in published_schools(conn) if not config.hub.schools or s in config.hub.schools]
    keys = stored_gate_keys(conn, schools)
    for school in schools:
        sent = {
            r[0] for r in conn.all("SELECT DISTINCT stream FROM published WHERE school = ? AND digest <> ''", [school])
        }
        expected = {"roster"} | ({"templates"} if template_models(conn, school) or "templates" in sent else set())
        for device in known_devices(conn, school):
            held = {
                stream: sealed_to
                for stream, sealed_to in conn.all(
                    "SELECT stream, sealed_to FROM published WHERE device = ? AND school = ? AND digest <> ''",
                    [device, school],
                )
            }
            key = keys.get((school, device))
            if key is None:
                continue  # nothing can be sealed to it yet
            missing = expected - set(held)
            rekeyed = any(sealed_to is not None and sealed_to != key for sealed_to in held.values())
            if missing or rekeyed:
                due.setdefault(school, []).append(device)
    return due


def catch_up(
    conn: Connection, config: HubConfig, key: Ed25519PrivateKey, skip: Callable[[str], bool] = lambda school: False
) -> PublishReport:
    """Publish to the gates that missed what their school was sent (see ``gates_to_catch_up``), and only to them,
    with the templates model of the school's last publish. A school another publish holds is left for the next
    round (``busy``, not an error); so is one ``skip`` names."""
    report = PublishReport()
    for school, devices in gates_to_catch_up(conn, config).items():
        if skip(school):
            continue
        models = template_models(conn, school)
        model = published_model(conn, school)
        if model not in models:
            model = models[0] if len(models) == 1 else None  # gone since: whatever the hub holds now
        roster_only = model is None and len(models) > 1
        if roster_only:
            report.errors.append(
                f"{school}: templates of several models at the hub ({', '.join(models)}) and no publish chose one: "
                "the catch-up sends the roster only; run `edugate hub roster publish --model M` once"
            )
        try:
            done = publish(
                conn, config, key, school=school, devices=devices, only=True, model=model, roster_only=roster_only
            )
        except (PublishError, TransportConfigError) as exc:  # no broker, an unreadable CA: rest, try later
            report.errors.append(f"{school}: {exc}")
            continue
        report.items += done.items
        report.busy += done.busy
        report.errors += [e for e in done.errors if not any(e.startswith(f"{b}: ") for b in done.busy)]
    return report


class CatchUpWorker(RoundWorker):
    """One thread, one database connection; a round every ``every`` seconds, the first one at once.

    A school whose catch-up failed (a broker refusing the message, templates of several models) is tried
    again after ``RETRY_FAILED_AFTER``, not every round: the log says why once per try.
    """

    name = "catch-up"

    def __init__(self, store: Store, config: HubConfig, key: Ed25519PrivateKey, every: float) -> None:
        super().__init__(store, every)
        self.config = config
        self.key = key
        self._failed: dict[str, float] = {}  # school -> when its catch-up last failed (monotonic)

    def _resting(self, school: str) -> bool:
        failed = self._failed.get(school)
        return failed is not None and time.monotonic() - failed < RETRY_FAILED_AFTER

    def run_once(self) -> PublishReport:
        report = catch_up(self._connection(), self.config, self.key, skip=self._resting)
        failed = {item.school for item in report.items if item.state == "failed"}
        failed |= {error.split(": ", 1)[0] for error in report.errors}
        done = {item.school for item in report.items} - failed
        for school in failed:
            self._failed[school] = time.monotonic()
        for school in done:
            self._failed.pop(school, None)
        for item in report.items:
            if item.state != "unchanged":
                log.info(
                    "hub: catch-up %s/%s %s version %s: %s",
                    item.school,
                    item.device,
                    item.stream,
                    item.version,
                    item.error or item.state,
                )
        for error in report.errors:
            log.warning("hub: catch-up: %s", error)
        return report
