"""`edugate bench ...`: benchmarks printing one JSON object per line."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli.common import config_option, config_vision, fail, friendly_errors


@click.group()
def bench() -> None:
    """Benchmarks; each prints one JSON object per line."""


@bench.command("journal")
@click.option("--events", "count", type=click.IntRange(min=100), default=5000, show_default=True)
@click.option(
    "--dir",
    "workdir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to put the test databases (default: a temporary folder; use the gate's disk).",
)
def bench_journal(count: int, workdir: Path | None) -> None:
    """Durable single-event commits/s through EventJournal vs a bare sqlite3 loop."""
    from appliance.bench.journal import run as run_journal

    run_journal(count, workdir)


@bench.command("tap")
@click.option("--taps", type=click.IntRange(min=10), default=1000, show_default=True)
@click.option(
    "--port",
    type=click.IntRange(1024, 65000),
    default=35963,
    show_default=True,
    help="Base TCP port for the private pcscd's virtual reader.",
)
def bench_tap(taps: int, port: int) -> None:
    """Tap -> committed event -> feedback through a real pcscd and virtual reader (needs root, pcscd, vpcd)."""
    from appliance.bench.errors import BenchError
    from appliance.bench.tap import run as run_tap

    try:
        run_tap(taps, port)
    except BenchError as exc:
        fail(str(exc))


@bench.command("idle")
@click.option("--seconds", type=click.FloatRange(min=1), default=30, show_default=True, help="Idle time measured.")
@click.option(
    "--port",
    type=click.IntRange(1024, 65000),
    default=35973,
    show_default=True,
    help="Base TCP port for the private pcscd's virtual reader.",
)
def bench_idle(seconds: float, port: int) -> None:
    """CPU use of an idle `edugate run` with two PC/SC lanes, beside a sleeping baseline (needs root, pcscd, vpcd)."""
    from appliance.bench.errors import BenchError
    from appliance.bench.idle import run as run_idle

    try:
        run_idle(seconds, port)
    except BenchError as exc:
        fail(str(exc))


@bench.command("match")
@click.option(
    "--sizes",
    default="1000,10000,100000",
    show_default=True,
    help="Gallery sizes to measure, in templates, comma-separated.",
)
@click.option("--queries", type=click.IntRange(min=10), default=200, show_default=True, help="Timed queries per size.")
@click.option(
    "--templates-per-person",
    type=click.IntRange(min=1, max=100),
    default=1,
    show_default=True,
    help="Templates enrolled per person (the runner-up pass skips a person's own templates).",
)
def bench_match(sizes: str, queries: int, templates_per_person: int) -> None:
    """1:N time per query through Gallery.match vs a bare numpy matrix-vector + argmax on the same matrix."""
    from appliance.bench.match import parse_sizes
    from appliance.bench.match import run as run_match

    try:
        parsed = parse_sizes(sizes)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--sizes") from None
    run_match(parsed, queries, templates_per_person)


_models_option = click.option(
    "--models",
    "models_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Installed model pack (default: vision.models_dir of the config).",
)


@bench.command("accuracy")
@click.option(
    "--dataset",
    "dataset",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    required=True,
    help="Folder with one subfolder of photos per person (LFW's layout).",
)
@click.option(
    "--pairs",
    "pairs_file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="Pairs in LFW's pairs.txt format (images DIR/NAME/NAME_%04d.jpg); default: all genuine pairs of the "
    "folders plus as many seeded random impostor pairs.",
)
@click.option(
    "--threshold",
    type=click.FloatRange(-1, 1),
    default=None,
    help="Cosine threshold for the identification section (default: the one at FAR 1e-3 when the data can "
    "resolve it, else the model's published threshold).",
)
@click.option(
    "--margin",
    type=click.FloatRange(0, 2),
    default=None,
    help="Margin over the runner-up for identification (default: vision.match_margin).",
)
@click.option(
    "--folds",
    type=click.IntRange(min=2),
    default=10,
    show_default=True,
    help="Folds for generated pairs (a pairs file brings its own).",
)
@_models_option
@config_option
@click.pass_context
@friendly_errors
def bench_accuracy(
    ctx: click.Context,
    dataset: Path,
    pairs_file: Path | None,
    threshold: float | None,
    margin: float | None,
    folds: int,
    models_dir: Path | None,
    config_path: Path,
) -> None:
    """LFW-style 10-fold verification accuracy, TAR at FAR 1e-3/1e-4 and open-set identification.

    Photos go through the gate's pipeline (detection and model settings from the config's [vision]); the face
    nearest the centre is used, a photo with no face is a failure to enrol and its pairs score -1.

    Calibrating the gate: the summary's `calibrate` field gives the cosine thresholds at FAR 1e-3 and 1e-4 on
    this data. Run this on photos like the gate's (at least 1,000 impostor pairs for FAR 1e-3, 10,000 for
    1e-4; the field says whether the data was enough), then set vision.match_threshold to the FAR 1e-3 value;
    repeat whenever the model changes, since thresholds do not carry over between models.
    """
    from appliance.bench.accuracy import DatasetError
    from appliance.bench.accuracy import run as run_accuracy
    from appliance.vision.models import ModelError

    try:
        run_accuracy(dataset, pairs_file, threshold, margin, folds, config_vision(ctx, config_path, models_dir))
    except (DatasetError, ModelError) as exc:
        fail(str(exc))


_faces_option = click.option(
    "--faces",
    "faces_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="The test photos with their manifest.csv (default: ../shared/data/faces beside the checkout).",
)


@bench.command("face")
@click.option(
    "--max-side",
    type=click.IntRange(160, 4096),
    default=None,
    help="Frame size for the pipeline's detection (default: vision.detect_max_side, 640).",
)
@click.option(
    "--people",
    type=click.IntRange(1, 8),
    default=5,
    show_default=True,
    help="Enrolled people walking past (a stranger walks too).",
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=5),
    default=None,
    help="Length of the video (default: a walk, a gap and a second of empty scene per person, ~6.5 s each).",
)
@click.option("--threads", type=click.IntRange(1, 64), default=None, help="onnxruntime threads (default: config).")
@click.option(
    "--walk-speed",
    type=click.FloatRange(100, 3000),
    default=560,
    show_default=True,
    help="How fast people cross the 1280 px frame, in px/s (faces are 100-140 px wide).",
)
@click.option(
    "--gallery",
    "gallery_size",
    type=click.IntRange(min=1),
    default=5000,
    show_default=True,
    help="People in the gallery: the walkers plus random unit vectors (matching cost grows with it).",
)
@_faces_option
@_models_option
@config_option
@click.pass_context
@friendly_errors
def bench_face(
    ctx: click.Context,
    max_side: int | None,
    people: int,
    seconds: float | None,
    threads: int | None,
    walk_speed: float,
    gallery_size: int,
    faces_dir: Path | None,
    models_dir: Path | None,
    config_path: Path,
) -> None:
    """The gate's face pipeline vs a naive one (full-size detection, every face embedded every frame) on a
    walk-past video made from the test photos: per-stage latency, frames/s, and whether both decide alike."""
    from appliance.bench.face import DEFAULT_FACES, VideoError
    from appliance.bench.face import run as run_face
    from appliance.vision.images import ImageError
    from appliance.vision.models import ModelError

    vision = config_vision(ctx, config_path, models_dir)
    try:
        run_face(
            faces_dir or DEFAULT_FACES,
            vision,
            max_side or vision.detect_max_side,
            people,
            seconds,
            threads or vision.intra_op_threads,
            gallery_size,
            walk_speed,
        )
    except (VideoError, ImageError, ModelError) as exc:
        fail(str(exc))


@bench.command("memory")
@click.option(
    "--people",
    type=click.IntRange(min=1),
    default=5000,
    show_default=True,
    help="People on the roster with face templates.",
)
@click.option("--templates-per-person", type=click.IntRange(1, 20), default=3, show_default=True)
@click.option(
    "--seconds",
    type=click.FloatRange(min=1),
    default=10,
    show_default=True,
    help="How long each daemon is sampled once it is ready and has embedded a face.",
)
@_faces_option
@_models_option
@config_option
@click.pass_context
@friendly_errors
def bench_memory(
    ctx: click.Context,
    people: int,
    templates_per_person: int,
    seconds: float,
    faces_dir: Path | None,
    models_dir: Path | None,
    config_path: Path,
) -> None:
    """Resident memory of a real `edugate run` with the face models loaded and PEOPLE enrolled, beside the same
    daemon with nobody enrolled and a bare `import numpy, onnxruntime, cv2` (Linux: reads /proc/PID/status)."""
    from appliance.bench.errors import BenchError
    from appliance.bench.face import DEFAULT_FACES, VideoError
    from appliance.bench.memory import run as run_memory
    from appliance.vision.models import ModelError

    vision = config_vision(ctx, config_path, models_dir)
    try:
        run_memory(faces_dir or DEFAULT_FACES, vision, people, templates_per_person, seconds)
    except (BenchError, VideoError, ModelError) as exc:
        fail(str(exc))


@bench.command("sync")
@click.option(
    "--events", type=click.IntRange(min=100), default=100_000, show_default=True, help="Backlog drained, in events."
)
@click.option("--taps", type=click.IntRange(min=10), default=500, show_default=True, help="Live taps timed to the hub.")
@click.option(
    "--tls/--no-tls",
    default=True,
    show_default=True,
    help="MQTT over TLS 1.2 with a throwaway CA (a school's broker accepts nothing else), or plaintext on loopback.",
)
@click.option(
    "--window",
    type=click.IntRange(1, 65535),
    default=None,
    help="QoS 1 messages in flight, for the gate and the baseline alike (default: the sync.window default).",
)
def bench_sync(events: int, taps: int, tls: bool, window: int | None) -> None:
    """Drain of a journal backlog to a private Mosquitto through the gate's SyncService vs a bare paho-mqtt
    QoS 1 publisher, then tap -> hub latency through a real `edugate run` (needs mosquitto)."""
    from appliance.bench.errors import BenchError
    from appliance.bench.sync import run as run_sync
    from appliance.config import SyncConfig

    try:
        run_sync(events, taps, tls, window or SyncConfig().window)
    except BenchError as exc:
        fail(str(exc))


@bench.command("hub")
@click.option(
    "--events", type=click.IntRange(min=100), default=100_000, show_default=True, help="Backlog waiting for the hub."
)
@click.option("--gates", type=click.IntRange(1, 50), default=4, show_default=True, help="Gates the backlog comes from.")
@click.option(
    "--taps", type=click.IntRange(min=1), default=100, show_default=True, help="Live taps timed to the webhook."
)
@click.option(
    "--postgres",
    metavar="URL",
    default=None,
    help="Also ingest into this PostgreSQL database (postgresql://user:password@host/db; private schemas, dropped).",
)
@click.option(
    "--dir",
    "workdir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="Where the SQLite databases go (default: a temporary folder; use the hub's disk).",
)
def bench_hub(events: int, gates: int, taps: int, postgres: str | None, workdir: Path | None) -> None:
    """Hub ingest of a backlog waiting in a private Mosquitto (events/s into SQLite, and PostgreSQL with
    --postgres) vs bare executemany inserts, then tap -> parent webhook latency (needs mosquitto)."""
    from appliance.bench.errors import BenchError
    from appliance.bench.hub import run as run_hub

    try:
        run_hub(events, gates, taps, postgres, workdir)
    except BenchError as exc:
        fail(str(exc))
