"""`edugate hub gates ...`: register gates with their keys, approve a key change, list, forget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from appliance.cli.common import fail, friendly_errors
from appliance.cli.hub import hub_config_option
from appliance.config import load_hub_config
from appliance.hub import gates
from appliance.hub.jobs import NoticeHold, notice_holds
from appliance.hub.publish import clear_retained
from appliance.hub.store import migrated_connection


@click.group("gates")
def hub_gates() -> None:
    """The gates IT registered: each gate's school and keys are fixed here, not by what the gate says."""


def _identity_file(path: str) -> dict[str, Any]:
    """What `edugate identity --json` printed on the gate (a file, or - for standard input)."""
    try:
        text = click.get_text_stream("stdin").read() if path == "-" else Path(path).read_text("utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        fail(
            f"--identity {path}: not the output of `edugate identity --json` ({getattr(exc, 'strerror', None) or exc})"
        )
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("template_key", "signing_key")):
        fail(f"--identity {path}: not the output of `edugate identity --json` (no template_key / signing_key)")
    return data


@hub_gates.command("add")
@click.argument("device", required=False)
@click.option("--school", help="The gate's school (its device.school).")
@click.option("--template-key", help="The gate's template key, as `edugate identity` prints it.")
@click.option("--signing-key", help="The gate's signing key, as `edugate identity` prints it.")
@click.option("--identity", "identity_path", help="The output of `edugate identity --json` (a file, or -).")
@click.option("--replace", is_flag=True, help="Replace the keys of a gate registered with other keys.")
@hub_config_option
@friendly_errors
def gates_add(
    device: str | None,
    school: str | None,
    template_key: str | None,
    signing_key: str | None,
    identity_path: str | None,
    replace: bool,
    config_path: Path,
) -> None:
    """Register DEVICE of SCHOOL with its keys: from then on its events are taken, its status is believed only
    when signed with this key, and rosters and faces are sealed only to this key."""
    if identity_path is not None:
        found = _identity_file(identity_path)
        for name, given, theirs in (("gate", device, found.get("device")), ("school", school, found.get("school"))):
            if given is not None and theirs is not None and given != theirs:
                fail(f"the identity file is of {name} {theirs}, not {given}")
        device, school = device or found.get("device"), school or found.get("school")
        template_key, signing_key = found["template_key"], found["signing_key"]
    if not device or not school or not template_key or not signing_key:
        fail("give DEVICE, --school, --template-key and --signing-key (or --identity FILE from `edugate identity`)")
    config = load_hub_config(config_path)
    if config.hub.schools and school not in config.hub.schools:
        fail(f"this hub serves {', '.join(config.hub.schools)} (hub.schools), not {school}")
    with migrated_connection(config.database) as conn:
        try:
            gate = gates.add(conn, device, school, template_key, signing_key, replace=replace)
        except gates.RegistryError as exc:
            fail(str(exc))
    click.echo(f"{school}/{device}: registered, fingerprint {gate.fingerprint}")


@hub_gates.command("approve")
@click.argument("device")
@click.option(
    "--fingerprint",
    "expected",
    required=True,
    help="The fingerprint `edugate identity` shows on the gate itself (not the one the hub shows).",
)
@click.option("--school", help="For a gate not registered yet: its school (default: the school it spoke for).")
@hub_config_option
@friendly_errors
def gates_approve(device: str, expected: str, school: str | None, config_path: Path) -> None:
    """Take the key DEVICE presents as its registered key (after its key file was replaced, or for a gate that
    came online before it was registered). Read the fingerprint on the gate first: a stolen login presents a
    key too."""
    config = load_hub_config(config_path)
    with migrated_connection(config.database) as conn:
        try:
            gate = gates.approve(conn, device, expected, school)
        except gates.RegistryError as exc:
            fail(str(exc))
    click.echo(f"{gate.school}/{device}: key {gate.fingerprint} approved; roster and faces follow at the next catch-up")


