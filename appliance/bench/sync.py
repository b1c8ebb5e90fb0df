"""``edugate bench sync``: how fast a backlog leaves the gate, and how soon a live tap reaches the hub.

A gate that was offline for days must empty its journal quickly once the network is back, and
on a normal morning a tap should reach the hub (and so the parent's phone) within a moment.
Everything runs against a private Mosquitto started here on 127.0.0.1 with the production
broker's settings that matter for speed (logins, the per-device ACL, 100 messages in flight
per client, no Nagle; TLS 1.2 unless ``--no-tls``); persistence is off, since a production
broker writes its database only every 60 s and at shutdown, never per message. A hub stand-in
(:mod:`appliance.bench.mqtt_hub`) subscribes at QoS 1 from its own process, like a real hub on
another machine, and checks that each device's seqs arrive once and in order.

1. Drain: a fresh journal prefilled with realistic events (setup, one transaction) is sent by the
   real SyncService, wired as the daemon wires it. Timed until every event is marked synced in
   the journal, and until the hub has them all. A drain that stops moving for 30 s is reported
   as such (``complete: false``, ``stuck_in_flight``) and the run goes on.
2. Baseline, before and after the drain: a bare paho-mqtt QoS 1 publisher sends the same JSON
   bytes with the same in-flight window as fast as it can and waits for every PUBACK.
3. Live, in process: the drain's service keeps running while events are committed one by one,
   20-50 ms apart; commit -> PUBACK and commit -> hub.
4. Live, end to end: a real ``edugate run`` subprocess with a socket lane; card UIDs written to
   the lane, 20-50 ms apart; written -> hub, with the console acknowledgement in between.

The phases are :mod:`~appliance.bench.sync_drain` (1 and 3), :mod:`~appliance.bench.sync_baseline` (2)
and :mod:`~appliance.bench.sync_latency` (4); this module runs them and sums them up.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.bench.errors import BenchError
from appliance.bench.gate_events import check_payloads, prefill
from appliance.bench.mqtt_broker import BROKER_SETTINGS, HUB_USER, BenchBroker, mosquitto_missing
from appliance.bench.sigterm import sigterm_interrupts
from appliance.bench.stats import emit, machine_info, progress
from appliance.bench.sync_baseline import run_raw
from appliance.bench.sync_drain import run_drain
from appliance.bench.sync_latency import run_daemon_latency
from appliance.bench.sync_rig import DRAIN_DEVICE, LIVE_DEVICE, RAW_DEVICE, HubProcess

TARGET_EVENTS_PER_S = 2000
TARGET_RATIO = 0.5
TARGET_LATENCY_P99_MS = 200


def run(events: int, taps: int, tls: bool, window: int) -> None:
    """Run every phase against a private broker; JSON lines on stdout; everything started here is stopped."""
    why = mosquitto_missing()
    if why:
        raise BenchError(why)
    workdir = Path(tempfile.mkdtemp(prefix="edugate-bench-sync-"))
    broker: BenchBroker | None = None
    hub: HubProcess | None = None
    try:
        with sigterm_interrupts():
            pki = None
            if tls:
                from appliance.bench.mqtt_pki import make_broker_pki

                pki = make_broker_pki(workdir / "pki")
            users = (HUB_USER, DRAIN_DEVICE, LIVE_DEVICE, RAW_DEVICE)
            passwords = {user: secrets.token_urlsafe(18) for user in users}
            password_files = {}
            for user in (DRAIN_DEVICE, LIVE_DEVICE):
                path = workdir / f"password-{user}"
                path.write_text(passwords[user] + "\n")
                path.chmod(0o600)
                password_files[user] = path

            progress(f"bench sync: prefilling a journal with {events} events (setup, not timed)")
            journal_path = workdir / "drain" / "journal.db"
            began = time.monotonic()
            payloads = prefill(journal_path, DRAIN_DEVICE, events)
            prefill_s = time.monotonic() - began
            check_payloads(payloads)

            broker = BenchBroker(workdir / "broker", passwords, pki)
            broker.start()
            hub = HubProcess(
                {
                    "host": broker.host,
                    "port": broker.port,
                    "ca": str(broker.ca) if broker.ca else None,
                    "username": HUB_USER,
                    "password": passwords[HUB_USER],
                },
                workdir,
            )
            emit(
                bench="sync",
                measure="setup",
                events=events,
                taps=taps,
                tls=tls,
                window=window,
                payload_bytes_mean=round(sum(map(len, payloads)) / len(payloads), 1),
                prefill_seconds=round(prefill_s, 2),
                broker=f"mosquitto on {broker.host}:{broker.port}",
                broker_settings=BROKER_SETTINGS,
                **machine_info(),
            )
            raw_runs = [run_raw(broker, hub, passwords[RAW_DEVICE], window, payloads, 1)]
            drain, live = run_drain(journal_path, broker, hub, password_files[DRAIN_DEVICE], window, events, taps)
            raw_runs.append(run_raw(broker, hub, passwords[RAW_DEVICE], window, payloads, 2))
            latency = run_daemon_latency(workdir / "live", broker, hub, password_files[LIVE_DEVICE], window, taps)
            _summary(events, tls, window, drain, raw_runs, live, latency)
    finally:
        if hub is not None:
            hub.stop()
        if broker is not None:
            broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _summary(
    events: int,
    tls: bool,
    window: int,
    drain: dict[str, Any],
    raw_runs: list[dict[str, Any]],
    live: dict[str, Any],
    latency: dict[str, Any],
) -> None:
    raw_rates = [r["events_per_s"] for r in raw_runs if r["events_per_s"]]
    raw = sum(raw_rates) / len(raw_rates) if raw_rates else None
    rate = drain["synced_events_per_s"]
    ratio = round(rate / raw, 3) if rate and raw else None
    p99 = latency.get("tap_to_hub_ms_p99")
    drain_met = bool(rate) and rate >= TARGET_EVENTS_PER_S
    ratio_met = ratio is not None and ratio >= TARGET_RATIO
    latency_met = p99 is not None and p99 <= TARGET_LATENCY_P99_MS
    emit(
        bench="sync",
        events=events,
        tls=tls,
        window=window,
        drain_complete=drain["complete"],
        drain_events_per_s=rate,
        drain_received_events_per_s=drain["received_events_per_s"],
        raw_events_per_s=round(raw, 1) if raw else None,
        raw_runs_events_per_s=raw_rates,
        ratio=ratio,
        missing=drain["missing"],
        duplicates=drain["duplicates"],
        in_order=drain["in_order"],
        every_seq_once=drain["every_seq_once"],
        latency_taps=latency["taps"],
        latency_missing=latency["missing"],
        latency_ms_p50=latency.get("tap_to_hub_ms_p50"),
        latency_ms_p90=latency.get("tap_to_hub_ms_p90"),
        latency_ms_p99=p99,
        latency_ms_max=latency.get("tap_to_hub_ms_max"),
        in_process_commit_to_puback_ms_p50=live.get("commit_to_puback_ms_p50"),
        in_process_commit_to_puback_ms_p99=live.get("commit_to_puback_ms_p99"),
        in_process_commit_to_hub_ms_p99=live.get("commit_to_hub_ms_p99"),
        target_events_per_s=TARGET_EVENTS_PER_S,
        target_ratio=TARGET_RATIO,
        target_latency_p99_ms=TARGET_LATENCY_P99_MS,
        drain_target_met=drain_met,
        ratio_target_met=ratio_met,
        latency_target_met=latency_met,
        target_met=drain_met and ratio_met and latency_met,
    )
