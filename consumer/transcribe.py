"""The transcribe stage: the `Transcriber` protocol, the audio limits it declares, and chunked transcription.

The backends live beside it: `transcribe_openai.py` (the OpenAI API or a compatible server) and
`transcribe_local.py` (faster-whisper, an optional extra); `build_transcriber` picks one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
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
    known: Mapping[int, Transcript] | None = None,
    on_part: Callable[[int, Transcript], None] | None = None,
) -> Transcript:
    """Transcribe every part not `known` yet (bounded parallelism) and stitch them all in order.

    `on_part(index, transcript)` runs as each part arrives, in the thread that got it, so a part already
    paid for is kept (the job's record) even when another part fails. With parallelism 1 and a model that
    takes prompts, each part is prompted with the end of the previous part's text; in parallel the parts
    cannot wait for each other, so only the job's prompt is sent.
    """
    results: dict[int, Transcript] = dict(known or {})

    def one(index: int, chained: str | None) -> Transcript:
        transcript = transcriber.transcribe(parts[index], language=language, prompt=chained)
        if on_part is not None:
            on_part(index, transcript)
        return transcript

    todo = [i for i in range(len(parts)) if i not in results]
    if parallelism <= 1 or len(todo) <= 1 or not transcriber.supports_prompt:
        for i in todo:
            chained = prompt
            if i - 1 in results and transcriber.supports_prompt:
                chained = results[i - 1].text[-PROMPT_TAIL_CHARS:] or prompt
            results[i] = one(i, chained)
    else:
        ex = ThreadPoolExecutor(max_workers=min(parallelism, len(todo)), thread_name_prefix="chunk")
        try:
            futures = {i: ex.submit(one, i, prompt) for i in todo}
            results.update((i, f.result()) for i, f in futures.items())
        finally:
            # One failed part fails the attempt: parts not yet sent are not sent (nor paid for); those on
            # the wire finish and are kept by on_part.
            ex.shutdown(wait=True, cancel_futures=True)
    if len(parts) == 1:
        return results[0]
    return stitch(parts, [results[i] for i in range(len(parts))])


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
