"""Items 1 and 3: jobs per second against CONCURRENCY at a fixed transcription latency, and daemon CPU per job."""

from __future__ import annotations

import os
import time
from typing import Any

from bench.common import Bench, figure
from bench.stack import Feeder, proc_cpu_seconds

LATENCY = 1.0
LEVELS = (1, 4, 16, 32)
EFFICIENCY_TARGET = 0.9
CPU_TARGET_MS = 5.0
CORES = os.cpu_count() or 1


def cpu_now(b: Bench, daemon_pid: int) -> dict[str, float]:
    """CPU seconds so far of the daemon, moto, and this process (the stand-ins, the feeder)."""
    return {"daemon": proc_cpu_seconds(daemon_pid), "moto": proc_cpu_seconds(b.moto.pid),
            "bench": time.process_time()}


def concurrency(b: Bench) -> dict[str, Any]:
    """One daemon per level, 4 x CONCURRENCY jobs (2 x with --quick), tiny audio, 1 s per transcription."""
    waves = 2 if b.quick else 4
    b.openai.latency = LATENCY
    rows = []
    for level in LEVELS:
        aws = b.stack()
        key = b.tiny_key(aws)
        total = waves * level
        with b.daemon(aws, CONCURRENCY=level) as d:
            feeder = Feeder(aws, b.receiver, prefix=f"conc{level}", key=key, total=total, ahead=2 * level + 10)
            before = cpu_now(b, d.pid)
            feeder.start()
            ok = b.receiver.wait_job(f"conc{level}-{total - 1}", timeout=120 + 10 * waves * LATENCY) is not None
            ok = ok and b.receiver.wait_count(feeder.base + total, timeout=30)
            arrived = [b.receiver.arrived[i] for i in feeder.ids() if i in b.receiver.arrived]
            used = {k: round(v - before[k], 2) for k, v in cpu_now(b, d.pid).items()}
        b.receiver.check(feeder.ids())
        assert feeder.first_sent is not None
        elapsed = max(arrived) - feeder.first_sent
        rate = len(arrived) / elapsed
        ideal = level / LATENCY
        row = {"concurrency": level, "jobs": total, "completed": len(arrived), "elapsed_s": round(elapsed, 3),
               "jobs_per_s": round(rate, 3), "ideal_jobs_per_s": ideal, "efficiency": round(rate / ideal, 3),
               "waves_floor_s": waves * LATENCY, "cpu_s": used, "all_completed": ok,
               "machine_busy": round(sum(used.values()) / (elapsed * CORES), 2)}
        rows.append(row)
        b.say(f"concurrency: C={level}: {len(arrived)}/{total} jobs in {elapsed:.2f} s = {rate:.2f} jobs/s, "
              f"efficiency {rate / ideal:.3f}")
    b.openai.latency = 0.0
    at16 = next(r for r in rows if r["concurrency"] == 16)
    figures = [
        figure(f"efficiency at CONCURRENCY={r['concurrency']}", r["efficiency"], "",
               target=f">= {EFFICIENCY_TARGET}" if r["concurrency"] == 16 else "",
               met=r["efficiency"] >= EFFICIENCY_TARGET if r["concurrency"] == 16 else None,
               key=f"efficiency_c{r['concurrency']}")
        for r in rows
    ]
    figures += [figure(f"jobs/s at CONCURRENCY={r['concurrency']}", r["jobs_per_s"], "jobs/s",
                       key=f"jobs_per_s_c{r['concurrency']}") for r in rows]
    return {"title": "Concurrency efficiency", "headline": at16["efficiency"],
            "config": {"latency_s": LATENCY, "jobs_per_level": f"{waves} x CONCURRENCY", "audio": "1 s WAV",
                       "daemon": "one `python -m consumer run` subprocess per level", "POLL_WAIT_SECONDS": 20},
            "rows": rows, "figures": figures}


def cpu(b: Bench) -> dict[str, Any]:
    """user+sys CPU of the daemon process per job: zero-latency transcriber, tiny audio, CONCURRENCY=4."""
    total = 100 if b.quick else 300
    idle_window = 5.0 if b.quick else 10.0
    b.openai.latency = 0.0
    aws = b.stack()
    key = b.tiny_key(aws)
    with b.daemon(aws, CONCURRENCY=4) as d:
        time.sleep(2.0)  # start-up work (imports, first depth poll) is not per-job cost
        c0, t0 = d.cpu_seconds(), time.monotonic()
        time.sleep(idle_window)
        idle_rate = (d.cpu_seconds() - c0) / (time.monotonic() - t0)
        b.say(f"cpu: idle daemon uses {idle_rate * 1000:.1f} ms CPU per second; sending {total} jobs")
        feeder = Feeder(aws, b.receiver, prefix="cpu", key=key, total=total, ahead=40)
        before, t1 = cpu_now(b, d.pid), time.monotonic()
        feeder.start()
        deadline = time.monotonic() + 600
        while d.completed() < total and time.monotonic() < deadline:
            time.sleep(0.2)
        after, t2 = cpu_now(b, d.pid), time.monotonic()
        completed = d.completed()
        b.receiver.check(feeder.ids())
        moto_note = "moto, the stubs and this process share the 2 cores with the daemon"
    used = {k: v - before[k] for k, v in after.items()}
    busy = used["daemon"]
    net = busy - idle_rate * (t2 - t1)
    per_job_ms = busy / completed * 1000
    b.say(f"cpu: {completed} jobs, daemon CPU {busy:.2f} s in {t2 - t1:.1f} s wall = {per_job_ms:.2f} ms/job")
    return {
        "title": "Daemon CPU per job", "headline": round(per_job_ms, 2),
        "config": {"jobs": total, "CONCURRENCY": 4, "latency_s": 0.0, "audio": "1 s WAV (no transcode)",
                   "source": "/proc/<pid>/stat utime+stime", "note": moto_note},
        "data": {"completed": completed, "cpu_s": round(busy, 3), "wall_s": round(t2 - t1, 3),
                 "idle_cpu_ms_per_s": round(idle_rate * 1000, 3), "jobs_per_s": round(completed / (t2 - t1), 2),
                 "cpu_per_job_net_idle_ms": round(net / completed * 1000, 3),
                 "cpu_ms_per_job_by_process": {k: round(v / completed * 1000, 2) for k, v in used.items()},
                 "machine_busy": round(sum(used.values()) / ((t2 - t1) * CORES), 2)},
        "figures": [
            figure("daemon CPU per job", round(per_job_ms, 2), "ms", target=f"<= {CPU_TARGET_MS:g} ms",
                   met=per_job_ms <= CPU_TARGET_MS, key="cpu_ms_per_job"),
            figure("daemon CPU per job, idle baseline subtracted", round(net / completed * 1000, 2), "ms",
                   key="cpu_ms_per_job_net"),
            figure("idle daemon CPU", round(idle_rate * 1000, 2), "ms/s", key="idle_cpu_ms_per_s"),
            figure("moto CPU per job (the local stand-in for SQS and S3)",
                   round(used["moto"] / completed * 1000, 2), "ms", key="moto_cpu_ms_per_job"),
            figure("jobs/s at zero latency (CPU-bound, whole stack on 2 cores)",
                   round(completed / (t2 - t1), 1), "jobs/s", key="jobs_per_s_zero_latency"),
        ],
    }
