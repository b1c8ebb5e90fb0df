"""`edugate bench ...`: benchmarks printing one JSON object per line."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli.common import fail


@click.group()
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
        fail(str(exc))
