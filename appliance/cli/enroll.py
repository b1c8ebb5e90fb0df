"""`edugate enroll`: face templates from photos (one person, or a folder of person-id folders), and erasure."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from appliance.cli.common import EXIT_FAILED, config_option, fail, friendly_errors, journal_option
from appliance.config import load_config
from appliance.journal import open_database

if TYPE_CHECKING:
    pass


def _print_report(report) -> None:
    for label, reason in report.refused:
        click.echo(f"  refused {label}: {reason}", err=True)
    for label, other, score in report.duplicates:
        click.echo(
            f"  WARNING {label}: this face already matches {other} (score {score:.2f}); "
            "check it is not the same person enrolled twice",
            err=True,
        )
    click.echo(f"{report.person}: {report.added} template(s) enrolled")


@click.command()
@click.argument("person_id", required=False)
@click.option(
    "--photos",
    "photos",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Photo files or a folder of photos of PERSON_ID (repeatable).",
)
@click.option(
    "--bulk",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder with one subfolder of photos per person id.",
)
@click.option("--remove", "remove", is_flag=True, help="Erase PERSON_ID's face templates (and kept photos).")
@config_option
@journal_option
@friendly_errors
def enroll(
    person_id: str | None,
    photos: tuple[Path, ...],
    bulk: Path | None,
    remove: bool,
    config_path: Path,
    journal_path: Path | None,
) -> None:
    """Enroll faces: only templates are kept (encrypted), not the photos, unless vision.keep_photos is set."""
    modes = sum([bool(photos), bulk is not None, remove])
    if modes != 1 or (bulk is None) != bool(person_id):
        fail("use one of: enroll PERSON_ID --photos PATH..., enroll --bulk DIR, enroll PERSON_ID --remove", 2)
    config = load_config(config_path)
    from appliance.vision.enroll import EnrollError
    from appliance.vision.images import ImageError
    from appliance.vision.models import ModelError
    from appliance.vision.service import FaceService

    database = open_database(journal_path or config.journal.path)
    try:
        service = FaceService(config.vision, database)
        enroller = service.enroller()
        if remove:
            assert person_id is not None
            removed = enroller.remove(person_id)
            click.echo(f"{person_id}: {removed} template(s) erased")
            return
        if bulk is not None:
            _enroll_bulk(enroller, bulk)
            return
        assert person_id is not None
        report = enroller.enroll_files(person_id, list(photos))
        _print_report(report)
        if not report.added:
            sys.exit(EXIT_FAILED)
    except (EnrollError, ImageError, ModelError) as exc:
        fail(str(exc))
    finally:
        database.close()


def _enroll_bulk(enroller, folder: Path) -> None:
    from tqdm import tqdm

    from appliance.vision.enroll import EnrollReport as Report

    people = sorted(p for p in folder.iterdir() if p.is_dir())
    if not people:
        fail(f"{folder}: no person folders inside (expected one subfolder per person id)")
    with tqdm(total=len(people), unit="person", file=sys.stderr, disable=None) as bar:
        results = enroller.enroll_folder(folder, progress=lambda _name: bar.update(1))
    failed = 0
    for result in results:
        if isinstance(result, Report):
            _print_report(result)
            failed += result.added == 0
        else:
            click.echo(f"  {result[0]}: {result[1]}", err=True)
            failed += 1
    click.echo(f"bulk enrollment: {len(results) - failed} of {len(results)} people enrolled")
    if failed:
        sys.exit(EXIT_FAILED)
