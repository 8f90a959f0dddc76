"""How long a recording really is: its packets counted by what their codec says, not by its header.

A header's duration is a claim. A FLAC STREAMINFO total, a WAV data-chunk size, an MP4 `stts` table or
WebM block timestamps can each say 10 s over hours of audio (tests/test_audio_limits.py forges them
all), and a decoder plays whatever the packets hold. So the packets are demuxed (not decoded, which costs
4-5 times as much) and each is counted by the codec's own framing:

    opus                        its TOC byte: frame length x frame count (RFC 6716 section 3.1)
    aac, mp3, mp2, ac3, eac3    a fixed number of samples per packet (the codec's frame_size)
    flac in .flac, PCM in .wav  the demuxer's packet durations, which it takes from each frame's own
                                header / the packet's byte count, never from the file header
    anything else               decoded, its samples counted

The container's timestamps are summed beside that and the larger total wins, so neither can shrink the
length. A WAV is read twice: as FFmpeg reads it (up to the data chunk's declared size) and with the wav
demuxer's `ignore_length` (to the end of the file, as a server that trusts the bytes may read it).
Counting stops as soon as the total passes the limit, so a file that lies costs at most the limit's
worth of demuxing: about 0.4 s per hour of 24 kbps Opus on one core (bench figure in the tests).

PyAV exceptions pass through; `consumer.audio` translates them at its boundary.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av

from consumer.audio_split import TOO_LONG_SLACK, open_input
from consumer.errors import PermanentError

# Codecs whose every packet decodes to the same number of samples (AAC: 1024, MP3: 1152 or 576, ...).
FIXED_FRAME_CODECS = frozenset({"aac", "mp3", "mp2", "mp1", "ac3", "eac3"})
# (container, codec) whose demuxer times each packet from the packet itself: FLAC's parser reads each
# frame header's block size; the wav demuxer divides the packet's bytes by the block alignment.
SELF_TIMED = frozenset({("flac", "flac")} | {("wav", f"pcm_{s}") for s in
                                            ("s16le", "s24le", "s32le", "f32le", "u8", "mulaw", "alaw")})
PROBE_DECODE_PACKETS = 50  # packets to try before deciding the audio cannot be decoded

OPUS_RATE = 48_000  # Opus frame lengths are counted at 48 kHz whatever the stream's nominal rate
# RFC 6716 section 3.1: the TOC byte's top five bits pick the configuration, whose frame length (in
# 48 kHz samples) cycles through these per mode; its low two bits say one, two or (code 3) M frames.
OPUS_SILK = (480, 960, 1920, 2880)  # configs 0-11: 10, 20, 40, 60 ms
OPUS_HYBRID = (480, 960)  # configs 12-15: 10, 20 ms
OPUS_CELT = (120, 240, 480, 960)  # configs 16-31: 2.5, 5, 10, 20 ms


def opus_samples(packet: bytes) -> int:
    """48 kHz samples one Opus packet decodes to, from its TOC byte (RFC 6716 section 3.1)."""
    if not packet:
        return 0
    config, code = packet[0] >> 3, packet[0] & 3
    if config < 12:
        frame = OPUS_SILK[config % 4]
    elif config < 16:
        frame = OPUS_HYBRID[config % 2]
    else:
        frame = OPUS_CELT[config % 4]
    if code == 0:
        return frame
    if code in (1, 2):
        return 2 * frame
    return frame * (packet[1] & 0x3F) if len(packet) > 1 else 0  # code 3: the frame count byte


@dataclass(frozen=True)
class Measurement:
    """What demuxing the audio stream found."""

    packets: int  # with data (the flush packet PyAV appends is not counted)
    decodable: bool  # at least one frame came out of the decoder
    seconds: float  # the longer of the codec's count and the timestamps' sum


def measure(container: Any, stream: Any, *, name: str, max_seconds: float | None,
            header: float | None = None) -> Measurement:
    """Demux `stream` to its end, counting its length; PermanentError(audio_too_long) once past the limit.

    `name` is the container's short name (flac, wav, ...); `header` what the header claims, for the
    message. The limit is `max_seconds` with `TOO_LONG_SLACK`: a slight excess is measured to the end
    and refused by `audio.check_limits` with the exact figure.
    """
    codec = stream.codec_context.codec.canonical_name
    rate = stream.codec_context.sample_rate or 1
    frame_size = stream.codec_context.frame_size if codec in FIXED_FRAME_CODECS else 0
    mode = "opus" if codec == "opus" else "frame" if frame_size else "timestamps" if (name, codec) in SELF_TIMED \
        else "decode"
    time_base = stream.time_base or Fraction(1, rate)
    # Integer tallies in each one's own unit, compared with limits converted once: no Fraction per packet.
    cap = math.inf if max_seconds is None else max_seconds * TOO_LONG_SLACK
    cap_ticks = cap / float(time_base)
    cap_counted = cap * (OPUS_RATE if mode == "opus" else rate)
    ticks, counted, decoded_seconds, packets, tried, decodable = 0, 0, 0.0, 0, 0, False
    for packet in container.demux(stream):
        if packet.size == 0:  # the flush packet: a decoder may hold a short file's frames until now
            frames = _decode(packet) if packets else []
            decodable = decodable or bool(frames)
            decoded_seconds += sum(f.samples / (f.sample_rate or rate) for f in frames) if mode == "decode" else 0
            continue
        packets += 1
        ticks += packet.duration or 0
        if mode == "opus":
            counted += opus_samples(bytes(packet))
        elif mode == "frame":
            counted += frame_size
        if mode == "decode" or (not decodable and tried < PROBE_DECODE_PACKETS):
            tried += 1
            frames = _decode(packet)
            decodable = decodable or bool(frames)
            if mode == "decode":
                decoded_seconds += sum(f.samples / (f.sample_rate or rate) for f in frames)
        if ticks > cap_ticks or counted > cap_counted or decoded_seconds > cap:
            raise too_long(max_seconds or 0.0, header=header)
    if mode == "opus":  # decoders drop the encoder's pre-skip; the last packet's padding stays (<= 20 ms)
        counted = max(0, counted - _opus_pre_skip(stream.codec_context.extradata))
    by_codec = counted / (OPUS_RATE if mode == "opus" else rate) if mode in ("opus", "frame") else decoded_seconds
    return Measurement(packets=packets, decodable=decodable, seconds=max(float(ticks * time_base), by_codec))


def _opus_pre_skip(extradata: bytes | None) -> int:
    """The OpusHead's pre-skip (RFC 7845 section 5.1: a little-endian u16 at byte 10), in 48 kHz samples."""
    if not extradata or not extradata.startswith(b"OpusHead") or len(extradata) < 12:
        return 0
    return int.from_bytes(extradata[10:12], "little")


