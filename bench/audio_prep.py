"""Item 6: audio preparation speed against the ffmpeg CLI (item 7, long recordings, is bench/long_calls.py).

It uses one hour of 16 kHz mono 16-bit WAV (115 MB: over the 25 MB request limit and the model's
1400 s, so `consumer.audio.prepare` transcodes it to Ogg/Opus and cuts it at pauses; WAV is also taken
off the accepted formats so that --quick's 30 minutes are transcoded too). The prepare
stage runs in a spawned child process so its CPU time is its own; ffmpeg's comes from getrusage.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import Bench, figure
from bench.stack import ROOT, write_wav
from consumer.transcribe import API_FORMATS, AudioLimits
from consumer.transcribe_openai import OpenAITranscriber

HOUR = 3600.0
MODEL = "gpt-transcribe"
FFMPEG = ["-ac", "1", "-ar", "16000", "-c:a", "libopus", "-b:a", "24k"]
# The same encoder settings as consumer.audio_split (voip application, constrained VBR).
FFMPEG_MATCHED = [*FFMPEG, "-application", "voip", "-vbr", "constrained"]


def hour_wav(b: Bench) -> tuple[Path, float]:
    seconds = 1800.0 if b.quick else HOUR
    path = b.cache.get("hour_wav")
    if path is None:
        b.say(f"audio: writing {seconds / 60:.0f} min of 16 kHz mono WAV")
        path = b.cache["hour_wav"] = write_wav(b.tmp / "hour.wav", seconds)
    return path, seconds


def forced_limits() -> AudioLimits:
    """The model's real byte and duration limits, with WAV taken off the accepted formats: always transcode."""
    limits = OpenAITranscriber(client=None, model=MODEL).limits  # type: ignore[arg-type]
    return dataclasses.replace(limits, formats=(limits.formats or API_FORMATS) - {"wav"})


def _prepare_child(path: Path, workdir: Path, out: multiprocessing.Queue[dict[str, Any]]) -> None:
    """probe + prepare with the model's real limits, timed inside the child (imports excluded)."""
    from consumer import audio

    limits = forced_limits()
    wall, cpu = time.perf_counter(), time.process_time()
    info = audio.probe(path)
    parts = audio.prepare(path, info, limits, workdir)
    out.put({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
             "duration_s": info.duration, "parts": [(str(p.path), p.filename, p.offset, p.duration) for p in parts],
             "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             "limits": {"max_bytes": limits.max_bytes, "max_seconds": limits.max_seconds}})


def prepare_hour(b: Bench) -> dict[str, Any]:
    if "hour_prepared" in b.cache:
        return dict(b.cache["hour_prepared"])
    path, _ = hour_wav(b)
    workdir = b.tmp / "hour-parts"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[dict[str, Any]] = context.Queue()
    child = context.Process(target=_prepare_child, args=(path, workdir, queue))
    child.start()
    result = queue.get(timeout=1800)
    child.join(60)
    if child.exitcode != 0:
        raise RuntimeError(f"prepare failed in the child (exit code {child.exitcode})")
    b.cache["hour_prepared"] = result
    return dict(result)


def ffmpeg_binary(b: Bench) -> str | None:
    found = shutil.which("ffmpeg")
    if found:
        return found
    b.say("audio: ffmpeg is missing; running bench/install-deps.sh (apt-get install ffmpeg)")
    status = subprocess.run(["bash", str(ROOT / "bench" / "install-deps.sh")], check=False).returncode
    found = shutil.which("ffmpeg")
    if status != 0 or not found:
        b.say("audio: no ffmpeg: the CLI comparison is skipped (install ffmpeg and rerun `--only audio_speed`)")
    return found


def run_ffmpeg(binary: str, source: Path, target: Path, options: list[str]) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    subprocess.run([binary, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(source), *options,
                    str(target)], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(cpu, 2),
            "bytes": target.stat().st_size}


def speed(b: Bench) -> dict[str, Any]:
    path, seconds = hour_wav(b)
    b.say("audio: consumer.audio.probe + prepare in a child process")
    prep = prepare_hour(b)
    pyav_speed = prep["duration_s"] / prep["cpu_s"]
    parts = prep["parts"]
    row: dict[str, Any] = {
        "audio_s": round(prep["duration_s"], 1), "source_bytes": path.stat().st_size,
        "prepare": {"cpu_s": round(prep["cpu_s"], 2), "wall_s": round(prep["wall_s"], 2),
                    "max_rss_mb": round(prep["max_rss_mb"], 1), "parts": len(parts),
                    "part_seconds": [round(p[3] or 0, 1) for p in parts],
                    "bytes": sum(Path(p[0]).stat().st_size for p in parts), "limits": prep["limits"]},
        "prepare_audio_s_per_cpu_s": round(pyav_speed, 1),
    }
    b.say(f"audio: prepare: {prep['duration_s']:.0f} s of audio in {prep['cpu_s']:.1f} CPU s "
          f"= {pyav_speed:.0f} audio s per CPU s, {len(parts)} parts")
    figures = [figure("prepare: audio seconds per CPU second", round(pyav_speed, 1), "x realtime",
                      key="prepare_speed")]
    binary = ffmpeg_binary(b)
    if binary:
        for name, options in (("ffmpeg", FFMPEG), ("ffmpeg_matched", FFMPEG_MATCHED)):
            result = run_ffmpeg(binary, path, b.tmp / f"{name}.ogg", options)
            result["audio_s_per_cpu_s"] = round(seconds / result["cpu_s"], 1) if result["cpu_s"] else None
            result["command"] = " ".join(["ffmpeg", "-i", "in.wav", *options, "out.ogg"])
            row[name] = result
            b.say(f"audio: {name}: {result['cpu_s']} CPU s = {result['audio_s_per_cpu_s']} audio s per CPU s")
        row["version"] = subprocess.run([binary, "-version"], capture_output=True, text=True,
                                        check=False).stdout.splitlines()[0]
        ratio = pyav_speed / row["ffmpeg"]["audio_s_per_cpu_s"]
        matched = pyav_speed / row["ffmpeg_matched"]["audio_s_per_cpu_s"]
        row["speed_ratio_vs_ffmpeg"] = round(ratio, 3)
        row["speed_ratio_vs_ffmpeg_matched"] = round(matched, 3)
        figures += [
            figure("ffmpeg CLI: audio seconds per CPU second", row["ffmpeg"]["audio_s_per_cpu_s"], "x realtime",
                   key="ffmpeg_speed"),
            figure("prepare speed / ffmpeg CLI speed", round(ratio, 2), "", key="speed_ratio"),
            figure("prepare speed / ffmpeg with the same Opus options", round(matched, 2), "",
                   key="speed_ratio_matched"),
        ]
    return {"title": "Audio preparation speed", "headline": round(pyav_speed, 1),
            "config": {"input": f"{seconds / 60:.0f} min WAV, 16 kHz mono 16-bit", "model_limits": MODEL},
            **row, "figures": figures}
