"""`edugate roster ...`: import and list people and cards."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import click

from appliance.cli.common import EXIT_FAILED, config_option, fail, friendly_errors, journal_option, journal_path_of
from appliance.config import GateConfig, RosterConfig, load_config
from appliance.journal import open_database
from appliance.roster.importer import ParsedRoster, RowError, load_roster_file


@click.group()
def roster() -> None:
    """Import and look at the roster (students and staff)."""


def reject_rows(file: Path, errors: Sequence[RowError]) -> None:
    """All or nothing: with any bad row, list every one and exit; the file is not imported."""
    if errors:
        rows = len({e.row for e in errors})
        click.echo(f"{file}: rejected, nothing imported: {rows} row(s) with problems:", err=True)
        for error in errors:
            click.echo(f"  {error}", err=True)
        sys.exit(EXIT_FAILED)


def checked_roster_file(file: Path, settings: RosterConfig, dry_run: bool) -> ParsedRoster | None:
    """Read a roster export and say which columns were found; exit listing every bad row (nothing is imported
    then). Returns the parsed roster, or None after a dry run's report. Shared by the gate's and the hub's import."""
    parsed = load_roster_file(file, settings)
    click.echo("columns: " + ", ".join(f"{k}={v!r}" for k, v in parsed.columns.items()))
    reject_rows(file, parsed.errors)
    if dry_run:
        click.echo(f"{file}: {len(parsed.people)} people OK (dry run, nothing written)")
        return None
    return parsed


@roster.command("import")
@click.argument("file", type=click.Path(path_type=Path))
@config_option
@journal_option
@click.option(
    "--merge",
    is_flag=True,
    help="Add/update only the people in FILE (default: FILE is the whole roster, "
    "people missing from it are deactivated).",
)
@click.option("--dry-run", is_flag=True, help="Check the file and report, change nothing.")
@friendly_errors
def roster_import(file: Path, config_path: Path, journal_path: Path | None, merge: bool, dry_run: bool) -> None:
    """Import people and cards from a CSV or XLSX export (all-or-nothing)."""
    from appliance.journal.roster_store import RosterStore

    cfg = load_config(config_path) if journal_path is None or config_path.exists() else GateConfig()
    parsed = checked_roster_file(file, cfg.roster, dry_run)
    if parsed is None:
        return
    database = open_database(journal_path or cfg.journal.path)
    try:
        report = RosterStore(database).apply(parsed.people, replace=not merge)
    except ValueError as exc:
        fail(f"{file}: rejected, nothing imported: {exc}")
    finally:
        database.close()
    click.echo(
        f"{file}: imported {len(parsed.people)} people: {report.added} added, {report.updated} updated, "
        f"{report.unchanged} unchanged, {len(report.deactivated)} deactivated; roster version {report.version}"
    )
    for uid, old, new in report.cards_moved:
        click.echo(f"  card {uid} moved from {old} to {new}")


@roster.command("list")
@config_option
@journal_option
@click.option("--search", default=None, help="Part of a name, with or without diacritics.")
@friendly_errors
def roster_list(config_path: Path, journal_path: Path | None, search: str | None) -> None:
    """List people on the roster."""
    from appliance.journal.roster_store import RosterStore

    database = open_database(journal_path_of(config_path, journal_path), readonly=True)
    store = RosterStore(database)
    for person in store.search(search) if search else store.all():
        flag = "" if person.active else "  (inactive)"
        click.echo(
            f"{person.id}\t{person.role.value}\t{person.class_name or '-'}\t{person.full_name}\t"
            f"{len(person.cards)} card(s){flag}"
        )
