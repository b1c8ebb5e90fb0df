"""Gallery decisions and sealed templates: strangers stay unknown, templates are unreadable without the key."""

from __future__ import annotations

import os
import platform
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from appliance.journal import open_database
from appliance.journal.sealing import Sealer, SealingError, load_or_create_key
from appliance.journal.template_store import TemplateStore
from appliance.vision.gallery import Gallery, normalise
from appliance.vision.service import _malloc_trim, release_free_heap

RNG = np.random.default_rng(7)


def unit(n: int = 1, dim: int = 128) -> np.ndarray:
    return normalise(RNG.standard_normal((n, dim)))


def near(vector: np.ndarray, noise: float) -> np.ndarray:
    return normalise(vector + noise * RNG.standard_normal(vector.shape))


def test_identifies_enrolled_person_and_rejects_stranger() -> None:
    gallery = Gallery(threshold=0.5, margin=0.05)
    people = {f"P{i}": unit() for i in range(50)}
    for person, vector in people.items():
        gallery.add(person, np.vstack([near(vector, 0.05), near(vector, 0.05)]))
    result = gallery.match(near(people["P7"], 0.05))
    assert result.accepted and result.person == "P7" and result.score > 0.6
    assert result.runner_up != "P7" and result.runner_up_score < result.score
    stranger = gallery.match(unit())
    assert not stranger.accepted and stranger.score < 0.5


def test_margin_keeps_look_alikes_unknown() -> None:
    base = unit()
    gallery = Gallery(threshold=0.5, margin=0.1)
    gallery.add("twin-a", near(base, 0.02))
    gallery.add("twin-b", near(base, 0.02))
    result = gallery.match(near(base, 0.02))
    assert result.score > 0.9 and not result.accepted  # confidently like both: not identified


def test_verify_and_remove() -> None:
    gallery = Gallery(threshold=0.5, margin=0.05)
    vector = unit()
    gallery.add("A", vector)
    assert gallery.verify("A", vector) == pytest.approx(1.0, abs=1e-5)
    assert gallery.verify("B", vector) is None
    assert gallery.remove("A") and len(gallery) == 0
    assert not gallery.match(vector).accepted


def test_removal_keeps_everyone_else_and_their_templates() -> None:
    gallery = Gallery(threshold=0.5, margin=0.05)
    people = {f"P{i}": unit() for i in range(200)}
    counts = {person: 1 + i % 3 for i, person in enumerate(people)}
    for person, vector in people.items():
        gallery.add(person, np.vstack([near(vector, 0.05) for _ in range(counts[person])]))
    gallery.add("P3", near(people["P3"], 0.05))  # more templates later: still one person
    counts["P3"] += 1
    assert gallery.people == 200 and len(gallery) == sum(counts.values())

    for gone in ("P0", "P57", "P199", "P3"):  # first, middle, last, and one added twice
        before = len(gallery)
        assert gallery.remove(gone) and gone not in gallery and not gallery.remove(gone)
        assert len(gallery) == before - counts.pop(gone)
        assert gallery.match(people[gone]).person != gone
    assert gallery.people == 196
    for person, vector in people.items():
        if person in counts:
            result = gallery.match(near(vector, 0.05))
            assert result.accepted and result.person == person, person
            assert gallery.verify(person, vector) > 0.8
            assert len(gallery.templates(person)) == counts[person]  # type: ignore[arg-type]

    gallery.add("P57", people["P57"])  # enrolled again after an erasure
    assert gallery.match(people["P57"]).person == "P57" and len(gallery.templates("P57")) == 1  # type: ignore[arg-type]


def test_templates_are_held_once_and_given_out_as_copies() -> None:
    gallery = Gallery(threshold=0.5, margin=0.05)
    rows = unit(3)
    gallery.add("A", rows)
    gallery.add("B", unit(2))
    copy = gallery.templates("A")
    np.testing.assert_allclose(copy, rows, atol=1e-6)  # type: ignore[arg-type]
    copy[:] = 0  # type: ignore[index]
    assert gallery.verify("A", rows[0]) == pytest.approx(1.0, abs=1e-5)
    # The matrix that matching reads is the only copy: a view of the gallery's one buffer.
    assert gallery._matrix.shape == (5, 128) and np.shares_memory(gallery._matrix, gallery._rows)
    gallery.add("C", np.zeros((0, 128)))  # nothing to add: nobody enrolled
    assert "C" not in gallery and gallery.people == 2


def test_wrong_dimension_refused() -> None:
    with pytest.raises(ValueError, match="512 values"):
        Gallery(0.5, 0.05).add("A", unit(dim=512))


def test_key_created_private_and_unsafe_key_refused(tmp_path: Path) -> None:
    key_path = tmp_path / "keys" / "templates.key"
    key = load_or_create_key(key_path)
    assert len(key) == 32 and stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert load_or_create_key(key_path) == key
    os.chmod(key_path, 0o644)
    with pytest.raises(SealingError, match="chmod 600"):
        load_or_create_key(key_path)


def test_templates_sealed_at_rest_and_bound_to_person(tmp_path: Path) -> None:
    database = open_database(tmp_path / "j.db", writer=True)
    store = TemplateStore(database, Sealer.from_file(tmp_path / "t.key"))
    vectors = unit(3)
    assert store.add("HS001", "sface", vectors) == 3
    store.add("GV001", "sface", unit(1))
    store.add("HS001", "other-model", unit(1))
    loaded = store.load("sface")
    assert set(loaded) == {"HS001", "GV001"}
    np.testing.assert_array_equal(loaded["HS001"], vectors)
    assert store.counts("sface") == (2, 4)

    raw = (tmp_path / "j.db").read_bytes() + Path(f"{tmp_path / 'j.db'}-wal").read_bytes()
    assert vectors[0].tobytes()[:16] not in raw  # nothing in clear on disk

    database.conn.execute("UPDATE templates SET person_id = 'GV001' WHERE person_id = 'HS001' AND model = 'sface'")
    with pytest.raises(SealingError, match="tampered"):
        store.load("sface")
    other = TemplateStore(database, Sealer(bytes(32)))
    with pytest.raises(SealingError, match="wrong key"):
        other.load("other-model")
    assert store.remove("GV001") == 4


