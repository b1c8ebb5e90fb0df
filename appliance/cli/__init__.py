"""The ``edugate`` command. Nothing imports this module; it only wires options to the parts.

Exit codes: 0 success; 1 the operation failed (bad config, rejected roster, journal error,
status degraded); 2 wrong usage; 3 ``status``: the daemon is not running.
"""

from __future__ import annotations

import click

from appliance import __version__
from appliance.cli import bench, enroll, gate, hub, identity, models, roster, sync


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs (may contain card numbers).")
@click.version_option(__version__, prog_name="edugate")
def main(debug: bool) -> None:
    """edugate: school-gate attendance appliance (card check-in, faces, offline journal)."""


for command in (
    gate.run,
    gate.demo,
    gate.config,
    gate.events,
    gate.status,
    identity.identity,
    roster.roster,
    enroll.enroll,
    bench.bench,
    models.models,
    sync.sync,
    hub.hub,
):
    main.add_command(command)