def measure_wav_to_end(path: str, *, max_seconds: float | None, header: float | None) -> float | None:
    """A WAV's length read to the end of the file, past whatever its data chunk's size says; None when what
    follows the declared data is a well-formed chain of RIFF chunks (metadata, or nothing), which is not
    audio: FFmpeg's own reading, up to the declared size, measured it all already."""
    # The wav demuxer's `ignore_length` (libavformat/wavdec.c; documented in ffmpeg-devel PR #23414:
    # "keep reading until the end of the file ... will misinterpret files with non-audio chunks after the
    # data chunk"). Without it FFmpeg stops at the declared size (observed with PyAV 18 / FFmpeg 8), so a
    # size saying 10 s hides the rest from us, not necessarily from a server that reads the bytes. Sizes
    # of 0 and 0xFFFFFFFF (streaming writers) are read to the end either way. A legitimate file may carry
    # LIST, id3, bext or iXML chunks after `data` (a megabyte of cover art reads as ~30 s of audio), so the
    # declared size is believed when the bytes after it are exactly such a chain up to the end of the file.
    if _chunks_after_data_are_metadata(path):
        return None
    with open_input(path, {"ignore_length": "1"}) as container:
        stream = container.streams.best("audio")
        if stream is None:
            return 0.0
        return measure(container, stream, name="wav", max_seconds=max_seconds, header=header).seconds


RIFF_CHUNK = struct.Struct("<4sI")  # RIFF chunk header: a four-character id, a little-endian size


def _chunks_after_data_are_metadata(path: str) -> bool:
    """True when the `data` chunk's declared size ends where a well-formed chain of RIFF chunks (printable
    four-character ids, sizes within the file, padded to even) begins and runs exactly to the end of the
    file: the size is honest. Audio bytes past a size that lies do not form such a chain."""
    with open(path, "rb") as fh:
        end = os.fstat(fh.fileno()).st_size
        if fh.read(12)[8:12] != b"WAVE":
            return False
        pos = 12
        found_data = False
        while pos + RIFF_CHUNK.size <= end:
            fh.seek(pos)
            ident, size = RIFF_CHUNK.unpack(fh.read(RIFF_CHUNK.size))
            if not all(0x20 <= b <= 0x7E for b in ident):
                return False
            if ident == b"data":
                if size in (0, 0xFFFFFFFF):
                    return False  # a streaming writer's placeholder: the audio runs to the end
                found_data = True
            nxt = pos + RIFF_CHUNK.size + size + (size & 1)
            if nxt > end + 1:  # a chunk running past the end (a pad byte may be missing at the very end)
                return False
            pos = nxt
        return found_data and end - pos in (0, -1)


def too_long(max_seconds: float, *, header: float | None) -> PermanentError:
    """The audio_too_long error for a recording found to hold more than `max_seconds`."""
    claim = f"; its header claims {header:.1f} s" if header is not None else ""
    return PermanentError(
        f"the recording holds more than {max_seconds:.0f} s ({max_seconds / 60:.1f} min) of audio, "
        f"the limit (MAX_AUDIO_SECONDS){claim}",
        code="audio_too_long",
    )


def _decode(packet: Any) -> list[Any]:
    try:
        return list(packet.decode())
    except av.error.InvalidDataError:  # a damaged packet; the caller decides whether that is fatal
        return []
