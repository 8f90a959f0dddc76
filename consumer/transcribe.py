"""The transcribe stage: the `Transcriber` protocol, the OpenAI backend, and chunked transcription.

The OpenAI backend translates the SDK's exceptions into the project's error tree by table, here and
nowhere else. The local faster-whisper backend lives in `transcribe_local.py` (an optional extra).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import openai

from consumer.errors import ConsumerError, PermanentError, RetryableError
from consumer.models import Segment, Transcript

if TYPE_CHECKING:
    from consumer.settings import Settings

log = logging.getLogger(__name__)

API_MAX_BYTES = 25 * 1024 * 1024
API_FORMATS = frozenset({"flac", "mp3", "mp4", "mpeg", "mpga", "m4a", "ogg", "wav", "webm"})

# Longest audio a model accepts in one request, seconds (None: only the byte limit applies). The
# gpt-4o-* transcribe models reject more than 1400 s; the margin keeps us clear of rounding on their side.
MODEL_MAX_SECONDS: dict[str, float | None] = {
    "gpt-4o-transcribe": 1400,
    "gpt-4o-mini-transcribe": 1400,
    "gpt-4o-transcribe-diarize": 1400,
    "gpt-transcribe": 1400,
    "whisper-1": None,
}
DURATION_MARGIN = 0.9
# Models that take the end of the previous chunk as `prompt`.
PROMPT_MODELS = frozenset({"whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-transcribe"})


@dataclass(frozen=True)
class AudioLimits:
    """What one transcription request may carry; audio.prepare cuts the recording to fit."""

    max_bytes: int | None = API_MAX_BYTES
    max_seconds: float | None = None
    formats: frozenset[str] | None = field(default=API_FORMATS)  # None: any format PyAV decodes


@dataclass(frozen=True)
class AudioPart:
    """One file to transcribe: the whole recording or a chunk of it."""

    path: Path
    filename: str  # name sent upstream; its extension must match the format
    offset: float = 0.0  # seconds from the start of the recording
    duration: float | None = None


class Transcriber(Protocol):
    """Turns one audio part into a Transcript; raises only ConsumerError subclasses."""

    model: str
    limits: AudioLimits
    supports_prompt: bool

    def transcribe(self, part: AudioPart, *, language: str | None, prompt: str | None) -> Transcript: ...


# ------------------------------------------------------------------------------------------ OpenAI

# openai exception class -> (retryable?, code). Looked up along the MRO, most specific first.
OPENAI_ERRORS: dict[type[Exception], tuple[bool, str]] = {
    openai.RateLimitError: (True, "rate_limited"),
    openai.APITimeoutError: (True, "transcription_unavailable"),
    openai.APIConnectionError: (True, "transcription_unavailable"),
    openai.InternalServerError: (True, "transcription_unavailable"),
    openai.AuthenticationError: (True, "transcription_unavailable"),  # a key fix should not lose jobs
    openai.PermissionDeniedError: (True, "transcription_unavailable"),
    openai.ConflictError: (True, "transcription_unavailable"),
    openai.BadRequestError: (False, "transcription_rejected"),
    openai.UnprocessableEntityError: (False, "transcription_rejected"),
    openai.NotFoundError: (True, "transcription_unavailable"),  # a mistyped model or URL: fix it, lose nothing
    openai.APIStatusError: (True, "transcription_unavailable"),
}
# Statuses not covered by an SDK subclass: 413 is too large (permanent), 408/425 are transient.
OPENAI_STATUS: dict[int, tuple[bool, str]] = {
    413: (False, "audio_too_large"),
    408: (True, "transcription_unavailable"),
    425: (True, "transcription_unavailable"),
}


def _retry_after(exc: openai.APIStatusError) -> float | None:
    headers = exc.response.headers
    for name in ("retry-after-ms", "retry-after"):
        value = headers.get(name)
        if value:
            try:
                seconds = float(value)
            except ValueError:
                continue
            return seconds / 1000 if name.endswith("-ms") else seconds
    return None


def translate_openai_error(exc: openai.OpenAIError) -> ConsumerError:
    """Map an OpenAI SDK exception to RetryableError/PermanentError by the tables above."""
    status = getattr(exc, "status_code", None)
    if status in OPENAI_STATUS:
        retryable, code = OPENAI_STATUS[status]
    else:
        retryable, code = next(
            (OPENAI_ERRORS[k] for k in type(exc).__mro__ if k in OPENAI_ERRORS),
            (True, "transcription_unavailable"),
        )
    detail = f"OpenAI {status}: {exc}" if status else f"OpenAI: {exc}"
    if retryable:
        delay = _retry_after(exc) if isinstance(exc, openai.APIStatusError) else None
        return RetryableError(detail, code=code, delay=delay)
    return PermanentError(detail, code=code)


class OpenAITranscriber:
    """The OpenAI transcription API (or any compatible server) through the official SDK."""

    supports_prompt = True

    def __init__(self, client: openai.OpenAI, *, model: str) -> None:
        self.client = client
        self.model = model
        max_seconds = MODEL_MAX_SECONDS.get(model)
        self.limits = AudioLimits(max_seconds=max_seconds * DURATION_MARGIN if max_seconds else None)
        self.supports_prompt = model in PROMPT_MODELS or model not in MODEL_MAX_SECONDS

    def transcribe(self, part: AudioPart, *, language: str | None, prompt: str | None) -> Transcript:
        kwargs: dict[str, Any] = {"model": self.model, "response_format": "verbose_json"}
        kwargs["timestamp_granularities"] = ["segment"]
        if language:
            kwargs["language"] = language
        if prompt and self.supports_prompt:
            kwargs["prompt"] = prompt
        try:
            with part.path.open("rb") as fh:
                result = self.client.audio.transcriptions.create(file=(part.filename, fh), **kwargs)
        except openai.OpenAIError as exc:
            raise translate_openai_error(exc) from exc
        data = result.model_dump() if hasattr(result, "model_dump") else dict(result)
        segments = [
            Segment(start=float(s.get("start", 0)), end=float(s.get("end", 0)), text=str(s.get("text", "")))
            for s in (data.get("segments") or [])
        ]
        return Transcript(
            text=str(data.get("text") or "").strip(),
            language=data.get("language"),
            duration_seconds=data.get("duration") or part.duration,
            segments=segments,
        )


def build_transcriber(settings: Settings) -> Transcriber:
    """The backend TRANSCRIBER names (openai by default when a key or base URL is set)."""
    if settings.transcriber_kind == "local":
        from consumer.transcribe_local import LocalWhisperTranscriber

        return LocalWhisperTranscriber.from_settings(settings)
    client = openai.OpenAI(
        api_key=settings.openai_api_key.get_secret_value() if settings.openai_api_key else "unused",
        base_url=settings.openai_base_url,
        max_retries=settings.openai_max_retries,
        timeout=settings.transcribe_timeout,
    )
    return OpenAITranscriber(client, model=settings.transcribe_model)


# ------------------------------------------------------------------------------ chunks and stitching

PROMPT_TAIL_CHARS = 200


def transcribe_parts(
    transcriber: Transcriber,
    parts: Sequence[AudioPart],
    *,
    language: str | None,
    prompt: str | None,
    parallelism: int,
) -> Transcript:
    """Transcribe every part (bounded parallelism) and stitch them in order.

    With parallelism 1 and a model that takes prompts, each chunk is prompted with the end of the
    previous chunk's text; in parallel the chunks cannot wait for each other, so only the job's prompt
    is sent.
    """
    if len(parts) == 1:
        return transcriber.transcribe(parts[0], language=language, prompt=prompt)
    if parallelism <= 1 or not transcriber.supports_prompt:
        results: list[Transcript] = []
        for part in parts:
            chained = prompt
            if results and transcriber.supports_prompt:
                chained = results[-1].text[-PROMPT_TAIL_CHARS:] or prompt
            results.append(transcriber.transcribe(part, language=language, prompt=chained))
    else:
        ex = ThreadPoolExecutor(max_workers=min(parallelism, len(parts)), thread_name_prefix="chunk")
        try:
            futures = [ex.submit(transcriber.transcribe, p, language=language, prompt=prompt) for p in parts]
            results = [f.result() for f in futures]
        finally:
            # One failed chunk fails the attempt: chunks not yet sent are not sent (nor paid for).
            ex.shutdown(wait=True, cancel_futures=True)
    return stitch(parts, results)


def stitch(parts: Sequence[AudioPart], results: Sequence[Transcript]) -> Transcript:
    """Join chunk transcripts: text joined, segments shifted by each chunk's real start offset."""
    segments: list[Segment] = []
    for part, result in zip(parts, results, strict=True):
        segments.extend(
            Segment(start=s.start + part.offset, end=s.end + part.offset, text=s.text) for s in result.segments
        )
    last = parts[-1]
    duration = last.offset + (last.duration or results[-1].duration_seconds or 0.0)
    return Transcript(
        text=" ".join(r.text.strip() for r in results if r.text.strip()),
        language=next((r.language for r in results if r.language), None),
        duration_seconds=round(duration, 3),
        segments=segments,
    )
