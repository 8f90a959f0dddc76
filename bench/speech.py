"""Issue 15, items 4 and 5: what cutting costs in accuracy, and how fast the local Whisper backend is here.

Both run the local faster-whisper model the daemon embeds (WHISPER_MODEL, by default .cache/models/whisper-base,
what `make model` fetches) on speech with a known text: bench/data/speech.txt (768 words, a sales call)
read by espeak-ng (en-us, 165 words a minute: 4.2 minutes, 22.05 kHz mono WAV).

    quality    word error rate (jiwer; lower-cased, punctuation removed) of the recording transcribed whole
               against cut the way the daemon cuts it (consumer.audio.prepare with max_seconds=60: Ogg/Opus
               parts cut at pauses, sent with consumer.transcribe.transcribe_parts); also of the whole recording
               transcoded as prepare transcodes it but not cut (WAV taken off the accepted formats), which
               separates the cuts' cost from the codec's, and of the WAV with +-2 LSB of dither, which shows how
               far an inaudible change moves the WER of this model on this reading (the noise floor).
    local_rtf  real-time factor (wall time / audio time) for 1, 10 and 30 minutes of that speech (the
               reading repeated, a second of silence between readings), two ways: the daemon's own path
               (prepare into parts of at most 300 s, transcribe_parts with TRANSCRIBE_PARALLELISM=4, the
               model sized by LocalWhisperTranscriber.from_settings for CONCURRENCY=4 on this machine's
               cores) and faster-whisper's BatchedInferencePipeline over the whole decoded recording.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Bench, figure
from bench.stack import ROOT
from consumer import audio
from consumer.transcribe import API_FORMATS, AudioLimits, AudioPart, Transcriber, transcribe_parts
from consumer.transcribe_local import LocalWhisperTranscriber

TEXT = ROOT / "bench" / "data" / "speech.txt"
DEFAULT_MODEL = ROOT / ".cache" / "models" / "whisper-base"
VOICE, WORDS_PER_MINUTE = "en-us", 165
CUT_SECONDS = 60.0
WER_TARGET_PP = 0.5
MINUTES = (1, 10, 30)
BATCH_SIZE = 8  # BatchedInferencePipeline.transcribe's default
DAEMON_CONCURRENCY, DAEMON_PARALLELISM = 4, 4  # the Settings defaults from_settings sizes the model for


def model_path() -> Path:
    path = Path(os.environ.get("WHISPER_MODEL") or DEFAULT_MODEL)
    if not (path / "model.bin").exists():
        raise RuntimeError(f"no Whisper model at {path}: run `make model` (or set WHISPER_MODEL)")
    return path


def espeak() -> str:
    found = shutil.which("espeak-ng")
    if found is None:
        subprocess.run(["bash", str(ROOT / "bench" / "install-deps.sh")], check=False)
        found = shutil.which("espeak-ng")
    if found is None:
        raise RuntimeError("espeak-ng is missing: apt-get install espeak-ng (bench/install-deps.sh does it as root)")
    return found


def reading(b: Bench) -> Path:
    """The known text read by espeak-ng, once per run."""
    path = b.tmp / "speech.wav"
    if not path.exists():
        subprocess.run([espeak(), "-v", VOICE, "-s", str(WORDS_PER_MINUTE), "-w", str(path), "-f", str(TEXT)],
                       check=True, capture_output=True)
    return path


def speech_of(b: Bench, minutes: float) -> Path:
    """`minutes` of the reading, repeated with a second of silence between readings, as 16-bit WAV."""
    path = b.tmp / f"speech-{minutes:g}min.wav"
    if path.exists():
        return path
    with wave.open(str(reading(b))) as src:
        rate = src.getframerate()
        one = np.frombuffer(src.readframes(src.getnframes()), dtype="<i2")
    unit = np.concatenate([one, np.zeros(rate, dtype="<i2")])
    total = int(minutes * 60 * rate)
    pcm = np.tile(unit, -(-total // len(unit)))[:total]
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return path


def wer(reference: str, hypothesis: str) -> float:
    import jiwer

    normal = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                            jiwer.Strip(), jiwer.ReduceToListOfListOfWords()])
    return float(jiwer.wer(reference, hypothesis, reference_transform=normal, hypothesis_transform=normal))


def dithered(path: Path, out: Path) -> Path:
    """The recording with +-2 LSB of noise: inaudible, but enough to send Whisper's decoding down other paths."""
    with wave.open(str(path)) as src:
        params = src.getparams()
        pcm = np.frombuffer(src.readframes(src.getnframes()), dtype="<i2").astype(np.int32)
    noise = np.random.default_rng(3).integers(-2, 3, len(pcm))
    with wave.open(str(out), "wb") as dst:
        dst.setparams(params)
        dst.writeframes(np.clip(pcm + noise, -32768, 32767).astype("<i2").tobytes())
    return out


