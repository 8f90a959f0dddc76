"""consumer.audio: probe, limits, the speech check and prepare, on real encoded recordings.

The small fixtures in tests/fixtures/audio/ come from tests/fixtures/make_fixtures.py. Long recordings
are generated here, streamed to disk, with pauses at known places so the cuts can be checked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest

from consumer import audio, audio_split
from consumer.audio import AudioInfo, check_limits, has_speech, prepare, probe
from consumer.errors import PermanentError, RetryableError
from consumer.models import Segment, Transcript
from consumer.transcribe import API_FORMATS, AudioLimits, stitch

FIXTURES = Path(__file__).parent / "fixtures" / "audio"
TRUTH = json.loads((FIXTURES / "manifest.json").read_text())
SPEECH_SECONDS = TRUTH["speech_seconds"]
API = AudioLimits()  # the OpenAI defaults: 25 MB, the API's formats, no duration cap

# file -> (container, codec, channels, sample rate, has_video, api_format)
PROBES = {
    "chrome.webm": ("webm", "opus", 1, 48_000, False, "webm"),
    "safari.mp4": ("mp4", "aac", 1, 48_000, False, "m4a"),
    "speech.ogg": ("ogg", "vorbis", 2, 44_100, False, "ogg"),
    "speech.mp3": ("mp3", "mp3", 2, 44_100, False, "mp3"),
    "speech.wav": ("wav", "pcm_s16le", 1, 8_000, False, "wav"),
    "speech.flac": ("flac", "flac", 1, 16_000, False, "flac"),
    "video.mp4": ("mp4", "aac", 1, 48_000, True, "mp4"),
    "mislabeled.wav": ("mp3", "mp3", 2, 44_100, False, "mp3"),
}


@pytest.mark.parametrize("name", sorted(PROBES))
def test_probe_describes_each_recording(name: str) -> None:
    path = FIXTURES / name
    info = probe(path)
    container, codec, channels, rate, has_video, api_format = PROBES[name]
    assert (info.container, info.codec, info.channels, info.sample_rate) == (container, codec, channels, rate)
    assert (info.has_video, info.api_format, info.size_bytes) == (has_video, api_format, path.stat().st_size)
    # Encoders add up to one frame of priming (AAC: 1024 samples = 21 ms at 48 kHz).
    assert info.duration == pytest.approx(SPEECH_SECONDS, abs=0.05)


def test_chrome_webm_duration_comes_from_the_stream() -> None:
    with av.open(str(FIXTURES / "chrome.webm")) as container:
        assert container.duration is None  # as MediaRecorder writes it: no length in the header
        assert container.streams.audio[0].duration is None
    assert probe(FIXTURES / "chrome.webm").duration == pytest.approx(SPEECH_SECONDS, abs=0.02)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("empty.webm", "the object is 0 bytes"),
        ("garbled.webm", "not a readable audio file"),
        ("truncated.m4a", "damaged, truncated"),
        ("video_only.mp4", "no audio stream found (container mp4 has only video)"),
    ],
)
def test_unusable_files_are_refused_with_a_reason(name: str, expected: str) -> None:
    with pytest.raises(PermanentError) as caught:
        probe(FIXTURES / name)
    assert caught.value.code == "unsupported_audio"
    assert expected in caught.value.message


def test_audio_stream_without_data_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "header-only.wav"
    with wave.open(str(path), "wb") as out:  # a recorder that crashed before the first sample
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16_000)
    with pytest.raises(PermanentError, match=r"has no audio data|lasts 0 seconds") as caught:
        probe(path)
    assert caught.value.code == "unsupported_audio"


def test_av_errors_are_translated_by_table() -> None:
    invalid = audio.translate_av_error(av.error.InvalidDataError(1094995529, "Invalid data"))
    assert isinstance(invalid, PermanentError)
    assert invalid.code == "unsupported_audio"
    disk = audio.translate_av_error(av.error.OSError(28, "No space left on device"))
    assert isinstance(disk, RetryableError)
    assert "No space left on device" in disk.message
    assert audio.translate_av_error(av.error.UndefinedError(-1, "odd")).code == "unsupported_audio"


def test_check_limits_names_the_numbers() -> None:
    info = probe(FIXTURES / "speech.wav")
    check_limits(info, max_bytes=info.size_bytes, max_seconds=info.duration)
    with pytest.raises(PermanentError, match=f"{info.size_bytes:,} bytes.*limit is 1,000 bytes") as big:
        check_limits(info, max_bytes=1000, max_seconds=3600)
    assert big.value.code == "audio_too_large"
    with pytest.raises(PermanentError, match=r"lasts 4\.2 s.*limit is 2 s") as long:
        check_limits(info, max_bytes=10**9, max_seconds=2)
    assert long.value.code == "audio_too_long"


@pytest.mark.parametrize("name", ["chrome.webm", "safari.mp4", "speech.mp3", "speech.wav", "video.mp4"])
def test_speech_is_detected(name: str) -> None:
    assert has_speech(FIXTURES / name, probe(FIXTURES / name))


def test_silence_is_not_speech(tmp_path: Path) -> None:
    muted = FIXTURES / "silence.webm"  # a live microphone with nobody talking
    assert not has_speech(muted, probe(muted))
    zeros = tmp_path / "zeros.flac"  # digital silence
    write_recording(zeros, [], seconds=5, fmt="flac", codec="flac")
    assert not has_speech(zeros, probe(zeros))


@pytest.mark.parametrize(("name", "filename"), [("chrome.webm", "chrome.webm"), ("safari.mp4", "safari.m4a"),
                                                ("mislabeled.wav", "mislabeled.mp3")])  # fmt: skip
def test_accepted_formats_are_sent_as_they_are(name: str, filename: str, tmp_path: Path) -> None:
    info = probe(FIXTURES / name)
    parts = prepare(FIXTURES / name, info, API, tmp_path)
    assert [(p.path, p.filename, p.offset, p.duration) for p in parts] == [
        (FIXTURES / name, filename, 0.0, info.duration)
    ]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("name", "limits"),
    [
        ("video.mp4", API),  # the API would upload the video track for nothing
        ("chrome.webm", AudioLimits(formats=frozenset({"mp3", "wav"}))),
        ("speech.flac", AudioLimits(max_bytes=50_000)),  # over the byte limit, a transcode fits
    ],
)
def test_others_are_transcoded_to_mono_opus(name: str, limits: AudioLimits, tmp_path: Path) -> None:
    info = probe(FIXTURES / name)
    [part] = prepare(FIXTURES / name, info, limits, tmp_path)
    assert part.path.parent == tmp_path
    assert part.filename == f"{Path(name).stem}.ogg"
    out = probe(part.path)
    assert (out.container, out.codec, out.channels, out.has_video, out.api_format) == ("ogg", "opus", 1, False, "ogg")
    assert part.offset == 0.0
    assert part.duration == pytest.approx(SPEECH_SECONDS, abs=0.05)
    assert has_speech(part.path, out)
    assert out.size_bytes < 20_000  # ~24 kbps


def test_a_format_the_api_lacks_is_transcoded_unless_any_format_goes(tmp_path: Path) -> None:
    path = tmp_path / "android.aac"  # raw ADTS AAC: PyAV decodes it, the API's list does not name it
    with av.open(str(FIXTURES / "speech.wav")) as src, av.open(str(path), "w", format="adts") as out:
        stream = out.add_stream("aac", rate=16_000)
        stream.layout = "mono"
        for frame in src.decode(audio=0):
            frame.pts = None
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    info = probe(path)
    assert (info.container, info.codec, info.api_format) == ("aac", "aac", None)
    [part] = prepare(path, info, API, tmp_path)
    assert part.filename == "android.ogg"
    assert probe(part.path).codec == "opus"
    # A local backend takes whatever PyAV decodes (formats=None): the original goes as it is.
    [original] = prepare(path, info, AudioLimits(max_bytes=None, formats=None), tmp_path)
    assert (original.path, original.filename) == (path, "android.aac")


def test_limits_too_small_to_cut_between_words_are_refused(tmp_path: Path) -> None:
    info = probe(FIXTURES / "speech.flac")
    with pytest.raises(PermanentError, match="at least 30 s"):
        prepare(FIXTURES / "speech.flac", info, AudioLimits(max_seconds=4.0), tmp_path)


# ---------------------------------------------------------------------------------- long recordings

RATE = 16_000


@dataclass(frozen=True)
class Recording:
    path: Path
    seconds: float
    pauses: list[tuple[float, float]]  # (start, end) of every gap between utterances


def talk_plan(seconds: float, seed: int) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Utterances of 3-8 s separated by pauses of 0.6-1.5 s, like two people taking turns."""
    rng = np.random.default_rng(seed)
    talks, pauses, t = [], [], 0.0
    while t < seconds:
        talk, pause = rng.uniform(3, 8), rng.uniform(0.6, 1.5)
        talks.append((t, min(t + talk, seconds)))
        if t + talk < seconds:
            pauses.append((t + talk, min(t + talk + pause, seconds)))
        t += talk + pause
    return talks, pauses


