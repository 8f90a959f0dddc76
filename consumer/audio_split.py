"""Streaming PCM decode, the cut plan, and the one-pass transcode that cuts a recording into chunks.

A transcode writes 16 kHz mono: Ogg/Opus from a compressed source, FLAC from PCM (`Encoding`).

Everything here streams: the decoder hands over 100 ms blocks of 16 kHz mono int16, the only audio held
in memory is the search window around the next cut (2 x `CUT_WINDOW_SECONDS`), and each chunk is handed
over as soon as it is closed, so it can be sent while the rest are still being encoded.
`consumer.audio_copy` cuts by the same plan without re-encoding. PyAV
exceptions pass through unchanged; `consumer.audio` translates them at its boundary.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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
# Cut for latency no finer than this: shorter parts add boundaries (words split, context lost) and
# requests (each with its fixed latency) for little gain.
MIN_PART_SECONDS = 60.0
# The transcode takes its samples in blocks this long: the cuts fall on the same samples whatever the
# block, and 10 s blocks cost a hundredth of 100 ms blocks' per-block Python work (an hour of 48 kHz
# WAV: about 1 s of CPU, a third of the transcode, on a long recording's critical path).
TRANSCODE_BLOCK = 10 * RATE
# The wav demuxer hands PCM over in packets of at most 4,096 bytes (its `max_size`): an hour of 48 kHz
# mono is 84,000 packets, each a decode and a resample call. 64 kB packets take the transcode's decode and
# resample from 0.95 to 0.58 CPU s an hour (the same samples: tested), for 1.5 ms more at open (the
# stream-info read decodes the first packet), so only the transcode asks for them.
TRANSCODE_WAV_OPTIONS = {"max_size": "65536"}
ENCODE_AHEAD = 4  # decoded blocks that may wait for the encoder's thread (40 s: 1.3 MB)
# libopus takes 16 kHz input directly in this PyAV build (`av.codec.Codec("libopus", "w").audio_rates`
# lists 8/12/16/24/48 kHz), so we encode at 16 kHz and skip a pointless upsample to 48 kHz; Ogg/Opus
# always records granules at 48 kHz, and decoders output 48 kHz whatever we feed in.
OPUS_ENCODER = "libopus"
OPUS_BITRATE = 24_000  # mono speech stays fully intelligible to ASR at 24 kbps: 25 MB holds ~2.3 h
# Constrained VBR keeps each second close to the target, so chunk sizes can be planned from duration.
OPUS_OPTIONS = {"application": "voip", "vbr": "constrained"}
MAX_UNDECODABLE_PACKETS = 100  # a few damaged packets are skipped as ffmpeg's CLI would; not thousands
# A WAV's stream parameters all come from its `fmt ` chunk (libavformat/wavdec.c), so the stream-info
# read avformat_find_stream_info does after the header (up to `probesize`, 5,000,000 bytes by default)
# learns nothing: it cost 1.5 ms per open of a one-second WAV and 11 ms of a 48 kHz one of any length
# (bench: PyAV 18), and a job opens its recording three or four times. Other formats keep the default:
# ADTS AAC, MP3 or Ogg may need those packets for their parameters, and opened in 0.1-0.3 ms anyway.
WAV_OPEN_OPTIONS = {"probesize": "4096"}  # one packet: time grows with every byte read (~0.35 ms per 4 kB)


def open_input(path: Path | str, options: dict[str, str] | None = None, *,
               wav_options: dict[str, str] | None = None) -> Any:
    """av.open for reading a recording, with `WAV_OPEN_OPTIONS` and `wav_options` when it is a RIFF/RF64 WAVE."""
    with open(path, "rb") as fh:
        head = fh.read(12)
    wav = head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE"
    merged = {**WAV_OPEN_OPTIONS, **(wav_options or {}), **(options or {})} if wav else options
    return av.open(str(path), "r", metadata_errors="ignore", options=merged or None)


def pcm_blocks(path: Path, *, max_seconds: float | None = None, block: int = BLOCK,
               wav_options: dict[str, str] | None = None) -> Iterator[Samples]:
    """Decode the best audio stream to blocks of `block` 16 kHz mono int16 samples (100 ms unless told),
    streaming; video is skipped. `wav_options` go to the wav demuxer when the file is a WAV.

    `max_seconds` bounds what is decoded: a header may understate the duration (MAX_AUDIO_SECONDS is
    checked against it first), and only counting decoded samples catches that.
    """
    limit = None if max_seconds is None else int(max_seconds * TOO_LONG_SLACK * RATE)
    decoded = 0
    for samples in _pcm_blocks(path, block, wav_options):
        decoded += len(samples)
        if limit is not None and decoded > limit:
            raise PermanentError(f"recording decodes to more than {max_seconds:.0f} s (MAX_AUDIO_SECONDS), "
                                 "whatever its header says", code="audio_too_long")
        yield samples


def _pcm_blocks(path: Path, block: int, wav_options: dict[str, str] | None) -> Iterator[Samples]:
    with open_input(path, wav_options=wav_options) as container:
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
                    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE, frame_size=block)
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


@dataclass(frozen=True)
class Encoding:
    """What a transcode writes: 16 kHz mono in this codec and container."""

    encoder: str
    muxer: str
    extension: str
    options: dict[str, str]
    bit_rate: int | None
    bytes_per_second: float  # the most one second may take, container included: plans parts under a byte limit


# Compressed sources: 24 kbit/s Opus, ~3.4 KB/s with Ogg pages and VBR swings (15 % over the target).
OPUS = Encoding(OPUS_ENCODER, "ogg", "ogg", OPUS_OPTIONS, OPUS_BITRATE, OPUS_BITRATE / 8 * 1.15)
# Uncompressed sources (PCM in WAV): FLAC, lossless and about ten times cheaper to encode than Opus (an
# hour of 48 kHz WAV: ~3 s of CPU against ~15 s, on the critical path of a long recording); at worst as
# big as the 16-bit PCM (verbatim frames), 32 KB/s plus frame headers, so 25 MB still holds 13 minutes.
FLAC = Encoding("flac", "flac", "flac", {}, None, RATE * 2 * 1.02)


class _EncodedFile:
    """A file being written from int16 blocks in `encoding`; counts what it was given."""

    def __init__(self, path: Path, encoding: Encoding) -> None:
        self.path = path
        self.samples = 0
        self.container: Any = av.open(str(path), "w", format=encoding.muxer)
        try:
            self.stream = cast(Any, self.container.add_stream(encoding.encoder, rate=RATE, options=encoding.options))
            self.stream.layout = "mono"
            if encoding.bit_rate:
                self.stream.bit_rate = encoding.bit_rate
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
    """Where to cut, in samples: nominal boundaries (the first `grid` in, each part after it `taper` times the
    one before), each searched `window` either side."""

    grid: int | None  # the first part's nominal length; None: one chunk, however long
    window: int
    longest: int | None  # no chunk may hold more samples than this
    count: int = 1  # chunks the expected duration makes (one more if the audio runs longer than expected)
    taper: float = 1.0  # each nominal part this times as long as the one before (1: all equal)

    @classmethod
    def make(cls, *, max_seconds: float | None, expected_seconds: float, parts_hint: int = 1,
             taper: float = 1.0) -> SplitPlan:
        """Spread the expected duration over chunks: the fewest under max_seconds, at least `parts_hint`.

        Parts sent side by side finish together when they are equally long and ready together, so a
        recording is cut into `parts_hint` parts (transcribe.parts_hint) for latency, none shorter than
        `MIN_PART_SECONDS`; more only where max_seconds demands it. A cut that makes its parts one after
        another passes `taper` < 1: each part is then that much shorter than the one before,
        since it is ready later, so that all finish about together (not when the parts are sent one at a
        time, nor when max_seconds makes more parts than go at once or leaves no room for a longer first)."""
        wanted = max(1, min(parts_hint, math.floor(expected_seconds / MIN_PART_SECONDS)))
        taper = taper if wanted > 1 else 1.0
        if max_seconds is None or math.isinf(max_seconds):
            if wanted == 1:
                return cls(grid=None, window=0, longest=None)
            first, last = _tapered(expected_seconds, wanted, taper)
            return cls(grid=round(first * RATE), window=round(min(CUT_WINDOW_SECONDS, last / 4) * RATE),
                       longest=None, count=wanted, taper=taper)
        window = min(CUT_WINDOW_SECONDS, max_seconds / 8)
        longest = max_seconds - CUT_MARGIN_SECONDS
        # A cut may move `window` either way, so a chunk can be up to grid + 2 * window long.
        usable = longest - 2 * window
        count = max(wanted, math.ceil(expected_seconds / usable))
        if count > wanted or _tapered(expected_seconds, count, taper)[0] > usable:
            taper = 1.0  # the cap makes the parts: more than go at once wait for a turn, not for the cut
        first, last = _tapered(expected_seconds, count, taper)
        grid = first if count > 1 else usable
        if count > 1:
            window = min(window, last / 4)
        return cls(grid=round(grid * RATE), window=round(window * RATE), longest=math.floor(longest * RATE),
                   count=count, taper=taper if count > 1 else 1.0)

    def boundary(self, n: int) -> int | None:
        """The nominal end of part n - 1 (n >= 1), in samples; past `count` parts each as long as the last."""
        if self.grid is None:
            return None
        if self.taper == 1.0 or n <= 0:
            return n * self.grid
        lengths = [round(self.grid * self.taper**i) for i in range(min(n, self.count))]
        return sum(lengths) + (n - len(lengths)) * lengths[-1]

    def key(self) -> str:
        """What determines where the cuts fall, as a string: equal keys, equal parts (for one recording)."""
        taper = "" if self.taper == 1.0 else f",taper={self.taper:g}"
        return f"grid={self.grid},window={self.window},longest={self.longest},count={self.count}{taper}"


def _tapered(total: float, count: int, taper: float) -> tuple[float, float]:
    """The first and last of `count` lengths summing to `total`, each `taper` times the one before."""
    if count <= 1 or taper == 1.0:
        return total / count, total / count
    first = total * (1 - taper) / (1 - taper**count)
    return first, first * taper ** (count - 1)


def transcode_split(source: Path, workdir: Path, *, stem: str, plan: SplitPlan,
                    max_seconds: float | None = None, encoding: Encoding = OPUS) -> Iterator[Chunk]:
    """Decode `source` once into 16 kHz mono chunks in `workdir` (Ogg/Opus, or FLAC), cut at pauses; each
    yielded when closed."""
    queue = _Queue()
    written, chunk_start, boundary = 0, 0, plan.boundary(1)
    ext = encoding.extension
    encoder = _Encoder()
    current = _EncodedFile(workdir / f"{stem}.part{written:03d}.{ext}", encoding)

    def cut_at(index: int) -> Chunk:
        nonlocal current, chunk_start, written
        encoder.submit(current.write, queue.pop_until(index))
        encoder.submit(current.close)
        encoder.drain()
        chunk = Chunk(path=current.path, offset=chunk_start / RATE, duration=current.samples / RATE)
        chunk_start, written = index, written + 1
        current = _EncodedFile(workdir / f"{stem}.part{written:03d}.{ext}", encoding)
        return chunk

    try:
        for block in pcm_blocks(source, max_seconds=max_seconds, block=TRANSCODE_BLOCK,
                                wav_options=TRANSCODE_WAV_OPTIONS):
            queue.push(block)
            while boundary is not None and queue.end >= boundary + plan.window:
                lo = max(boundary - plan.window, chunk_start + 1)
                yield cut_at(lo + quietest_point(queue.peek(lo, boundary + plan.window), boundary - lo))
                boundary = plan.boundary(written + 1)
            hold_from = queue.end if boundary is None else boundary - plan.window
            encoder.submit(current.write, queue.pop_until(hold_from))
        if plan.longest is not None and boundary is not None and queue.end - chunk_start > plan.longest:
            # Longer than the probe said and ended inside a search window: cut in what there is.
            lo = max(boundary - plan.window, chunk_start + 1)
            yield cut_at(lo + quietest_point(queue.peek(lo, queue.end), boundary - lo))
        encoder.submit(current.write, queue.pop_until(queue.end))
        encoder.submit(current.close)
        encoder.drain()
    except BaseException:
        encoder.stop()  # before closing: the encoder's thread may be writing into the file
        current.container.close()
        raise
    finally:
        encoder.stop()
    path = current.path
    if current.samples == 0 and written:  # ended exactly on a cut
        path.unlink()
        return
    single = path.with_name(f"{stem}.{ext}")
    if not written and single != source:  # a single file needs no part number
        path = path.replace(single)
    yield Chunk(path=path, offset=chunk_start / RATE, duration=current.samples / RATE)


class _Encoder:
    """Runs a transcode's writes, in order, on a thread of its own. PyAV releases the GIL while FFmpeg
    encodes and resamples, so encoding a block overlaps decoding and resampling the next one: on a second
    core an hour of 48 kHz WAV is cut in about the time of the decode alone, the FLAC encode (the larger
    half) off the critical path. At most `ENCODE_AHEAD` blocks wait, so memory stays bounded."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
        self.pending: deque[Future[None]] = deque()

    def submit(self, write: Callable[..., None], *args: Any) -> None:
        self.pending.append(self.pool.submit(write, *args))
        while len(self.pending) > ENCODE_AHEAD:
            self.pending.popleft().result()

    def drain(self) -> None:
        """Wait for every write so far; re-raise the first that failed."""
        while self.pending:
            self.pending.popleft().result()

    def stop(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
