"""Peak memory of the prepare-audio stage on a 500 MB recording: probe, has_speech, prepare.

    .venv/bin/python bench/audio_memory.py [--megabytes 500] [--keep DIR]

Writes a 16 kHz mono 16-bit WAV of the requested size (500 MB is about 4 h 20 min) to a temp dir,
a second at a time, then runs the stage in a child process with the OpenAI gpt-4o-transcribe limits
and prints one JSON object: the child's peak RSS, its wall and CPU time, and the parts it wrote. The
target is a peak under 250 MB, whatever the recording's length.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from consumer import audio  # noqa: E402
from consumer.transcribe_openai import OpenAITranscriber  # noqa: E402

RATE = 16_000
TARGET_RSS_MB = 250


def write_wav(path: Path, megabytes: int) -> float:
    """Speech-like talk turns over room noise, streamed to `path`; returns the length in seconds."""
    seconds = megabytes * 1_000_000 // (2 * RATE)
    rng = np.random.default_rng(1)
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=RATE)
        stream.layout = "mono"
        for second in range(seconds):
            t = second + np.arange(RATE) / RATE
            talking = (t % 9.0) < 7.5  # 7.5 s turns, 1.5 s pauses
            voice = 0.15 * (0.6 + 0.4 * np.abs(np.sin(2 * np.pi * 2.5 * t))) * np.sin(2 * np.pi * 140 * t)
            signal = rng.standard_normal(RATE) * 0.001 + np.where(talking, voice, 0.0)
            frame = av.AudioFrame.from_ndarray((signal * 32767).astype(np.int16).reshape(1, -1), layout="mono")
            frame.sample_rate, frame.pts = RATE, second * RATE
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return float(seconds)


def stage(path: Path, workdir: Path, queue: multiprocessing.Queue[dict[str, object]]) -> None:
    """The child: what pipeline.process does between fetch and transcribe."""
    limits = OpenAITranscriber(client=None, model="gpt-4o-transcribe").limits  # type: ignore[arg-type]
    wall, cpu = time.perf_counter(), time.process_time()
    info = audio.probe(path)
    speech = audio.has_speech(path, info)
    parts = audio.prepare(path, info, limits, workdir)
    queue.put(
        {
            "duration_s": round(info.duration, 1),
            "has_speech": speech,
            "parts": len(parts),
            "longest_part_s": round(max(p.duration or 0.0 for p in parts), 1),
            "largest_part_bytes": max(p.path.stat().st_size for p in parts),
            "limits": {"max_bytes": limits.max_bytes, "max_seconds": limits.max_seconds},
            "wall_s": round(time.perf_counter() - wall, 1),
            "cpu_s": round(time.process_time() - cpu, 1),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=500)
    parser.add_argument("--keep", type=Path, help="write into this directory and leave the files there")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="audio-memory-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        source = workdir / "recording.wav"
        started = time.perf_counter()
        write_wav(source, args.megabytes)
        generated = time.perf_counter() - started
        # A fresh process (spawn, not fork) so its peak RSS is the stage's and not this script's.
        context = multiprocessing.get_context("spawn")
        queue: multiprocessing.Queue[dict[str, object]] = context.Queue()
        child = context.Process(target=stage, args=(source, workdir, queue))
        child.start()
        child.join()  # the result is a few hundred bytes: it sits in the pipe without blocking the child
        if child.exitcode != 0:
            sys.exit(f"the stage failed in the child (exit code {child.exitcode})")
        result = queue.get(timeout=10)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # kilobytes on Linux
        result.update(
            source_bytes=source.stat().st_size,
            generate_s=round(generated, 1),
            peak_rss_mb=round(peak_mb, 1),
            target_rss_mb=TARGET_RSS_MB,
            ok=peak_mb < TARGET_RSS_MB,
        )
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