def _status_line(status: str | None, status_at: str | None, online: int | None) -> str:
    if status is None:
        return "no status believed yet"
    try:
        backlog = json.loads(status).get("backlog")
    except (ValueError, AttributeError):
        backlog = None
    state = "online" if online else "offline"
    return f"{state} since {status_at}, backlog {backlog if backlog is not None else '?'}"


@hub_gates.command("list")
@hub_config_option
@friendly_errors
def gates_list(config_path: Path) -> None:
    """One line per gate: registered or not, its fingerprint, its last status; a key change awaiting approval
    and refused messages are flagged with `!`."""
    config = load_hub_config(config_path)
    with migrated_connection(config.database) as conn:
        known = gates.all_gates(conn)
        statuses = {r[0]: r[1:] for r in conn.all("SELECT device, online, status, status_at FROM devices")}
        holds = {(h.school, h.gate): h for h in notice_holds(conn, config)}
    if not known:
        click.echo("no gates registered: on each gate `edugate identity`, then `edugate hub gates add ...` here")
    for gate in known:
        online, status, status_at = statuses.get(gate.device, (None, None, None))
        where = f"{gate.school}/{gate.device}"
        if gate.registered:
            click.echo(f"{where}: registered ({gate.fingerprint}), {_status_line(status, status_at, online)}")
        else:
            click.echo(f"{where}: NOT REGISTERED, its messages are refused")
        if gate.pending:
            what = "KEY CHANGE" if gate.registered else "presents a key"
            click.echo(
                f"  ! {what} since {gate.pending_since}: {gate.pending_fingerprint}; if `edugate identity` on the gate "
                f"shows it: edugate hub gates approve {gate.device} --fingerprint {gate.pending_fingerprint}"
            )
        if gate.refused:
            click.echo(f"  ! {gate.refused} message(s) refused, the last at {gate.last_refusal}")
        hold = holds.pop((gate.school, gate.device), None)
        if hold is not None:
            click.echo(f"  ! {_hold_line(hold)}")
    for hold in holds.values():  # a gate the hub tracks that is no longer registered
        click.echo(f"{hold.school}/{hold.gate}: ! {_hold_line(hold)}")


def _hold_line(hold: NoticeHold) -> str:
    """What a gate that is behind does to its school's absence notices today, in one line."""
    since = f" since {hold.since}" if hold.since else ""
    line = f"behind ({', '.join(hold.causes)}{since}): {hold.reason}"
    if hold.unnotified:
        return f"{line}; absences of {', '.join(hold.unnotified)} recorded WITHOUT notifying parents"
    if hold.waiting:
        return f"{line}; absence notices of {', '.join(hold.waiting)} HELD BACK until it catches up"
    return f"{line}; absence notices will wait for it at the next cut-off"


@hub_gates.command("forget")
@click.argument("device")
@hub_config_option
@friendly_errors
def gates_forget(device: str, config_path: Path) -> None:
    """Remove DEVICE's registration (a gate retired, stolen or moved to another school): its messages are refused
    until it is registered again, and the roster and templates the broker keeps for it are emptied. Its events
    and seq tracking stay."""
    config = load_hub_config(config_path)
    with migrated_connection(config.database) as conn:
        sent_to = conn.all("SELECT DISTINCT school FROM published WHERE device = ?", [device])
        forgotten = gates.forget(conn, device)
    if not forgotten:
        fail(f"no gate {device} at this hub (see `edugate hub gates list`)")
    click.echo(f"{device}: forgotten; its messages are refused until `edugate hub gates add` registers it again")
    for (school,) in sent_to:  # what the hub published to it is retained on the broker
        problem = clear_retained(config, school, device)
        if problem is not None:
            topic = f"{config.mqtt.topic_prefix}/{school}/{device}/downlink"
            fail(
                f"{device}: the broker still keeps its roster and templates (sealed to its key): {problem}; empty "
                f"them with the hub's login: mosquitto_pub -r -n -t {topic}/roster (and {topic}/templates)"
            )
        click.echo(f"{device}: the broker no longer keeps its roster and templates of {school}")
