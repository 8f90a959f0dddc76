"""Recordings whose headers understate them: measured, refused as audio_too_long within seconds, never sent.

Every lying file is made here from a real encoder's output (PyAV's FLAC, PCM, AAC and libopus encoders),
then patched (FLAC STREAMINFO, WAV data-chunk size) or muxed with shrunken timestamps (MP4 `stts`, WebM
block times), so that its header claims CLAIMED seconds while its packets hold HELD. MAX_AUDIO_SECONDS is
set to LIMIT, between the two: files of minutes stand for the hours a real attacker (or a broken
recorder) would send.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import numpy as np
import openai
import pytest

from consumer import audio, audio_measure, audio_split
from consumer.audio import has_speech, prepare, probe
from consumer.errors import PermanentError
from consumer.transcribe import API_FORMATS, AudioLimits
from consumer.transcribe_local import MAX_PART_SECONDS
from consumer.transcribe_openai import OpenAITranscriber
from tests.conftest import send_job, upload
from tests.stack import wait_for
from tests.stack.openai_stub import audio_duration

RATE = 16_000
CLAIMED, HELD, LIMIT = 10, 180, 60  # seconds: what the header says, what the file holds, MAX_AUDIO_SECONDS
# HELD cut for a LIMIT-second request cap: chunks of LIMIT less the cut margin and a search window each side.
PARTS = math.ceil(HELD / (LIMIT - audio_split.CUT_MARGIN_SECONDS - 2 * min(audio_split.CUT_WINDOW_SECONDS, LIMIT / 8)))


def blocks(seconds: int, rate: int, *, loud: bool) -> Iterator[np.ndarray]:
    """One-second int16 mono blocks: a -10 dBFS 220 Hz tone (loud enough to count as speech) or zeros."""
    for second in range(seconds):
        if loud:
            t = second + np.arange(rate) / rate
            yield (0.3 * 32767 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)
        else:
            yield np.zeros(rate, np.int16)


def encode(path: Path, fmt: str, codec: str, *, seconds: int = HELD, loud: bool = True, rate: int = RATE,
           shrink: int = 1) -> Path:
    """Encode `seconds` of audio; `shrink` > 1 divides every packet's timestamps and duration by it."""
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"

        def mux(packets: list[av.Packet]) -> None:
            for packet in packets:
                if shrink > 1 and packet.pts is not None:
                    packet.pts //= shrink
                    packet.dts = packet.pts
                    packet.duration = max(1, (packet.duration or 0) // shrink)
                out.mux(packet)

        written = 0
        for block in blocks(seconds, rate, loud=loud):
            frame = av.AudioFrame.from_ndarray(block.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, written
            written += len(block)
            mux(stream.encode(frame))
        mux(stream.encode(None))
    return path


def forge_flac_total_samples(path: Path, total: int) -> None:
    """Overwrite STREAMINFO's total-samples field, leaving the audio frames as the encoder wrote them.

    RFC 9639 (FLAC), sections 8.1 and 8.2. Bytes 0-3 are the marker "fLaC"; byte 4 holds the last-block
    flag (1 bit) and the block type (7 bits, 0 = STREAMINFO, which must come first); bytes 5-7 the block's
    length (24 bits, 34). STREAMINFO then starts at byte 8: minimum and maximum block size (u16 each,
    bytes 8-11), minimum and maximum frame size (u24 each, bytes 12-17), then one big-endian 64-bit word
    at bytes 18-25 packing sample rate (20 bits), channels - 1 (3), bits per sample - 1 (5) and the total
    number of samples per channel (36 bits, the word's low bits), and the audio's MD5 (bytes 26-41).
    """
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0 and int.from_bytes(data[5:8], "big") == 34
    word = int.from_bytes(data[18:26], "big")
    word = (word & ~(2**36 - 1)) | total
    data[18:26] = word.to_bytes(8, "big")
    path.write_bytes(bytes(data))


def forge_wav_data_size(path: Path, size: int, *, riff: int | None = None) -> None:
    """Overwrite the size of the WAV's `data` chunk (and optionally the RIFF size), not its bytes.

    RIFF (Microsoft/IBM "Multimedia Programming Interface and Data Specifications 1.0", 1991): "RIFF",
    a little-endian u32 size, "WAVE", then chunks of a 4-byte id, a little-endian u32 size and the body,
    padded to an even length. Streaming writers leave 0xFFFFFFFF (or 0) in both sizes.
    """
    data = bytearray(path.read_bytes())
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    at = 12
    while data[at:at + 4] != b"data":
        at += 8 + struct.unpack_from("<I", data, at + 4)[0] + (struct.unpack_from("<I", data, at + 4)[0] & 1)
    struct.pack_into("<I", data, at + 4, size)
    if riff is not None:
        struct.pack_into("<I", data, 4, riff)
    path.write_bytes(bytes(data))


def flac_streaminfo(path: Path, loud: bool) -> Path:
    encode(path.with_suffix(".flac"), "flac", "flac", loud=loud)
    forge_flac_total_samples(path.with_suffix(".flac"), CLAIMED * RATE)
    return path.with_suffix(".flac")


def wav_data_size(path: Path, loud: bool) -> Path:
    encode(path.with_suffix(".wav"), "wav", "pcm_s16le", loud=loud)
    forge_wav_data_size(path.with_suffix(".wav"), CLAIMED * RATE * 2, riff=36 + CLAIMED * RATE * 2)
    return path.with_suffix(".wav")


def wav_streaming(path: Path, loud: bool) -> Path:
    encode(path.with_suffix(".wav"), "wav", "pcm_s16le", loud=loud)
    forge_wav_data_size(path.with_suffix(".wav"), 0xFFFFFFFF, riff=0xFFFFFFFF)
    return path.with_suffix(".wav")


def m4a_stts(path: Path, loud: bool) -> Path:
    return encode(path.with_suffix(".m4a"), "mp4", "aac", loud=loud, shrink=HELD // CLAIMED)


def webm_timestamps(path: Path, loud: bool) -> Path:
    return encode(path.with_suffix(".webm"), "webm", "libopus", rate=48_000, loud=loud, shrink=HELD // CLAIMED)


# name -> (maker, what the header claims: CLAIMED, or None when it admits it does not know)
LIARS: dict[str, tuple[Callable[[Path, bool], Path], int | None]] = {
    "flac-streaminfo": (flac_streaminfo, CLAIMED),
    "wav-data-size": (wav_data_size, CLAIMED),
    "wav-streaming": (wav_streaming, None),
    "m4a-stts": (m4a_stts, CLAIMED),
    "webm-timestamps": (webm_timestamps, CLAIMED),
}


def header_seconds(path: Path) -> float:
    """What FFmpeg believes the duration is from the header alone, as the old check_limits did."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        if stream.duration and stream.time_base:
            return float(stream.duration * stream.time_base)
        return float(container.duration or 0) / av.time_base


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(LIARS))
def test_the_duration_is_measured_not_read(name: str, tmp_path: Path) -> None:
    make, claimed = LIARS[name]
    path = make(tmp_path / name, True)
    if claimed is not None:  # the forgery works: the header says 10 s
        assert header_seconds(path) == pytest.approx(claimed, abs=0.1)
    info = probe(path)
    assert info.duration == pytest.approx(HELD, abs=0.1)
    assert claimed is None or info.header_duration == pytest.approx(claimed, abs=0.1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loud", [True, False], ids=["loud", "silent"])
@pytest.mark.parametrize("name", sorted(LIARS))
def test_a_file_holding_more_than_the_limit_fails_within_seconds(name: str, loud: bool, tmp_path: Path) -> None:
    path = LIARS[name][0](tmp_path / name, loud)
    started = time.monotonic()
    with pytest.raises(PermanentError) as caught:
        probe(path, max_seconds=LIMIT)
    elapsed = time.monotonic() - started
    assert caught.value.code == "audio_too_long"
    assert f"more than {LIMIT} s" in caught.value.message
    assert elapsed < 5, elapsed  # ~10 ms here: the count stops at the limit


@pytest.mark.timeout(60)
def test_every_decode_stops_at_the_limit_even_when_told_the_file_is_short(tmp_path: Path) -> None:
    """The measurement is one guard; the decodes in has_speech and prepare are a second, by samples."""
    path = flac_streaminfo(tmp_path / "silent", loud=False)  # silence: has_speech would decode to the end
    believed = dataclasses.replace(probe(path), duration=CLAIMED)
    with pytest.raises(PermanentError) as speech:
        has_speech(path, believed, max_seconds=LIMIT)
    assert speech.value.code == "audio_too_long"
    transcode = AudioLimits(max_bytes=None, formats=frozenset())  # nothing goes as it is
    with pytest.raises(PermanentError) as prepared:
        prepare(path, believed, transcode, tmp_path, max_total_seconds=LIMIT)
    assert prepared.value.code == "audio_too_long"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("limits", [AudioLimits(max_seconds=LIMIT, formats=API_FORMATS),  # a capped model
                                    AudioLimits(max_bytes=None, max_seconds=LIMIT, formats=None)],  # local
                         ids=["openai", "local"])
@pytest.mark.parametrize("name", ["flac-streaminfo", "m4a-stts"])
def test_the_measured_length_decides_what_is_sent(name: str, limits: AudioLimits, tmp_path: Path) -> None:
    """A header saying 10 s must not get a 3-minute original sent to a transcriber that takes 60 s a request."""
    source = tmp_path / "in"
    source.mkdir()
    path = LIARS[name][0](source / name, True)
    parts = prepare(path, probe(path), limits, tmp_path)
    assert path not in [p.path for p in parts]
    assert len(parts) == PARTS
    for part in parts:
        assert part.path.parent == tmp_path
        assert probe(part.path).duration <= LIMIT
    assert sum(p.duration or 0.0 for p in parts) == pytest.approx(HELD, abs=0.2)


@pytest.mark.timeout(120)
def test_the_local_backend_gets_parts_no_longer_than_it_decodes_at_once(tmp_path: Path) -> None:
    """faster-whisper decodes a whole part into memory: a 400 s file claiming 10 s must reach it cut."""
    seconds, rate = 400, 8000
    source = tmp_path / "in"
    source.mkdir()
    path = encode(source / "call.flac", "flac", "flac", seconds=seconds, rate=rate)
    forge_flac_total_samples(path, CLAIMED * rate)
    local = AudioLimits(max_bytes=None, max_seconds=MAX_PART_SECONDS, formats=None)  # LocalWhisperTranscriber's
    parts = prepare(path, probe(path), local, tmp_path)
    assert len(parts) == 2 and path not in [p.path for p in parts]
    assert all((p.duration or 0.0) <= MAX_PART_SECONDS for p in parts)
    assert sum(p.duration or 0.0 for p in parts) == pytest.approx(seconds, abs=0.2)


@pytest.mark.timeout(120)
def test_hours_of_silence_behind_a_ten_second_header_fail_fast(tmp_path: Path) -> None:
    """2.5 h of FLAC digital silence is 1.7 MB; its STREAMINFO says 10 s. The old code decoded all of it."""
    seconds, rate = 9000, 8000
    path = encode(tmp_path / "silence.flac", "flac", "flac", seconds=seconds, loud=False, rate=rate)
    forge_flac_total_samples(path, CLAIMED * rate)
    assert path.stat().st_size < 3_000_000
    started = time.monotonic()
    with pytest.raises(PermanentError) as caught:
        probe(path, max_seconds=3600)
    assert caught.value.code == "audio_too_long"
    assert time.monotonic() - started < 10  # ~0.3 s here: 40 % of the file demuxed, nothing decoded
    # Told it lasts 10 s, the speech check still stops decoding one hour in.
    believed = dataclasses.replace(probe(path), duration=CLAIMED)
    with pytest.raises(PermanentError, match="more than 3600 s"):
        has_speech(path, believed, max_seconds=3600)


def four_hours_of_opus(path: Path) -> Path:
    """A 4-hour Ogg/Opus file made by muxing 10 s of libopus packets over and over (encoding 4 h takes minutes)."""
    sample = encode(path.with_name("sample.ogg"), "ogg", "libopus", seconds=10, loud=True)
    with av.open(str(sample)) as src, av.open(str(path), "w", format="ogg") as out:
        template = src.streams.audio[0]
        packets = [p for p in src.demux(template) if p.size]
        stream = out.add_stream_from_template(template)
        step, pts = packets[0].duration, 0
        for i in range(4 * 3600 * 48_000 // step):
            packet = av.Packet(bytes(packets[i % len(packets)]))
            packet.stream, packet.time_base = stream, template.time_base
            packet.pts = packet.dts = pts
            packet.duration = step
            pts += step
            out.mux(packet)
    return path


@pytest.mark.timeout(120)
def test_measuring_four_hours_of_opus_takes_seconds(tmp_path: Path) -> None:
    """The cost of not trusting the header: demuxing 720,000 packets (~2 s on one idle core)."""
    path = four_hours_of_opus(tmp_path / "long.ogg")
    started = time.monotonic()
    info = probe(path, max_seconds=4 * 3600)
    elapsed = time.monotonic() - started
    assert info.duration == pytest.approx(4 * 3600, abs=0.1)
    assert elapsed < 20, elapsed  # generous: the test machines are shared


def test_opus_packets_are_counted_by_their_toc_byte() -> None:
    # RFC 6716 section 3.1: config 1 (SILK 20 ms) code 0; config 31 (CELT 20 ms) code 1 (two frames);
    # config 16 (CELT 2.5 ms) code 3 with a frame-count byte of 5; config 13 (hybrid 20 ms) code 2.
    assert audio_measure.opus_samples(bytes([1 << 3 | 0])) == 960
    assert audio_measure.opus_samples(bytes([31 << 3 | 1])) == 1920
    assert audio_measure.opus_samples(bytes([16 << 3 | 3, 5])) == 5 * 120
    assert audio_measure.opus_samples(bytes([13 << 3 | 2, 0])) == 1920
    assert audio_measure.opus_samples(b"") == 0


# ---------------------------------------------------------------------------------------------- pipeline


@pytest.mark.timeout(120)
def test_lying_recordings_fail_as_too_long_and_nothing_is_uploaded(run_daemon, aws, openai_stub, wordpress,
                                                                   tmp_path):
    jobs = {}
    for name, (make, _claimed) in sorted(LIARS.items()):
        for loud in (True, False):
            path = make(tmp_path / f"{name}-{'loud' if loud else 'silent'}", loud)
            job_id = f"liar-{path.stem}"
            upload(aws, f"audio/{path.name}", path)
            send_job(aws, job_id, f"audio/{path.name}")
            jobs[job_id] = path
    run_daemon(concurrency=2, max_audio_seconds=LIMIT)
    wait_for(lambda: all(wordpress.terminal(j) for j in jobs), timeout=90, what="a callback per lying file")
    for job_id in jobs:
        [body] = wordpress.terminal(job_id)
        assert body["status"] == "failed", (job_id, body)
        assert body["error"]["code"] == "audio_too_long", (job_id, body["error"])
        assert body["error"]["retryable"] is False
    assert openai_stub.requests == [] and openai_stub.refused == []  # not one byte went to the transcriber


@pytest.mark.timeout(120)
def test_an_understating_header_does_not_get_the_original_sent_whole(run_daemon, aws, openai_stub, wordpress,
                                                                      tmp_path):
    """Within MAX_AUDIO_SECONDS but over the model's per-request cap: cut to fit, by the measured length."""
    path = flac_streaminfo(tmp_path / "call", loud=True)  # 180 s, claims 10 s
    upload(aws, "audio/call.flac", path)
    send_job(aws, "understated-1", "audio/call.flac")
    client = openai.OpenAI(api_key="sk-test", base_url=openai_stub.base_url, max_retries=0)
    backend = OpenAITranscriber(client, model="whisper-1")
    backend.limits = dataclasses.replace(backend.limits, max_seconds=LIMIT)
    run_daemon(transcriber=backend)
    [body] = wait_for(lambda: wordpress.terminal("understated-1"), timeout=90, what="the callback")
    assert body["status"] == "completed", body
    sent = openai_stub.requests
    assert len(sent) == PARTS and all(r.filename.endswith(".ogg") for r in sent)
    assert all(0 < audio_duration(r.data) <= LIMIT for r in sent)
    assert body["transcript"]["duration_seconds"] == pytest.approx(HELD, abs=0.5)


def test_check_limits_still_refuses_a_measured_excess() -> None:
    """Measured a little past the limit (inside the measurement's slack): check_limits gives the figure."""
    info = audio.AudioInfo(container="flac", codec="flac", channels=1, sample_rate=RATE, duration=LIMIT * 1.02,
                           has_video=False, size_bytes=1000, api_format="flac", header_duration=CLAIMED)
    with pytest.raises(PermanentError, match=r"lasts 61\.2 s") as caught:
        audio.check_limits(info, max_bytes=10**6, max_seconds=LIMIT)
    assert caught.value.code == "audio_too_long"
