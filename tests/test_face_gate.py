"""Faces at the gate with the real pipeline: card+face, someone else's card, staff by face, strangers."""

from __future__ import annotations

import io
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FACES
from test_pipeline import portrait, walk_past

from appliance.clock import Clock
from appliance.config import GateConfig, parse_config
from appliance.daemon import Gate
from appliance.events import Direction
from appliance.face_gate import FaceGate
from appliance.feedback import MultiFeedback
from appliance.feedback.console import ConsoleFeedback
from appliance.journal import open_database
from appliance.journal.events import read_events
from appliance.journal.roster_store import RosterStore
from appliance.readers.simulated import SimulatedReader
from appliance.roster.model import Person, Role
from appliance.vision.models import ModelPack
from appliance.vision.service import FaceService

ROSTER = [
    Person("GV_OBAMA", "Barack Obama", Role.STAFF, cards=("AA000001",)),
    Person("HS_BIDEN", "Joe Biden", Role.STUDENT, "6A", cards=("AA000002",)),
    Person("HS_KIT", "Kit Harington", Role.STUDENT, "6A", cards=("AA000003",)),
    Person("HS_ROSE", "Rose Leslie", Role.STUDENT, "6A", cards=("AA000004",)),
]
ENROLL = {
    "GV_OBAMA": "barack_obama/barack_obama_01.jpg",
    "HS_BIDEN": "joe_biden/joe_biden_01.jpg",
    "HS_ROSE": "rose_leslie/rose_leslie_01.jpg",
}


def make_gate(tmp_path: Path, pack: ModelPack, card_face: str) -> tuple[Gate, SimulatedReader, io.StringIO]:
    whole_day = ["00:00", "23:59"]
    config: GateConfig = parse_config(
        {
            "journal": {"path": str(tmp_path / "journal.db")},
            "policy": {
                "student": {"arrival_window": whole_day, "departure_window": whole_day, "start": "23:59"},
                "staff": {"arrival_window": whole_day, "departure_window": whole_day, "start": "23:59"},
            },
            "vision": {
                "enabled": True,
                "models_dir": str(pack.models_dir),
                "key_file": str(tmp_path / "t.key"),
                "card_face": card_face,
                "camera_direction": "in",
            },
        }
    )
    database = open_database(config.journal.path, writer=True)
    RosterStore(database).apply(ROSTER, replace=True)
    service = FaceService(config.vision, database, pack)
    enroller = service.enroller()
    for person, path in ENROLL.items():
        assert enroller.enroll_files(person, [FACES / "faces" / path]).added == 1
    out = io.StringIO()
    lane = SimulatedReader("lane-in", Direction.IN)
    gate = Gate(config, database, MultiFeedback([ConsoleFeedback("en", stream=out)]), Clock(config.zone), [lane])
    gate.faces = FaceGate(service, None, gate.submit)
    gate.start()
    return gate, lane, out


def show(gate: Gate, photo: str) -> None:
    """Someone walks up to the camera: frames through the real pipeline, decisions to the gate."""
    assert gate.faces is not None
    for frame in walk_past(portrait(photo), 6):
        for decision in gate.faces.pipeline.process(frame, time.monotonic()):
            gate.submit(decision)
    gate.wait_idle()


def leave(gate: Gate) -> None:
    assert gate.faces is not None
    for decision in gate.faces.pipeline.flush(time.monotonic()):
        gate.submit(decision)
    gate.wait_idle()


def events(gate: Gate) -> list[dict]:
    return list(read_events(gate.database))


@pytest.mark.parametrize("card_face", ["warn", "refuse"])
def test_card_verified_by_face(tmp_path: Path, pack: ModelPack, card_face: str) -> None:
    gate, lane, out = make_gate(tmp_path, pack, card_face)
    try:
        show(gate, "faces/joe_biden/joe_biden_02.jpg")
        lane.tap("AA000002")  # Biden's own card, Biden's face
        gate.wait_idle()
        arrival = events(gate)[-1]
        assert arrival["kind"] == "arrival" and arrival["method"] == "card+face" and arrival["face_score"] > 0.5

        lane.tap("AA000003")  # Kit is not enrolled: card only, whoever is in front of the camera
        gate.wait_idle()
        assert events(gate)[-1]["method"] == "card" and "face_score" not in events(gate)[-1]

        leave(gate)
        show(gate, "faces/kit_harington/kit_harington_02.jpeg")
        lane.tap("AA000004")  # Rose's card, Kit's face
        gate.wait_idle()
        tail = events(gate)[-2:] if card_face == "warn" else events(gate)[-1:]
        kinds = [e["kind"] for e in tail]
        if card_face == "warn":
            assert kinds == ["arrival", "card_face_mismatch"]
            assert "Hello Rose Leslie" in out.getvalue().splitlines()[-1]
        else:
            assert kinds == ["card_face_mismatch"]
            assert "no longer valid" in out.getvalue().splitlines()[-1]
            assert all(e["kind"] != "arrival" or e["person"] != "HS_ROSE" for e in events(gate))
        assert tail[-1]["person"] == "HS_ROSE" and tail[-1]["face_score"] < 0.42
    finally:
        gate.stop()


def test_staff_clock_in_by_face_and_stranger_is_unknown(tmp_path: Path, pack: ModelPack) -> None:
    gate, _lane, out = make_gate(tmp_path, pack, "warn")
    try:
        show(gate, "faces/barack_obama/barack_obama_04.jpg")
        staff = [e for e in events(gate) if e["kind"] == "arrival"]
        assert len(staff) == 1 and staff[0]["person"] == "GV_OBAMA" and staff[0]["method"] == "face"
        assert "Hello Barack Obama" in out.getvalue()
        leave(gate)
        show(gate, "faces/joe_biden/joe_biden_02.jpg")  # a student by face alone: no event
        leave(gate)
        show(gate, "faces/paul_rudd/paul_rudd_01.jpg")
        leave(gate)
        kinds = [e["kind"] for e in events(gate)]
        assert kinds == ["arrival", "unknown_face"]
        stranger = events(gate)[-1]
        assert stranger["person"] is None and stranger["method"] == "face" and stranger["face_score"] < 0.42
        assert np.isfinite(stranger["face_score"])
    finally:
        gate.stop()


def test_a_bad_stored_template_or_a_failed_reload_keeps_faces_working(tmp_path: Path, pack: ModelPack) -> None:
    gate, _lane, _out = make_gate(tmp_path, pack, "warn")
    try:
        faces = gate.faces
        assert faces is not None and faces.health()["state"] == "ok"
        faces.service.templates.add("HS_KIT", faces.service.engine.model_name, np.ones(512, dtype=np.float32))
        faces._reload()
        health = faces.health()
        assert health["state"] == "degraded" and health["detail"] == (
            "3 people enrolled, 1 stored templates left out (see the log)"
        )
        show(gate, "faces/barack_obama/barack_obama_04.jpg")
        assert [e["person"] for e in events(gate) if e["kind"] == "arrival"] == ["GV_OBAMA"]
        leave(gate)

        unreadable = sqlite3.connect(":memory:")
        unreadable.close()
        faces.service.templates.conn = unreadable  # the journal cannot be read: the reload fails
        faces._reload()
        assert faces.health()["state"] == "degraded"
        assert faces.health()["detail"].startswith("face gallery reload failed: Cannot operate on a closed database")
        assert faces.service.gallery.people == 3
    finally:
        gate.stop()
