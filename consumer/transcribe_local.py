"""The local transcribe backend: faster-whisper (CTranslate2) on this machine, no network at run time.

It owns loading the model once at start-up (problems become a `ConfigError` naming the variable) and the
translation of PyAV and CTranslate2 failures into the project's error tree, by the tables below:

    decoding the audio part      no audio / undecodable   -> PermanentError unsupported_audio
                                 our temp file vanished   -> RetryableError transcription_unavailable
    running the model            anything                 -> RetryableError transcription_unavailable
    language not in the model                             -> PermanentError transcription_rejected
    slower than TRANSCRIBE_TIMEOUT (once it has a worker) -> RetryableError transcription_unavailable

faster-whisper is an optional extra (`pip install 'salestrainer-sidecar[local]'`), imported only here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av

from consumer.errors import ConfigError, ConsumerError, PermanentError, RetryableError
from consumer.models import Segment, Transcript
from consumer.transcribe import AudioLimits, AudioPart

if TYPE_CHECKING:
    from consumer.settings import Settings

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000  # what Whisper's feature extractor expects; decode_audio resamples to it

# faster-whisper holds the whole part in memory: the decoded audio (64 KB/s) and, while it computes the
# mel features of all of it at once, STFT temporaries of ~1.1 MB per second of audio (measured with
# tracemalloc: 327 MB peak for 300 s, 654 MB for 600 s). A 4-hour call in one piece would need ~16 GB,
# so audio.prepare cuts recordings into parts of at most this length; Whisper reads 30 s windows anyway,
# so the only cost of shorter parts is a few more boundaries to stitch.
MAX_PART_SECONDS = 300.0

# Ordered (exception type, retryable?, code); the first isinstance match wins. Order matters: PyAV's
# FileNotFoundError is also an FFmpegError, and a vanished temp file is our problem, not the recording's.
DECODE_ERRORS: tuple[tuple[type[BaseException], bool, str], ...] = (
    (FileNotFoundError, True, "transcription_unavailable"),
    (MemoryError, True, "transcription_unavailable"),
    (av.error.FFmpegError, False, "unsupported_audio"),  # not audio, corrupt, unknown codec
    (IndexError, False, "unsupported_audio"),  # decode_audio's container.decode(audio=0): no audio stream
    (Exception, True, "transcription_unavailable"),
)
# CTranslate2 raises RuntimeError for device trouble (CUDA out of memory, driver errors) and the like;
# none of it says the recording is bad, so every failure of the model is worth another attempt.
MODEL_ERRORS: tuple[tuple[type[BaseException], bool, str], ...] = (
    (MemoryError, True, "transcription_unavailable"),
    (RuntimeError, True, "transcription_unavailable"),
    (Exception, True, "transcription_unavailable"),
)

INSTALL_HINT = (
    "TRANSCRIBER=local needs faster-whisper: pip install 'salestrainer-sidecar[local]' "
    "(or `make model`, which installs it and fetches an offline model)"
)


def translate_error(exc: Exception, table: tuple[tuple[type[BaseException], bool, str], ...]) -> ConsumerError:
    """Map a PyAV/CTranslate2 exception to RetryableError/PermanentError by one of the tables above."""
    retryable, code = next(((r, c) for t, r, c in table if isinstance(exc, t)), (True, "transcription_unavailable"))
    detail = f"faster-whisper: {type(exc).__name__}: {exc}"
    return RetryableError(detail, code=code) if retryable else PermanentError(detail, code=code)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours cgroup/taskset limits, unlike os.cpu_count()
    except AttributeError:
        return os.cpu_count() or 1


def _looks_like_path(value: str) -> bool:
    """True when WHISPER_MODEL names a directory, not a hub model ("base", "Systran/faster-whisper-base")."""
    return value.startswith(("/", "./", "../", "~")) or value.count("/") > 1 or os.path.isdir(value)


class LocalWhisperTranscriber:
    """faster-whisper on CPU or CUDA: one model, shared by every worker thread."""

    supports_prompt = True  # passed as initial_prompt
    source = "local"  # sidecar_transcriptions{source}: transcribed on this machine

    def __init__(
        self,
        model: str | Path,
        *,
        device: str = "auto",
        compute_type: str | None = None,
        num_workers: int = 1,
        cpu_threads: int = 0,
        timeout: float | None = None,
    ) -> None:
        """Load the model now (fail fast at start-up); ConfigError names the variable to fix."""
        try:
            import ctranslate2  # type: ignore[import-untyped]  # no stubs; pyproject ignores only faster_whisper
            from faster_whisper import WhisperModel, decode_audio
        except ImportError as exc:
            raise ConfigError([f"{INSTALL_HINT} ({exc})"]) from None

        source = str(model)
        hint = ""
        if _looks_like_path(source):
            path = Path(source).expanduser()
            _check_model_dir(path)
            source = str(path)
            self.model = f"faster-whisper:{path.resolve().name}"
        else:
            self.model = f"faster-whisper:{source}"
            hint = " (offline: run `make model` and set WHISPER_MODEL to .cache/models/whisper-base)"
        self.device = _resolve_device(device, cuda_devices=ctranslate2.get_cuda_device_count())
        self.compute_type = compute_type or ("float16" if self.device == "cuda" else "int8")
        supported = ctranslate2.get_supported_compute_types(self.device)
        if self.compute_type not in supported:
            raise ConfigError(
                [f"WHISPER_COMPUTE_TYPE: {self.compute_type!r} is not supported on {self.device} "
                 f"(supported: {', '.join(sorted(supported))})"]
            )  # fmt: skip
        self.limits = AudioLimits(max_bytes=None, max_seconds=MAX_PART_SECONDS, formats=None)
        self.timeout = timeout
        self._decode_audio = decode_audio
        # Calls beyond num_workers would only queue inside CTranslate2, each already holding its decoded
        # audio and features (see MAX_PART_SECONDS) and with its TRANSCRIBE_TIMEOUT running. Queuing them
        # here instead bounds memory to num_workers parts and makes the timeout measure work, not waiting.
        self._slots = threading.BoundedSemaphore(max(1, num_workers))
        # Parts beyond what the workers run buy no speed, and each cut costs accuracy: bench 9 measured
        # +0.52 WER points for 8 parts of a 17-minute reading against +0.00 for 4 (2 workers here), at the
        # same real-time factor. Two per worker keeps a worker busy while the next part is cut.
        self.parts_at_once: int | None = 2 * max(1, num_workers)
        started = time.monotonic()
        try:
            # num_workers is CTranslate2's inter_threads: that many replicas serve concurrent transcribe()
            # calls in parallel, sharing one copy of the weights on the same device (CTranslate2 docs,
            # "parallel.md"; faster-whisper issue #100: share one model, raise num_workers, call
            # transcribe() from many threads). transcribe() keeps its state per call (tokenizer, segment
            # generator), so the shared WhisperModel is safe; calls beyond num_workers queue in CTranslate2.
            self._whisper: Any = WhisperModel(
                source,
                device=self.device,
                compute_type=self.compute_type,
                num_workers=num_workers,
                cpu_threads=cpu_threads,
            )
        except Exception as exc:  # ctranslate2 reports a bad model.bin, hub errors, ... as various types
            reason = " ".join(str(exc).split())  # ConfigError is one line per problem; hub errors span several
            raise ConfigError([f"WHISPER_MODEL: cannot load {model!s}: {type(exc).__name__}: {reason}{hint}"]) from exc
        log.info(
            "whisper_model_loaded",
            extra={
                "model": self.model,
                "device": self.device,
                "compute_type": self.compute_type,
                "num_workers": num_workers,
                "cpu_threads": cpu_threads,
                "duration_s": round(time.monotonic() - started, 3),
            },
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalWhisperTranscriber:
        """Build from the WHISPER_* settings, sized for CONCURRENCY * TRANSCRIBE_PARALLELISM calls at once."""
        calls = settings.concurrency * settings.transcribe_parallelism
        cpus = _usable_cpus()
        # WHISPER_DEVICE=auto on a GPU host gets the CPU sizing below, which serves a GPU as well.
        if settings.whisper_device == "cuda":
            num_workers, cpu_threads = min(calls, 4), 0  # a GPU gains little past a few streams
        else:
            # On CPU the cores are the limit: workers * threads = cores; extra calls wait their turn.
            num_workers = max(1, min(calls, cpus))
            cpu_threads = max(1, cpus // num_workers)
        return cls(
            settings.whisper_model,
            device=settings.whisper_device,
            compute_type=settings.whisper_compute_type,
            num_workers=num_workers,
            cpu_threads=cpu_threads,
            timeout=settings.transcribe_timeout,
        )

    def transcribe(self, part: AudioPart, *, language: str | None, prompt: str | None) -> Transcript:
        """Transcribe one part; segments are relative to the part (transcribe_parts shifts them)."""
        if language and language not in self._whisper.supported_languages:
            raise PermanentError(f"{self.model} does not know language {language!r}", code="transcription_rejected")
        with self._slots:
            return self._transcribe(part, language=language, prompt=prompt)

    def _transcribe(self, part: AudioPart, *, language: str | None, prompt: str | None) -> Transcript:
        try:
            audio = self._decode_audio(str(part.path), sampling_rate=SAMPLE_RATE)
        except Exception as exc:
            raise translate_error(exc, DECODE_ERRORS) from exc
        duration = len(audio) / SAMPLE_RATE
        deadline = time.monotonic() + self.timeout if self.timeout else None
        segments: list[Segment] = []
        try:
            pieces, info = self._whisper.transcribe(audio, language=language, initial_prompt=prompt or None)
            # The segments are a lazy generator: the model runs while we iterate, so errors surface here
            # and the deadline can stop it between segments (closing the generator ends the work).
            for piece in pieces:
                segments.append(Segment(start=float(piece.start), end=float(piece.end), text=piece.text.strip()))
                if deadline is not None and time.monotonic() > deadline:
                    pieces.close()
                    raise RetryableError(
                        f"{part.filename}: local transcription exceeded TRANSCRIBE_TIMEOUT ({self.timeout}s)",
                        code="transcription_unavailable",
                    )
        except ConsumerError:
            raise
        except Exception as exc:
            raise translate_error(exc, MODEL_ERRORS) from exc
        text = " ".join(s.text for s in segments if s.text)
        return Transcript(
            text=text,
            language=info.language,
            duration_seconds=round(duration, 3),
            segments=segments,
            no_speech=not text,
        )


def _resolve_device(device: str, *, cuda_devices: int) -> str:
    if device == "auto":
        return "cuda" if cuda_devices > 0 else "cpu"
    if device == "cuda" and cuda_devices == 0:
        raise ConfigError(["WHISPER_DEVICE: cuda requested but CTranslate2 finds no CUDA device"])
    return device


def _check_model_dir(path: Path) -> None:
    """A CTranslate2 Whisper directory needs these; tokenizer.json too, or faster-whisper goes to the hub."""
    if not path.is_dir():
        raise ConfigError([f"WHISPER_MODEL: {path} is not a directory (run `make model` to fetch whisper-base)"])
    missing = [name for name in ("model.bin", "config.json", "tokenizer.json") if not (path / name).is_file()]
    if missing:
        raise ConfigError(
            [f"WHISPER_MODEL: {path} is not a faster-whisper model directory (no {', '.join(missing)}); "
             "run `make model` or convert one with ct2-transformers-converter"]
        )  # fmt: skip
