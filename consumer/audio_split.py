"""Streaming PCM decode and the one-pass transcode that cuts a recording into Ogg/Opus chunks.

Everything here streams: the decoder hands over 100 ms blocks of 16 kHz mono int16, and the only
audio held in memory is the search window around the next cut (2 x `CUT_WINDOW_SECONDS`). PyAV
exceptions pass through unchanged; `consumer.audio` translates them at its boundary.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import av
import numpy as np
import numpy.typing as npt

from consumer.errors import PermanentError

log = logging.getLogger(__name__)

Samples = npt.NDArray[np.int16]

RATE = 16_000  # what every ASR model resamples to anyway; lower rates lose consonants
BLOCK = RATE // 10  # 100 ms: the unit of both the speech check and the cut search
TOO_LONG_SLACK = 1.05  # decoders pad a little; only a real excess over MAX_AUDIO_SECONDS is refused
HOP = RATE // 100  # the cut search slides its 100 ms frame by 10 ms
CUT_WINDOW_SECONDS = 10.0  # search this far either side of a nominal boundary for a pause
CUT_MARGIN_SECONDS = 1.0  # slack under max_seconds for encoder padding and rounding on the API side
# libopus takes 16 kHz input directly in this PyAV build (`av.codec.Codec("libopus", "w").audio_rates`
# lists 8/12/16/24/48 kHz), so we encode at 16 kHz and skip a pointless upsample to 48 kHz; Ogg/Opus
# always records granules at 48 kHz, and decoders output 48 kHz whatever we feed in.
OPUS_ENCODER = "libopus"
OPUS_BITRATE = 24_000  # mono speech stays fully intelligible to ASR at 24 kbps: 25 MB holds ~2.3 h
# Constrained VBR keeps each second close to the target, so chunk sizes can be planned from duration.
OPUS_OPTIONS = {"application": "voip", "vbr": "constrained"}
MAX_UNDECODABLE_PACKETS = 100  # a few damaged packets are skipped as ffmpeg's CLI would; not thousands


def pcm_blocks(path: Path, *, max_seconds: float | None = None) -> Iterator[Samples]:
    """Decode the best audio stream to 100 ms blocks of 16 kHz mono int16, streaming; video is skipped.

    `max_seconds` bounds what is decoded: a header may understate the duration (MAX_AUDIO_SECONDS is
    checked against it first), and only counting decoded samples catches that.
    """
    limit = None if max_seconds is None else int(max_seconds * TOO_LONG_SLACK * RATE)
    decoded = 0
    for block in _pcm_blocks(path):
        decoded += len(block)
        if limit is not None and decoded > limit:
            raise PermanentError(f"recording decodes to more than {max_seconds:.0f} s (MAX_AUDIO_SECONDS), "
                                 "whatever its header says", code="audio_too_long")
        yield block


def _pcm_blocks(path: Path) -> Iterator[Samples]:
    with av.open(str(path), metadata_errors="ignore") as container:
        stream = container.streams.best("audio")
        if stream is None:
            raise av.error.InvalidDataError(1094995529, "no audio stream")
        resampler: Any = None
        shape: tuple[str, str, int] | None = None
        bad = 0
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                bad += 1
                if bad > MAX_UNDECODABLE_PACKETS:
                    raise
                continue
            for frame in frames:
                if not isinstance(frame, av.AudioFrame):
                    continue
                frame_shape = (frame.format.name, frame.layout.name, frame.sample_rate)
                if frame_shape != shape:  # a stream may change layout mid-way; swresample cannot follow
                    if resampler is not None:
                        yield from _drain(resampler)
                    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE, frame_size=BLOCK)
                    shape = frame_shape
                frame.pts = None  # timestamps are irrelevant here: offsets are counted in samples
                for out in resampler.resample(frame):
                    yield out.to_ndarray()[0]
        if resampler is not None:
            yield from _drain(resampler)
        if bad:
            log.warning("audio_packets_skipped", extra={"count": bad})


def _drain(resampler: Any) -> Iterator[Samples]:
    for out in resampler.resample(None):
        yield out.to_ndarray()[0]


def quietest_point(window: Samples, target: int) -> int:
    """Index (in `window`) of the centre of its quietest 100 ms frame; ties go to the one nearest `target`."""
    if len(window) <= BLOCK:
        return len(window) // 2
    wide = window.astype(np.int64)
    energy_sum = np.concatenate(([0], np.cumsum(wide * wide)))
    starts = np.arange(0, len(window) - BLOCK + 1, HOP)
    energy = energy_sum[starts + BLOCK] - energy_sum[starts]
    # Frames within 5 % (or one LSB of RMS) of the quietest are equally good, e.g. a run of digital silence.
    quiet = starts[energy <= energy.min() * 1.05 + BLOCK] + BLOCK // 2
    return int(quiet[np.argmin(np.abs(quiet - target))])


@dataclass(frozen=True)
class Chunk:
    """One written chunk: its file and where it sits in the recording, in real seconds."""

    path: Path
    offset: float
    duration: float


class _OpusFile:
    """An Ogg/Opus file being written from int16 blocks; counts what it was given."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.samples = 0
        self.container: Any = av.open(str(path), "w", format="ogg")
        try:
            self.stream = cast(Any, self.container.add_stream(OPUS_ENCODER, rate=RATE, options=OPUS_OPTIONS))
            self.stream.layout = "mono"
            self.stream.bit_rate = OPUS_BITRATE
        except BaseException:
            self.container.close()
            raise

    def write(self, pcm: Samples) -> None:
        if not len(pcm):
            return
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self.samples
        self.samples += len(pcm)
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        try:
            for packet in self.stream.encode(None):
                self.container.mux(packet)
        finally:
            self.container.close()