def test_school_loads_into_one_matrix_that_the_gallery_adopts(tmp_path: Path) -> None:
    database = open_database(tmp_path / "j.db", writer=True)
    store = TemplateStore(database, Sealer.from_file(tmp_path / "t.key"))
    people = {f"HS{i:03d}": unit() for i in range(30)}
    for person, vector in people.items():
        store.add(person, "sface", np.vstack([near(vector, 0.05), near(vector, 0.05)]) * 3.0)  # stored unnormalised
    store.add("HS004", "sface", near(people["HS004"], 0.05))  # enrolled again later: rows not side by side
    store.add("GV001", "other-model", unit())

    loaded = store.load_matrix("sface", 128)
    assert loaded.people == list(people) and loaded.rows.shape == (61, 128) and loaded.owners.dtype == np.int32
    by_person = store.load("sface")
    for index, person in enumerate(loaded.people):
        np.testing.assert_array_equal(loaded.rows[loaded.owners == index], by_person[person])

    gallery = Gallery.from_rows(0.5, 0.05, loaded.rows, loaded.owners, loaded.people)
    assert np.shares_memory(gallery._matrix, loaded.rows)  # adopted, not copied
    assert gallery.people == 30 and len(gallery) == 61 and len(gallery.templates("HS004")) == 3  # type: ignore[arg-type]
    np.testing.assert_allclose(np.linalg.norm(gallery._matrix, axis=1), 1.0, atol=1e-5)
    added = Gallery(0.5, 0.05)
    for person, rows in by_person.items():
        added.add(person, rows)
    for person, vector in people.items():
        query = near(vector, 0.05)
        ours, theirs = gallery.match(query), added.match(query)
        assert (ours.person, ours.accepted, ours.runner_up) == (person, True, theirs.runner_up)
        assert ours.score == pytest.approx(theirs.score, abs=1e-6)
    assert gallery.remove("HS007") and "HS007" not in gallery and gallery.match(people["HS007"]).person != "HS007"
    gallery.add("HS007", people["HS007"])  # grows past the adopted matrix
    assert gallery.match(people["HS007"]).person == "HS007" and len(gallery) == 60

    assert store.load_matrix("nobody", 128).rows.shape == (0, 128)


def test_unusable_stored_rows_are_left_out_and_counted_not_fatal(tmp_path: Path) -> None:
    """A wrong-size row (a hub's mistake) or one sealed with another key (a key file replaced) costs its own
    template only: everyone else still loads and matches."""
    database = open_database(tmp_path / "j.db", writer=True)
    store = TemplateStore(database, Sealer.from_file(tmp_path / "t.key"))
    people = {f"HS{i:03d}": unit() for i in range(5)}
    for person, vector in people.items():
        store.add(person, "sface", vector)
    store.add("HS002", "sface", np.ones(512, dtype=np.float32))
    TemplateStore(database, Sealer.from_file(tmp_path / "other.key")).add("HS009", "sface", unit())
    loaded = store.load_matrix("sface", 128)
    assert loaded.skipped == 2 and loaded.people == list(people) and loaded.rows.shape == (5, 128)
    gallery = Gallery.from_rows(0.5, 0.05, loaded.rows, loaded.owners, loaded.people)
    assert all(gallery.match(vector).person == person for person, vector in people.items())
    assert store.load_matrix("sface", 512).people == ["HS002"]


def test_load_matrix_takes_rows_enrolled_after_it_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    database = open_database(tmp_path / "j.db", writer=True)
    store = TemplateStore(database, Sealer.from_file(tmp_path / "t.key"))
    store.add("HS001", "sface", unit(3))
    store.add("HS002", "sface", unit(70))
    monkeypatch.setattr(store, "counts", lambda model=None: (1, 2))  # as if HS002 enrolled in between
    loaded = store.load_matrix("sface", 128)
    assert loaded.people == ["HS001", "HS002"] and len(loaded.rows) == len(loaded.owners) == 73
    np.testing.assert_array_equal(loaded.rows[3:], store.load("sface")["HS002"])


def test_adopted_rows_must_say_whose_they_are() -> None:
    rows = unit(3)
    with pytest.raises(ValueError, match="n owners"):
        Gallery.from_rows(0.5, 0.05, rows, np.array([0, 1]), ["A", "B"])
    with pytest.raises(ValueError, match="not in the list"):
        Gallery.from_rows(0.5, 0.05, rows, np.array([0, 1, 2]), ["A", "B"])
    with pytest.raises(ValueError, match="listed twice"):
        Gallery.from_rows(0.5, 0.05, rows, np.array([0, 1, 1]), ["A", "A"])
    with pytest.raises(ValueError, match="has no template"):
        Gallery.from_rows(0.5, 0.05, rows, np.array([0, 0, 0]), ["A", "B"])
    empty = Gallery.from_rows(0.5, 0.05, np.zeros((0, 128), np.float32), np.zeros(0, np.int32), [])
    assert empty.people == 0 and not empty.match(rows[0]).accepted


def test_freed_heap_is_given_back_where_glibc_can() -> None:
    release_free_heap()  # harmless anywhere
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert _malloc_trim() is not None
