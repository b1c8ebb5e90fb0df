"""Enrollment: photos (or camera frames) of a person -> quality-checked templates in the sealed store.

A photo must hold exactly one good face; a face that already matches someone else is a
duplicate warning (the same person enrolled twice under two ids, or a wrong photo). Only
templates are kept, never the photos, unless ``keep_photos_dir`` is given.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from appliance.journal.roster_store import RosterStore
from appliance.journal.template_store import TemplateStore
from appliance.vision.engine import FaceEngine
from appliance.vision.gallery import Gallery
from appliance.vision.images import ImageError, list_images, read_image

log = logging.getLogger(__name__)


class EnrollError(Exception):
    """Enrollment cannot proceed at all (unknown person, no usable photo)."""


@dataclass
class EnrollReport:
    person: str
    added: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[tuple[str, str, float]] = field(default_factory=list)


def embedding_of_photo(engine: FaceEngine, image: np.ndarray, source: str) -> np.ndarray:
    """The one good face of an enrollment photo, or ImageError saying why not."""
    observations = engine.observe(image)
    if not observations:
        raise ImageError(f"{source}: no face found")
    if len(observations) > 1:
        raise ImageError(f"{source}: {len(observations)} faces; use a photo of this person alone")
    only = observations[0]
    if only.embedding is None:
        raise ImageError(f"{source}: face not usable: {'; '.join(only.quality.problems)}")
    return only.embedding


class Enroller:
    def __init__(
        self,
        engine: FaceEngine,
        gallery: Gallery,
        templates: TemplateStore,
        roster: RosterStore,
        keep_photos_dir: Path | None = None,
    ) -> None:
        self.engine = engine
        self.gallery = gallery
        self.templates = templates
        self.roster = roster
        self.keep_photos_dir = keep_photos_dir

    def check_person(self, person_id: str) -> None:
        """Refuse an unknown id before anyone stands in front of a camera or photos are read."""
        if self.roster.get(person_id) is None:
            raise EnrollError(f"{person_id}: not on the roster; import the roster first (edugate roster import)")

    def enroll_images(self, person_id: str, images: Iterable[tuple[str, np.ndarray]]) -> EnrollReport:
        """Add templates from (label, BGR image) pairs; refuses photos one by one, never the whole person."""
        self.check_person(person_id)
        refused: list[tuple[str, str]] = []
        accepted: list[tuple[str, np.ndarray]] = []
        for label, image in images:
            try:
                accepted.append((label, embedding_of_photo(self.engine, image, label)))
            except ImageError as exc:
                refused.append((label, str(exc).removeprefix(f"{label}: ")))
        if refused:
            log.info("refused %d photo(s)", len(refused))
        report = self.enroll_embeddings(person_id, accepted)
        report.refused = refused
        return report

    def enroll_embeddings(self, person_id: str, embeddings: Iterable[tuple[str, np.ndarray]]) -> EnrollReport:
        """Store already checked (label, embedding) pairs: the step photos and camera frames share.

        Each face is compared with the gallery first, so a face that already belongs to someone else
        is reported as a duplicate (it is still enrolled: the operator decides).
        """
        self.check_person(person_id)
        report = EnrollReport(person_id)
        accepted = []
        for label, embedding in embeddings:
            match = self.gallery.match(embedding)
            if match.person is not None and match.person != person_id and match.score >= self.gallery.threshold:
                report.duplicates.append((label, match.person, match.score))
            accepted.append(embedding)
        if accepted:
            rows = np.vstack(accepted)
            self.templates.add(person_id, self.engine.model_name, rows)
            self.gallery.add(person_id, rows)
            report.added = len(accepted)
        log.info("enrolled %d template(s), %d duplicate warning(s)", report.added, len(report.duplicates))
        return report

    def enroll_files(self, person_id: str, paths: list[Path]) -> EnrollReport:
        files: list[Path] = []
        for path in paths:
            files.extend(list_images(path) if path.is_dir() else [path])
        if not files:
            raise EnrollError(f"{person_id}: no photos given (JPEG/PNG files or a folder of them)")
        refused: list[tuple[str, str]] = []

        def images() -> Iterable[tuple[str, np.ndarray]]:
            for path in files:
                try:
                    yield str(path), read_image(path)
                except ImageError as exc:
                    refused.append((str(path), str(exc).removeprefix(f"{path}: ")))

        report = self.enroll_images(person_id, images())
        report.refused = refused + report.refused
        if self.keep_photos_dir is not None and report.added:
            self._keep(person_id, files)
        return report

    def _keep(self, person_id: str, files: list[Path]) -> None:
        target = self.keep_photos_dir / person_id  # type: ignore[operator]
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in files:
            copy = target / path.name
            if copy.exists() and copy.samefile(path):
                continue  # enrolled again from the kept photos themselves
            shutil.copyfile(path, copy)
            os.chmod(copy, 0o600)

    def keep_images(self, person_id: str, images: Iterable[tuple[str, np.ndarray]]) -> list[Path]:
        """Keep camera images (name, BGR) as JPEG files readable by the service user only; only when configured."""
        if self.keep_photos_dir is None:
            return []
        target = self.keep_photos_dir / person_id
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        kept = []
        for name, image in images:
            ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
            if not ok:
                raise ImageError(f"{name}: cannot encode as JPEG")
            path = target / f"{name}.jpg"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(data.tobytes())
            kept.append(path)
        return kept

    def enroll_folder(
        self, folder: Path, progress: Callable[[str], None] | None = None
    ) -> list[EnrollReport | tuple[str, str]]:
        """Bulk: one subfolder per person id. Returns reports, or (person, error) for people that failed."""
        results: list[EnrollReport | tuple[str, str]] = []
        for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
            try:
                results.append(self.enroll_files(sub.name, [sub]))
            except EnrollError as exc:
                results.append((sub.name, str(exc)))
            if progress:
                progress(sub.name)
        return results

    def remove(self, person_id: str) -> int:
        """Erase a person's templates (and kept photos): the right to erasure."""
        removed = self.templates.remove(person_id)
        self.gallery.remove(person_id)
        if self.keep_photos_dir is not None:
            shutil.rmtree(self.keep_photos_dir / person_id, ignore_errors=True)
        return removed
