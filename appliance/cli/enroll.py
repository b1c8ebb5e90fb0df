"""`edugate enroll`: face templates from photos (one person, or a folder of person-id folders) or a live camera,
and erasure."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from appliance.cli.common import EXIT_FAILED, config_option, fail, friendly_errors, journal_option
from appliance.config import load_config
from appliance.journal import open_database

if TYPE_CHECKING:
    from appliance.vision.enroll import Enroller, EnrollReport
    from appliance.vision.enroll_camera import CaptureProgress

DEFAULT_CAMERA_SECONDS = 20.0


def _print_report(report: EnrollReport) -> None:
    for label, reason in report.refused:
        click.echo(f"  refused {label}: {reason}", err=True)
    by_other: dict[str, list[tuple[str, float]]] = {}
    for label, other, score in report.duplicates:
        by_other.setdefault(other, []).append((label, score))
    for other, hits in by_other.items():  # one warning per other person, not one per camera frame
        best = max(score for _, score in hits)
        if len(hits) == 1:
            what = f"{hits[0][0]}: this face already matches"
        else:
            what = f"{len(hits)} faces (first {hits[0][0]}): they already match"
        click.echo(
            f"  WARNING {what} {other} (score {best:.2f}); check it is not the same person enrolled twice",
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
@click.option(
    "--camera",
    "camera",
    is_flag=True,
    help="Enroll PERSON_ID live: a few good frames from the camera (vision.camera unless --camera-source).",
)
@click.option(
    "--camera-source",
    metavar="SOURCE",
    help="Camera for --camera: /dev/videoN, a video file, an rtsp:// or http:// URL, or picamera2.",
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=1, max=600),
    default=None,
    help=f"Give up --camera after this long, enrolling nothing [default: {DEFAULT_CAMERA_SECONDS:.0f}].",
)
@config_option
@journal_option
@friendly_errors
def enroll(
    person_id: str | None,
    photos: tuple[Path, ...],
    bulk: Path | None,
    remove: bool,
    camera: bool,
    camera_source: str | None,
    seconds: float | None,
    config_path: Path,
    journal_path: Path | None,
) -> None:
    """Enroll faces: only templates are kept (encrypted), not the photos, unless vision.keep_photos is set.

    With --camera the person looks at the camera for a few seconds; the daemon may keep running (it picks
    new templates up by itself), but a USB camera it holds is busy: use another one with --camera-source.
    """
    modes = sum([bool(photos), bulk is not None, remove, camera])
    if modes != 1 or (bulk is None) != bool(person_id):
        fail(
            "use one of: enroll PERSON_ID --photos PATH..., enroll PERSON_ID --camera, enroll --bulk DIR, "
            "enroll PERSON_ID --remove",
            2,
        )
    if not camera and (camera_source is not None or seconds is not None):
        fail("--camera-source and --seconds go with --camera", 2)
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
        if camera:
            source = camera_source if camera_source is not None else config.vision.camera
            _enroll_camera(enroller, person_id, source, seconds or DEFAULT_CAMERA_SECONDS)
            return
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


class _ProgressPrinter:
    """Tells the operator on stderr how the capture goes: at every new good frame, and when the advice
    changes (at most once a second, so a flickering detection does not scroll the terminal)."""

    def __init__(self) -> None:
        self._picked = -1
        self._hint = ""
        self._printed_at = 0.0

    def __call__(self, progress: CaptureProgress) -> None:
        from appliance.vision.enroll_camera import PROBLEMS

        if progress.picked >= progress.wanted:
            hint = "done, thank you"
        else:
            hint = PROBLEMS[progress.problem][1] if progress.problem else "look at the camera"
        now = time.monotonic()
        if progress.picked == self._picked and (hint == self._hint or now - self._printed_at < 1.0):
            return
        self._picked, self._hint, self._printed_at = progress.picked, hint, now
        click.echo(f"  {progress.picked}/{progress.wanted} good frames — {hint}", err=True)


def _enroll_camera(enroller: Enroller, person_id: str, source: str, seconds: float) -> None:
    from appliance.vision.camera import describe_source
    from appliance.vision.enroll_camera import (
        PROBLEMS,
        CameraOpenError,
        CaptureError,
        CaptureRules,
        camera_settings,
        enroll_from_camera,
    )

    try:
        settings = camera_settings(source)
    except ValueError as exc:
        fail(str(exc), 2)
    rules = CaptureRules(seconds=seconds)
    enroller.check_person(person_id)  # before anyone poses for an id that is not on the roster
    if not click.get_current_context().find_root().params.get("debug"):
        # The capture thread logs reconnects for the daemon's journal; here the error line says it once.
        logging.getLogger("appliance.vision.camera").setLevel(logging.CRITICAL)
    click.echo(
        f"{person_id}: camera {describe_source(source)}; look at the camera for a few seconds "
        f"(up to {seconds:.0f} s, Ctrl-C to cancel)",
        err=True,
    )
    try:
        result = enroll_from_camera(enroller, person_id, settings, rules, _ProgressPrinter())
    except CameraOpenError as exc:
        hint = ""
        if exc.maybe_busy:
            hint = (
                "\n  a running edugate with faces on holds the gate's camera: "
                "stop edugate (systemctl stop edugate) or use --camera-source with another camera"
            )
        fail(f"{exc}; nothing enrolled{hint}")
    except CaptureError as exc:
        fail(f"{exc}; nothing enrolled")
    except KeyboardInterrupt:
        fail("cancelled; nothing enrolled", 130)
    skipped = ", ".join(f"{count} {PROBLEMS[key][0]}" for key, count in result.skipped.most_common())
    click.echo(
        f"  {result.frames} frames looked at in {result.seconds:.1f} s, {len(result.picks)} used"
        + (f"; skipped: {skipped}" if skipped else ""),
        err=True,
    )
    if result.kept:
        click.echo(f"  kept {len(result.kept)} face crop(s) in {result.kept[0].parent} (vision.keep_photos)", err=True)
    _print_report(result.report)
    if not result.report.added:
        sys.exit(EXIT_FAILED)