def _transcribe(transcriber: Transcriber, parts: list[AudioPart], parallelism: int) -> tuple[str, float]:
    started = time.perf_counter()
    transcript = transcribe_parts(transcriber, parts, language="en", prompt=None, parallelism=parallelism)
    return transcript.text, time.perf_counter() - started


def _prepared(path: Path, limits: AudioLimits, workdir: Path) -> tuple[list[AudioPart], float]:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    started = time.perf_counter()
    parts = audio.prepare(path, audio.probe(path), limits, workdir)
    return parts, time.perf_counter() - started


def quality(b: Bench) -> dict[str, Any]:
    model = model_path()
    path = reading(b)
    reference = TEXT.read_text()
    transcriber = LocalWhisperTranscriber(model, device="cpu", num_workers=1, cpu_threads=os.cpu_count() or 1)
    info = audio.probe(path)
    whole = [AudioPart(path=path, filename=path.name, offset=0.0, duration=info.duration)]
    # The daemon's own encoding without cuts: WAV off the accepted formats, so prepare transcodes it whole.
    encoded, _ = _prepared(path, AudioLimits(max_bytes=None, max_seconds=None, formats=API_FORMATS - {"wav"}),
                           b.tmp / "quality-encoded")
    cut, _ = _prepared(path, AudioLimits(max_bytes=None, max_seconds=CUT_SECONDS, formats=None),
                       b.tmp / "quality-cut")
    results = {}
    noisy = dithered(path, b.tmp / "speech-dithered.wav")
    dither = [AudioPart(path=noisy, filename=noisy.name, offset=0.0, duration=info.duration)]
    for name, parts in (("whole", whole), ("dithered", dither), ("encoded", encoded), ("parts", cut)):
        text, seconds = _transcribe(transcriber, parts, DAEMON_PARALLELISM)
        results[name] = {"wer": round(wer(reference, text), 4), "parts": len(parts), "wall_s": round(seconds, 1),
                         "formats": sorted({p.path.suffix for p in parts}),
                         "part_seconds": [round(p.duration or 0, 1) for p in parts], "text": text}
        b.say(f"quality: {name}: {len(parts)} part(s), WER {results[name]['wer']:.2%} ({seconds:.0f} s)")
    difference = (results["parts"]["wer"] - results["whole"]["wer"]) * 100
    cut_alone = (results["parts"]["wer"] - results["encoded"]["wer"]) * 100
    noise = (results["dithered"]["wer"] - results["whole"]["wer"]) * 100
    return {"title": "Quality kept when cutting", "headline": round(difference, 2),
            "config": {"model": model.name, "text": "bench/data/speech.txt", "words": len(reference.split()),
                       "voice": f"espeak-ng -v {VOICE} -s {WORDS_PER_MINUTE}", "max_seconds": CUT_SECONDS,
                       "transcribe_parallelism": DAEMON_PARALLELISM, "normalisation": "lower case, no punctuation"},
            "audio_s": round(info.duration, 1), "wer_whole": results["whole"]["wer"],
            "wer_encoded": results["encoded"]["wer"], "wer_parts": results["parts"]["wer"],
            "difference_pp": round(difference, 2), "cut_alone_pp": round(cut_alone, 2),
            "dither_noise_pp": round(noise, 2), "runs": results,
            "figures": [
                figure("WER, whole recording (WAV)", round(results["whole"]["wer"] * 100, 2), "%", key="wer_whole"),
                figure("WER, whole recording with +-2 LSB dither (how much a tiny change moves WER)",
                       round(results["dithered"]["wer"] * 100, 2), "%", key="wer_dithered"),
                figure(f"WER, whole recording transcoded as the daemon does ({', '.join(results['encoded']['formats'])}"
                       ", no cuts)", round(results["encoded"]["wer"] * 100, 2), "%", key="wer_encoded"),
                figure(f"WER, cut as the daemon cuts ({len(cut)} {', '.join(results['parts']['formats'])} parts "
                       f"of <= {CUT_SECONDS:g} s)",
                       round(results["parts"]["wer"] * 100, 2), "%", key="wer_parts"),
                figure("WER cut - WER whole", round(difference, 2), "points",
                       target=f"within {WER_TARGET_PP} points", met=abs(difference) <= WER_TARGET_PP,
                       key="wer_difference"),
                figure("WER cut - WER whole transcoded (the cuts alone)", round(cut_alone, 2), "points",
                       key="wer_cut_alone"),
            ]}


