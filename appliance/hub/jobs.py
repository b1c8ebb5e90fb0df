"""The hub's daily jobs: absences at each class's cut-off, the report's export and city push at ``send_at``.

Both are decided in the database, not in memory, so a restart neither repeats nor skips them: the
absence decision of a class and day is a ``meta`` row written in the same transaction as the
parents' notifications it plans (``absent/<school>/<day>/<class>``, holding the absentees'
ids), and a finished report a ``meta`` row ``report/<school>/<day>`` (the push's own record is
the ``reports`` table). Work whose time has come is done at the next round, so a hub that was down
at 07:30 decides the 07:30 absences when it starts, on the same day only (a missed day is
exported and pushed by hand: ``edugate hub report --date D --push``).

A gate of the school that is offline (for less than ``OUT_OF_SERVICE``), still sending its backlog
or missing events holds the absence decision back: its students' arrivals may not be here yet.
The decision waits up to ``attendance.absent_hold_minutes`` past the cut-off; after that the
absentees are recorded, but their parents are not notified (a message to every family of a
school whose gate lost the network would be worse than none), and a warning names the gates.

Holding notices back is never silent: ``notice_holds`` says, per school and gate, why the gate holds
them and which of today's classes wait for it or were recorded without notice (for ``edugate hub
gates list``, the API's metrics and systemd's status line), and the jobs log it once per gate, day
and cause.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from appliance.config import HubConfig
from appliance.hub.attendance import ABSENT_UNEXCUSED, class_day, classes, cutoff, is_school_day, schools
from appliance.hub.resync import MAX_ATTEMPTS, current_journal
from appliance.hub.rounds import RoundWorker
from appliance.hub.store import Connection, Store

log = logging.getLogger(__name__)

TICK = 20.0  # seconds between rounds
OUT_OF_SERVICE = timedelta(hours=72)  # a gate offline longer than this is not waited for
RETRY_FAILED_AFTER = 300.0  # seconds before a job that raised is tried again


@dataclass(frozen=True)
class NoticeHold:
    """A gate that holds its school's absence notices back: the decision waits for it, then goes without notice."""

    school: str
    gate: str
    causes: tuple[str, ...]  # "offline", "backlog", "gap"
    reason: str  # one line, e.g. "missing seq 6-9007199254740991 of journal 1a2b3c4d (resync request 3 of 8)"
    since: str | None  # when the cause began (ISO), when known
    waiting: tuple[str, ...] = ()  # today's classes past their cut-off whose decision waits (for this gate or another)
    unnotified: tuple[str, ...] = ()  # today's classes recorded without notifying parents, this gate among the causes

    @property
    def withholding(self) -> bool:
        """Whether notices are held back today (not only would be, at the next cut-off)."""
        return bool(self.waiting or self.unnotified)


@dataclass(frozen=True)
class _Behind:
    causes: tuple[str, ...]
    reason: str
    since: str | None


@dataclass(frozen=True)
class AbsenceDecision:
    school: str
    day: str
    class_name: str
    absent: tuple[str, ...]
    notified: bool
    gates_behind: tuple[str, ...]


def absence_key(school: str, day: str, class_name: str) -> str:
    return f"absent/{school}/{day}/{class_name}"


def report_key(school: str, day: str) -> str:
    return f"report/{school}/{day}"


def gates_behind(conn: Connection, school: str, now: datetime) -> list[str]:
    """Gates whose events of the day may not all be here: offline lately, a backlog, or a gap in their seq."""
    return sorted(_behind(conn, school, now))


def _behind(conn: Connection, school: str, now: datetime) -> dict[str, _Behind]:
    """gates_behind with the cause of each, in words."""
    found: dict[str, list[tuple[str, str, str | None]]] = {}
    for device, online, status, status_at in conn.all(
        "SELECT device, online, status, status_at FROM devices WHERE school = ?", [school]
    ):
        if not online:
            try:
                since = datetime.fromisoformat(status_at)
            except ValueError:
                continue
            if since.tzinfo is None:
                since = since.replace(tzinfo=UTC)
            if now - since < OUT_OF_SERVICE:
                when = since.astimezone(UTC).isoformat(timespec="seconds")
                found.setdefault(device, []).append(("offline", f"offline since {when}", when))
            continue
        try:
            backlog = json.loads(status).get("backlog") or 0
        except (ValueError, AttributeError):
            backlog = 0
        if isinstance(backlog, int) and backlog > 0:
            found.setdefault(device, []).append(("backlog", f"{backlog:,} events not sent yet (its status)", None))
    # A gap counts while it may still close: the hub has not given up asking for it, and it is in the gate's
    # current journal (an earlier one can no longer be resent). Else one lost range would hold every day's
    # absence messages for good.
    for device, journal, status, contiguous, highest, attempts, gap_since in conn.all(
        "SELECT s.device, s.journal, d.status, s.contiguous, s.highest, s.resync_attempts, s.gap_since FROM streams s "
        "LEFT JOIN devices d ON d.device = s.device WHERE s.school = ? AND s.highest > s.contiguous "
        "AND s.resync_attempts <= ?",
        [school, MAX_ATTEMPTS],
    ):
        current = current_journal(status)
        if current is None or current == journal:
            asked = f"resync request {attempts} of {MAX_ATTEMPTS}" if attempts else "not asked for yet"
            reason = f"missing seq {contiguous + 1}-{highest} of journal {journal[:8]} ({asked})"
            found.setdefault(device, []).append(("gap", reason, gap_since))
    return {
        device: _Behind(tuple(c for c, _, _ in causes), "; ".join(r for _, r, _ in causes), causes[0][2])
        for device, causes in found.items()
    }


