"""The transcribe stage: the `Transcriber` protocol, the audio limits it declares, and chunked transcription.

The backends live beside it: `transcribe_openai.py` (the OpenAI API or a compatible server) and
`transcribe_local.py` (faster-whisper, an optional extra); `build_transcriber` picks one.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
    # Parts of one recording worth cutting for at once (None: as many as TRANSCRIBE_PARALLELISM sends).
    # Every cut costs accuracy (bench 9), so a backend that can only work on a few parts at a time asks
    # for no more.
    parts_at_once: int | None

    def transcribe(self, part: AudioPart, *, language: str | None, prompt: str | None) -> Transcript: ...


def parts_hint(transcriber: Transcriber, parallelism: int) -> int:
    """How many parts to cut a long recording into for latency: as many as are sent at once
    (TRANSCRIBE_PARALLELISM), and no more than the transcriber can work on at once."""
    return min(parallelism, transcriber.parts_at_once or parallelism)


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


# ------------------------------------------------------------------------------ requests shared by all jobs


class RequestSlots:
    """A semaphore that serves waiters first come, first served.

    `threading.Semaphore` lets a thread that releases a slot take it straight back, so the next part of
    a long recording could win over a short job that has been waiting; here a released slot goes to the
    longest waiter."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = size
        self._waiters: deque[threading.Event] = deque()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()  # set by release(), which hands its slot over

    def release(self) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self._free += 1

    def __enter__(self) -> RequestSlots:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class SharedTranscriber:
    """A Transcriber whose requests, from every job of the process, hold one of `slots` while they run.

    TRANSCRIBE_PARALLELISM bounds the parts of one job in flight; this bounds them all (TRANSCRIBE_MAX_REQUESTS),
    so the upstream's rate limit and this host's uplink see a bounded load, and a long recording's parts
    queue behind a short job's request instead of ahead of it (`RequestSlots` is first come, first served)."""

    def __init__(self, inner: Transcriber, slots: RequestSlots) -> None:
        self.inner = inner
        self.slots = slots
        self.model = inner.model
        self.limits = inner.limits
        self.supports_prompt = inner.supports_prompt
        self.source = inner.source
        self.parts_at_once = inner.parts_at_once

    def transcribe(self, part: AudioPart, *, language: str | None, prompt: str | None) -> Transcript:
        with self.slots:
            return self.inner.transcribe(part, language=language, prompt=prompt)


# ------------------------------------------------------------------------------ chunks and stitching

PROMPT_TAIL_CHARS = 200


def transcribe_parts(
    transcriber: Transcriber,
    parts: Iterable[AudioPart],
    *,
    language: str | None,
    prompt: str | None,
    parallelism: int,
    known: Mapping[int, Transcript] | None = None,
    on_part: Callable[[int, Transcript], None] | None = None,
) -> Transcript:
    """Transcribe every part not `known` yet (at most `parallelism` at once) and stitch them all in order.

    `parts` may still be being cut: each part is sent as soon as the iterable yields it, while the next
    is cut. `on_part(index, transcript)` runs as each part arrives, in the thread that got it, so a part
    already paid for is kept (the job's record) even when another part fails. With parallelism 1 and a
    model that takes prompts, each part is prompted with the end of the previous part's text; in parallel
    the parts cannot wait for each other, so only the job's prompt is sent.
    """
    results: dict[int, Transcript] = dict(known or {})
    seen: list[AudioPart] = []

    def one(index: int, part: AudioPart, chained: str | None) -> Transcript:
        transcript = transcriber.transcribe(part, language=language, prompt=chained)
        if on_part is not None:
            on_part(index, transcript)
        return transcript

    source = iter(parts)
    try:
        if parallelism <= 1:
            _in_turn(source, seen, results, one, prompt=prompt, chain=transcriber.supports_prompt)
        else:
            _side_by_side(source, seen, results, one, prompt=prompt, parallelism=parallelism)
    finally:
        close = getattr(source, "close", None)
        if close is not None:  # stop cutting: a generator's files are closed, its work dir stays ours
            close()
    if len(seen) == 1:
        return results[0]
    return stitch(seen, [results[i] for i in range(len(seen))])


def _in_turn(source: Iterator[AudioPart], seen: list[AudioPart], results: dict[int, Transcript],
             one: Callable[[int, AudioPart, str | None], Transcript], *, prompt: str | None, chain: bool) -> None:
    for index, part in enumerate(source):
        seen.append(part)
        if index in results:
            continue
        chained = prompt
        if chain and index - 1 in results:
            chained = results[index - 1].text[-PROMPT_TAIL_CHARS:] or prompt
        results[index] = one(index, part, chained)


def _side_by_side(source: Iterator[AudioPart], seen: list[AudioPart], results: dict[int, Transcript],
                  one: Callable[[int, AudioPart, str | None], Transcript], *, prompt: str | None,
                  parallelism: int) -> None:
    ex = ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix="chunk")
    futures: dict[int, Future[Transcript]] = {}
    try:
        for index, part in enumerate(source):
            seen.append(part)
            if any(f.done() and f.exception() for f in futures.values()):
                break  # a part failed: the attempt fails, so cutting (and paying for) more is wasted
            if index not in results:
                futures[index] = ex.submit(one, index, part, prompt)
        results.update((i, f.result()) for i, f in futures.items())
    finally:
        # One failed part fails the attempt: parts not yet sent are not sent (nor paid for); those on
        # the wire finish and are kept by on_part.
        ex.shutdown(wait=True, cancel_futures=True)


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