def _daemon_path(transcriber: LocalWhisperTranscriber, path: Path, workdir: Path) -> dict[str, float]:
    parts, prepare_s = _prepared(path, transcriber.limits, workdir)
    _, transcribe_s = _transcribe(transcriber, parts, DAEMON_PARALLELISM)
    return {"wall_s": round(prepare_s + transcribe_s, 1), "prepare_s": round(prepare_s, 1), "parts": len(parts)}


def _batched(pipeline: Any, path: Path) -> float:
    from faster_whisper import decode_audio

    started = time.perf_counter()
    segments, _ = pipeline.transcribe(decode_audio(str(path), sampling_rate=16_000), language="en",
                                      batch_size=BATCH_SIZE)
    for _ in segments:  # the segments are lazy: the model runs while they are read
        pass
    return time.perf_counter() - started


def local_rtf(b: Bench) -> dict[str, Any]:
    """RTF for 1, 10 and 30 minutes; what is not measured (see `measured`) is extrapolated from 10 minutes."""
    from faster_whisper import BatchedInferencePipeline

    model = model_path()
    settings = _daemon_settings(model)
    daemon_model = LocalWhisperTranscriber.from_settings(settings)
    batched_model = LocalWhisperTranscriber(model, device="cpu", num_workers=1, cpu_threads=os.cpu_count() or 1)
    pipeline = BatchedInferencePipeline(model=batched_model._whisper)
    # 30 minutes on the daemon's path alone takes ~4 minutes here; its parts are 300 s each however long the
    # recording, so its RTF at 30 minutes follows from 10 (the extrapolation is marked as such).
    measured = {1: ("daemon", "batched")} if b.quick else {1: ("daemon", "batched"), 10: ("daemon", "batched"),
                                                           30: ("batched",)}
    rows = []
    for minutes in MINUTES:
        path = speech_of(b, minutes)
        seconds = minutes * 60.0
        row: dict[str, Any] = {"minutes": minutes, "audio_s": seconds, "extrapolated": []}
        if "daemon" in measured.get(minutes, ()):
            run = _daemon_path(daemon_model, path, b.tmp / "rtf-parts")
            row.update(rtf=round(run["wall_s"] / seconds, 4), daemon=run)
        if "batched" in measured.get(minutes, ()):
            wall = _batched(pipeline, path)
            row.update(batched_rtf=round(wall / seconds, 4), batched_wall_s=round(wall, 1))
        for key in ("rtf", "batched_rtf"):
            if key not in row:
                source = max((r for r in rows if key not in r["extrapolated"]), key=lambda r: r["minutes"])
                row[key] = source[key]
                row["extrapolated"].append(key)
        b.say(f"local_rtf: {minutes} min: daemon path RTF {row['rtf']:.3f}, batched {row['batched_rtf']:.3f}"
              f"{' (extrapolated: ' + ', '.join(row['extrapolated']) + ')' if row['extrapolated'] else ''}")
        rows.append(row)
    figures = []
    for r in rows:
        note = " (extrapolated)" if "rtf" in r["extrapolated"] else ""
        figures.append(figure(f"RTF, {r['minutes']} min, the daemon's path{note}", r["rtf"], "",
                              key=f"rtf_{r['minutes']}"))
        note = " (extrapolated)" if "batched_rtf" in r["extrapolated"] else ""
        figures.append(figure(f"RTF, {r['minutes']} min, BatchedInferencePipeline{note}", r["batched_rtf"], "",
                              key=f"batched_rtf_{r['minutes']}"))
    faster = [r["minutes"] for r in rows if r["batched_rtf"] < r["rtf"]]
    return {"title": "Local Whisper real-time factor", "headline": rows[-1]["batched_rtf"],
            "config": {"model": model.name, "device": daemon_model.device, "compute_type": daemon_model.compute_type,
                       "daemon_workers_threads": _sizing(settings), "batched": f"1 worker x {os.cpu_count()} "
                       f"threads, batch_size {BATCH_SIZE}", "speech": "bench/data/speech.txt read by espeak-ng, "
                       "repeated", "part_seconds": daemon_model.limits.max_seconds},
            "rows": rows, "batched_faster_at_minutes": faster, "figures": figures}


def _daemon_settings(model: Path) -> Any:
    from consumer.settings import Settings

    return Settings(_env_file=None, transcriber="local", whisper_model=str(model), whisper_device="cpu",  # type: ignore[call-arg]
                    concurrency=DAEMON_CONCURRENCY, transcribe_parallelism=DAEMON_PARALLELISM)


def _sizing(settings: Any) -> str:
    calls = settings.concurrency * settings.transcribe_parallelism
    cpus = len(os.sched_getaffinity(0))
    workers = max(1, min(calls, cpus))
    return f"{workers} workers x {max(1, cpus // workers)} threads (from_settings for {calls} calls on {cpus} cores)"

