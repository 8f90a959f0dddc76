"""Item 4: latency the daemon adds, enqueue (SendMessage issued) to callback received, minus the stub's latency.

Two phases on one CONCURRENCY=4 daemon with POLL_WAIT_SECONDS=20: jobs one at a time (the next is sent
when the previous one's callback has arrived), then a steady 80 % of capacity (evenly spaced sends at
0.8 x CONCURRENCY / latency per second) where completions must keep up with the offered rate.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from bench.common import Bench, figure, percentile
from bench.stack import send_job

SINGLE_LATENCY = 0.25
LOAD_LATENCY = 1.0
CONCURRENCY = 4
LOAD = 0.8
P50_TARGET_MS, P99_TARGET_MS = 50.0, 250.0


def _summary(overheads: list[float]) -> dict[str, float]:
    ms = [o * 1000 for o in overheads]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 1), "p90_ms": round(percentile(ms, 90), 1),
            "p99_ms": round(percentile(ms, 99), 1), "max_ms": round(max(ms), 1), "min_ms": round(min(ms), 1),
            "mean_ms": round(sum(ms) / len(ms), 1)}


def _split(b: Bench, sent: dict[str, float], latency: float) -> dict[str, float]:
    """p50s of where the overhead goes: inside the daemon (receive to callback built, from the callback's
    own `timings.total_ms`, minus the stub's latency) and outside it (SendMessage + the receive's return +
    the callback's POST)."""
    inside, outside = [], []
    for job_id, t0 in sent.items():
        total = b.receiver.timings.get(job_id, {}).get("total_ms")
        arrived = b.receiver.arrived.get(job_id)
        if total is None or arrived is None:
            continue
        inside.append(total - latency * 1000)
        outside.append((arrived - t0) * 1000 - total)
    if not inside:
        return {}
    return {"inside_daemon_p50_ms": round(percentile(inside, 50), 1),
            "outside_daemon_p50_ms": round(percentile(outside, 50), 1)}


def one_at_a_time(b: Bench, aws: Any, key: str, jobs: int) -> tuple[dict[str, Any], list[float]]:
    b.openai.latency = SINGLE_LATENCY
    overheads = []
    sent_at: dict[str, float] = {}
    for i in range(jobs):
        job_id = f"single-{i}"
        sent = sent_at[job_id] = time.monotonic()
        send_job(aws, job_id, key)
        arrived = b.receiver.wait_job(job_id, timeout=60)
        if arrived is None:
            raise RuntimeError(f"no callback for {job_id} within 60 s")
        b.receiver.check([job_id])
        overheads.append(arrived - sent - SINGLE_LATENCY)
        if (i + 1) % 50 == 0:
            b.say(f"latency: one at a time: {i + 1}/{jobs}, p50 so far {percentile(overheads, 50) * 1000:.1f} ms")
        time.sleep(0.05)  # let the previous job's delete land: one job in the system at a time
    return _summary(overheads) | _split(b, sent_at, SINGLE_LATENCY), overheads


def at_load(b: Bench, aws: Any, key: str, seconds: float) -> tuple[dict[str, Any], list[float]]:
    b.openai.latency = LOAD_LATENCY
    rate = LOAD * CONCURRENCY / LOAD_LATENCY
    jobs = int(rate * seconds)
    sent: dict[str, float] = {}

    def sender() -> None:
        start = time.monotonic()
        for i in range(jobs):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent[f"load-{i}"] = time.monotonic()
            send_job(aws, f"load-{i}", key)

    b.say(f"latency: {rate:g} jobs/s offered for {seconds:g} s ({LOAD:.0%} of {CONCURRENCY}/{LOAD_LATENCY:g} s)")
    base = b.receiver.count()
    thread = threading.Thread(target=sender, name="load-sender", daemon=True)
    thread.start()
    thread.join(seconds * 3 + 30)
    b.receiver.wait_count(base + jobs, timeout=120)
    b.receiver.check(list(sent))
    arrived = {k: b.receiver.arrived[k] for k in sent if k in b.receiver.arrived}
    first, last = min(sent.values()), max(sent.values())
    offered = (len(sent) - 1) / (last - first)
    done = sorted(arrived.values())
    completion = (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 else 0.0
    overheads = [arrived[k] - sent[k] - LOAD_LATENCY for k in arrived]
    half = len(sent) // 2
    early = [arrived[f"load-{i}"] - sent[f"load-{i}"] for i in range(half) if f"load-{i}" in arrived]
    late = [arrived[f"load-{i}"] - sent[f"load-{i}"] for i in range(half, jobs) if f"load-{i}" in arrived]
    summary = _summary(overheads) | _split(b, sent, LOAD_LATENCY) | {
        "offered_per_s": round(offered, 3), "completed_per_s": round(completion, 3),
        "completed": len(arrived), "sent": len(sent),
        "p50_first_half_ms": round((percentile(early, 50) - LOAD_LATENCY) * 1000, 1),
        "p50_second_half_ms": round((percentile(late, 50) - LOAD_LATENCY) * 1000, 1),
    }
    return summary, overheads


def run(b: Bench) -> dict[str, Any]:
    jobs = 40 if b.quick else 200
    seconds = 20.0 if b.quick else 60.0
    aws = b.stack()
    key = b.tiny_key(aws)
    try:
        with b.daemon(aws, CONCURRENCY=CONCURRENCY, POLL_WAIT_SECONDS=20) as d:
            time.sleep(1.0)
            b.say(f"latency: {jobs} jobs one at a time, stub latency {SINGLE_LATENCY} s")
            single, single_raw = one_at_a_time(b, aws, key, jobs)
            b.say(f"latency: one at a time: p50 {single['p50_ms']} ms, p99 {single['p99_ms']} ms")
            load, load_raw = at_load(b, aws, key, seconds)
            b.say(f"latency: at {LOAD:.0%}: p50 {load['p50_ms']} ms, p99 {load['p99_ms']} ms, "
                  f"{load['completed_per_s']} done/s for {load['offered_per_s']} offered/s")
            stages = _stage_means(d.metrics())
    finally:
        b.openai.latency = 0.0
    keeps_up = load["completed"] == load["sent"] and load["completed_per_s"] >= 0.97 * load["offered_per_s"]
    figures = [
        figure("overhead p50, one at a time", single["p50_ms"], "ms", target=f"<= {P50_TARGET_MS:g} ms",
               met=single["p50_ms"] <= P50_TARGET_MS, key="single_p50_ms"),
        figure("overhead p99, one at a time", single["p99_ms"], "ms", target=f"<= {P99_TARGET_MS:g} ms",
               met=single["p99_ms"] <= P99_TARGET_MS, key="single_p99_ms"),
        figure(f"overhead p50 at {LOAD:.0%} of capacity", load["p50_ms"], "ms", key="load_p50_ms"),
        figure(f"overhead p99 at {LOAD:.0%} of capacity", load["p99_ms"], "ms", key="load_p99_ms"),
        figure("completion rate / offered rate at 80 %",
               round(load["completed_per_s"] / load["offered_per_s"], 3), "",
               target="keeps up (>= 0.97, all completed)", met=keeps_up, key="load_keeps_up"),
    ]
    return {"title": "Latency overhead", "headline": single["p50_ms"],
            "config": {"CONCURRENCY": CONCURRENCY, "POLL_WAIT_SECONDS": 20, "single_latency_s": SINGLE_LATENCY,
                       "load_latency_s": LOAD_LATENCY, "load": LOAD, "audio": "1 s WAV"},
            "single": single, "load": load, "stage_means_ms": stages,
            "samples_ms": {"single": [round(x * 1000, 1) for x in single_raw],
                           "load": [round(x * 1000, 1) for x in load_raw]},
            "figures": figures}


def _stage_means(metrics: dict[tuple[str, str], float]) -> dict[str, float]:
    """Mean seconds per stage over every job this daemon ran, from its histograms (ms)."""
    out = {}
    for (name, labels), value in metrics.items():
        if name == "sidecar_stage_duration_seconds_sum":
            stage = labels.split('"')[1]
            count = metrics.get(("sidecar_stage_duration_seconds_count", labels), 0.0)
            if count:
                out[stage] = round(value / count * 1000, 1)
    return dict(sorted(out.items()))
