"""`edugate hub outbox [retry]`: what parents were sent, what is waiting, what failed and why; send again."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from appliance.cli.common import fail, friendly_errors
from appliance.cli.hub import hub_config_option
from appliance.config import HubConfig, load_hub_config
from appliance.hub.notify import STATUSES
from appliance.hub.notify.planner import iso, utc_now
from appliance.hub.store import migrated_connection

MIN_KEY_PREFIX = 6
COLUMNS = (
    "o.key, o.created_at, o.day, o.school, o.person, p.full_name, o.kind, o.channel, o.status, o.attempts, "
    "o.next_attempt_at, o.sent_at, o.last_error, o.recipients"
)


def _day(value: str | None, config: HubConfig) -> str | None:
    if value is None:
        return None
    if value == "today":
        return datetime.now(config.zone).date().isoformat()
    for fmt in ("%Y-%m-%d", "%d/%m/%Y"):
        try:
            return datetime.strptime(value, fmt).date().isoformat()
        except ValueError:
            continue
    raise click.BadParameter(f"{value!r}: use YYYY-MM-DD, dd/mm/yyyy or today", param_hint="--day")


day_option = click.option("--day", default=None, help="Only messages about this day (YYYY-MM-DD, dd/mm/yyyy, today).")
school_option = click.option("--school", default=None, help="Only this school.")


def _filters(status: str | None, day: str | None, school: str | None) -> tuple[str, list[Any]]:
    clauses, params = [], []
    for column, value in (("o.status", status), ("o.day", day), ("o.school", school)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _local(config: HubConfig, stamp: str | None) -> str:
    if not stamp:
        return "-"
    return datetime.fromisoformat(stamp).astimezone(config.zone).strftime("%Y-%m-%d %H:%M:%S")


def _when(config: HubConfig, row: dict[str, Any]) -> str:
    """The time that matters for the row's status: sent at, next attempt, or nothing."""
    if row["status"] == "sent":
        return "sent " + _local(config, row["sent_at"])[11:]
    if row["status"] in ("pending", "sending"):
        return "next " + _local(config, row["next_attempt_at"])[11:]
    return ""


@click.group("outbox", invoke_without_command=True)
@hub_config_option
@click.option("--status", type=click.Choice(STATUSES), default=None, help="Only messages in this state.")
@day_option
@school_option
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True, help="Newest first.")
@click.option("--show-contacts", is_flag=True, help="Also show the parents' phone numbers / e-mail addresses.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of a table.")
@click.pass_context
@friendly_errors
def outbox(
    ctx: click.Context,
    config_path: Path,
    status: str | None,
    day: str | None,
    school: str | None,
    limit: int,
    show_contacts: bool,
    as_json: bool,
) -> None:
    """Parent notifications and their delivery: pending, sending, sent, failed (with the answer), skipped (why).

    `edugate hub outbox retry KEY` or `--all-failed` sends failed (or skipped) messages again.
    """
    if ctx.invoked_subcommand is not None:
        return
    config = load_hub_config(config_path)
    where, params = _filters(status, _day(day, config), school)
    with migrated_connection(config.database) as conn:
        rows = conn.all(
            f"SELECT {COLUMNS} FROM outbox o LEFT JOIN people p ON p.school = o.school AND p.id = o.person{where}"
            " ORDER BY o.created_at DESC, o.key LIMIT ?",
            [*params, limit],
        )
        counts = conn.all(f"SELECT o.status, COUNT(*) FROM outbox o{where} GROUP BY o.status", params)
    names = [c.strip().split(".")[-1] for c in COLUMNS.split(",")]
    records = [dict(zip(names, row, strict=True)) for row in rows]
    for record in records:
        contacts = json.loads(record.pop("recipients"))
        record["recipients"] = contacts if show_contacts else len(contacts)
    if as_json:
        for record in records:
            click.echo(json.dumps(record, ensure_ascii=False))
        return
    if not records:
        click.echo("No messages.")
        return
    for record in records:
        to = ", ".join(record["recipients"]) if show_contacts else f"{record['recipients']} recipient(s)"
        click.echo(
            f"{record['key'][:12]}  {_local(config, record['created_at'])}  {record['day']}  {record['school']}  "
            f"{record['person']} {record['full_name'] or '?'}  {record['kind']}  {record['channel']} -> {to}  "
            f"{record['status']}  attempts {record['attempts']}  {_when(config, record)}".rstrip()
        )
        if record["last_error"] and record["status"] != "sent":
            click.echo(f"    {' '.join(str(record['last_error']).split())[:300]}")
    summary = ", ".join(f"{name} {count}" for name, count in sorted(counts))
    shown = f"{len(records)} shown (newest first)" if len(records) < sum(c for _, c in counts) else f"{len(records)}"
    click.echo(f"{shown}; by status: {summary}")


@outbox.command("retry")
@click.argument("key", required=False)
@click.option("--all-failed", is_flag=True, help="Every failed message (narrow with --day / --school).")
@day_option
@school_option
@hub_config_option
@click.pass_context
@friendly_errors
def retry(
    ctx: click.Context, key: str | None, all_failed: bool, day: str | None, school: str | None, config_path: Path
) -> None:
    """Send a failed or skipped message again (KEY or its first characters, as listed), or all failed ones.

    The running hub picks them up within a second; they get max_attempts new attempts.
    """
    if (key is None) == (not all_failed):
        fail("give a KEY (from `edugate hub outbox`) or --all-failed, not both")
    parent = ctx.parent
    if (
        parent is not None
        and ctx.get_parameter_source("config_path") is ParameterSource.DEFAULT
        and parent.get_parameter_source("config_path") is not ParameterSource.DEFAULT
    ):
        config_path = parent.params["config_path"]  # `edugate hub outbox --config X retry ...`
    config = load_hub_config(config_path)
    now = iso(utc_now())
    with migrated_connection(config.database) as conn, conn.transaction():
        if all_failed:
            where, params = _filters("failed", _day(day, config), school)
            cur = conn.execute(
                "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = ? WHERE key IN"
                f" (SELECT o.key FROM outbox o{where})",
                [now, *params],
            )
            click.echo(f"requeued {max(cur.rowcount, 0)} failed message(s); the running hub sends them now")
            return
        assert key is not None
        if len(key) < MIN_KEY_PREFIX or any(c not in "0123456789abcdef" for c in key.lower()):
            fail(f"a key is hexadecimal; give at least its first {MIN_KEY_PREFIX} characters")
        matches = conn.all("SELECT key, status FROM outbox WHERE key LIKE ?", [key.lower() + "%"])
        if not matches:
            fail(f"no message with a key starting {key!r} (see `edugate hub outbox`)")
        if len(matches) > 1:
            fail(f"{len(matches)} messages have keys starting {key!r}: give more characters")
        full, status = matches[0]
        if status not in ("failed", "skipped"):
            fail(f"message {full[:12]} is {status}: only failed or skipped messages are sent again")
        conn.execute(
            "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = ? WHERE key = ? AND status = ?",
            [now, full, status],
        )
        click.echo(f"requeued message {full[:12]} (was {status}); the running hub sends it now")