class _Queue:
    """Decoded samples not yet written, indexed by absolute sample number."""

    def __init__(self) -> None:
        self.blocks: deque[Samples] = deque()
        self.start = 0
        self.end = 0

    def push(self, block: Samples) -> None:
        self.blocks.append(block)
        self.end += len(block)

    def pop_until(self, index: int) -> Samples:
        pieces: list[Samples] = []
        while self.start < index and self.blocks:
            block = self.blocks[0]
            n = min(len(block), index - self.start)
            pieces.append(block[:n])
            if n == len(block):
                self.blocks.popleft()
            else:
                self.blocks[0] = block[n:]
            self.start += n
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int16)

    def peek(self, lo: int, hi: int) -> Samples:
        pieces, pos = [], self.start
        for block in self.blocks:
            a, b = max(lo - pos, 0), min(hi - pos, len(block))
            if a < b:
                pieces.append(block[a:b])
            pos += len(block)
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int16)


@dataclass(frozen=True)
class SplitPlan:
    """Where to cut, in samples: nominal boundaries every `grid`, each searched `window` either side."""

    grid: int | None  # None: one chunk, however long
    window: int
    longest: int | None  # no chunk may hold more samples than this

    @classmethod
    def make(cls, *, max_seconds: float | None, expected_seconds: float) -> SplitPlan:
        """Spread the expected duration over the fewest equal chunks that fit under max_seconds."""
        if max_seconds is None or math.isinf(max_seconds):
            return cls(grid=None, window=0, longest=None)
        window = min(CUT_WINDOW_SECONDS, max_seconds / 8)
        longest = max_seconds - CUT_MARGIN_SECONDS
        # A cut may move `window` either way, so a chunk can be up to grid + 2 * window long.
        usable = longest - 2 * window
        count = max(1, math.ceil(expected_seconds / usable))
        grid = expected_seconds / count if count > 1 else usable
        return cls(grid=round(grid * RATE), window=round(window * RATE), longest=math.floor(longest * RATE))


def transcode_split(source: Path, workdir: Path, *, stem: str, plan: SplitPlan,
                    max_seconds: float | None = None) -> list[Chunk]:
    """Decode `source` once and write 16 kHz mono Ogg/Opus chunks into `workdir`, cutting at pauses."""
    queue = _Queue()
    written: list[tuple[Path, int]] = []
    chunk_start, boundary = 0, plan.grid
    current = _OpusFile(workdir / f"{stem}.part{len(written):03d}.ogg")

    def cut_at(index: int) -> None:
        nonlocal current, chunk_start
        current.write(queue.pop_until(index))
        current.close()
        written.append((current.path, current.samples))
        chunk_start = index
        current = _OpusFile(workdir / f"{stem}.part{len(written):03d}.ogg")

    try:
        for block in pcm_blocks(source, max_seconds=max_seconds):
            queue.push(block)
            while boundary is not None and queue.end >= boundary + plan.window:
                lo = max(boundary - plan.window, chunk_start + 1)
                cut_at(lo + quietest_point(queue.peek(lo, boundary + plan.window), boundary - lo))
                boundary += plan.grid or 0
            hold_from = queue.end if boundary is None else boundary - plan.window
            current.write(queue.pop_until(hold_from))
        if plan.longest is not None and boundary is not None and queue.end - chunk_start > plan.longest:
            # Longer than the probe said and ended inside a search window: cut in what there is.
            lo = max(boundary - plan.window, chunk_start + 1)
            cut_at(lo + quietest_point(queue.peek(lo, queue.end), boundary - lo))
        current.write(queue.pop_until(queue.end))
        current.close()
        written.append((current.path, current.samples))
    except BaseException:
        current.container.close()
        raise
    return _as_chunks(written, stem, source)


def _as_chunks(written: list[tuple[Path, int]], stem: str, source: Path) -> list[Chunk]:
    if written and written[-1][1] == 0 and len(written) > 1:  # ended exactly on a cut
        written[-1][0].unlink()
        written.pop()
    single = written[0][0].with_name(f"{stem}.ogg")
    if len(written) == 1 and single != source:  # a single file needs no part number
        written[0][0].replace(single)
        written = [(single, written[0][1])]
    chunks, offset = [], 0
    for path, samples in written:
        chunks.append(Chunk(path=path, offset=offset / RATE, duration=samples / RATE))
        offset += samples
    return chunks
