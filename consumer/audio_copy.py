"""Cutting a recording into parts by packet copy, at pauses, without re-encoding a sample.

When the transcriber takes the recording's codec (Opus from Chrome's or Firefox's MediaRecorder),
its compressed packets are copied into parts of the same container: a demux, no decode, no encode. Only
the search window around each nominal boundary (`SplitPlan.window` either side) is decoded, to find the
quietest 100 ms there (`audio_split.quietest_point`); the cut falls on the packet boundary nearest it.
An hour of Chrome WebM/Opus is cut in about a third of a second of CPU, against about 15 s to transcode.

Each part is a complete file of its source's type (WebM parts from WebM, Ogg from Ogg),
with its timestamps rebased to start at zero, so a server measuring it from its packets gets its own
length. Parts are yielded as each one is closed, so the first can be sent while the rest are cut.

Offsets and durations are counted from the packets as `consumer.audio_measure` counts them (Opus TOC
bytes), never from timestamps: on the recording's own clock. Every Opus part carries the
source's OpusHead, so a decoder drops its pre-skip (6.5 ms for libopus) at each part's start; a part's
duration is what it decodes to, and the parts' sum falls short of the whole by that much per cut.

PyAV exceptions pass through; `consumer.audio` translates them at its boundary.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import numpy.typing as npt

from consumer import audio_measure
from consumer.audio_split import RATE, TOO_LONG_SLACK, Chunk, Samples, SplitPlan, open_input, quietest_point
from consumer.errors import PermanentError

log = logging.getLogger(__name__)

# (container, codec) -> the muxer that writes a part of the same type, and the part's extension.
COPY_FORMATS: dict[tuple[str, str], tuple[str, str]] = {
    ("webm", "opus"): ("webm", "webm"),
    ("ogg", "opus"): ("ogg", "ogg"),
    # Not MP3: a frame's data may begin in the frames before it (the bit reservoir, up to 511 bytes), so
    # the first frames of a copied part do not decode; a 44.1 kHz MP3 cut in eight lost 0.1 s per cut here.
}
# A decoder starting on a packet mid-stream needs a few frames to settle (RFC 7845 section 4.6 suggests
# 80 ms of Opus pre-roll after a seek): decode this much before the search window and throw it away.
PREROLL_SECONDS = 0.2
LOUD = np.iinfo(np.int16).max  # stands in for a packet that would not decode: never taken for a pause


@dataclass
class _Packet:
    packet: Any
    start: int  # samples (at the count rate) from the start of the recording
    samples: int


class _Part:
    """One part being written: packets copied in, timestamps rebased to its first packet."""

    def __init__(self, path: Path, fmt: str, template: Any, start: int, rate: int) -> None:
        self.path, self.start, self.samples = path, start, 0
        self.container: Any = av.open(str(path), "w", format=fmt)
        try:
            self.stream: Any = self.container.add_stream_from_template(template)
        except BaseException:
            self.container.close()
            raise
        self.time_base = template.time_base or Fraction(1, rate)
        # samples -> time_base ticks in integers (a Fraction per packet costs more than the copy itself)
        self._per = self.time_base.numerator * rate
        self._ticks = self.time_base.denominator

    def write(self, item: _Packet) -> None:
        packet, per = item.packet, self._per
        packet.pts = packet.dts = (2 * (item.start - self.start) * self._ticks + per) // (2 * per)
        packet.duration = (2 * item.samples * self._ticks + per) // (2 * per)
        packet.time_base = self.time_base
        packet.stream = self.stream
        self.container.mux(packet)
        self.samples += item.samples

    def close(self) -> None:
        self.container.close()


def copy_split(source: Path, workdir: Path, *, stem: str, plan: SplitPlan, max_bytes: int | None,
               max_seconds: float | None = None) -> Iterator[Chunk]:
    """Copy `source`'s audio packets into parts in `workdir`, cut at pauses near `plan`'s boundaries."""
    with open_input(source) as container:
        stream = container.streams.best("audio")
        if stream is None:
            raise av.error.InvalidDataError(1094995529, "no audio stream")
        yield from _Cutter(container, stream, workdir, stem=stem, plan=plan, max_bytes=max_bytes,
                           max_seconds=max_seconds).run()


class _Cutter:
    def __init__(self, container: Any, stream: Any, workdir: Path, *, stem: str, plan: SplitPlan,
                 max_bytes: int | None, max_seconds: float | None) -> None:
        name = container.format.name.split(",")
        key = ("webm" if "matroska" in name else name[0], stream.codec_context.codec.canonical_name)
        self.fmt, self.ext = COPY_FORMATS[key]
        self.container, self.stream, self.workdir, self.stem = container, stream, workdir, stem
        self.codec = key[1]
        self.rate = audio_measure.OPUS_RATE if self.codec == "opus" else stream.codec_context.sample_rate
        self.frame_size = stream.codec_context.frame_size or 0
        self.pre_skip = audio_measure._opus_pre_skip(stream.codec_context.extradata) if self.codec == "opus" else 0
        # The plan counts 16 kHz samples; here everything is counted at the codec's own rate.
        self.plan = plan
        self.window = plan.window * self.rate // RATE
        self.max_bytes = max_bytes
        self.limit = None if max_seconds is None else max_seconds * TOO_LONG_SLACK * self.rate
        self.written = 0

    def _samples(self, packet: Any) -> int:
        if self.codec == "opus":
            return audio_measure.opus_samples(bytes(packet))
        if self.frame_size:
            return int(self.frame_size)
        return round((packet.duration or 0) * (packet.time_base or 0) * self.rate)

    def run(self) -> Iterator[Chunk]:
        part = self._open(0)
        held: list[_Packet] = []  # packets from the pre-roll of the next search window on, not yet written
        preroll = round(PREROLL_SECONDS * self.rate)
        boundary, position = self._boundary(1), 0
        hold_from = None if boundary is None else boundary - self.window - preroll
        try:
            for packet in self.container.demux(self.stream):
                if packet.size == 0:
                    continue
                item = _Packet(packet, position, self._samples(packet))
                position += item.samples
                if self.limit is not None and position > self.limit:  # the probe counted first; a second guard
                    raise audio_measure.too_long((self.limit / self.rate) / TOO_LONG_SLACK, header=None)
                if hold_from is None or item.start < hold_from:
                    part.write(item)
                    continue
                held.append(item)
                if position >= (boundary or 0) + self.window:
                    cut = self._cut_point(held, boundary or 0, after=part.start)
                    for early in [h for h in held if h.start < cut]:
                        part.write(early)
                    held = [h for h in held if h.start >= cut]
                    yield self._close(part)
                    part = self._open(cut)
                    boundary = self._boundary(self.written + 1) or 0
                    hold_from = boundary - self.window - preroll
                    # What stays held belongs to the new part unless it reaches into the next window.
                    while held and held[0].start < hold_from:
                        part.write(held.pop(0))
            for item in held:
                part.write(item)
            yield self._close(part)
        except BaseException:
            part.container.close()
            raise

    def _boundary(self, n: int) -> int | None:
        """The plan's nominal end of part n - 1, at the codec's rate."""
        nominal = self.plan.boundary(n)
        return None if nominal is None else nominal * self.rate // RATE

    def _open(self, start: int) -> _Part:
        path = self.workdir / f"{self.stem}.part{self.written:03d}.{self.ext}"
        return _Part(path, self.fmt, self.stream, start, self.rate)

    def _close(self, part: _Part) -> Chunk:
        part.close()
        self.written += 1
        size = part.path.stat().st_size
        if self.max_bytes is not None and size > self.max_bytes:
            raise PermanentError(  # the plan leaves a quarter of headroom over the average bitrate
                f"part {part.path.name} came out at {size:,} bytes, over the {self.max_bytes:,}-byte limit",
                code="audio_too_large",
            )
        skip = min(self.pre_skip, part.samples)  # every Opus part's decoder drops the pre-skip
        return Chunk(path=part.path, offset=part.start / self.rate, duration=(part.samples - skip) / self.rate)

    def _cut_point(self, held: list[_Packet], boundary: int, *, after: int) -> int:
        """The start (in samples) of the held packet nearest the quietest 100 ms of the window."""
        lo = boundary - self.window
        candidates = [h.start for h in held if lo <= h.start and h.start > after]
        if not candidates:
            return held[-1].start
        pcm, first = self._decode(held)
        window_start = max(lo, first)
        skip = round((window_start - first) * RATE / self.rate)
        target = round((boundary - window_start) * RATE / self.rate)
        quiet = window_start + round(quietest_point(pcm[skip:], target) * self.rate / RATE)
        return min(candidates, key=lambda start: (abs(start - quiet), start))

    def _decode(self, held: list[_Packet]) -> tuple[Samples, int]:
        """The held packets as 16 kHz mono int16 (a fresh decoder state), and the sample they start at.

        Each packet is placed by its own count, whatever the decoder gave back for it, so the clock holds
        across a packet that does not decode. Taking every n-th sample is no resampler, but an energy
        search over 100 ms frames does not hear the aliasing."""
        decoder = self.stream.codec_context
        decoder.flush_buffers()
        pieces: list[npt.NDArray[np.float64]] = []
        for item in held:
            try:
                frames = decoder.decode(item.packet)
            except av.error.InvalidDataError:
                frames = []
            got = np.concatenate([_mono(f) for f in frames]) if frames else np.zeros(0)
            pieces.append(got[:item.samples] if len(got) >= item.samples else
                          np.concatenate([got, np.full(item.samples - len(got), float(LOUD))]))
        pcm = np.concatenate(pieces) if pieces else np.zeros(0)
        picks = np.arange(len(pcm) * RATE // self.rate) * self.rate // RATE
        return np.clip(pcm[picks], -LOUD, LOUD).astype(np.int16), held[0].start


def _mono(frame: Any) -> npt.NDArray[np.float64]:
    """One decoded frame as mono samples on the int16 scale."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    samples = data.mean(axis=0) if frame.format.is_planar else data.reshape(-1, channels).mean(axis=1)
    scale = 32767.0 if np.issubdtype(data.dtype, np.floating) else 1.0
    return np.asarray(samples, dtype=np.float64) * scale
