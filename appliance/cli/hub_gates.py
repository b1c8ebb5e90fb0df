"""`edugate hub gates ...`: the gates the hub knows, and forgetting one that moved to another school."""

from __future__ import annotations

import json
from pathlib import Path

import click

from appliance.cli.common import fail, friendly_errors
from appliance.cli.hub import hub_config_option
from appliance.config import load_hub_config
from appliance.hub.store import migrated_connection


@click.group("gates")
def hub_gates() -> None:
    """Gates the hub has heard from; each belongs to the school it was first heard from."""


@hub_gates.command("list")
@hub_config_option
@friendly_errors
def gates_list(config_path: Path) -> None:
    """One line per gate: school, gate, online or not, its last status time and backlog."""
    config = load_hub_config(config_path)
    with migrated_connection(config.database) as conn:
        rows = conn.all("SELECT school, device, online, status, status_at FROM devices ORDER BY school, device")
    for school, device, online, status, status_at in rows:
        try:
            backlog = json.loads(status).get("backlog")
        except (ValueError, AttributeError):
            backlog = None
        state = "online" if online else "offline"
        click.echo(f"{school}/{device}: {state} since {status_at}, backlog {backlog if backlog is not None else '?'}")


@hub_gates.command("forget")
@click.argument("device")
@hub_config_option
@friendly_errors
def gates_forget(device: str, config_path: Path) -> None:
    """Forget DEVICE's school (a gate moved to another school): its next status decides again.

    Its events, seq tracking and what was published to it stay; the next publish (or catch-up) sends it the
    new school's roster and templates once it has spoken on the new school's topics.
    """
    config = load_hub_config(config_path)
    with migrated_connection(config.database) as conn, conn.transaction():
        forgotten = conn.execute("DELETE FROM devices WHERE device = ?", [device]).rowcount
    if not forgotten:
        fail(f"no gate {device} at this hub (see `edugate hub gates list`)")
    click.echo(f"{device}: forgotten; the school it next speaks for is its school from then on")