def notice_holds(conn: Connection, config: HubConfig, now: datetime | None = None) -> list[NoticeHold]:
    """Per school and gate: every gate that holds the school's absence notices back, why, and what it holds today.

    A gate offline lately, with a backlog or a gap it may still fill holds the absence decision of each class
    until it catches up, and past ``attendance.absent_hold_minutes`` the absentees are recorded without
    notifying their parents. For ``edugate hub gates list`` (an alert per gate), the API's metrics and the log.
    """
    now = (now or datetime.now(config.zone)).astimezone(config.zone)
    today = now.date()
    holds: list[NoticeHold] = []
    for school in schools(conn, config):
        behind = _behind(conn, school, now)
        if not behind:
            continue
        waiting: list[str] = []
        unnotified: dict[str, list[str]] = {}
        if is_school_day(config, today):
            for class_name in classes(conn, school):
                if now < cutoff(config, today, class_name):
                    continue
                row = conn.one(
                    "SELECT value FROM meta WHERE key = ?", [absence_key(school, today.isoformat(), class_name)]
                )
                if row is None:
                    waiting.append(class_name)
                    continue
                decided = json.loads(row[0])
                if not decided.get("notified"):
                    for gate in decided.get("behind") or []:
                        unnotified.setdefault(gate, []).append(class_name)
        for gate, cause in sorted(behind.items()):
            holds.append(
                NoticeHold(
                    school,
                    gate,
                    cause.causes,
                    cause.reason,
                    cause.since,
                    tuple(waiting),
                    tuple(unnotified.get(gate, [])),
                )
            )
    return holds


def _meta_exists(conn: Connection, key: str) -> bool:
    return conn.one("SELECT 1 FROM meta WHERE key = ?", [key]) is not None


def decide_absences(
    conn: Connection, config: HubConfig, school: str, day: date, class_name: str, now: datetime
) -> AbsenceDecision | None:
    """At or after the class's cut-off: record its unexcused absentees once and plan their parents' messages.

    Returns None when it is too early, already decided, or waiting for a gate that is behind.
    """
    the_cutoff = cutoff(config, day, class_name)
    key = absence_key(school, day.isoformat(), class_name)
    if now < the_cutoff or _meta_exists(conn, key):
        return None
    behind = gates_behind(conn, school, now)
    if behind and now < the_cutoff + timedelta(minutes=config.attendance.absent_hold_minutes):
        return None
    notify = config.notify.enabled and not behind
    with conn.transaction():
        absent = [
            s.person for s in class_day(conn, config, school, day, class_name, now=now) if s.status == ABSENT_UNEXCUSED
        ]
        value = json.dumps(
            {"decided_at": now.isoformat(timespec="seconds"), "absent": absent, "notified": notify, "behind": behind}
        )
        inserted = conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO NOTHING", [key, value]
        ).rowcount
        if inserted != 1:
            return None  # another hub instance decided it first
        if notify and absent:
            from appliance.hub.notify import plan_absent

            for person in absent:
                plan_absent(conn, config, school, person, day)
    if behind:
        log.warning(
            "absences %s %s %s: %d recorded, parents not notified: gate(s) %s still behind %d min after the cut-off",
            school,
            day.isoformat(),
            class_name,
            len(absent),
            ", ".join(behind),
            config.attendance.absent_hold_minutes,
        )
    else:
        log.info(
            "absences %s %s %s: %d without permission%s",
            school,
            day.isoformat(),
            class_name,
            len(absent),
            ", parents notified" if notify and absent else "",
        )
    return AbsenceDecision(school, day.isoformat(), class_name, tuple(absent), notify, tuple(behind))


def run_report(
    conn: Connection,
    config: HubConfig,
    school: str,
    day: date,
    stop: threading.Event | None = None,
    wait: bool = True,
) -> bool:
    """Push the day's exported files to the city if configured and record the report as done; True once
    finished for good (sent, failed, or no city), False to come back next round (``wait``: see push_day)."""
    from appliance.hub.city import push_day
    from appliance.hub.report import report_paths

    key = report_key(school, day.isoformat())
    if _meta_exists(conn, key):
        return True
    files = report_paths(config, school, day)
    pushed = None
    if config.report.city is not None:
        result = push_day(conn, config, school, day, stop=stop, wait=wait)
        if not result.done:
            return False  # a retry not due yet, or another instance is sending: next round
        pushed = result.status
    log.info("report %s %s exported%s", school, day.isoformat(), f", city push {pushed}" if pushed else "")
    value = json.dumps(
        {"exported_at": datetime.now(UTC).isoformat(timespec="seconds"), "files": [str(files.xlsx), str(files.csv)]}
        | ({"push": pushed} if pushed else {})
    )
    with conn.transaction():
        conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO NOTHING", [key, value])
    return True


