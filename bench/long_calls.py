"""Benchmark 7: a 60-minute browser recording through the daemon, end to end, against its lower bound.

The recording is WebM/Opus as Chrome's MediaRecorder writes it (48 kHz mono Opus at 32 kbit/s in 20 ms
frames, written as a live stream: no duration in the header, no cues; tests/fixtures/make_fixtures.py
writes its chrome.webm the same way) of speech-like talk turns with pauses (bench.stack.write_wav's signal).
The OpenAI stand-in answers after `FIXED_S + PER_AUDIO_SECOND x` the seconds of audio it was sent
(OpenAIStub.latency and .latency_per_audio_second), so a part's transcription time grows with its length.

One fresh daemon per run, the job sent once the recording is in S3:
    wall        SendMessage to the callback's arrival, at the default TRANSCRIBE_PARALLELISM and at 1 (the
                daemon then chooses its parts for one request at a time); the parts of the default run sent
                one after another is computed (download + the sum of their times), not run
    bound       download (the daemon's own `download` stage) + the slowest single part's transcription
                (FIXED_S + PER_AUDIO_SECOND x its seconds): no schedule of the parts can beat it
    prepare     probe + prepare of the same file with gpt-transcribe's limits in a spawned child process:
                its CPU seconds (time.process_time() in the child), and the parts it makes
    first part  SendMessage to the stand-in's receipt of the first part (is sending overlapped with cutting?)
"""

from __future__ import annotations

import multiprocessing
import resource
import shutil
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from bench.common import Bench, figure
from bench.latency import _stage_means
from bench.stack import ROOT, send_job
from tests.stack.openai_stub import TranscriptionRequest, audio_duration

MINUTES = 60
RATE = 48_000
BITRATE = 32_000
FIXED_S = 1.0  # assumed: a request's fixed cost (upload, queueing); not an observed OpenAI figure
PER_AUDIO_SECOND = 0.02  # assumed: 50x real time, so a 20-minute part takes 25 s; configurable here
MODEL = "gpt-transcribe"
CACHE = ROOT / ".cache" / "bench"
BOUND_TARGET, SEQUENTIAL_TARGET = 1.3, 6.0  # issue 15, item 3


