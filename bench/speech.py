"""Issue 15, items 4 and 5: what cutting costs in accuracy, and how fast the local Whisper backend is here.

Both run the local faster-whisper model the daemon embeds (WHISPER_MODEL, by default .cache/models/whisper-base,
what `make model` fetches) on speech with a known text: the four texts in bench/data/speech*.txt (3,092 words:
a sales call, a renewal call, a support call, a sales meeting) each read by espeak-ng (en-us, 165 words a
minute: ~4.2 minutes each, 22.05 kHz mono WAV), and the long recording made of the four readings one after
another, a second of silence between them (16.8 minutes).

    quality    word error rate (jiwer; lower-cased, punctuation removed, one reference word per word) of
               the long recording transcribed whole against cut the way the daemon cuts it with its
               default settings (consumer.audio.prepare with the local model's limits and
               consumer.transcribe.parts_hint: TRANSCRIBE_PARALLELISM, but no more parts than the model
               sized by from_settings works on at once; the parts sent with transcribe_parts); of each
               reading whole against cut (the densest cut the daemon makes: parts of about a minute, its
               MIN_PART_SECONDS); and of the long recording with +-2 LSB of dither, which shows how far an
               inaudible change moves the WER of this model on this speech (the noise floor).
    local_rtf  real-time factor (wall time / audio time) for 1, 10 and 30 minutes of that speech (the long
               recording, repeated for 30 minutes), two ways: the daemon's own path (prepare into parts,
               transcribe_parts with TRANSCRIBE_PARALLELISM, the model sized by
               LocalWhisperTranscriber.from_settings, all for the default Settings on this machine's cores)
               and faster-whisper's BatchedInferencePipeline over the whole decoded recording.
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
from consumer.transcribe import AudioPart, Transcriber, parts_hint, transcribe_parts
from consumer.transcribe_local import LocalWhisperTranscriber

TEXTS = tuple(ROOT / "bench" / "data" / f"speech{name}.txt" for name in ("", "-renewal", "-support", "-meeting"))
DEFAULT_MODEL = ROOT / ".cache" / "models" / "whisper-base"
VOICE, WORDS_PER_MINUTE = "en-us", 165
WER_TARGET_PP = 0.5
MINUTES = (1, 10, 30)
BATCH_SIZE = 8  # BatchedInferencePipeline.transcribe's default


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


def reading(b: Bench, text: Path) -> Path:
    """One text read by espeak-ng, once per run."""
    path = b.tmp / f"{text.stem}.wav"
    if not path.exists():
        subprocess.run([espeak(), "-v", VOICE, "-s", str(WORDS_PER_MINUTE), "-w", str(path), "-f", str(text)],
                       check=True, capture_output=True)
    return path


def _pcm(path: Path) -> tuple[int, np.ndarray]:
    with wave.open(str(path)) as src:
        return src.getframerate(), np.frombuffer(src.readframes(src.getnframes()), dtype="<i2")


def _write(path: Path, rate: int, pcm: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.astype("<i2").tobytes())
    return path


def long_reading(b: Bench) -> Path:
    """The four readings one after another, a second of silence after each: 16.8 minutes."""
    path = b.tmp / "speech-long.wav"
    if not path.exists():
        pieces = [_pcm(reading(b, text)) for text in TEXTS]
        rate = pieces[0][0]
        _write(path, rate, np.concatenate([x for _, pcm in pieces for x in (pcm, np.zeros(rate, "<i2"))]))
    return path


def speech_of(b: Bench, minutes: float) -> Path:
    """`minutes` of the long reading (repeated when longer), as 16-bit WAV."""
    path = b.tmp / f"speech-{minutes:g}min.wav"
    if not path.exists():
        rate, pcm = _pcm(long_reading(b))
        total = int(minutes * 60 * rate)
        _write(path, rate, np.tile(pcm, -(-total // len(pcm)))[:total])
    return path


def reference(texts: tuple[Path, ...] = TEXTS) -> str:
    # One space between words: jiwer splits on spaces only, so a line break left in would glue the last
    # word of a line to the first of the next into one reference "word" that no transcript can match.
    return " ".join(" ".join(text.read_text().split()) for text in texts)


def errors(ref: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words) after lower-casing and removing punctuation."""
    import jiwer

    normal = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                            jiwer.Strip(), jiwer.ReduceToListOfListOfWords()])
    out = jiwer.process_words(" ".join(ref.split()), " ".join(hypothesis.split()),
                              reference_transform=normal, hypothesis_transform=normal)
    return out.substitutions + out.deletions + out.insertions, sum(len(words) for words in out.references)


def dithered(path: Path, out: Path) -> Path:
    """The recording with +-2 LSB of noise: inaudible, but enough to send Whisper's decoding down other paths."""
    rate, pcm = _pcm(path)
    noise = np.random.default_rng(3).integers(-2, 3, len(pcm))
    return _write(out, rate, np.clip(pcm.astype(np.int32) + noise, -32768, 32767))


