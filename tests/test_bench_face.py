"""``edugate bench face`` and ``edugate bench memory``, run as a user runs them, with the real models and photos.

Speed and absolute memory are not asserted (shared, noisy machines): what is asserted is that the figures are
the right ones. The face bench must report every stage, run both sides over the same frames, reach the same
decisions on both, identify every enrolled walker once and leave the stranger unknown. The memory bench must
measure real daemons that loaded the people and worked on faces, beside the baselines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import FACES

STAGES = ("decode", "detect", "detect_full", "align", "quality", "embed", "match")


def edugate(args: list[str], expect: int = 0) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("edugate")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "appliance.cli"]
    env = dict(os.environ)
    env.pop("EDUGATE_CONFIG", None)  # the built-in [vision] defaults, whatever the developer's shell says
    proc = subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == expect, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def json_lines(stdout: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert lines and all(isinstance(item, dict) for item in lines)
    return lines


def ordered(item: dict[str, Any], prefix: str) -> None:
    values = [item[f"{prefix}_p50"], item[f"{prefix}_p90"], item[f"{prefix}_p99"], item[f"{prefix}_max"]]
    assert 0 < values[0] <= values[1] <= values[2] <= values[3], (prefix, values)


# ---------------------------------------------------------------------------------------------------- face


def test_bench_face_pipeline_and_naive_decide_alike(models_dir: Path) -> None:
    args = ["bench", "face", "--models", str(models_dir), "--faces", str(FACES), "--people", "2", "--gallery", "300"]
    lines = json_lines(edugate(args).stdout)
    assert all(item["bench"] == "face" for item in lines)
    assert [item.get("measure") for item in lines] == ["video", *["stage"] * len(STAGES), "run", "run", None]

    video = lines[0]
    assert video["size"] == "1280x720" and video["fps"] == 15.0 and "MJPG" in video["file"]
    passes = video["passes"]
    # Two enrolled walkers (people with several photos first, by name) and the stranger between them.
    assert [(p["person"], p["enrolled"]) for p in passes] == [
        ("alex_lacamoire", True),
        ("paul_rudd", False),
        ("barack_obama", True),
    ]
    for item in passes:
        first, last = item["frames"]
        assert 0 < first < last < video["frames"]
        if item["enrolled"]:  # never enrolled from the photo the video shows
            assert item["enrolled_from"] and item["shown"] not in item["enrolled_from"]
        else:
            assert item["enrolled_from"] == []
    assert video["empty_frames"] > 0 and video["gallery_people"] == 300 and video["gallery_fillers"] == 298

    stages = {item["stage"]: item for item in lines[1 : 1 + len(STAGES)]}
    assert set(stages) == set(STAGES)
    assert stages["detect"]["input"] == "640x360" and stages["detect_full"]["input"] == "1280x720"
    assert stages["decode"]["samples"] == stages["detect"]["samples"] == video["frames"]
    for name in STAGES:
        assert stages[name]["samples"] > 0
        ordered(stages[name], "ms")

    pipeline, naive = lines[-3], lines[-2]
    assert (pipeline["side"], naive["side"]) == ("pipeline", "naive")
    assert pipeline["frames"] == naive["frames"] == naive["detections"] == video["frames"]
    ordered(pipeline, "frame_ms")
    ordered(naive, "frame_ms")
    # The pipeline skips the still, empty scene and embeds a few times per pass; the naive side embeds every face.
    assert pipeline["skipped"] > 0 and pipeline["detections"] + pipeline["skipped"] == pipeline["frames"]
    assert 3 <= pipeline["embeddings"] < naive["embeddings"] == stages["embed"]["samples"]
    assert naive["stray_faces"] == 0

    summary = lines[-1]
    expected = {"accepted": ["alex_lacamoire", "barack_obama"], "unknown": 1}
    assert summary["expected_decisions"] == expected
    assert summary["pipeline_decisions"] == summary["naive_decisions"] == expected
    assert summary["same_decisions"] is True and summary["correct"] is True
    assert summary["pipeline_fps"] > 0 and summary["naive_fps"] > 0 and summary["speedup"] > 0
    assert summary["target_speedup"] == 3.0 and isinstance(summary["target_met"], bool)
    assert summary["frames"] == video["frames"] and "decoded once" in summary["frames_fed"]
    assert summary["cpu_count"] >= 1 and summary["threads"] == 2
    # One decision per pass: each walker identified once, the stranger once unknown.
    assert [(p["person"], p["pipeline"], p["naive"]) for p in summary["passes"]] == [
        ("alex_lacamoire", ["alex_lacamoire"], ["alex_lacamoire"]),
        ("paul_rudd", ["unknown"], []),
        ("barack_obama", ["barack_obama"], ["barack_obama"]),
    ]
    assert summary["extra_pipeline_decisions"] == 0


def test_bench_face_refuses_a_video_too_short_for_its_people(models_dir: Path) -> None:
    proc = edugate(
        ["bench", "face", "--models", str(models_dir), "--faces", str(FACES), "--people", "3", "--seconds", "8"],
        expect=1,
    )
    assert proc.stdout == ""
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("edugate: error: --seconds 8 is too short for 4 people; give at least ")
    assert "drawing" not in proc.stderr


def test_bench_face_without_the_photos(models_dir: Path, tmp_path: Path) -> None:
    proc = edugate(["bench", "face", "--models", str(models_dir), "--faces", str(tmp_path)], expect=1)
    assert proc.stderr.startswith("edugate: error: ") and "manifest.csv: no such file" in proc.stderr
    assert proc.stderr.count("\n") == 1


# -------------------------------------------------------------------------------------------------- memory


def test_bench_memory_measures_the_daemon_beside_its_baselines(models_dir: Path) -> None:
    args = ["bench", "memory", "--models", str(models_dir), "--faces", str(FACES), "--people", "200", "--seconds", "2"]
    lines = json_lines(edugate(args).stdout)
    assert all(item["bench"] == "memory" for item in lines)
    bare, empty, ours, summary = lines
    assert bare["process"] == "bare imports" and bare["imports"] == "import numpy, onnxruntime, cv2"
    assert (empty["people"], empty["templates"]) == (0, 0)
    assert (ours["people"], ours["templates"]) == (200, 600) and ours["journal_mb"] > empty["journal_mb"]
    for item in (bare, empty, ours):
        assert 0 < item["vm_rss_mb"] <= item["vm_rss_max_mb"] <= item["vm_hwm_mb"]
        assert item["samples"] >= 2
    for item in (empty, ours):
        # Measured while it worked: the camera's video went through the pipeline and a face was embedded.
        assert item["pipeline"]["frames"] > 0 and item["pipeline"]["embeddings"] >= 1
        # Models and sessions loaded: far above the bare imports.
        assert item["vm_rss_mb"] > bare["vm_rss_mb"] + 50
    # 600 templates are 0.3 MB: the two daemons differ by noise only (page and allocator luck), not by tens of MB.
    assert abs(ours["vm_rss_mb"] - empty["vm_rss_mb"]) < 30

    assert summary["people"] == 200 and summary["templates_per_person"] == 3
    assert summary["rss_mb"] == ours["vm_rss_mb"] and summary["hwm_mb"] == ours["vm_hwm_mb"]
    assert summary["baseline_rss_mb"] == empty["vm_rss_mb"] and summary["bare_imports_rss_mb"] == bare["vm_rss_mb"]
    assert summary["limit_mb"] == 300 and summary["within_limit"] == (ours["vm_hwm_mb"] <= 300)
    assert summary["gallery_mb"] == round(ours["vm_rss_mb"] - empty["vm_rss_mb"], 1)
    assert "random unit vectors" in summary["vectors"] and summary["cpu_count"] >= 1
