"""``edugate bench match`` and ``edugate bench accuracy``, run as a user runs them, with the real models and photos.

Speed is not asserted (shared, noisy machines). What is asserted is that the figures are the right ones: the
1:N bench really timed both sides on the same gallery and both found the same best template; on the photos of
../shared/data/faces every genuine pair (worst 0.56) scores above every impostor pair (best 0.275), so exact
pair and fold counts, fold accuracies of 1.0, rank-1 of 1.0 and no stranger accepted are all known in advance.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import FACES

MULTI = {"alex_lacamoire": 3, "barack_obama": 6, "joe_biden": 2, "kit_harington": 3, "rose_leslie": 2}
SINGLE = ("eileen_collins", "kate_siegel", "lin_manuel_miranda", "paul_rudd")
GENUINE = sum(n * (n - 1) // 2 for n in MULTI.values())  # 23
WORST_GENUINE = 0.5596  # alex_lacamoire 1 vs 3
BEST_IMPOSTOR = 0.2750  # barack_obama 2 vs joe_biden 1


def _edugate() -> list[str]:
    script = Path(sys.executable).with_name("edugate")
    return [str(script)] if script.exists() else [sys.executable, "-m", "appliance.cli"]


def edugate(args: list[str], expect: int = 0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("EDUGATE_CONFIG", None)  # the built-in [vision] defaults, whatever the developer's shell says
    proc = subprocess.run([*_edugate(), *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == expect, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def json_lines(stdout: str) -> list[dict[str, Any]]:
    """Every stdout line must be one JSON object."""
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert lines and all(isinstance(item, dict) for item in lines)
    return lines


def section(lines: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [item for item in lines if item.get("measure") == name]
    return found


def _ordered(item: dict[str, Any], prefix: str) -> None:
    values = [item[f"{prefix}_p50"], item[f"{prefix}_p90"], item[f"{prefix}_p99"], item[f"{prefix}_max"]]
    assert 0 < values[0] <= values[1] <= values[2] <= values[3], (prefix, values)


# ------------------------------------------------------------------------------------------------- match


def test_bench_match_times_gallery_against_baseline() -> None:
    lines = json_lines(edugate(["bench", "match", "--sizes", "1000,5000", "--queries", "50"]).stdout)
    assert all(item["bench"] == "match" for item in lines)
    setup = section(lines, "setup")
    assert setup["sizes"] == [1000, 5000] and setup["queries"] == 50 and setup["blas"]
    sizes = [item for item in lines if item.get("measure") == "size"]
    assert [item["size"] for item in sizes] == [1000, 5000]
    for item in sizes:
        assert item["people"] == item["size"] and item["templates_per_person"] == 1 and item["queries"] == 50
        assert item["matrix_mb"] == pytest.approx(item["size"] * 128 * 4 / 1e6, abs=0.01)
        assert item["held_mb"] >= item["matrix_mb"]
        _ordered(item, "ms")
        _ordered(item, "baseline_ms")
        assert item["overhead_ms_p50"] == pytest.approx(item["ms_p50"] - item["baseline_ms_p50"], abs=0.002)
        # Both sides really searched the same matrix: the same best template for every query.
        assert item["same_best"] == 50
        # Half the queries are noisy copies of enrolled templates: all identified; no random stranger accepted.
        assert item["known_queries"] == 25 and item["known_accepted"] == 25 and item["accepted"] == 25
    verdict = lines[-1]
    assert "measure" not in verdict and verdict["target_ms"] == 5.0 and verdict["target_size"] == 100_000
    assert verdict["p50_ms"] is None and verdict["target_met_p50"] is None  # 100k was not measured


def test_bench_match_several_templates_per_person() -> None:
    lines = json_lines(
        edugate(["bench", "match", "--sizes", "3000", "--queries", "20", "--templates-per-person", "3"]).stdout
    )
    (item,) = [item for item in lines if item.get("measure") == "size"]
    assert item["size"] == 3000 and item["people"] == 1000 and item["same_best"] == 20
    assert item["known_accepted"] == item["known_queries"] == 10


def test_bench_match_rejects_bad_sizes() -> None:
    proc = edugate(["bench", "match", "--sizes", "1000,lots"], expect=2)
    assert "--sizes" in proc.stderr and "'lots'" in proc.stderr


# ---------------------------------------------------------------------------------------------- accuracy


def build_dataset(root: Path) -> Path:
    """LFW layout: DIR/person/person_0001.jpg ..., symlinks to the single-face photos of faces/."""
    for person in [*MULTI, *SINGLE]:
        photos = sorted((FACES / "faces" / person).iterdir())
        assert len(photos) == MULTI.get(person, 1), person
        (root / person).mkdir(parents=True)
        for index, photo in enumerate(photos, 1):
            (root / person / f"{person}_{index:04d}.jpg").symlink_to(photo)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("lfw") / "lfw")


def write_pairs(path: Path) -> Path:
    """5 folds x (4 matched + 4 mismatched), LFW's pairs.txt format; includes the worst genuine and best
    impostor pair."""
    matched = [(p, a, b) for p, n in MULTI.items() for a, b in itertools.combinations(range(1, n + 1), 2)][:20]
    assert ("alex_lacamoire", 1, 3) in matched
    people = {**MULTI, **dict.fromkeys(SINGLE, 1)}
    cross = [
        (p, a, q, b)
        for p, q in itertools.combinations(sorted(people), 2)
        for a in range(1, people[p] + 1)
        for b in range(1, people[q] + 1)
    ]
    mismatched = [pair for pair in cross[::9] if pair != ("barack_obama", 2, "joe_biden", 1)][:19]
    mismatched.append(("barack_obama", 2, "joe_biden", 1))
    lines = ["5\t4"]
    for fold in range(5):
        lines += ["\t".join(map(str, pair)) for pair in matched[4 * fold : 4 * fold + 4]]
        lines += ["\t".join(map(str, pair)) for pair in mismatched[4 * fold : 4 * fold + 4]]
    path.write_text("\n".join(lines) + "\n")
    return path


def accuracy(dataset: Path, models_dir: Path, *extra: str) -> list[dict[str, Any]]:
    proc = edugate(["bench", "accuracy", "--dataset", str(dataset), "--models", str(models_dir), *extra])
    lines = json_lines(proc.stdout)
    assert all(item["bench"] == "accuracy" for item in lines)
    assert [item.get("measure") for item in lines] == ["dataset", "verification", "far", "identification", None]
    return lines


def check_separable(verification: dict[str, Any]) -> None:
    assert verification["fold_accuracy"] == [1.0] * verification["folds"]
    assert verification["accuracy_mean"] == 1.0 and verification["accuracy_std"] == 0.0
    assert verification["separable"] is True
    assert verification["genuine_min"] == pytest.approx(WORST_GENUINE, abs=0.005)
    assert verification["impostor_max"] <= BEST_IMPOSTOR + 0.005
    for threshold in verification["fold_threshold"]:  # each learned on the other folds: inside the gap
        assert verification["impostor_max"] < threshold < verification["genuine_min"]


def test_accuracy_generated_pairs(dataset: Path, models_dir: Path) -> None:
    lines = accuracy(dataset, models_dir)
    data = section(lines, "dataset")
    assert data["images"] == 20 and data["people"] == 9 and data["people_with_several_photos"] == 5
    assert data["embedded"] == 20 and data["failures_to_enrol"] == 0 and data["failed"] == []

    verification = section(lines, "verification")
    assert verification["genuine"] == GENUINE and verification["impostor"] == GENUINE
    assert verification["pairs"] == 2 * GENUINE and verification["folds"] == 10
    # 23 genuine and 23 impostor pairs dealt round-robin over 10 folds.
    assert verification["fold_sizes"] == [6, 6, 6, 4, 4, 4, 4, 4, 4, 4]
    assert verification["failed_pairs_genuine"] == verification["failed_pairs_impostor"] == 0
    check_separable(verification)

    far = section(lines, "far")["far"]
    assert [entry["far"] for entry in far] == [1e-3, 1e-4]
    for entry in far:
        assert entry["impostor_pairs"] == GENUINE and entry["meaningful"] is False and "only 23" in entry["note"]
        assert entry["tar"] == 1.0 and entry["false_accepts"] == 0
        assert verification["impostor_max"] < entry["threshold"] <= verification["impostor_max"] + 1e-4

    ident = section(lines, "identification")
    assert ident["threshold_source"] == "published" and ident["threshold"] == 0.363
    assert ident["enrolled_people"] == 5 and ident["queries"] == 11 and ident["strangers"] == 4
    assert ident["rank1"] == 1.0 and ident["identified_rate"] == 1.0 and ident["wrong_accepts"] == 0
    assert ident["strangers_accepted"] == 0 and ident["stranger_far"] == 0.0
    assert ident["stranger_best_score"] < 0.363

    summary = lines[-1]
    assert summary["published_lfw_accuracy"] == 0.9932
    assert summary["difference_points"] == pytest.approx(0.68)
    assert summary["accuracy_mean"] == 1.0 and summary["pairs"] == 46 and summary["folds"] == 10
    assert summary["calibrate"]["far_1e-3"] == {"threshold": far[0]["threshold"], "meaningful": False}
    assert summary["calibrate"]["far_1e-4"]["threshold"] == far[1]["threshold"]
    assert summary["calibrate"]["impostor_pairs"] == 23
    assert summary["rank1"] == 1.0 and summary["stranger_far"] == 0.0


def test_accuracy_with_lfw_pairs_file(dataset: Path, models_dir: Path, tmp_path: Path) -> None:
    pairs = write_pairs(tmp_path / "pairs.txt")
    lines = accuracy(dataset, models_dir, "--pairs", str(pairs))
    verification = section(lines, "verification")
    assert verification["pairs"] == 40 and verification["genuine"] == 20 and verification["impostor"] == 20
    assert verification["folds"] == 5 and verification["fold_sizes"] == [8] * 5
    check_separable(verification)
    assert verification["impostor_max"] == pytest.approx(BEST_IMPOSTOR, abs=0.002)

    calibrated = lines[-1]["calibrate"]["far_1e-3"]["threshold"]
    assert calibrated == pytest.approx(0.275, abs=1e-4)  # just above the best impostor, 0.27499
    assert lines[-1]["protocol"] == "pairs file" and lines[-1]["folds"] == 5

    # Identification at the calibrated threshold: every enrolled person found, no stranger let in.
    lines = accuracy(dataset, models_dir, "--pairs", str(pairs), "--threshold", str(calibrated))
    ident = section(lines, "identification")
    assert ident["threshold_source"] == "option" and ident["threshold"] == calibrated
    assert ident["rank1"] == 1.0 and ident["identified_rate"] == 1.0 and ident["wrong_accepts"] == 0
    assert ident["strangers"] == 4 and ident["strangers_accepted"] == 0
    assert ident["stranger_best_score"] < calibrated


def test_accuracy_counts_a_photo_without_face_and_picks_the_centre_face(models_dir: Path, tmp_path: Path) -> None:
    root = build_dataset(tmp_path / "lfw")
    (root / "barack_obama" / "barack_obama_0007.jpg").symlink_to(FACES / "noface" / "coffee.png")
    # Biden is the face nearest the centre of this stage photo; Obama's face scores higher and comes first.
    (root / "joe_biden" / "joe_biden_0003.jpg").symlink_to(FACES / "group" / "obama_and_biden_stage.jpg")
    lines = accuracy(root, models_dir)
    data = section(lines, "dataset")
    assert data["images"] == 22 and data["embedded"] == 21 and data["failures_to_enrol"] == 1
    assert data["failed"] == [{"file": "barack_obama/barack_obama_0007.jpg", "reason": "no face found"}]
    assert data["several_faces"] == 1

    verification = section(lines, "verification")
    genuine = GENUINE + 6 + 2  # a 7th "photo" of barack_obama, a 3rd of joe_biden
    assert verification["genuine"] == verification["impostor"] == genuine and verification["pairs"] == 2 * genuine
    assert verification["failed_pairs_genuine"] == 6
    # The coffee photo's six genuine pairs score -1 and are lost whatever the threshold; everything else is
    # right, which needs the stage photo's Biden (not Obama) to be the face compared.
    errors = sum((1 - a) * n for a, n in zip(verification["fold_accuracy"], verification["fold_sizes"], strict=True))
    assert errors == pytest.approx(6, abs=0.01)
    assert verification["genuine_min"] == pytest.approx(WORST_GENUINE, abs=0.005)
    assert verification["impostor_max"] < 0.3

    ident = section(lines, "identification")
    assert ident["queries"] == 13 and ident["queries_without_face"] == 1
    assert ident["rank1"] == pytest.approx(12 / 13, abs=1e-4) and ident["genuine_rejected"] == 1
    assert ident["wrong_accepts"] == 0 and ident["strangers_accepted"] == 0
    assert lines[-1]["failures_to_enrol"] == 1


def test_accuracy_pairs_file_naming_a_missing_image(dataset: Path, models_dir: Path, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1\t1\nbarack_obama\t1\t9\njoe_biden\t1\tkit_harington\t2\n")
    proc = edugate(
        ["bench", "accuracy", "--dataset", str(dataset), "--models", str(models_dir), "--pairs", str(pairs)], expect=1
    )
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("edugate: error: ") and "line 2" in lines[0]
    assert str(dataset / "barack_obama" / "barack_obama_0009.jpg") in lines[0]


def test_accuracy_pairs_file_with_wrong_counts(dataset: Path, models_dir: Path, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("2\t1\nbarack_obama\t1\t2\njoe_biden\t1\tkit_harington\t2\n")
    proc = edugate(
        ["bench", "accuracy", "--dataset", str(dataset), "--models", str(models_dir), "--pairs", str(pairs)], expect=1
    )
    assert proc.stderr.count("\n") == 1 and "promises 2 fold(s)" in proc.stderr and "has 2" in proc.stderr


# ------------------------------------------------------------------------------------- the computations


def test_each_fold_is_judged_with_the_threshold_of_the_other_folds() -> None:
    from appliance.bench.accuracy import verification

    # Fold 0 alone would pick 0.5 (between 0.2 and 0.8); fold 1 alone 0.375 (between 0.3 and 0.45).
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.45, 0.9, 0.1, 0.3])
    genuine = np.array([True, True, False, False, True, True, False, False])
    fold = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    result = verification(scores, genuine, fold, 2)
    assert result["fold_threshold"] == [0.375, 0.5]
    assert result["fold_accuracy"] == [1.0, 0.75]  # 0.45 is rejected by the threshold learned on fold 0
    assert result["accuracy_mean"] == 0.875 and result["accuracy_std"] == pytest.approx(0.1768, abs=1e-4)


def test_tar_at_far_from_the_impostor_scores() -> None:
    from appliance.bench.accuracy import tar_at_far

    impostor = np.concatenate([np.linspace(-0.2, 0.1, 1997), [0.3, 0.4, 0.5]])
    gen = np.array([0.35, 0.45, 0.55, 0.2])
    scores = np.concatenate([gen, impostor])
    at_3, at_4 = tar_at_far(scores, np.arange(len(scores)) < len(gen))
    # FAR 1e-3 of 2000 impostor pairs allows 2 false accepts: the threshold just clears the third best, 0.3.
    assert at_3["threshold"] == 0.3001 and at_3["false_accepts"] == 2 and at_3["tar"] == 0.75
    assert at_3["meaningful"] is True and at_3["impostor_pairs"] == 2000
    # FAR 1e-4 allows none: just above the best impostor; 2000 pairs cannot resolve it.
    assert at_4["threshold"] == 0.5001 and at_4["false_accepts"] == 0 and at_4["tar"] == 0.25
    assert at_4["meaningful"] is False and at_4["min_impostor_pairs"] == 10_000 and "only 2000" in at_4["note"]


def test_generated_pairs_are_deterministic_and_right(tmp_path: Path) -> None:
    from appliance.bench.accuracy import generate_pairs, scan_dataset

    people = scan_dataset(build_dataset(tmp_path / "lfw"))
    pairs = generate_pairs(people, 10)
    assert pairs == generate_pairs(people, 10)
    genuine = [p for p in pairs if p.genuine]
    impostor = [p for p in pairs if not p.genuine]
    assert len(genuine) == len(impostor) == GENUINE
    assert all(p.first.parent == p.second.parent and p.first != p.second for p in genuine)
    assert all(p.first.parent != p.second.parent for p in impostor)
    assert len({frozenset((p.first, p.second)) for p in pairs}) == len(pairs)
    assert {p.fold for p in genuine} == {p.fold for p in impostor} == set(range(10))


def test_nearest_centre_face() -> None:
    from appliance.bench.accuracy import nearest_centre
    from appliance.vision.detect import Face

    marks = np.zeros((5, 2), np.float32)
    corner = Face(box=(0, 0, 100, 100), landmarks=marks, score=0.99)
    middle = Face(box=(420, 260, 60, 60), landmarks=marks, score=0.81)
    assert nearest_centre([corner, middle], 900, 600) is middle