def _transcribe(transcriber: Transcriber, parts: list[AudioPart], parallelism: int) -> tuple[str, float]:
    started = time.perf_counter()
    transcript = transcribe_parts(transcriber, parts, language="en", prompt=None, parallelism=parallelism)
    return transcript.text, time.perf_counter() - started


def _whole(path: Path) -> list[AudioPart]:
    return [AudioPart(path=path, filename=path.name, offset=0.0, duration=audio.probe(path).duration)]


def _prepared(path: Path, transcriber: Transcriber, workdir: Path, hint: int) -> tuple[list[AudioPart], float]:
    """The daemon's cut: what pipeline.process does for this transcriber and `hint` (consumer.transcribe.parts_hint)."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    started = time.perf_counter()
    parts = audio.prepare(path, audio.probe(path), transcriber.limits, workdir, parts_hint=hint)
    return parts, time.perf_counter() - started


def quality(b: Bench) -> dict[str, Any]:
    model = model_path()
    settings = _daemon_settings(model)
    parallelism = settings.transcribe_parallelism
    # The daemon's cut: as many parts as its transcriber (sized by from_settings) asks for, not the one here.
    hint = parts_hint(LocalWhisperTranscriber.from_settings(settings), parallelism)
    transcriber = LocalWhisperTranscriber(model, device="cpu", num_workers=1, cpu_threads=os.cpu_count() or 1)
    long = long_reading(b)
    noisy = dithered(long, b.tmp / "speech-long-dithered.wav")
    runs: dict[str, dict[str, Any]] = {}

    def run(name: str, pieces: list[tuple[Path, list[AudioPart]]]) -> None:
        wrong = words = 0
        seconds, texts = 0.0, []
        for text_path, parts in pieces:
            text, took = _transcribe(transcriber, parts, parallelism)
            e, n = errors(reference((text_path,)) if text_path != long else reference(), text)
            wrong, words, seconds = wrong + e, words + n, seconds + took
            texts.append(text)
        runs[name] = {"wer": round(wrong / words, 4), "errors": wrong, "words": words, "wall_s": round(seconds, 1),
                      "parts": [len(parts) for _, parts in pieces],
                      "part_seconds": [[round(p.duration or 0, 1) for p in parts] for _, parts in pieces],
                      "formats": sorted({p.path.suffix for _, parts in pieces for p in parts}), "text": texts}
        b.say(f"quality: {name}: {sum(runs[name]['parts'])} part(s), WER {wrong / words:.2%} "
              f"({wrong} errors in {words} words, {seconds:.0f} s)")

    run("long_whole", [(long, _whole(long))])
    run("long_dithered", [(long, _whole(noisy))])
    run("long_cut", [(long, _prepared(long, transcriber, b.tmp / "quality-long", hint)[0])])
    paths = [(text, reading(b, text)) for text in TEXTS]
    run("readings_whole", [(text, _whole(path)) for text, path in paths])
    run("readings_cut", [(text, _prepared(path, transcriber, b.tmp / f"quality-{text.stem}", hint)[0])
                         for text, path in paths])

    def points(a: str, c: str) -> float:
        return round((runs[a]["wer"] - runs[c]["wer"]) * 100, 2)

    difference, dense, noise = (points("long_cut", "long_whole"), points("readings_cut", "readings_whole"),
                                points("long_dithered", "long_whole"))
    long_parts, reading_parts = runs["long_cut"]["part_seconds"][0], runs["readings_cut"]["part_seconds"]
    long_cut = (f"{len(long_parts)} {'/'.join(runs['long_cut']['formats'])} parts of "
                f"{min(long_parts):.0f}-{max(long_parts):.0f} s")
    return {"title": "Quality kept when cutting", "headline": difference,
            "config": {"model": model.name, "texts": [str(t.relative_to(ROOT)) for t in TEXTS],
                       "words": runs["long_whole"]["words"], "voice": f"espeak-ng -v {VOICE} -s {WORDS_PER_MINUTE}",
                       "limits_max_seconds": transcriber.limits.max_seconds, "parts_hint": hint,
                       "transcribe_parallelism": parallelism, "normalisation": "lower case, no punctuation"},
            "audio_s": round(audio.probe(long).duration, 1), "wer_whole": runs["long_whole"]["wer"],
            "wer_parts": runs["long_cut"]["wer"], "difference_pp": difference, "readings_difference_pp": dense,
            "dither_noise_pp": noise, "runs": runs,
            "figures": [
                figure("WER, long recording whole (WAV)", round(runs["long_whole"]["wer"] * 100, 2), "%",
                       key="wer_whole"),
                figure("WER, long recording whole with +-2 LSB dither (how much a tiny change moves WER)",
                       round(runs["long_dithered"]["wer"] * 100, 2), "%", key="wer_dithered"),
                figure(f"WER, long recording cut as the daemon cuts ({long_cut})",
                       round(runs["long_cut"]["wer"] * 100, 2), "%", key="wer_parts"),
                figure("WER cut - WER whole, long recording", difference, "points",
                       target=f"within {WER_TARGET_PP} points", met=abs(difference) <= WER_TARGET_PP,
                       key="wer_difference"),
                figure("WER dithered - WER whole (the noise floor)", noise, "points", key="wer_dither_noise"),
                figure("WER, the four readings whole", round(runs["readings_whole"]["wer"] * 100, 2), "%",
                       key="wer_readings_whole"),
                figure(f"WER, the four readings cut as the daemon cuts ({'+'.join(str(len(p)) for p in reading_parts)}"
                       f" parts of {min(map(min, reading_parts)):.0f}-{max(map(max, reading_parts)):.0f} s)",
                       round(runs["readings_cut"]["wer"] * 100, 2), "%", key="wer_readings_cut"),
                figure("WER cut - WER whole, readings (the densest cut: parts of about a minute)", dense, "points",
                       key="wer_readings_difference"),
            ]}


def _daemon_path(transcriber: LocalWhisperTranscriber, path: Path, workdir: Path, parallelism: int) -> dict[str, Any]:
    parts, prepare_s = _prepared(path, transcriber, workdir, parts_hint(transcriber, parallelism))
    _, transcribe_s = _transcribe(transcriber, parts, parallelism)
    return {"wall_s": round(prepare_s + transcribe_s, 1), "prepare_s": round(prepare_s, 1), "parts": len(parts),
            "part_seconds": [round(p.duration or 0, 1) for p in parts]}


def _batched(pipeline: Any, path: Path) -> float:
    from faster_whisper import decode_audio

    started = time.perf_counter()
    segments, _ = pipeline.transcribe(decode_audio(str(path), sampling_rate=16_000), language="en",
                                      batch_size=BATCH_SIZE)
    for _ in segments:  # the segments are lazy: the model runs while they are read
        pass
    return time.perf_counter() - started


def local_rtf(b: Bench) -> dict[str, Any]:
    """RTF for 1, 10 and 30 minutes, every figure measured (--quick: 1 minute only)."""
    from faster_whisper import BatchedInferencePipeline

    model = model_path()
    settings = _daemon_settings(model)
    daemon_model = LocalWhisperTranscriber.from_settings(settings)
    batched_model = LocalWhisperTranscriber(model, device="cpu", num_workers=1, cpu_threads=os.cpu_count() or 1)
    pipeline = BatchedInferencePipeline(model=batched_model._whisper)
    rows = []
    for minutes in MINUTES[:1] if b.quick else MINUTES:
        path = speech_of(b, minutes)
        seconds = minutes * 60.0
        run = _daemon_path(daemon_model, path, b.tmp / "rtf-parts", settings.transcribe_parallelism)
        wall = _batched(pipeline, path)
        rows.append({"minutes": minutes, "audio_s": seconds, "rtf": round(run["wall_s"] / seconds, 4), "daemon": run,
                     "batched_rtf": round(wall / seconds, 4), "batched_wall_s": round(wall, 1)})
        b.say(f"local_rtf: {minutes} min: daemon path RTF {rows[-1]['rtf']:.3f} ({run['parts']} parts), "
              f"batched {rows[-1]['batched_rtf']:.3f}")
    figures = []
    for r in rows:
        figures.append(figure(f"RTF, {r['minutes']} min, the daemon's path ({r['daemon']['parts']} part(s))",
                              r["rtf"], "", key=f"rtf_{r['minutes']}"))
        figures.append(figure(f"RTF, {r['minutes']} min, BatchedInferencePipeline", r["batched_rtf"], "",
                              key=f"batched_rtf_{r['minutes']}"))
    faster = [r["minutes"] for r in rows if r["batched_rtf"] < r["rtf"]]
    return {"title": "Local Whisper real-time factor", "headline": rows[-1]["rtf"],
            "config": {"model": model.name, "device": daemon_model.device, "compute_type": daemon_model.compute_type,
                       "daemon_workers_threads": _sizing(settings), "batched": f"1 worker x {os.cpu_count()} "
                       f"threads, batch_size {BATCH_SIZE}", "speech": "bench/data/speech*.txt read by espeak-ng, "
                       "one after another, repeated", "part_seconds": daemon_model.limits.max_seconds,
                       "transcribe_parallelism": settings.transcribe_parallelism},
            "rows": rows, "batched_faster_at_minutes": faster, "figures": figures}


def _daemon_settings(model: Path) -> Any:
    """The default Settings (CONCURRENCY, TRANSCRIBE_PARALLELISM, ...) with the local model on CPU."""
    from consumer.settings import Settings

    return Settings(_env_file=None, transcriber="local", whisper_model=str(model), whisper_device="cpu")  # type: ignore[call-arg]


def _sizing(settings: Any) -> str:
    calls = settings.concurrency * settings.transcribe_parallelism
    cpus = len(os.sched_getaffinity(0))
    workers = max(1, min(calls, cpus))
    return f"{workers} workers x {max(1, cpus // workers)} threads (from_settings for {calls} calls on {cpus} cores)"
