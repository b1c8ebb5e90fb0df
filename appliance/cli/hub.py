"""`edugate hub ...`: the school server's side (the gates' other end)."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli.common import friendly_errors, setup_logging
from appliance.config import DEFAULT_HUB_CONFIG_PATH, load_hub_config

hub_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_HUB_CONFIG_PATH,
    show_default=True,
    help="The hub's config file.",
)


@click.group()
def hub() -> None:
    """The school hub: ingest from the gates, notifications, reports, API."""


@hub.command("run")
@hub_config_option
@click.pass_context
@friendly_errors
def run(ctx: click.Context, config_path: Path) -> None:
    """Run the hub daemon (what systemd starts on the school's server)."""
    config = load_hub_config(config_path)
    setup_logging(config.logging.level, ctx.find_root().params["debug"])
    from appliance.hub.service import HubService

    HubService(config).run()


@hub.command("check")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@friendly_errors
def check(file: Path) -> None:
    """Validate a hub.toml without starting anything."""
    from appliance.hub.store import Store

    config = load_hub_config(file)
    click.echo(f"{file}: OK (hub {config.hub.id}, database {Store(config.database).describe()})")
    for reason in config.mqtt.guessable_names():
        click.echo(f"{file}: warning: {reason}", err=True)


from appliance.cli.hub_attendance import absent, leave, report  # noqa: E402  (they use hub_config_option)

hub.add_command(absent)
hub.add_command(report)
hub.add_command(leave)
from appliance.cli.hub_notify import outbox  # noqa: E402  (it uses hub_config_option)

hub.add_command(outbox)
from appliance.cli.hub_roster import hub_roster, hub_templates  # noqa: E402  (they use hub_config_option)

hub.add_command(hub_roster)
hub.add_command(hub_templates)
from appliance.cli.hub_gates import hub_gates  # noqa: E402  (it uses hub_config_option)

hub.add_command(hub_gates)