def speechlike(talks: list[tuple[float, float]], seconds: float, seed: int) -> Iterator[np.ndarray]:
    """One-second int16 blocks: a voiced, syllable-modulated tone while talking, room noise otherwise."""
    rng = np.random.default_rng(seed)
    total = round(seconds * RATE)
    for start in range(0, total, RATE):
        t = (start + np.arange(min(RATE, total - start))) / RATE
        talking = np.zeros(len(t), bool)
        for a, b in talks:
            if a <= t[-1] and b >= t[0]:
                talking |= (t >= a) & (t < b)
        envelope = 0.6 + 0.4 * np.abs(np.sin(2 * np.pi * 2.5 * t))
        voice = 0.15 * envelope * (np.sin(2 * np.pi * 140 * t) + 0.5 * np.sin(2 * np.pi * 280 * t + 1))
        signal = rng.standard_normal(len(t)) * 0.001 + np.where(talking, voice, 0.0)
        yield (signal * 32767).astype(np.int16)


def write_recording(
    path: Path, talks: list[tuple[float, float]], *, seconds: float, fmt: str = "wav", codec: str = "pcm_s16le"
) -> None:
    """Stream a 16 kHz mono recording to `path`, a second at a time (silence when `talks` is empty)."""
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=RATE)
        stream.layout = "mono"
        written = 0
        blocks = (
            speechlike(talks, seconds, seed=5) if talks else (np.zeros(RATE, np.int16) for _ in range(int(seconds)))
        )
        for block in blocks:
            frame = av.AudioFrame.from_ndarray(block.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts = RATE, written
            written += len(block)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


@pytest.fixture(scope="module")
def half_hour(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    seconds = 1800.0
    talks, pauses = talk_plan(seconds, seed=3)
    path = tmp_path_factory.mktemp("long") / "call.wav"
    write_recording(path, talks, seconds=seconds)
    return Recording(path, seconds, pauses)


def check_chunks(parts: list[audio.AudioPart], recording: Recording, limits: AudioLimits) -> None:
    """Every chunk under both limits, offsets the running sum of real durations, every cut in a pause."""
    expected_offset = 0.0
    for part in parts:
        info = probe(part.path)
        assert (info.container, info.codec, info.channels) == ("flac", "flac", 1)  # a WAV's PCM: lossless parts
        assert limits.max_seconds is None or info.duration <= limits.max_seconds
        assert limits.max_bytes is None or info.size_bytes <= limits.max_bytes
        # The probe counts packets: the last one's padding (up to one 20 ms frame) is counted too.
        assert part.duration == pytest.approx(info.duration, abs=0.021)
        assert part.offset == pytest.approx(expected_offset, abs=1e-9)
        expected_offset += part.duration or 0.0
    assert [p.offset for p in parts] == sorted({p.offset for p in parts})
    assert expected_offset == pytest.approx(recording.seconds, abs=0.5)
    for part in parts[1:]:
        assert any(a + 0.04 <= part.offset <= b - 0.04 for a, b in recording.pauses), part.offset


def test_long_recording_is_cut_at_pauses_under_max_seconds(half_hour: Recording, tmp_path: Path) -> None:
    limits = AudioLimits(max_seconds=300, formats=API_FORMATS)
    info = probe(half_hour.path)
    assert info.api_format == "wav"  # an accepted format, but too long for one request
    parts = prepare(half_hour.path, info, limits, tmp_path)
    usable = 300 - audio_split.CUT_MARGIN_SECONDS - 2 * audio_split.CUT_WINDOW_SECONDS
    assert len(parts) == math.ceil(half_hour.seconds / usable) == 7
    assert [p.filename for p in parts] == [f"call.part{i:03d}.flac" for i in range(7)]
    check_chunks(parts, half_hour, limits)

    # Stitching per-chunk transcripts puts every segment on the recording's own clock.
    results = [Transcript(text=f"chunk {i}", segments=fake_segments(p.duration or 0.0)) for i, p in enumerate(parts)]
    stitched = stitch(parts, results)
    starts = [s.start for s in stitched.segments]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    assert all(s.end <= half_hour.seconds + 0.5 for s in stitched.segments)
    assert stitched.duration_seconds == pytest.approx(half_hour.seconds, abs=0.5)


def fake_segments(duration: float) -> list[Segment]:
    """What a model might return for a chunk: a segment every 7 s, none past the chunk's end."""
    return [Segment(start=t, end=min(t + 6.5, duration), text="words") for t in np.arange(0.0, duration, 7.0)]


def test_byte_limit_splits_too(tmp_path: Path) -> None:
    seconds = 600.0
    talks, pauses = talk_plan(seconds, seed=9)
    source = tmp_path / "source"
    source.mkdir()
    path = source / "call.wav"
    write_recording(path, talks, seconds=seconds)
    limits = AudioLimits(max_bytes=4_000_000)  # ~120 s of 16 kHz FLAC at its worst (verbatim PCM)
    parts = prepare(path, probe(path), limits, tmp_path)
    longest = (4_000_000 - audio.OGG_HEADER_BYTES) / audio_split.FLAC.bytes_per_second
    usable = longest - audio_split.CUT_MARGIN_SECONDS - 2 * audio_split.CUT_WINDOW_SECONDS
    assert len(parts) == math.ceil(seconds / usable) == 6
    check_chunks(parts, Recording(path, seconds, pauses), limits)


def test_chunks_go_to_the_workdir_only(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    copy = shutil.copy(FIXTURES / "video.mp4", source / "original")
    parts = prepare(Path(copy), probe(Path(copy)), API, tmp_path)
    assert [p.filename for p in parts] == ["original.ogg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "original.ogg"]


def test_audio_info_is_a_value() -> None:
    info = probe(FIXTURES / "speech.flac")
    assert info == AudioInfo(**{**info.__dict__})
    with pytest.raises(AttributeError):
        info.duration = 1.0  # type: ignore[misc]


def test_decoded_length_is_bounded_whatever_the_header_says(tmp_path):
    """MAX_AUDIO_SECONDS is checked on the header first; the transcode counts decoded samples too."""
    from consumer import audio as audio_mod
    from consumer.errors import PermanentError
    from consumer.transcribe import AudioLimits

    src = FIXTURES / "speech.wav"
    info = audio_mod.probe(src)
    lying = dataclasses.replace(info, duration=0.5)  # as if the header understated the length
    with pytest.raises(PermanentError) as err:
        audio_mod.prepare(src, lying, AudioLimits(max_bytes=None, formats=frozenset()), tmp_path, max_total_seconds=1.0)
    assert err.value.code == "audio_too_long"


# ------------------------------------------------------------------ cut by packet copy, for latency

# Recordings whose codec the API takes: Chrome's MediaRecorder (WebM/Opus, written live: no length in the
# header) and Firefox's (Ogg/Opus), at 48 kHz as a browser records.
COPIED = {"webm": ("webm", "libopus", 48_000, {"live": "1"}), "ogg": ("ogg", "libopus", 48_000, {})}


def write_browser_recording(path: Path, talks: list[tuple[float, float]], *, seconds: float, fmt: str,
                            codec: str, rate: int, options: dict[str, str]) -> None:
    """`speechlike` audio encoded as a browser would, streamed to disk a second at a time."""
    with av.open(str(path), "w", format=fmt, options=options) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        stream.bit_rate = 32_000
        written = 0
        for block in speechlike(talks, seconds, seed=5):
            upsampled = block[np.arange(len(block) * rate // RATE) * RATE // rate]
            frame = av.AudioFrame.from_ndarray(upsampled.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, written
            written += len(upsampled)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


@pytest.fixture(scope="module")
def browser_recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Recording]:
    seconds = 600.0
    talks, pauses = talk_plan(seconds, seed=11)
    folder = tmp_path_factory.mktemp("browser")
    made = {}
    for ext, (fmt, codec, rate, options) in COPIED.items():
        path = folder / f"call.{ext}"
        write_browser_recording(path, talks, seconds=seconds, fmt=fmt, codec=codec, rate=rate, options=options)
        made[ext] = Recording(path, seconds, pauses)
    return made


def decoded_seconds(path: Path) -> float:
    """What a decoder makes of the file: every sample it outputs, counted."""
    with av.open(str(path)) as container:
        return sum(frame.samples / frame.sample_rate for frame in container.decode(audio=0))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ext", sorted(COPIED))
def test_a_codec_the_api_takes_is_cut_by_packet_copy_at_pauses(ext: str, browser_recordings: dict[str, Recording],
                                                              tmp_path: Path) -> None:
    from tests.stack.openai_stub import TranscriptionRequest, check

    recording = browser_recordings[ext]
    info = probe(recording.path)
    cut = audio.cut(recording.path, info, AudioLimits(max_seconds=1260), tmp_path, parts_hint=8)
    parts = list(cut.parts)
    assert cut.plan.startswith(f"{audio.CUT_VERSION}:copy:") and cut.count == len(parts) == 8
    assert [p.filename for p in parts] == [f"call.part{i:03d}.{ext}" for i in range(8)]
    assert f"taper={audio.COPY_TAPER:g}" in cut.plan  # each part a little shorter than the one before
    first = recording.seconds * (1 - audio.COPY_TAPER) / (1 - audio.COPY_TAPER**8)
    offset = 0.0
    for i, part in enumerate(parts):
        out = probe(part.path)
        # The same codec in the same container, not a re-encode: the API takes it as what its name says.
        assert (out.container, out.codec, out.api_format) == (info.container, info.codec, ext)
        assert out.sample_rate == info.sample_rate
        request = TranscriptionRequest({"model": "gpt-4o-transcribe"}, {}, part.filename, part.path.read_bytes())
        assert check(request) is None, part.filename
        # Each part decodes to what the cut says it holds, and starts where the previous one ended.
        assert part.duration == pytest.approx(decoded_seconds(part.path), abs=0.03)
        assert part.offset == pytest.approx(offset, abs=0.03)
        offset = part.offset + (part.duration or 0.0)
        nominal = first * audio.COPY_TAPER**i  # 80 s down to 70 s, moved at most a window either way at each end
        window = audio_split.CUT_WINDOW_SECONDS
        assert nominal - 2 * window <= (part.duration or 0.0) <= nominal + 2 * window
    assert sum(decoded_seconds(p.path) for p in parts) == pytest.approx(decoded_seconds(recording.path), abs=0.1)
    for part in parts[1:]:  # every cut falls in a pause between utterances (packets are 20 ms)
        assert any(a + 0.03 <= part.offset <= b - 0.03 for a, b in recording.pauses), part.offset


@pytest.mark.timeout(120)
def test_the_cut_is_the_same_every_time(browser_recordings: dict[str, Recording], tmp_path: Path) -> None:
    """A retry sends only the parts still missing, by index: index i must be the same audio every time."""
    recording = browser_recordings["webm"]
    runs = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        cut = audio.cut(recording.path, probe(recording.path), API, tmp_path / run, parts_hint=6)
        parts = list(cut.parts)
        runs.append((cut.plan, [(p.filename, p.offset, p.duration, packets(p.path)) for p in parts]))
    assert runs[0] == runs[1] and len(runs[0][1]) == 6


def packets(path: Path) -> list[bytes]:
    """The audio a file holds, packet by packet (a muxer's own header, e.g. a Matroska segment UID, aside)."""
    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(audio=0) if p.size]


def test_parts_are_handed_over_while_the_rest_are_cut(browser_recordings: dict[str, Recording],
                                                      tmp_path: Path) -> None:
    recording = browser_recordings["webm"]
    cut = audio.cut(recording.path, probe(recording.path), API, tmp_path, parts_hint=4)
    first = next(cut.parts)
    assert first.path.exists() and first.offset == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["call.part000.webm"]  # the rest not cut yet
    assert len([first, *cut.parts]) == 4


@pytest.mark.parametrize(("seconds", "hint", "cap", "count"), [
    (3600, 8, 1260, 8),  # an hour: eight parts side by side, not the three the model's cap needs
    (3600, 2, 1260, 3),  # the cap still rules: parts of 30 minutes would be refused
    (300, 8, 1260, 5),  # none under a minute
    (90, 8, 1260, 1),  # too short to gain anything: sent as it is
    (3600, 8, None, 8),  # no cap (whisper-1): cut for latency all the same
])
def test_part_count_is_chosen_for_latency(seconds: float, hint: int, cap: float | None, count: int) -> None:
    plan = audio_split.SplitPlan.make(max_seconds=cap, expected_seconds=seconds, parts_hint=hint)
    assert plan.count == count
    if count > 1:
        assert plan.grid == pytest.approx(seconds / count * RATE, abs=1)
        assert plan.window <= (plan.grid or 0) / 4


@pytest.mark.parametrize(("cap", "count"), [(1260, 8), (None, 8), (766, 8)])
def test_parts_cut_one_after_another_get_shorter(cap: float | None, count: int) -> None:
    """A tapered plan: each nominal part `taper` times the one before, summing to the recording, the first
    (the longest) under the cap, windows clear of the shortest part; not tapered for one request at a time."""
    plan = audio_split.SplitPlan.make(max_seconds=cap, expected_seconds=3600, parts_hint=8, taper=0.96)
    assert plan.count == count and plan.taper == 0.96 and "taper=0.96" in plan.key(), plan
    ends = [plan.boundary(n) or 0 for n in range(count + 1)]
    lengths = np.diff(ends)
    assert ends[count] == pytest.approx(3600 * RATE, abs=count)
    assert lengths[1:] / lengths[:-1] == pytest.approx(0.96, abs=1e-4)
    assert cap is None or lengths[0] + 2 * plan.window <= (cap - audio_split.CUT_MARGIN_SECONDS) * RATE
    assert plan.window <= lengths[-1] / 4
    assert plan.boundary(count + 2) == ends[count] + 2 * lengths[-1]  # audio longer than measured
    one_at_a_time = audio_split.SplitPlan.make(max_seconds=cap, expected_seconds=3600, parts_hint=1, taper=0.96)
    assert one_at_a_time.taper == 1.0 and "taper" not in one_at_a_time.key()


@pytest.mark.parametrize(("cap", "hint", "count"), [(300, 8, 13), (530, 8, 8)])
def test_parts_the_cap_makes_stay_equal(cap: float, hint: int, count: int) -> None:
    """More parts than go at once (they wait for a turn, not for the cut), or no room under the cap for a
    longer first part: equal parts, as many as without a taper."""
    plan = audio_split.SplitPlan.make(max_seconds=cap, expected_seconds=3600, parts_hint=hint, taper=0.96)
    assert plan == audio_split.SplitPlan.make(max_seconds=cap, expected_seconds=3600, parts_hint=hint)
    assert plan.count == count and plan.taper == 1.0


def test_equal_parts_keep_their_plan() -> None:
    """Without a taper the boundaries and the plan's key are what they were: parts stored by earlier code
    (WebM/Opus packet copies) are still found by their plan on a retry."""
    plan = audio_split.SplitPlan.make(max_seconds=1260, expected_seconds=3600, parts_hint=8)
    assert plan.key() == "grid=7200000,window=160000,longest=20144000,count=8"
    assert [plan.boundary(n) for n in (1, 2, 9)] == [7_200_000, 14_400_000, 64_800_000]


def decoded_pcm(path: Path) -> np.ndarray:
    return np.concatenate(list(audio_split.pcm_blocks(path)))


@pytest.mark.timeout(300)
def test_a_wav_is_cut_into_shorter_and_shorter_lossless_parts(half_hour: Recording, tmp_path: Path) -> None:
    """Sent side by side, a WAV's FLAC parts shorten one after another (the last is ready last), every cut
    in a pause, the parts together exactly the recording's samples, and the same parts every time."""
    limits = AudioLimits(max_seconds=1260, formats=API_FORMATS)
    runs = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        cut = audio.cut(half_hour.path, probe(half_hour.path), limits, tmp_path / run, parts_hint=8)
        parts = list(cut.parts)
        runs.append((cut.plan, [(p.filename, p.offset, p.duration, p.path.read_bytes()) for p in parts]))
    assert runs[0] == runs[1]
    assert f"taper={audio.TRANSCODE_TAPER:g}" in runs[0][0] and len(parts) == 8
    check_chunks(parts, half_hour, limits)
    durations = [p.duration or 0.0 for p in parts]
    nominal = [half_hour.seconds * (1 - audio.TRANSCODE_TAPER) / (1 - audio.TRANSCODE_TAPER**8)
               * audio.TRANSCODE_TAPER**i for i in range(8)]
    window = audio_split.CUT_WINDOW_SECONDS
    assert all(n - 2 * window <= d <= n + 2 * window for n, d in zip(nominal, durations, strict=True))
    assert durations[0] > durations[-1] + 40
    together = np.concatenate([decoded_pcm(p.path) for p in parts])
    assert np.array_equal(together, decoded_pcm(half_hour.path))  # FLAC: not a sample lost or changed


def test_the_transcode_block_and_packet_size_change_no_byte(half_hour: Recording, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The transcode reads 10 s blocks and 64 kB WAV packets for speed; 100 ms blocks of the demuxer's
    default 4 kB packets cut the same parts, byte for byte."""
    limits = AudioLimits(max_seconds=600, formats=API_FORMATS)
    made, big, small = {}, audio_split.TRANSCODE_BLOCK, audio_split.BLOCK
    packets = {big: audio_split.TRANSCODE_WAV_OPTIONS, small: {}}
    for block in (big, small):
        monkeypatch.setattr(audio_split, "TRANSCODE_BLOCK", block)
        monkeypatch.setattr(audio_split, "TRANSCODE_WAV_OPTIONS", packets[block])
        (tmp_path / str(block)).mkdir()
        cut = audio.cut(half_hour.path, probe(half_hour.path), limits, tmp_path / str(block), parts_hint=4)
        made[block] = [(p.offset, p.path.read_bytes()) for p in cut.parts]
    assert made[big] == made[small] and len(made[small]) == 4


def test_a_short_recording_the_api_takes_goes_as_it_is_whatever_the_hint(tmp_path: Path) -> None:
    info = probe(FIXTURES / "chrome.webm")
    cut = audio.cut(FIXTURES / "chrome.webm", info, API, tmp_path, parts_hint=8)
    assert cut.count == 1 and [p.path for p in cut.parts] == [FIXTURES / "chrome.webm"]
