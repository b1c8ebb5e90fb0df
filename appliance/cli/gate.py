"""Commands that run or inspect the gate: run, demo, config check, events, status."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from appliance.cli.common import (
    EXIT_FAILED,
    EXIT_NOT_RUNNING,
    config_option,
    fail,
    friendly_errors,
    journal_option,
    journal_path_of,
    setup_logging,
)
from appliance.config import load_config, parse_config
from appliance.config.base import read_toml
from appliance.journal import open_database


@click.command()
@config_option
@click.pass_context
@friendly_errors
def run(ctx: click.Context, config_path: Path) -> None:
    """Run the gate daemon (what systemd starts)."""
    config = load_config(config_path)
    setup_logging(config.logging.level, ctx.find_root().params["debug"])
    from appliance.daemon import Daemon

    Daemon(config, config_path).run()


@click.command()
@click.option(
    "--interactive/--no-interactive",
    default=None,
    help="Ask for taps at the keyboard after the script (default: when stdin is a terminal).",
)
@click.option("--keep", type=click.Path(path_type=Path), default=None, help="Keep the demo journal in this folder.")
@friendly_errors
def demo(interactive: bool | None, keep: Path | None) -> None:
    """Run the real gate pipeline on built-in defaults: sample roster, scripted and typed taps."""
    from appliance.demo.run import run_demo

    setup_logging("WARNING", False)
    sys.exit(run_demo(sys.stdin.isatty() if interactive is None else interactive, keep))


@click.group()
def config() -> None:
    """Check configuration files."""


@config.command("check")
@click.argument("file", type=click.Path(path_type=Path))
@friendly_errors
def config_check(file: Path) -> None:
    """Validate FILE without starting anything; exit 0 when it is usable."""
    data = read_toml(file, "config/gate.example.toml")
    if "hub" in data:
        fail(f"{file} is a hub.toml (it has [hub]); check it with: edugate hub check {file}")
    cfg = parse_config(data, str(file))
    click.echo(
        f"{file}: OK (device {cfg.device.id}, school {cfg.device.school}, {len(cfg.readers)} reader(s), "
        f"journal {cfg.journal.path})"
    )


@click.command()
@config_option
@journal_option
@click.option(
    "--since", default=None, help="Only events at or after this time/day (ISO, e.g. 2026-11-23 or 2026-11-23T07:00)."
)
@click.option("--unsynced", is_flag=True, help="Only events not yet delivered to the hub.")
@click.option("--limit", type=click.IntRange(min=1), default=None)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@friendly_errors
def events(
    config_path: Path, journal_path: Path | None, since: str | None, unsynced: bool, limit: int | None, as_json: bool
) -> None:
    """Show journalled events in seq order."""
    from appliance.journal.events import read_events

    database = open_database(journal_path_of(config_path, journal_path), readonly=True)
    for event in read_events(database, since=since, unsynced=unsynced, limit=limit):
        if as_json:
            click.echo(json.dumps(event, ensure_ascii=False, sort_keys=True))
            continue
        extra = []
        if event.get("late"):
            extra.append(f"late {event.get('minutes_late')} min")
        if event.get("reason"):
            extra.append(event["reason"])
        click.echo(
            f"{event['seq']:>7} {event['ts']} {event['kind']:<13} {event.get('person') or '-':<12} "
            f"{event.get('reader', '-'):<10} {'synced' if event['synced_at'] else 'unsynced'}"
            f"{'  ' + ', '.join(extra) if extra else ''}{'' if event['clock_ok'] else '  (clock not synced)'}"
        )


@click.command()
@config_option
@journal_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly_errors
def status(config_path: Path, journal_path: Path | None, as_json: bool) -> None:
    """Readers, journal size, unsynced count, clock and disk. Exit 0 healthy, 1 degraded, 3 not running."""
    from appliance.clock import kernel_clock_synced
    from appliance.daemon import stats_dict
    from appliance.status import disk_state, read_status, status_path

    cfg = load_config(config_path) if journal_path is None else None
    path = journal_path or cfg.journal.path  # type: ignore[union-attr]
    min_free = cfg.journal.min_free_mb if cfg else 200
    daemon = read_status(status_path(path))
    if daemon and daemon.get("running"):
        min_free = daemon.get("disk", {}).get("min_free_mb", min_free)
    database = open_database(path, readonly=True)
    journal = stats_dict(database)
    database.close()
    disk = disk_state(path, min_free)
    clock_ok = daemon["clock_ok"] if daemon and daemon.get("running") else kernel_clock_synced()
    running = bool(daemon and daemon.get("running"))
    readers = daemon.get("readers", []) if running and daemon else []
    problems = []
    if not running:
        problems.append("daemon not running")
    problems += [f"reader {r['name']}: {r['state']} ({r['detail']})" for r in readers if r["state"] != "ok"]
    if disk.low:
        problems.append(f"disk nearly full: {disk.free_mb} MB free (limit {min_free} MB)")
    if not clock_ok:
        problems.append("clock not synchronised (events are flagged clock_ok=false)")
    vision = daemon.get("vision") if running and daemon else None
    if vision and vision.get("state") != "ok":
        problems.append(f"faces: {vision.get('detail')}")
    if vision and isinstance(vision.get("camera"), dict) and vision["camera"].get("state") not in (None, "ok"):
        problems.append(f"camera: {vision['camera'].get('state')} ({vision['camera'].get('detail')})")
    if running and daemon and daemon["journal"].get("last_error"):
        problems.append(f"journal: {daemon['journal']['last_error']}")
    sync = daemon.get("sync") if running and daemon else None
    if sync and sync.get("state") != "online":
        problems.append(f"sync: {sync.get('state')} ({sync.get('last_error') or 'not connected yet'})")
    if sync and sync.get("uplink_error"):
        problems.append(f"sync: {sync['uplink_error']}")
    if as_json:
        click.echo(
            json.dumps(
                {
                    "running": running,
                    "readers": readers,
                    "journal": journal,
                    "clock_ok": clock_ok,
                    "disk": {"free_mb": disk.free_mb, "low": disk.low},
                    "problems": problems,
                    "counters": daemon.get("counters") if daemon else None,
                    "vision": vision,
                    "sync": sync,
                },
                ensure_ascii=False,
            )
        )
    else:
        click.echo(f"daemon:   {'running (pid {})'.format(daemon['pid']) if running and daemon else 'NOT RUNNING'}")
        for r in readers:
            click.echo(f"reader:   {r['name']:<12} {r['type']:<9} {r['state']:<8} {r['detail']}")
        if vision:
            click.echo(f"faces:    {vision.get('state')} ({vision.get('detail')})")
        click.echo(
            f"journal:  {path} ({journal['bytes'] // 1024} KiB), {journal['events']} events, last seq "
            f"{journal['last_seq']}, {journal['unsynced']} unsynced"
            + (f" (oldest {journal['oldest_unsynced']})" if journal["oldest_unsynced"] else "")
        )
        if sync:
            since = f" since {sync['since']}" if sync.get("since") else ""
            click.echo(
                f"sync:     {sync.get('state')}{since}, broker {sync.get('broker')}, "
                f"{sync.get('acknowledged', 0)} sent this run, {sync.get('inflight', 0)} in flight"
            )
        click.echo(f"clock:    {'synchronised' if clock_ok else 'NOT synchronised'}")
        click.echo(f"disk:     {disk.free_mb} MB free of {disk.total_mb} MB{'  LOW' if disk.low else ''}")
        for problem in problems:
            click.echo(f"problem:  {problem}")
    if not running:
        sys.exit(EXIT_NOT_RUNNING)
    if problems:
        sys.exit(EXIT_FAILED)