class DailyJobs(RoundWorker):
    """One thread, one database connection; a round every ``tick`` seconds (and at once when started)."""

    name = "daily-jobs"

    def __init__(
        self, store: Store, config: HubConfig, tick: float = TICK, ready: Callable[[], bool] = lambda: True
    ) -> None:
        super().__init__(store, tick)
        self.config = config
        # Whether the hub has taken in what the broker held for it: after a restart at 9:00 the morning's
        # arrivals are still queued, and deciding before they are in would mark present students absent.
        self.ready = ready
        self._failed: dict[str, float] = {}
        self._exported: set[str] = set()
        self._holds_logged: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}  # (school, gate) -> (day, causes)

    def _guarded(self, key: str, job: Callable[[], object]) -> None:
        """Run one job; one that raised waits ``RETRY_FAILED_AFTER`` before it is tried again (no log flood)."""
        failed_at = self._failed.get(key)
        if failed_at is not None and time.monotonic() - failed_at < RETRY_FAILED_AFTER:
            return
        try:
            job()
            self._failed.pop(key, None)
        except Exception:
            self._failed[key] = time.monotonic()
            log.exception("daily jobs: %s failed; trying again in %.0f s", key, RETRY_FAILED_AFTER)
            self._drop_if_broken()

    def _report(self, school: str, day: date) -> None:
        """Export once per process and day; the push may take several rounds (retries, another instance)."""
        from appliance.hub.report import export_day

        key = report_key(school, day.isoformat())
        conn = self._connection()
        if key not in self._exported and not _meta_exists(conn, key):
            export_day(conn, self.config, school, day)
            self._exported.add(key)
        run_report(conn, self.config, school, day, self._stop, wait=False)  # retries must not hold the cut-offs

    def run_once(self, now: datetime | None = None) -> None:
        """Everything due today by ``now`` (the hub's local time) that is not yet done."""
        now = (now or datetime.now(self.config.zone)).astimezone(self.config.zone)
        today = now.date()
        if not self.ready():
            return
        conn = self._connection()
        for school, day in _unfinished_pushes(conn, today):
            # A retry due after midnight, or on a day off, is still sent: its day's round is over.
            self._guarded(report_key(school, day.isoformat()), lambda s=school, d=day: self._report(s, d))
        if not is_school_day(self.config, today):
            return
        for school in schools(conn, self.config):
            for class_name in classes(conn, school):
                self._guarded(
                    absence_key(school, today.isoformat(), class_name),
                    lambda s=school, c=class_name: decide_absences(self._connection(), self.config, s, today, c, now),
                )
            if now.time() >= self.config.report.send_at:
                self._guarded(report_key(school, today.isoformat()), lambda s=school: self._report(s, today))
            if self._stop.is_set():
                return
        self._guarded("notice-holds", lambda: self._log_holds(now))

    def _log_holds(self, now: datetime) -> None:
        """Say in the log which gate holds which school's absence notices back, once per gate, day and cause, and
        when it no longer does: notices held back in silence looked like a school with nobody absent."""
        day = now.date().isoformat()
        current: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}
        for hold in notice_holds(self._connection(), self.config, now):
            if not hold.withholding:
                continue
            key = (hold.school, hold.gate)
            current[key] = (day, hold.causes)
            if self._holds_logged.get(key) == current[key]:
                continue
            log.warning(
                "absence notices of %s %s held back by gate %s: %s; waiting: %s; recorded without notice: %s "
                "(parents are not notified of a class decided while it is behind)",
                hold.school,
                day,
                hold.gate,
                hold.reason,
                ", ".join(hold.waiting) or "none",
                ", ".join(hold.unnotified) or "none",
            )
        for school, gate in set(self._holds_logged) - set(current):
            log.info("absence notices of %s: gate %s no longer holds them back", school, gate)
        self._holds_logged = current


def _unfinished_pushes(conn: Connection, today: date) -> list[tuple[str, date]]:
    """(school, day) of earlier days whose city push is still retrying or was cut short mid-send."""
    rows = conn.all(
        "SELECT school, day FROM reports WHERE target = 'city' AND status IN ('retrying', 'sending') AND day < ? "
        "ORDER BY day, school",
        [today.isoformat()],
    )
    return [(str(school), date.fromisoformat(str(day))) for school, day in rows]


def daily_jobs(store: Store, config: HubConfig, ready: Callable[[], bool] = lambda: True) -> DailyJobs:
    """The entry point the hub service starts: absences at the cut-offs, the report at ``report.send_at``.

    ``ready`` says whether the hub's ingest has caught up with the broker; nothing is decided before.
    """
    return DailyJobs(store, config, ready=ready)