def chrome_webm(path: Path, seconds: float) -> Path:
    """Talk turns over room noise as MediaRecorder's WebM/Opus: live (no duration, no cues), 20 ms frames."""
    rng = np.random.default_rng(1)
    with av.open(str(path), "w", format="webm", options={"live": "1"}) as out:
        stream: Any = out.add_stream("libopus", rate=RATE)
        stream.layout = "mono"
        stream.bit_rate = BITRATE
        step = RATE  # PyAV's encoder re-frames to Opus's 20 ms frames itself
        block = 10 * RATE
        for start in range(0, int(seconds * RATE), block):
            t = (start + np.arange(block)) / RATE
            talking = (t % 9.0) < 7.5  # 7.5 s turns, 1.5 s pauses, as bench.stack.write_wav
            voice = 0.15 * (0.6 + 0.4 * np.abs(np.sin(2 * np.pi * 2.5 * t))) * np.sin(2 * np.pi * 140 * t)
            samples = (rng.standard_normal(block) * 0.001 + np.where(talking, voice, 0.0)).astype(np.float32)
            for offset in range(0, block, step):
                frame = av.AudioFrame.from_ndarray(samples[None, offset:offset + step], format="flt", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = RATE, start + offset, Fraction(1, RATE)
                for packet in stream.encode(frame):
                    out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def _prepare_child(path: Path, workdir: Path, out: multiprocessing.Queue[dict[str, Any]]) -> None:
    """probe + prepare with gpt-transcribe's limits, timed inside the child (imports excluded)."""
    from consumer import audio
    from consumer.transcribe_openai import OpenAITranscriber

    limits = OpenAITranscriber(client=None, model=MODEL).limits  # type: ignore[arg-type]
    wall, cpu = time.perf_counter(), time.process_time()
    info = audio.probe(path)
    parts = audio.prepare(path, info, limits, workdir)
    out.put({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
             "duration_s": info.duration, "parts": [round(p.duration or 0.0, 1) for p in parts],
             "formats": sorted({Path(p.filename).suffix for p in parts}),
             "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def prepare_cpu(b: Bench, path: Path) -> dict[str, Any]:
    workdir = b.tmp / "long-parts"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[dict[str, Any]] = context.Queue()
    child = context.Process(target=_prepare_child, args=(path, workdir, queue))
    child.start()
    result = queue.get(timeout=900)
    child.join(60)
    shutil.rmtree(workdir, ignore_errors=True)
    return dict(result)


def one_job(b: Bench, path: Path, seconds: float, **settings: Any) -> dict[str, Any]:
    aws = b.stack()
    aws.s3.upload_file(str(path), aws.bucket, "audio/call.webm")
    arrivals: list[tuple[float, float]] = []

    def seen(request: TranscriptionRequest) -> None:
        arrivals.append((time.monotonic(), audio_duration(request.data)))

    b.openai.latency, b.openai.latency_per_audio_second, b.openai.on_request = FIXED_S, PER_AUDIO_SECOND, seen
    job = f"long-{settings.get('TRANSCRIBE_PARALLELISM', 'default')}-{int(time.monotonic())}"
    try:
        with b.daemon(aws, CONCURRENCY=4, TRANSCRIBE_TIMEOUT=600, **settings) as d:
            time.sleep(1.0)
            cpu0 = d.cpu_seconds()
            sent = time.monotonic()
            send_job(aws, job, "audio/call.webm")
            arrived = b.receiver.wait_job(job, timeout=60 + 4 * seconds * PER_AUDIO_SECOND + 20 * FIXED_S)
            if arrived is None:
                raise RuntimeError(f"no callback for the {seconds / 60:.0f}-minute recording")
            cpu = d.cpu_seconds() - cpu0
            stages = _stage_means(d.metrics())
    finally:
        b.openai.latency, b.openai.latency_per_audio_second, b.openai.on_request = 0.0, 0.0, None
    b.receiver.check([job])
    parts = [round(s, 1) for _, s in arrivals]
    slowest = FIXED_S + PER_AUDIO_SECOND * max(parts)
    download = stages.get("download", 0.0) / 1000
    return {"wall_s": round(arrived - sent, 2), "daemon_cpu_s": round(cpu, 2), "parts_sent_s": parts,
            "first_part_sent_after_s": round(min(t for t, _ in arrivals) - sent, 2),
            "download_s": round(download, 2), "slowest_part_s": round(slowest, 2),
            "lower_bound_s": round(download + slowest, 2), "stage_means_ms": stages,
            # what the same parts would take sent one after another: computed from the stand-in's rule
            "same_parts_in_sequence_s": round(download + sum(FIXED_S + PER_AUDIO_SECOND * p for p in parts), 2)}


def run(b: Bench) -> dict[str, Any]:
    minutes = 20 if b.quick else MINUTES
    seconds = minutes * 60.0
    path = CACHE / f"call-{minutes}min-{BITRATE // 1000}k.webm"  # deterministic: kept between runs
    if not path.exists():
        b.say(f"long: writing {minutes} min of WebM/Opus as MediaRecorder does (once, into .cache/bench)")
        CACHE.mkdir(parents=True, exist_ok=True)
        chrome_webm(path.with_suffix(".partial"), seconds).rename(path)
    b.say(f"long: {path.stat().st_size / 1e6:.1f} MB; prepare in a child process")
    prep = prepare_cpu(b, path)
    b.say(f"long: prepare {prep['cpu_s']:.1f} CPU s, {prep['wall_s']:.1f} s wall, parts {prep['parts']}")
    runs = {}
    for label, settings in (("parallel", {}), ("sequential", {"TRANSCRIBE_PARALLELISM": 1})):
        runs[label] = one_job(b, path, seconds, **settings)
        r = runs[label]
        b.say(f"long: {label}: {r['wall_s']} s from send to callback (bound {r['lower_bound_s']} s), "
              f"parts {r['parts_sent_s']}, first part after {r['first_part_sent_after_s']} s")
    par, seq = runs["parallel"], runs["sequential"]
    over_bound = par["wall_s"] / par["lower_bound_s"]
    speedup = seq["wall_s"] / par["wall_s"]
    return {"title": "Long recordings", "headline": round(over_bound, 2),
            "config": {"recording": f"{minutes} min WebM/Opus, 48 kHz mono, {BITRATE // 1000} kbit/s, live",
                       "bytes": path.stat().st_size, "stand_in": f"{FIXED_S:g} s + {PER_AUDIO_SECOND:g} s "
                       "per audio second", "model_limits": MODEL, "audio_s": seconds},
            "prepare": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in prep.items()},
            "runs": runs, "figures": [
                figure("send to callback, default TRANSCRIBE_PARALLELISM", par["wall_s"], "s", key="wall_parallel"),
                figure("lower bound: download + slowest part", par["lower_bound_s"], "s", key="lower_bound"),
                figure("wall / lower bound", round(over_bound, 2), "x", target=f"<= {BOUND_TARGET}",
                       met=over_bound <= BOUND_TARGET, key="over_bound"),
                figure("send to callback, parts one after another (=1)", seq["wall_s"], "s", key="wall_sequential"),
                figure("sequential / parallel", round(speedup, 2), "x", target=f">= {SEQUENTIAL_TARGET:g}",
                       met=speedup >= SEQUENTIAL_TARGET, key="speedup"),
                figure("the same parts one after another (computed: download + each part's time)",
                       par["same_parts_in_sequence_s"], "s", key="same_parts_in_sequence"),
                figure("prepare CPU (probe + prepare, child process)", round(prep["cpu_s"], 2), "s",
                       key="prepare_cpu"),
                figure("first part at the stand-in, after send", par["first_part_sent_after_s"], "s",
                       key="first_part"),
                figure("daemon CPU for the whole job", par["daemon_cpu_s"], "s", key="daemon_cpu"),
            ]}

