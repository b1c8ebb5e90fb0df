"""Enrollment and recognition on real photos: enrol from one photo, recognise the others, refuse bad input."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import FACES

from appliance.config import parse_config
from appliance.journal import open_database
from appliance.journal.roster_store import RosterStore
from appliance.roster.model import Person, Role
from appliance.vision.images import ImageError, read_image
from appliance.vision.models import ModelPack
from appliance.vision.service import FaceService

PEOPLE = ["barack_obama", "joe_biden", "alex_lacamoire", "kit_harington", "rose_leslie"]
STRANGERS = ["paul_rudd", "kate_siegel", "eileen_collins", "lin_manuel_miranda"]


def photo(identity: str, n: int) -> Path:
    return next((FACES / "faces" / identity).glob(f"{identity}_{n:02d}.*"))


@pytest.fixture
def gate(tmp_path: Path, models_dir: Path) -> Path:
    """A gate.toml, a journal with the roster, and the models: what `edugate enroll` needs."""
    journal = tmp_path / "journal.db"
    database = open_database(journal)
    RosterStore(database).apply([Person(p, p.replace("_", " ").title(), Role.STAFF) for p in PEOPLE], replace=True)
    database.close()
    config = tmp_path / "gate.toml"
    config.write_text(
        f'[journal]\npath = "{journal}"\n[vision]\nmodels_dir = "{models_dir}"\n'
        f'key_file = "{tmp_path / "keys" / "templates.key"}"\n'
    )
    return config


def edugate(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def service(config: Path, pack: ModelPack) -> FaceService:
    cfg = parse_config(
        {
            "journal": {"path": str(config.parent / "journal.db")},
            "vision": {"models_dir": str(pack.models_dir), "key_file": str(config.parent / "keys" / "templates.key")},
        }
    )
    return FaceService(cfg.vision, open_database(cfg.journal.path), pack)


def test_enrol_one_photo_recognise_the_others_and_reject_strangers(gate: Path, pack: ModelPack) -> None:
    for person in PEOPLE:
        result = edugate(gate, "enroll", person, "--photos", str(photo(person, 1)))
        assert result.returncode == 0, result.stderr
        assert f"{person}: 1 template(s) enrolled" in result.stdout
    key = gate.parent / "keys" / "templates.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600

    faces = service(gate, pack)
    assert faces.gallery.people == len(PEOPLE)
    for person in PEOPLE:
        for other in sorted((FACES / "faces" / person).iterdir())[1:]:
            observation = faces.engine.observe(read_image(other))[0]
            result = faces.gallery.match(observation.embedding)
            assert result.accepted and result.person == person, (other.name, result)
    for stranger in STRANGERS:
        observation = faces.engine.observe(read_image(photo(stranger, 1)))[0]
        result = faces.gallery.match(observation.embedding)
        assert not result.accepted, (stranger, result)


def test_photos_with_no_face_or_several_faces_are_refused(gate: Path) -> None:
    result = edugate(
        gate,
        "enroll",
        "joe_biden",
        "--photos",
        str(FACES / "noface" / "coffee.png"),
        "--photos",
        str(FACES / "group" / "two_people_obama_biden.jpg"),
    )
    assert result.returncode == 1
    assert "coffee.png: no face found" in result.stderr
    assert "2 faces; use a photo of this person alone" in result.stderr
    assert "joe_biden: 0 template(s) enrolled" in result.stdout


def test_unknown_person_refused(gate: Path) -> None:
    result = edugate(gate, "enroll", "nobody", "--photos", str(photo("joe_biden", 1)))
    assert result.returncode == 1
    assert "nobody: not on the roster" in result.stderr and "Traceback" not in result.stderr


def test_duplicate_enrollment_warned(gate: Path) -> None:
    assert edugate(gate, "enroll", "barack_obama", "--photos", str(photo("barack_obama", 1))).returncode == 0
    result = edugate(gate, "enroll", "joe_biden", "--photos", str(photo("barack_obama", 2)))
    assert result.returncode == 0
    assert "already matches barack_obama" in result.stderr


def test_remove_erases_templates(gate: Path, pack: ModelPack) -> None:
    edugate(gate, "enroll", "rose_leslie", "--photos", str(photo("rose_leslie", 1)))
    result = edugate(gate, "enroll", "rose_leslie", "--remove")
    assert result.returncode == 0 and "1 template(s) erased" in result.stdout
    faces = service(gate, pack)
    assert faces.gallery.people == 0 and faces.templates.counts() == (0, 0)


def test_bulk_enrollment_from_person_folders(gate: Path, tmp_path: Path) -> None:
    bulk = tmp_path / "bulk"
    for person in ["barack_obama", "kit_harington", "not_on_roster"]:
        (bulk / person).mkdir(parents=True)
        source = person if person != "not_on_roster" else "paul_rudd"
        for n in (1, 2):
            candidates = list((FACES / "faces" / source).glob(f"{source}_{n:02d}.*"))
            if candidates:
                os.symlink(candidates[0], bulk / person / candidates[0].name)
    result = edugate(gate, "enroll", "--bulk", str(bulk))
    assert result.returncode == 1
    assert "barack_obama: 2 template(s) enrolled" in result.stdout
    assert "kit_harington: 2 template(s) enrolled" in result.stdout
    assert "not_on_roster: not on the roster" in result.stderr
    assert "2 of 3 people enrolled" in result.stdout


def test_bad_image_files_give_clear_errors(tmp_path: Path) -> None:
    good = photo("barack_obama", 5).read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 8])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    cv2.imwrite(str(tmp_path / "huge.png"), np.zeros((6000, 8000), dtype=np.uint8))
    for name, message in [
        ("empty.jpg", "empty file"),
        ("text.jpg", "not a readable image"),
        ("huge.png", "too large"),
        ("missing.jpg", "no such file"),
    ]:
        with pytest.raises(ImageError, match=message):
            read_image(tmp_path / name)
    truncated = tmp_path / "truncated.jpg"
    try:
        image = read_image(truncated)  # libjpeg may decode the top of a truncated file: then it is a real image
        assert image.ndim == 3
    except ImageError as exc:
        assert str(truncated) in str(exc)


def test_grayscale_and_rgba_photos_are_usable(tmp_path: Path, pack: ModelPack) -> None:
    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), cv2.cvtColor(read_image(photo("joe_biden", 1)), cv2.COLOR_BGR2GRAY))
    from appliance.vision.engine import FaceEngine

    engine = FaceEngine(pack)
    grey_image = read_image(grey)
    assert grey_image.shape[2] == 3
    rgba_image = read_image(photo("alex_lacamoire", 3))  # an RGBA PNG
    assert rgba_image.shape[2] == 3
    for image in (grey_image, rgba_image):
        observations = engine.observe(image)
        assert len(observations) == 1 and observations[0].embedding is not None


def test_enrolling_again_from_the_kept_photos_folder(gate: Path, tmp_path: Path) -> None:
    """With keep_photos on, the kept folder is a valid source (e.g. after a model change); nothing is copied twice."""
    kept = tmp_path / "photos"
    gate.write_text(gate.read_text() + f'keep_photos = true\nphotos_dir = "{kept}"\n')
    assert edugate(gate, "enroll", "joe_biden", "--photos", str(photo("joe_biden", 1))).returncode == 0
    result = edugate(gate, "enroll", "joe_biden", "--photos", str(kept / "joe_biden"))
    assert result.returncode == 0, result.stderr
    assert "joe_biden: 1 template(s) enrolled" in result.stdout
    assert [p.name for p in (kept / "joe_biden").iterdir()] == [photo("joe_biden", 1).name]
