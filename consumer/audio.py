"""The prepare-audio stage: probe a downloaded recording, check it, turn it into what the transcriber takes.

    probe(path, max_seconds) -> AudioInfo      container, codec, and the duration measured from the
                                               packets (consumer.audio_measure), never the header's
                                               claim; audio_too_long as soon as it passes max_seconds
    check_limits(info, ...)                    audio_too_large / audio_too_long
    has_speech(path, info, max_seconds) -> bool  False for silence, so nobody pays to transcribe it
    cut(path, info, limits, workdir, parts_hint) -> Cut
                                               the plan (what determines the cut) and the parts, yielded
                                               as each is ready: the original when the API takes it as it
                                               is and it needs no cutting; else parts cut at pauses, to fit
                                               and for latency (`parts_hint` parts sent side by side):
                                               packet copies when the API takes the codec (audio_copy.py),
                                               else a 16 kHz mono transcode (audio_split.py): FLAC from
                                               a WAV's PCM, Ogg/Opus from anything else
    prepare(...) -> list[AudioPart]            the same, all at once

All decoding goes through PyAV (its wheels bundle FFmpeg; no ffmpeg binary is needed) and streams, so
a four-hour recording costs no more memory than a short one. Every decode is bounded by MAX_AUDIO_SECONDS
as well (decoded samples counted), so a file whose header and packets both understate it still stops
there, and the original is sent as it is only when its measured duration fits the transcriber.
PyAV's exceptions are translated into the project's error tree by `AV_ERRORS`, here and nowhere else;
`consumer.audio_measure` measures, `consumer.audio_split` holds the streaming decode and the splitter.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

from consumer import audio_copy, audio_measure, audio_split
from consumer.errors import ConsumerError, PermanentError, RetryableError
from consumer.transcribe import AudioLimits, AudioPart

log = logging.getLogger(__name__)

# Speech picked up by a laptop or phone mic sits between -40 and -15 dBFS RMS over 100 ms, while a muted
# or idle input (digital zero, dither, a quiet room through AGC) stays below -55 dBFS; -50 dBFS splits
# the two with margin on both sides.
SPEECH_RMS_DBFS = -50.0
SPEECH_RMS = 32768 * 10 ** (SPEECH_RMS_DBFS / 20)
# A click or a cough is not a conversation: ask for half a second of frames above the threshold.
MIN_SPEECH_SECONDS = 0.5
# An Ogg/Opus chunk's bytes per second at OPUS_BITRATE, with room for Ogg pages and VBR swings.
OPUS_BYTES_PER_SECOND = audio_split.OPUS.bytes_per_second
OGG_HEADER_BYTES = 4096
# A copied part's bytes per second may run over the recording's average (VBR, a loud stretch): plan for this.
COPY_BITRATE_HEADROOM = 1.25
# Names the cut algorithm in a job's record: change it when a change here moves where cuts fall, so
# parts stored by the old code are not stitched with parts cut by the new.
CUT_VERSION = "cut2"
MIN_CHUNK_SECONDS = 30.0  # below this a byte or duration limit is a configuration mistake, not a plan
# Parts are cut one after another, so with equal parts the last one ready is the last one done. A part
# ready later by x seconds of audio finishes with the one before when it is shorter by x times (seconds
# to cut a second of audio) / (seconds to transcribe one: 0.02 assumed, bench 7's stand-in). A transcode
# (an hour of 48 kHz WAV) cuts 800-1,400 s of audio a second in the daemon here, so each part sent side
# by side is 4 % shorter than the one before (the first of eight a third longer than the last); a packet
# copy (an hour of WebM/Opus) 1,500-3,000 s a second: 2 %. Measured in bench 7 (bench/README.md).
TRANSCODE_TAPER = 0.96
COPY_TAPER = 0.98

# (container, codec) -> the name the transcription API knows the format by; absent: transcode first.
API_FORMATS: dict[tuple[str, str], str] = {
    ("webm", "opus"): "webm",
    ("webm", "vorbis"): "webm",
    ("ogg", "opus"): "ogg",
    ("ogg", "vorbis"): "ogg",
    ("mp3", "mp3"): "mp3",
    ("flac", "flac"): "flac",
    ("mp4", "aac"): "m4a",  # Safari's audio/mp4; the API rejects it unless the name ends in .m4a
    **{("wav", f"pcm_{s}"): "wav" for s in ("s16le", "s24le", "s32le", "f32le", "u8", "mulaw", "alaw")},
}
WEBM_CODECS = frozenset({"opus", "vorbis", "vp8", "vp9", "av1"})  # what makes a Matroska file a WebM

# PyAV exception -> (retryable?, code, what a person is told). Looked up along the MRO, most specific first.
AV_ERRORS: dict[type[BaseException], tuple[bool, str, str]] = {
    av.error.InvalidDataError: (
        False,
        "unsupported_audio",
        "not a readable audio file: damaged, truncated, or in no known format",
    ),
    av.error.EOFError: (
        False,
        "unsupported_audio",
        "the file ends before its audio does (truncated upload?)",
    ),
    av.error.DecoderNotFoundError: (False, "unsupported_audio", "the audio codec is not one we can decode"),
    av.error.DemuxerNotFoundError: (
        False,
        "unsupported_audio",
        "the container format is not one we can read",
    ),
    av.error.PatchWelcomeError: (False, "unsupported_audio", "the file uses a codec feature FFmpeg lacks"),
    # Our build, not the recording: keep the job until the deployment is fixed.
    av.error.EncoderNotFoundError: (True, "internal_error", f"no {audio_split.OPUS_ENCODER} encoder in PyAV"),
    av.error.MemoryError: (True, "internal_error", "out of memory while processing the audio"),
    OSError: (True, "internal_error", "could not read or write the audio on local disk"),
}
# Not a table entry: every PyAV error is an FFmpegError first, which would shadow OSError above.
AV_FALLBACK = (False, "unsupported_audio", "FFmpeg could not process the audio")


def translate_av_error(exc: BaseException) -> ConsumerError:
    """Map a PyAV exception to RetryableError/PermanentError by `AV_ERRORS`."""
    retryable, code, what = next((AV_ERRORS[k] for k in type(exc).__mro__ if k in AV_ERRORS), AV_FALLBACK)
    detail = f"{what} (FFmpeg: {getattr(exc, 'strerror', None) or exc})"
    return RetryableError(detail, code=code) if retryable else PermanentError(detail, code=code)


@dataclass(frozen=True)
class AudioInfo:
    """What the probe found in a recording."""

    container: str  # short format name: webm, matroska, mp4, mov, ogg, mp3, wav, flac, …
    codec: str  # of the audio stream that will be transcribed
    channels: int
    sample_rate: int
    duration: float  # seconds, measured from the packets (audio_measure), never the header's claim
    has_video: bool
    size_bytes: int
    api_format: str | None  # the transcription API's name for this format; None: it must be transcoded
    header_duration: float | None = None  # what the header claims, for logs and messages; None: nothing
    # Audio streams in the file. With more than one, the original is never sent as it is: which stream a
    # server decodes is its choice (faster-whisper decodes the first, FFmpeg's best may be another), so only
    # the stream measured here, taken out of the file, is sent.
    audio_streams: int = 1


def probe(path: Path, *, max_seconds: float | None = None) -> AudioInfo:
    """Describe the recording at `path`, its duration measured (`consumer.audio_measure`), not read.

    PermanentError(unsupported_audio) if it holds no usable audio; PermanentError(audio_too_long) as
    soon as the measurement passes `max_seconds` (MAX_AUDIO_SECONDS), whatever the header claims.
    """
    size = path.stat().st_size
    if size == 0:
        raise PermanentError("the object is 0 bytes: nothing was uploaded", code="unsupported_audio")
    try:
        with audio_split.open_input(path) as container:
            info = _probe_open(container, size, max_seconds=max_seconds)
        if info.container == "wav":  # the data chunk's size is a claim too: read to the end of the file
            to_end = audio_measure.measure_wav_to_end(str(path), max_seconds=max_seconds,
                                                      header=info.header_duration)
            if to_end is not None:
                info = dataclasses.replace(info, duration=max(info.duration, to_end))
    except (av.FFmpegError, OSError) as exc:
        raise translate_av_error(exc) from exc
    if info.header_duration is not None and info.duration > info.header_duration * audio_split.TOO_LONG_SLACK + 1:
        log.warning("audio_header_understates", extra={"duration_s": round(info.duration, 1),
                                                       "header_duration_s": round(info.header_duration, 1),
                                                       "container": info.container, "codec": info.codec})
    return info


def _probe_open(container: Any, size: int, *, max_seconds: float | None) -> AudioInfo:
    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    stream = container.streams.best("audio")
    codecs = {s.codec_context.codec.canonical_name for s in container.streams if s.codec_context}
    name = _container_name(container, codecs)
    if stream is None:
        what = "has only video" if videos else f"has {len(container.streams)} streams and none is audio"
        raise PermanentError(f"no audio stream found (container {name} {what})", code="unsupported_audio")
    codec = stream.codec_context.codec.canonical_name  # "mp3", not the decoder's name "mp3float"
    header = _header_duration(container, stream)
    found = audio_measure.measure(container, stream, name=name, max_seconds=max_seconds, header=header)
    if not found.decodable:
        problem = "has no audio data" if found.packets == 0 else "could not be decoded: the data is damaged"
        raise PermanentError(f"the {codec} audio stream {problem}", code="unsupported_audio")
    if found.seconds <= 0:
        raise PermanentError(f"the {codec} audio stream lasts 0 seconds", code="unsupported_audio")
    has_video = bool(videos)
    api_format = API_FORMATS.get((name, codec))
    if has_video and api_format == "m4a":
        api_format = "mp4"
    return AudioInfo(
        container=name,
        codec=codec,
        channels=int(stream.codec_context.channels),
        sample_rate=int(stream.codec_context.sample_rate),
        duration=found.seconds,
        has_video=has_video,
        size_bytes=size,
        api_format=api_format,
        header_duration=header,
        audio_streams=len(container.streams.audio),
    )


def _container_name(container: Any, codecs: set[str]) -> str:
    names = container.format.name.split(",")
    if "matroska" in names:  # FFmpeg's one demuxer reads both; WebM is Matroska restricted to these codecs
        return "webm" if codecs <= WEBM_CODECS else "matroska"
    if "mov" in names:  # likewise mov/mp4/m4a/3gp; the brand tells QuickTime from ISO MP4
        return "mov" if container.metadata.get("major_brand", "").strip() == "qt" else "mp4"
    return str(names[0])


def _header_duration(container: Any, stream: Any) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return float(container.duration / av.time_base)
    return None  # Chrome's MediaRecorder WebM: written live, so the header never learns the length


def check_limits(info: AudioInfo, *, max_bytes: int, max_seconds: float) -> None:
    """Raise PermanentError(audio_too_large / audio_too_long) when the recording is over a hard limit."""
    if info.size_bytes > max_bytes:
        raise PermanentError(
            f"the recording is {info.size_bytes:,} bytes ({info.size_bytes / 1e6:.1f} MB); "
            f"the limit is {max_bytes:,} bytes ({max_bytes / 1e6:.1f} MB)",
            code="audio_too_large",
        )
    if info.duration > max_seconds:
        raise PermanentError(
            f"the recording lasts {info.duration:.1f} s ({info.duration / 60:.1f} min); "
            f"the limit is {max_seconds:.0f} s ({max_seconds / 60:.1f} min)",
            code="audio_too_long",
        )


def has_speech(path: Path, info: AudioInfo, *, max_seconds: float | None = None) -> bool:
    """False when no half-second of the recording rises above `SPEECH_RMS_DBFS` (silence, a muted mic).

    A silent recording is decoded to its end, so the decode is bounded by `max_seconds`
    (MAX_AUDIO_SECONDS; PermanentError audio_too_long past it) whatever the probe measured."""
    needed = math.ceil(MIN_SPEECH_SECONDS * audio_split.RATE / audio_split.BLOCK)
    threshold = SPEECH_RMS**2 * audio_split.BLOCK  # compare sums of squares: no sqrt per frame
    loud = 0
    try:
        for block in audio_split.pcm_blocks(path, max_seconds=max_seconds):
            samples = block.astype(np.float64)
            if float(np.dot(samples, samples)) * audio_split.BLOCK / max(len(block), 1) > threshold:
                loud += 1
                if loud >= needed:
                    return True
    except (av.FFmpegError, OSError) as exc:
        raise translate_av_error(exc) from exc
    log.info("audio_no_speech", extra={"duration_s": round(info.duration, 1), "codec": info.codec})
    return False


@dataclass(frozen=True)
class Cut:
    """How a recording will be sent: `plan` names the cut before any part exists; `parts` yields them in order.

    For one recording (one ETag) the same `plan` always yields the same parts: index i is the same
    stretch of audio on a retry, so a part paid for once is not paid for again."""

    plan: str
    count: int  # parts the plan makes (one more if the audio runs longer than measured)
    parts: Iterator[AudioPart]


def prepare(path: Path, info: AudioInfo, limits: AudioLimits, workdir: Path, *,
            max_total_seconds: float | None = None, parts_hint: int = 1) -> list[AudioPart]:
    """Every part of `cut`, once all are cut."""
    return list(cut(path, info, limits, workdir, max_total_seconds=max_total_seconds, parts_hint=parts_hint).parts)


def cut(path: Path, info: AudioInfo, limits: AudioLimits, workdir: Path, *,
        max_total_seconds: float | None = None, parts_hint: int = 1) -> Cut:
    """The files to transcribe: the original if it fits `limits` as it is and needs no cutting; else parts.

    A recording longer than `parts_hint` minutes is cut into `parts_hint` parts (transcribe.parts_hint)
    so they can be sent side by side (each a little shorter than the one before: `TRANSCODE_TAPER`,
    `COPY_TAPER`); more where `limits` demand. Parts are packet copies of the original
    when the transcriber takes its codec (`consumer.audio_copy`), else a 16 kHz mono transcode (FLAC from
    a WAV's PCM, Ogg/Opus from anything else).
    `info.duration` is the measured length, so a header understating it cannot get the original sent to a
    transcriber with a per-request cap; `max_total_seconds` (MAX_AUDIO_SECONDS) bounds the work as well."""
    copy_to = audio_copy.COPY_FORMATS.get((info.container, info.codec))
    copyable = copy_to is not None and (limits.formats is None or copy_to[1] in limits.formats)
    if copyable:
        copy_seconds = _copy_seconds(limits, info)
        copyable = copy_seconds is None or copy_seconds >= MIN_CHUNK_SECONDS
    if copyable:
        plan = audio_split.SplitPlan.make(max_seconds=copy_seconds, expected_seconds=info.duration,
                                          parts_hint=parts_hint, taper=COPY_TAPER)
        if plan.count == 1 and _fits_as_is(info, limits):
            return _as_is(path, info)
        chunks = audio_copy.copy_split(path, workdir, stem=path.stem or "audio", plan=plan,
                                       max_bytes=limits.max_bytes, max_seconds=max_total_seconds)
        return Cut(plan=f"{CUT_VERSION}:copy:{plan.key()}", count=plan.count,
                   parts=_parts(chunks, info, limits, how="audio_copied"))
    encoding = _encoding(info, limits)
    plan = audio_split.SplitPlan.make(max_seconds=_chunk_seconds(limits, info.duration, encoding),
                                      expected_seconds=info.duration, parts_hint=parts_hint, taper=TRANSCODE_TAPER)
    if plan.count == 1 and _fits_as_is(info, limits):
        return _as_is(path, info)
    chunks = audio_split.transcode_split(path, workdir, stem=path.stem or "audio", plan=plan,
                                         max_seconds=max_total_seconds, encoding=encoding)
    return Cut(plan=f"{CUT_VERSION}:{encoding.extension}:{plan.key()}", count=plan.count,
               parts=_parts(chunks, info, limits, how="audio_transcoded"))


def _encoding(info: AudioInfo, limits: AudioLimits) -> audio_split.Encoding:
    """FLAC for PCM in a WAV (lossless in, lossless out, a tenth of Opus's CPU), where the transcriber takes it."""
    pcm = info.container == "wav" and info.codec.startswith("pcm_")
    flac_ok = limits.formats is None or "flac" in limits.formats
    return audio_split.FLAC if pcm and flac_ok else audio_split.OPUS


def _as_is(path: Path, info: AudioInfo) -> Cut:
    extension = info.api_format or info.container
    part = AudioPart(path=path, filename=f"{path.stem}.{extension}", offset=0.0, duration=info.duration)
    return Cut(plan=f"{CUT_VERSION}:as-is", count=1, parts=iter([part]))


def _parts(chunks: Iterator[audio_split.Chunk], info: AudioInfo, limits: AudioLimits, *,
           how: str) -> Iterator[AudioPart]:
    """The chunks as AudioParts, checked against the limits, with PyAV's errors translated."""
    started, count, total = time.monotonic(), 0, 0.0
    try:
        for chunk in chunks:
            size = chunk.path.stat().st_size
            if limits.max_bytes is not None and size > limits.max_bytes:
                raise PermanentError(  # the plan leaves 15 % headroom, so this means a broken encoder setting
                    f"chunk {chunk.path.name} came out at {size:,} bytes, over the {limits.max_bytes:,}-byte limit",
                    code="audio_too_large",
                )
            count, total = count + 1, total + chunk.duration
            yield AudioPart(path=chunk.path, filename=chunk.path.name, offset=chunk.offset, duration=chunk.duration)
    except (av.FFmpegError, OSError) as exc:
        raise translate_av_error(exc) from exc
    finally:
        if hasattr(chunks, "close"):
            chunks.close()
    if total <= 0:
        raise PermanentError(f"the {info.codec} audio stream decoded to nothing", code="unsupported_audio")
    log.info(how, extra={"parts": count, "duration_s": round(info.duration, 1), "source": info.container,
                         "cut_s": round(time.monotonic() - started, 3)})


def _fits_as_is(info: AudioInfo, limits: AudioLimits) -> bool:
    format_ok = limits.formats is None or (info.api_format is not None and info.api_format in limits.formats)
    return (
        format_ok
        and not info.has_video
        and info.audio_streams == 1
        and (limits.max_bytes is None or info.size_bytes <= limits.max_bytes)
        and (limits.max_seconds is None or info.duration <= limits.max_seconds)
    )


def _copy_seconds(limits: AudioLimits, info: AudioInfo) -> float | None:
    """The longest packet-copied part both limits allow at the recording's own average bitrate."""
    candidates = [limits.max_seconds] if limits.max_seconds is not None else []
    if limits.max_bytes is not None:
        per_second = info.size_bytes / max(info.duration, 1e-3) * COPY_BITRATE_HEADROOM
        candidates.append((limits.max_bytes - OGG_HEADER_BYTES) / per_second)
    return min(candidates) if candidates else None


def _chunk_seconds(limits: AudioLimits, duration: float,
                   encoding: audio_split.Encoding = audio_split.OPUS) -> float | None:
    """The longest chunk both limits allow at the transcode's bitrate (None: no limit)."""
    candidates = [limits.max_seconds] if limits.max_seconds is not None else []
    if limits.max_bytes is not None:
        candidates.append((limits.max_bytes - OGG_HEADER_BYTES) / encoding.bytes_per_second)
    if not candidates:
        return None
    seconds = min(candidates)
    if seconds < MIN_CHUNK_SECONDS and duration > seconds - audio_split.CUT_MARGIN_SECONDS:
        raise PermanentError(
            f"the transcriber's limits ({limits.max_bytes} bytes, {limits.max_seconds} s) leave chunks of "
            f"{seconds:.1f} s; at least {MIN_CHUNK_SECONDS:.0f} s is needed to cut between words",
            code="audio_too_large",
        )
    return seconds
