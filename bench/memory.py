"""Item 5: peak RSS (VmHWM) of a fresh daemon process while it processes one 10, 100 or 500 MB recording.

The recordings are 48 kHz stereo 16-bit WAV (what a desktop recorder or a DAW export gives), written
ten seconds at a time: 10 MB is 52 s (sent to the API as it is), 100 MB 8.7 min and 500 MB 43 min
(both over the 25 MB request limit, so transcoded to Ogg/Opus and cut). `bench/audio_memory.py` is
the stage-only variant (500 MB of 16 kHz mono, 4 h 20 min, in a child process without the daemon).
"""

from __future__ import annotations

import time
from typing import Any

from boto3.s3.transfer import TransferConfig

from bench.common import Bench, figure
from bench.stack import send_job, wav_seconds_for, write_wav

TARGET_MB = 250.0
RATE, CHANNELS = 48_000, 2


def one(b: Bench, megabytes: int) -> dict[str, Any]:
    seconds = wav_seconds_for(megabytes, rate=RATE, channels=CHANNELS)
    path = b.tmp / f"rec-{megabytes}mb.wav"
    started = time.monotonic()
    write_wav(path, seconds, rate=RATE, channels=CHANNELS)
    aws = b.stack()
    key = f"audio/rec-{megabytes}mb.wav"
    aws.s3.upload_file(str(path), aws.bucket, key, Config=TransferConfig(multipart_chunksize=64 * 1024 * 1024))
    size = path.stat().st_size
    path.unlink()
    b.say(f"memory: {megabytes} MB ({seconds / 60:.1f} min) written and uploaded in "
          f"{time.monotonic() - started:.1f} s; starting a fresh daemon")
    requests_before = b.openai.count()
    with b.daemon(aws, CONCURRENCY=4) as d:
        baseline = d.vm_hwm_mb()
        t0 = time.monotonic()
        send_job(aws, f"mem-{megabytes}", key)
        arrived = b.receiver.wait_job(f"mem-{megabytes}", timeout=900)
        deadline = time.monotonic() + 60
        while d.completed() < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        peak = d.vm_hwm_mb()
        rss_after = d.vm_rss_mb()
        done = d.completed()
    with b.openai.lock:
        sent = b.openai.requests[requests_before:]
    row = {"megabytes": megabytes, "bytes": size, "audio_min": round(seconds / 60, 1),
           "peak_rss_mb": round(peak, 1), "baseline_hwm_mb": round(baseline, 1),
           "rss_after_mb": round(rss_after, 1), "completed": done == 1 and arrived is not None,
           "callback_status": b.receiver.status.get(f"mem-{megabytes}", "no callback"),
           "job_wall_s": round((arrived or time.monotonic()) - t0, 1), "api_requests": len(sent),
           "api_files": [f"{r.filename} ({len(r.data) / 1e6:.1f} MB)" for r in sent]}
    b.say(f"memory: {megabytes} MB: peak RSS {peak:.1f} MB (after start-up {baseline:.1f} MB), "
          f"{len(sent)} API request(s), job took {row['job_wall_s']} s")
    return row


def run(b: Bench) -> dict[str, Any]:
    sizes = (10, 100) if b.quick else (10, 100, 500)
    rows = [one(b, mb) for mb in sizes]
    peaks = [r["peak_rss_mb"] for r in rows]
    flat = max(peaks) - min(peaks)
    figures = [figure(f"peak RSS, {r['megabytes']} MB WAV ({r['audio_min']} min)", r["peak_rss_mb"], "MB",
                      target=f"< {TARGET_MB:g} MB", met=r["peak_rss_mb"] < TARGET_MB and r["completed"],
                      key=f"peak_rss_{r['megabytes']}mb") for r in rows]
    figures.append(figure("peak RSS spread across sizes", round(flat, 1), "MB", target="flat (< 50 MB)",
                          met=flat < 50, key="peak_rss_spread"))
    figures.append(figure("daemon VmHWM after start-up, idle", rows[0]["baseline_hwm_mb"], "MB",
                          key="baseline_hwm"))
    return {"title": "Memory", "headline": max(peaks),
            "config": {"format": f"WAV {RATE} Hz, {CHANNELS} channels, 16-bit", "CONCURRENCY": 4,
                       "TRANSCRIBE_PARALLELISM": 4, "latency_s": 0.0,
                       "source": "/proc/<pid>/status VmHWM, a fresh daemon per size"},
            "rows": rows, "figures": figures}
