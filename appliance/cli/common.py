"""Shared pieces of the edugate command: error handling, common options, logging setup."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from appliance.config import DEFAULT_CONFIG_PATH, ConfigError, VisionConfig, load_config
from appliance.hub.store import StoreError
from appliance.journal import JournalError
from appliance.roster.importer import RosterFileError
from appliance.sync.signing import SigningKeyError
from appliance.sync.transport import TransportConfigError

KNOWN_ERRORS = (ConfigError, JournalError, RosterFileError, StoreError, SigningKeyError, TransportConfigError)

F = TypeVar("F", bound=Callable[..., Any])
EXIT_FAILED, EXIT_NOT_RUNNING = 1, 3


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"edugate: error: {message}", err=True)
    sys.exit(code)


def friendly_errors(func: F) -> F:
    """Known errors become one or two lines on stderr and exit 1; ``--debug`` shows the traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KNOWN_ERRORS as exc:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            fail(str(exc))

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


def journal_path_of(config_path: Path, journal_path: Path | None) -> Path:
    return journal_path if journal_path is not None else load_config(config_path).journal.path


def setup_logging(level: str, debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else getattr(logging, level),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def config_vision(ctx: click.Context, config_path: Path, models_dir: Path | None = None) -> VisionConfig:
    """The config's [vision] when a config is named or the default one exists, else the defaults; a given
    ``models_dir`` wins (`models check --dir`, `bench --models`)."""
    explicit = ctx.get_parameter_source("config_path") not in (
        click.core.ParameterSource.DEFAULT,
        click.core.ParameterSource.DEFAULT_MAP,
    )
    vision = load_config(config_path).vision if explicit or config_path.exists() else VisionConfig()
    if models_dir is not None:
        vision = vision.model_copy(update={"models_dir": models_dir})
    return vision
