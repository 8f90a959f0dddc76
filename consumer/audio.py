"""The prepare-audio stage: probe a downloaded recording, check it, turn it into what the transcriber takes.

    probe(path)              -> AudioInfo      container, codec, duration (also for header-less WebM)
    check_limits(info, ...)                    audio_too_large / audio_too_long
    has_speech(path, info)   -> bool           False for silence, so nobody pays to transcribe it
    prepare(path, info, limits, workdir) -> list[AudioPart]
                                               the original when the API takes it as it is; otherwise a
                                               16 kHz mono Ogg/Opus transcode, cut at pauses to fit

All decoding goes through PyAV (its wheels bundle FFmpeg; no ffmpeg binary is needed) and streams, so
a four-hour recording costs no more memory than a short one. PyAV's exceptions are translated into
the project's error tree by `AV_ERRORS`, here and nowhere else; `consumer.audio_split` holds the
streaming decode and the one-pass splitter.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

from consumer import audio_split
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
PROBE_DECODE_PACKETS = 50  # packets to try before deciding the audio cannot be decoded
# An Ogg/Opus chunk's bytes per second at OPUS_BITRATE, with room for Ogg pages and VBR swings.
OPUS_BYTES_PER_SECOND = audio_split.OPUS_BITRATE / 8 * 1.15
OGG_HEADER_BYTES = 4096
MIN_CHUNK_SECONDS = 30.0  # below this a byte or duration limit is a configuration mistake, not a plan

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
    duration: float  # seconds
    has_video: bool
    size_bytes: int
    api_format: str | None  # the transcription API's name for this format; None: it must be transcoded


def probe(path: Path) -> AudioInfo:
    """Describe the recording at `path`; PermanentError(unsupported_audio) if it holds no usable audio."""
    size = path.stat().st_size
    if size == 0:
        raise PermanentError("the object is 0 bytes: nothing was uploaded", code="unsupported_audio")
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            return _probe_open(container, size)
    except (av.FFmpegError, OSError) as exc:
        raise translate_av_error(exc) from exc


def _probe_open(container: Any, size: int) -> AudioInfo:
    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    stream = container.streams.best("audio")
    codecs = {s.codec_context.codec.canonical_name for s in container.streams if s.codec_context}
    name = _container_name(container, codecs)
    if stream is None:
        what = "has only video" if videos else f"has {len(container.streams)} streams and none is audio"
        raise PermanentError(f"no audio stream found (container {name} {what})", code="unsupported_audio")
    codec = stream.codec_context.codec.canonical_name  # "mp3", not the decoder's name "mp3float"
    duration = _header_duration(container, stream)
    packets, decodable, scanned = _scan(container, stream, need_duration=duration is None)
    if not decodable:
        problem = "has no audio data" if packets == 0 else "could not be decoded: the data is damaged"
        raise PermanentError(f"the {codec} audio stream {problem}", code="unsupported_audio")
    duration = duration if duration is not None else scanned
    if duration <= 0:
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
        duration=float(duration),
        has_video=has_video,
        size_bytes=size,
        api_format=api_format,
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


def _scan(container: Any, stream: Any, *, need_duration: bool) -> tuple[int, bool, float]:
    """Decode until one frame comes out; when the header had no duration, demux to the end for it.

    Returns (packets read, decodable, seconds from the first packet's start to the last packet's end).
    Packets without timestamps are decoded and their samples counted instead.
    """
    decodable, packets, tried, first, end, counted = False, 0, 0, None, 0, 0
    for packet in container.demux(stream):
        if packet.size == 0:  # the flush packet PyAV appends: a decoder may hold a short file's frames
            decodable = decodable or (packets > 0 and bool(_decode(packet)))
            continue
        packets += 1
        if packet.pts is not None and packet.duration:
            first = packet.pts if first is None else min(first, packet.pts)
            end = max(end, packet.pts + packet.duration)
        needs_samples = need_duration and (packet.pts is None or not packet.duration)
        if not decodable or needs_samples:
            tried += 1
            frames = _decode(packet)
            decodable = decodable or bool(frames)
            counted += sum(f.samples for f in frames) if needs_samples else 0
        if not need_duration and (decodable or tried >= PROBE_DECODE_PACKETS):
            break
    if counted:
        return packets, decodable, counted / (stream.codec_context.sample_rate or 1)
    return packets, decodable, float((end - first) * stream.time_base) if first is not None else 0.0


def _decode(packet: Any) -> list[Any]:
    try:
        return list(packet.decode())
    except av.error.InvalidDataError:  # a damaged packet; the caller decides whether that is fatal
        return []


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


def has_speech(path: Path, info: AudioInfo) -> bool:
    """False when no half-second of the recording rises above `SPEECH_RMS_DBFS` (silence, a muted mic)."""
    needed = math.ceil(MIN_SPEECH_SECONDS * audio_split.RATE / audio_split.BLOCK)
    threshold = SPEECH_RMS**2 * audio_split.BLOCK  # compare sums of squares: no sqrt per frame
    loud = 0
    try:
        for block in audio_split.pcm_blocks(path):
            samples = block.astype(np.float64)
            if float(np.dot(samples, samples)) * audio_split.BLOCK / max(len(block), 1) > threshold:
                loud += 1
                if loud >= needed:
                    return True
    except (av.FFmpegError, OSError) as exc:
        raise translate_av_error(exc) from exc
    log.info("audio_no_speech", extra={"duration_s": round(info.duration, 1), "codec": info.codec})
    return False


def prepare(path: Path, info: AudioInfo, limits: AudioLimits, workdir: Path, *,
            max_total_seconds: float | None = None) -> list[AudioPart]:
    """The files to transcribe: the original if it fits `limits` as it is, else Ogg/Opus chunks in workdir.

    `max_total_seconds` (MAX_AUDIO_SECONDS) is enforced on the decoded audio, not only on the header."""
    if _fits_as_is(info, limits):
        extension = info.api_format or info.container
        return [AudioPart(path=path, filename=f"{path.stem}.{extension}", offset=0.0, duration=info.duration)]
    max_seconds = _chunk_seconds(limits, info.duration)
    plan = audio_split.SplitPlan.make(max_seconds=max_seconds, expected_seconds=info.duration)
    try:
        chunks = audio_split.transcode_split(path, workdir, stem=path.stem or "audio", plan=plan,
                                             max_seconds=max_total_seconds)
    except (av.FFmpegError, OSError) as exc:
        raise translate_av_error(exc) from exc
    if sum(c.duration for c in chunks) <= 0:
        raise PermanentError(f"the {info.codec} audio stream decoded to nothing", code="unsupported_audio")
    for chunk in chunks:
        if limits.max_bytes is not None and chunk.path.stat().st_size > limits.max_bytes:
            raise PermanentError(  # the plan leaves 15 % headroom, so this means a broken encoder setting
                f"chunk {chunk.path.name} came out at {chunk.path.stat().st_size:,} bytes, over the "
                f"{limits.max_bytes:,}-byte limit",
                code="audio_too_large",
            )
    log.info(
        "audio_transcoded",
        extra={"parts": len(chunks), "duration_s": round(info.duration, 1), "source": info.container},
    )
    return [AudioPart(path=c.path, filename=c.path.name, offset=c.offset, duration=c.duration) for c in chunks]


def _fits_as_is(info: AudioInfo, limits: AudioLimits) -> bool:
    format_ok = limits.formats is None or (info.api_format is not None and info.api_format in limits.formats)
    return (
        format_ok
        and not info.has_video
        and (limits.max_bytes is None or info.size_bytes <= limits.max_bytes)
        and (limits.max_seconds is None or info.duration <= limits.max_seconds)
    )


def _chunk_seconds(limits: AudioLimits, duration: float) -> float | None:
    """The longest chunk both limits allow at the transcode's bitrate (None: no limit)."""
    candidates = [limits.max_seconds] if limits.max_seconds is not None else []
    if limits.max_bytes is not None:
        candidates.append((limits.max_bytes - OGG_HEADER_BYTES) / OPUS_BYTES_PER_SECOND)
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
