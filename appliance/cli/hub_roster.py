"""`edugate hub roster ...` and `edugate hub templates ...`: the school's people and faces at the hub, to the gates."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from appliance.cli.common import EXIT_FAILED, fail, friendly_errors
from appliance.cli.hub import hub_config_option
from appliance.config import HubConfig, load_hub_config
from appliance.config.base import NAME_PATTERN
from appliance.hub.store import Connection, migrated_connection


def _name(ctx: click.Context, param: click.Parameter, value: object) -> object:
    """School and device ids as the topics and the ACL need them."""
    values = value if isinstance(value, tuple) else (value,)
    for item in values:
        if item is not None and not re.match(NAME_PATTERN, str(item)):
            raise click.BadParameter(f"{item!r}: use letters, digits, '_', '.', '-' (as in the gates' config)")
    return value


school_option = click.option("--school", required=True, callback=_name, help="The school's id (device.school).")


@contextmanager
def _hub(config_path: Path) -> Iterator[tuple[HubConfig, Connection]]:
    config = load_hub_config(config_path)
    with migrated_connection(config.database) as conn:
        yield config, conn


def _kb(size: int) -> str:
    return f"{size / 1_000_000:.1f} MB" if size >= 1_000_000 else f"{max(1, round(size / 1000))} KB"


@click.group("roster")
def hub_roster() -> None:
    """The school's roster at the hub, and publishing it to the gates."""


@hub_roster.command("import")
@click.argument("file", type=click.Path(path_type=Path))
@school_option
@hub_config_option
@click.option("--merge", is_flag=True, help="Add/update only the people in FILE (default: FILE is the whole roster).")
@click.option("--dry-run", is_flag=True, help="Check the file and report, change nothing.")
@friendly_errors
def roster_import(file: Path, school: str, config_path: Path, merge: bool, dry_run: bool) -> None:
    """Import people and cards from the school's CSV or XLSX export (all-or-nothing).

    Same formats and headers as `edugate roster import` on a gate, with the hub's [roster] settings.
    People missing from FILE are deactivated, unless --merge.
    """
    from appliance.cli.roster import checked_roster_file
    from appliance.hub.roster import import_people

    config = load_hub_config(config_path)
    parsed = checked_roster_file(file, config.roster, dry_run)
    if parsed is None:
        return
    with _hub(config_path) as (_, conn):
        try:
            report = import_people(conn, school, parsed.people, replace=not merge)
        except ValueError as exc:
            fail(f"{file}: rejected, nothing imported: {exc}")
    click.echo(
        f"{file}: {school}: imported {len(parsed.people)} people: {report.added} added, {report.updated} updated, "
        f"{report.unchanged} unchanged, {report.deactivated} deactivated"
    )
    for uid, old, new in report.cards_moved:
        click.echo(f"  card {uid} moved from {old} to {new}")
    click.echo("send it to the gates with: edugate hub roster publish")


@hub_roster.command("publish")
@click.option("--school", default=None, callback=_name, help="Only this school (default: every school of the hub).")
@click.option(
    "--device",
    "devices",
    multiple=True,
    callback=_name,
    help="A gate to publish to besides the known ones (e.g. one not yet connected); repeatable.",
)
@click.option("--force", is_flag=True, help="Send again even what a gate already has.")
@click.option("--model", default=None, help="Face model of the templates, if the hub holds several.")
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds to wait for the online gates' answers (applied or refused).",
)
@hub_config_option
@friendly_errors
def roster_publish(
    school: str | None, devices: tuple[str, ...], force: bool, model: str | None, wait: float, config_path: Path
) -> None:
    """Sign and send the roster and face templates to every gate (retained: offline gates get them later)."""
    from appliance.hub.publish import PublishError, publish
    from appliance.hub.roster import TemplateKeyError
    from appliance.sync.signing import load_private_key

    with _hub(config_path) as (config, conn):
        key = load_private_key(config.signing.key_file)
        try:
            report = publish(conn, config, key, school, devices, force, model, wait)
        except (PublishError, TemplateKeyError) as exc:
            fail(str(exc))
    for note in report.notes:
        click.echo(note)
    for item in report.items:
        where = f"{item.school}/{item.device} {item.stream}"
        if item.state == "unchanged":
            click.echo(f"{where}: unchanged (version {item.version}), not sent")
        elif item.state == "failed":
            click.echo(f"{where}: NOT SENT: {item.error}", err=True)
        else:
            line = f"{where}: version {item.version} sent ({item.summary}; {_kb(item.size)})"
            if item.state == "offline":
                line += ", gate offline: it gets it when it connects"
            elif item.result is not None:
                if item.result.get("ok"):
                    detail = ", ".join(f"{k} {v}" for k, v in sorted((item.result.get("detail") or {}).items()))
                    line += f", applied by the gate ({detail})"
                else:
                    line += f", REFUSED by the gate: {item.result.get('reason')}"
            elif wait > 0:
                line += f", no answer from the gate within {wait:g} s"
            click.echo(line)
    for error in report.errors:
        click.echo(f"edugate: error: {error}", err=True)
    if report.failed:
        sys.exit(EXIT_FAILED)


@click.group("templates")
def hub_templates() -> None:
    """Enrolled face templates at the hub (sealed with signing.template_key_file)."""


@hub_templates.command("import")
@school_option
@click.option(
    "--journal",
    "journal",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="A copy of the enrolling gate's journal database (its journal.path).",
)
@click.option(
    "--key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="That gate's template key (its vision.key_file), mode 0600.",
)
@click.option("--model", default=None, help="Only templates of this face model (default: every model there).")
@hub_config_option
@friendly_errors
def templates_import(school: str, journal: Path, key_file: Path, model: str | None, config_path: Path) -> None:
    """Take the templates enrolled on a gate into the hub, sealed again with the hub's own key.

    Each person's templates of a model replace what the hub held for them; others are kept.
    Publishing then makes every gate's templates equal to the hub's.
    """
    from appliance.hub.roster import TemplateKeyError, hub_sealer, import_templates, read_gate_templates

    with _hub(config_path) as (config, conn):
        try:
            templates = read_gate_templates(journal, key_file, model)
            if not any(templates.values()):
                fail(f"{journal}: no enrolled face templates there")
            report = import_templates(conn, hub_sealer(config, create=True), school, templates)
        except TemplateKeyError as exc:
            fail(str(exc))
    click.echo(
        f"{journal}: {school}: imported {report.templates} templates of {report.people} people "
        f"(model {', '.join(report.models)}), sealed with {config.signing.template_key_file}"
    )
    if report.trimmed:
        click.echo(f"  {report.trimmed} people had more than 50 templates: only their newest 50 were kept")
    if report.not_on_roster:
        click.echo(f"  {report.not_on_roster} people are not on the hub's roster of {school}: not sent until they are")
    click.echo("send them to the gates with: edugate hub roster publish")


@hub_templates.command("remove")
@click.argument("people", nargs=-1, required=True)
@school_option
@hub_config_option
@friendly_errors
def templates_remove(people: tuple[str, ...], school: str, config_path: Path) -> None:
    """Erase people's face templates at the hub (right to erasure); the next publish erases them on the gates."""
    from appliance.hub.roster import remove_templates

    with _hub(config_path) as (_, conn):
        removed = remove_templates(conn, school, list(people))
    click.echo(f"{school}: erased {removed} template record(s) of {len(people)} people at the hub")
    click.echo("erase them on the gates with: edugate hub roster publish")
