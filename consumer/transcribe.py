"""The transcribe stage: the `Transcriber` protocol, the audio limits it declares, and chunked transcription.

The backends live beside it: `transcribe_openai.py` (the OpenAI API or a compatible server) and
`transcribe_local.py` (faster-whisper, an optional extra); `build_transcriber` picks one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from consumer.models import Segment, Transcript

if TYPE_CHECKING:
    from consumer.settings import Settings

log = logging.getLogger(__name__)

API_MAX_BYTES = 25 * 1024 * 1024
API_FORMATS = frozenset({"flac", "mp3", "mp4", "mpeg", "mpga", "m4a", "ogg", "wav", "webm"})


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
    source: str  # the sidecar_transcriptions{source} label of a fresh transcript: "api" or "local"

    def transcribe(self, part: AudioPart, *, language: str | None, prompt: str | None) -> Transcript: ...


def build_transcriber(settings: Settings) -> Transcriber:
    """The backend TRANSCRIBER names (openai by default when a key or base URL is set)."""
    if settings.transcriber_kind == "local":
        from consumer.transcribe_local import LocalWhisperTranscriber

        return LocalWhisperTranscriber.from_settings(settings)
    import openai

    from consumer.transcribe_openai import OpenAITranscriber

    client = openai.OpenAI(
        api_key=settings.openai_api_key.get_secret_value() if settings.openai_api_key else "unused",
        base_url=settings.openai_base_url,
        max_retries=settings.openai_max_retries,
        timeout=settings.transcribe_timeout,
    )
    return OpenAITranscriber(client, model=settings.transcribe_model,
                             response_format=settings.transcribe_response_format)


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
