"""``edugate bench hub``: how fast the hub swallows a backlog, and how soon a tap becomes a parent's message.

After a night with the school's server down, every gate's events wait in the broker; when the hub
comes back they all arrive at once and must be stored (validated, deduplicated, seq streams kept,
acknowledged after the commit) quickly. Everything runs against a private Mosquitto started here on
127.0.0.1 (plaintext, the production limits that matter: 100 messages in flight per client, a queue
big enough for the backlog) with the gates' ACL.

1. Ingest: the hub's MQTT session is made (shared subscription, persistent session) and closed; a
   few simulated gates publish the backlog (valid events, QoS 1, every PUBACK a success, so the
   broker holds them for the hub); then the hub's ingest starts, wired as HubService wires it
   (IngestWorker + MqttTransport with manual acks after the commit), and is timed until every event
   is in the database. Into SQLite (a file in ``--dir``), and into PostgreSQL with ``--postgres``.
2. Baseline, same run, same rows: bare ``executemany`` inserts in batches of 500 into the same
   events table (sqlite3; psycopg too with ``--postgres``), one transaction per batch. The ratio is
   what validation, dedupe, the streams and MQTT cost on top of writing the rows.
3. Latency, everything online: a real ``edugate run`` (a socket lane, its sync to the bench
   broker) and the hub (ingest with the notification hook, the outbox worker, wired as HubService
   wires them) with ``[notify]`` on and a webhook to an HTTP server started here. Card UIDs of
   distinct students (parents' phones in the hub's people table) are written to the lane, spaced
   like arrivals at a gate; each is timed from the write to the webhook request for that student
   (one clock: CLOCK_MONOTONIC), with the hub's commit in between.

The phases are :mod:`~appliance.bench.hub_ingest` (1), :mod:`~appliance.bench.hub_baseline` (2) and
:mod:`~appliance.bench.hub_latency` (3); this module runs them and sums them up.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

from appliance.bench.errors import BenchError
from appliance.bench.hub_baseline import baseline_postgres, baseline_sqlite, event_rows
from appliance.bench.hub_ingest import backlog, open_session, publish_backlog, run_ingest
from appliance.bench.hub_latency import run_latency
from appliance.bench.hub_rig import LIVE_DEVICE, QueueBroker, gate_name, hub_config
from appliance.bench.mqtt_broker import HUB_USER, BenchBroker, mosquitto_missing
from appliance.bench.pg_schemas import PgSchemas
from appliance.bench.sigterm import sigterm_interrupts
from appliance.bench.stats import emit, machine_info, progress

TARGET_INGEST_PER_S = 2000
TARGET_LATENCY_P95_MS = 5000


def run(events: int, gates: int, taps: int, postgres: str | None, workdir: Path | None) -> None:
    """Every phase against a private broker; JSON lines on stdout; everything started here is stopped."""
    why = mosquitto_missing()
    if why:
        raise BenchError(why)
    base = Path(tempfile.mkdtemp(prefix="edugate-bench-hub-", dir=workdir))
    broker: BenchBroker | None = None
    schemas = PgSchemas(postgres) if postgres else None
    try:
        with sigterm_interrupts():
            devices = [gate_name(i) for i in range(gates)]
            passwords = {user: secrets.token_urlsafe(18) for user in (HUB_USER, LIVE_DEVICE, *devices)}
            broker = QueueBroker(base / "broker", passwords, events + 10_000)
            broker.start()
            emit(
                bench="hub",
                measure="setup",
                events=events,
                gates=gates,
                taps=taps,
                postgres=postgres is not None,
                broker=f"mosquitto on {broker.host}:{broker.port}, plaintext",
                **machine_info(),
            )
            targets: list[tuple[str, str]] = [("sqlite", f"sqlite:///{base / 'hub.db'}")]
            if schemas is not None:
                targets.append(("postgresql", schemas.new("ingest")))
            ingests: dict[str, dict[str, Any]] = {}
            baselines: dict[str, dict[str, Any]] = {}
            config = hub_config(broker, base, targets[0][1])
            open_session(config)
            for label, url in targets:
                progress(f"bench hub: {len(devices)} gates publish {events} events while the hub is away")
                waiting = backlog(events, gates, seed=len(ingests) + 5)
                publish_s = publish_backlog(broker, passwords, waiting)
                emit(
                    bench="hub",
                    measure="publish",
                    database=label,
                    events=events,
                    seconds=round(publish_s, 3),
                    events_per_s=round(events / publish_s, 1),
                )
                ingests[label] = run_ingest(hub_config(broker, base, url), events, label, devices, base / "keys")
                rows = event_rows(waiting)
                if label == "sqlite":
                    baselines[label] = baseline_sqlite(rows, base / "baseline.db")
                else:
                    assert schemas is not None
                    baselines[label] = baseline_postgres(rows, schemas.new("baseline"))
            latency = run_latency(broker, passwords, base / "live", taps)
            _summary(events, ingests, baselines, latency)
    finally:
        if schemas is not None:
            schemas.drop()
        if broker is not None:
            broker.stop()
        shutil.rmtree(base, ignore_errors=True)


def _summary(
    events: int, ingests: dict[str, dict[str, Any]], baselines: dict[str, dict[str, Any]], latency: dict[str, Any]
) -> None:
    out: dict[str, Any] = {"bench": "hub", "events": events}
    for label, ingest in ingests.items():
        rate, raw = ingest["events_per_s"], baselines[label]["events_per_s"]
        out[f"{label}_events_per_s"] = rate
        out[f"{label}_baseline_events_per_s"] = raw
        out[f"{label}_ratio"] = round(rate / raw, 3) if rate and raw else None
        out[f"{label}_every_event_once"] = ingest["every_event_once"]
    sqlite_rate = ingests["sqlite"]["events_per_s"]
    p95 = latency.get("tap_to_webhook_ms_p95")
    out.update(
        latency_taps=latency["taps"],
        latency_missing=latency["missing"],
        latency_duplicates=latency["duplicates"],
        latency_ms_p50=latency.get("tap_to_webhook_ms_p50"),
        latency_ms_p95=p95,
        latency_ms_max=latency.get("tap_to_webhook_ms_max"),
        target_events_per_s=TARGET_INGEST_PER_S,
        target_latency_p95_ms=TARGET_LATENCY_P95_MS,
    )
    ingest_met = bool(sqlite_rate) and sqlite_rate >= TARGET_INGEST_PER_S
    latency_met = p95 is not None and p95 <= TARGET_LATENCY_P95_MS and latency["missing"] == 0
    out.update(ingest_target_met=ingest_met, latency_target_met=latency_met, target_met=ingest_met and latency_met)
    emit(**out)
