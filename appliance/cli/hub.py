"""`edugate hub ...`: the school server's side (the gates' other end)."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli.common import friendly_errors, setup_logging
from appliance.config import DEFAULT_HUB_CONFIG_PATH, HubConfig, load_hub_config

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
    """Validate a hub.toml without starting anything.

    An API on the network without TLS is an error (unless api.allow_plaintext); the API's token file, if this
    user may read it, is checked line by line, as the running hub would read it.
    """
    from appliance.hub.store import Store

    config = load_hub_config(file)
    click.echo(f"{file}: OK (hub {config.hub.id}, database {Store(config.database).describe()})")
    for reason in [*config.mqtt.guessable_names(), *_api_warnings(config)]:
        click.echo(f"{file}: warning: {reason}", err=True)


def _api_warnings(config: HubConfig) -> list[str]:
    """What is allowed but unsafe in the API's settings, and the token file's lines the hub would not use."""
    from appliance.config.hub import is_loopback
    from appliance.hub.api.auth import parse_tokens

    api, warnings = config.api, []
    if not api.enabled:
        return warnings
    if api.allow_plaintext and api.tls_cert_file is None and not is_loopback(api.listen):
        warnings.append(
            f"api.allow_plaintext: the API serves plain HTTP on {api.listen}: anyone on the network can read its "
            "tokens and the children's data; use tls_cert_file and tls_key_file"
        )
    database = config.database.url.removeprefix("sqlite:///") if config.database.url.startswith("sqlite") else None
    key = config.signing.template_key_file
    if database is not None and Path(database).parent in (key.parent, *key.parent.parents):
        warnings.append(
            f"signing.template_key_file {key} is in the database's folder: one copy of that folder holds the "
            "sealed faces and the key that opens them; keep the key elsewhere"
        )
    if api.token_file is None:  # the API is not used yet: it answers 503 with how to set it up
        return warnings
    try:
        text = api.token_file.read_text("utf-8")
    except FileNotFoundError:
        return [
            *warnings,
            f"api.token_file {api.token_file} does not exist: the API refuses every request until it does",
        ]
    except PermissionError:
        return [*warnings, f"api.token_file {api.token_file}: this user may not read it; run check as the hub's user"]
    except (OSError, UnicodeDecodeError) as exc:
        return [*warnings, f"api.token_file {api.token_file}: {getattr(exc, 'strerror', None) or exc}"]
    parsed = parse_tokens(text, config.hub.schools)
    warnings += [f"api.token_file {api.token_file} {problem}" for problem in parsed.problems]
    if not parsed.grants:
        warnings.append(
            f"api.token_file {api.token_file} holds no token the hub can use: the API refuses every request"
        )
    return warnings


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
