"""The whole pipeline on real browser recordings: what is sent upstream, and what WordPress hears."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import av
import numpy as np
import openai
import pytest

from consumer.transcribe_openai import OpenAITranscriber
from tests.conftest import send_job, upload
from tests.stack import wait_for
from tests.stack.openai_stub import Reply, audio_duration

AUDIO = Path(__file__).resolve().parent / "fixtures" / "audio"

# fixture -> (callback status, filename sent upstream or None when no request, error code)
CASES = {
    "chrome.webm": ("completed", ".webm", None),
    "safari.mp4": ("completed", ".m4a", None),
    "speech.ogg": ("completed", ".ogg", None),
    "speech.mp3": ("completed", ".mp3", None),
    "speech.wav": ("completed", ".wav", None),
    "speech.flac": ("completed", ".flac", None),
    "mislabeled.wav": ("completed", ".mp3", None),
    "video.mp4": ("completed", ".ogg", None),
    "silence.webm": ("completed", None, None),
    "garbled.webm": ("failed", None, "unsupported_audio"),
    "truncated.m4a": ("failed", None, "unsupported_audio"),
    "empty.webm": ("failed", None, "unsupported_audio"),
    "video_only.mp4": ("failed", None, "unsupported_audio"),
}


# Each model is asked in the shape its reference documents; the stand-in refuses any other (REALITY.md).
MODELS = ["gpt-transcribe", "gpt-4o-transcribe", "whisper-1"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model", MODELS)
def test_browser_recordings_end_to_end(run_daemon, aws, openai_stub, wordpress, model):
    for name in CASES:
        upload(aws, f"audio/{name}", AUDIO / name)
        send_job(aws, f"fx-{name.replace('.', '-')}", f"audio/{name}")
    run_daemon(concurrency=4, transcribe_model=model)
    wait_for(lambda: all(wordpress.terminal(f"fx-{n.replace('.', '-')}") for n in CASES), timeout=90,
             what="a callback per fixture")
    sent = openai_stub.requests
    assert not openai_stub.refused and all(r.model == model for r in sent)
    for name, (status, _suffix, code) in CASES.items():
        [body] = wordpress.terminal(f"fx-{name.replace('.', '-')}")
        assert body["status"] == status, (name, body)
        if status == "completed" and name != "silence.webm":
            transcript = body["transcript"]
            # The duration is our own measurement, and the segments span it whatever the model replies.
            assert transcript["duration_seconds"] == pytest.approx(audio_duration((AUDIO / name).read_bytes()),
                                                                   abs=0.1), name
            assert transcript["segments"][-1]["end"] == pytest.approx(transcript["duration_seconds"], abs=0.1)
        if code:
            assert body["error"]["code"] == code, (name, body["error"])
            assert body["error"]["message"]
        if name == "silence.webm":
            assert body["transcript"] == {"text": "", "duration_seconds": pytest.approx(3.0, abs=0.2),
                                          "segments": [], "no_speech": True}
    # One upstream request per transcribed fixture, each named with the extension of its real format.
    expected = sorted(suffix for _, suffix, _ in CASES.values() if suffix)
    assert sorted(Path(r.filename).suffix for r in sent) == expected
    # The video's audio track went up as Ogg/Opus, not the video file itself.
    [transcoded] = [r for r in sent if r.filename.endswith(".ogg") and r.data[:4] == b"OggS"
                    and r.data != (AUDIO / "speech.ogg").read_bytes()]
    assert len(transcoded.data) < (AUDIO / "video.mp4").stat().st_size


def _long_recording(path: Path, seconds: int) -> None:
    """Tones with a pause every 7 s, encoded as Opus in WebM like a browser would."""
    rate = 48000
    with av.open(str(path), "w", format="webm") as out:
        stream = out.add_stream("libopus", rate=rate)
        stream.layout = "mono"
        t = 0
        for second in range(seconds):
            samples = np.arange(rate) / rate
            tone = (0.3 * np.sin(2 * np.pi * 220 * (samples + second))).astype(np.float32)
            if second % 7 == 6:
                tone[:] = 0.0
            for start in range(0, rate, 960):
                frame = av.AudioFrame.from_ndarray(tone[None, start:start + 960], format="fltp", layout="mono")
                frame.sample_rate, frame.pts = rate, t
                t += 960
                for packet in stream.encode(frame):
                    out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("model", "segments_per_part"), [("gpt-transcribe", 1), ("gpt-4o-transcribe", 1),
                                                          ("whisper-1", 2)])
def test_long_recording_is_split_and_stitched(run_daemon, aws, openai_stub, wordpress, tmp_path, model,
                                              segments_per_part):
    path = tmp_path / "long.webm"
    _long_recording(path, 75)
    upload(aws, "audio/long.webm", path)
    send_job(aws, "long-1", "audio/long.webm")
    client = openai.OpenAI(api_key="sk-test", base_url=openai_stub.base_url, max_retries=0)
    backend = OpenAITranscriber(client, model=model)
    backend.limits = dataclasses.replace(backend.limits, max_seconds=30.0)
    run_daemon(transcriber=backend, transcribe_parallelism=3)
    [body] = wait_for(lambda: wordpress.terminal("long-1"), timeout=90, what="long job callback")
    assert body["status"] == "completed"
    requests = openai_stub.requests
    assert len(requests) >= 3  # 75 s in parts of at most 30 s
    # WebM/Opus is a format the API takes: the parts are packet copies of it, not a transcode.
    assert all(r.filename.endswith(".webm") and 0 < audio_duration(r.data) <= 30.0 for r in requests)
    segments = body["transcript"]["segments"]
    starts = [s["start"] for s in segments]
    assert starts == sorted(starts) and len(segments) == segments_per_part * len(requests)
    assert segments[-1]["end"] <= body["transcript"]["duration_seconds"] + 0.05
    assert body["transcript"]["duration_seconds"] == pytest.approx(75, abs=0.5)


def _capped_backend(stub, model: str = "gpt-transcribe") -> OpenAITranscriber:
    """A model that takes 30 s a request, so 75 s recordings are cut in four parts."""
    client = openai.OpenAI(api_key="sk-test", base_url=stub.base_url, max_retries=0)
    backend = OpenAITranscriber(client, model=model)
    backend.limits = dataclasses.replace(backend.limits, max_seconds=30.0)
    return backend


@pytest.mark.timeout(120)
def test_the_first_part_is_sent_before_the_last_is_cut(run_daemon, aws, openai_stub, wordpress, tmp_path,
                                                       monkeypatch):
    """A slow cut: each part after the first is closed only once a request reached the stand-in (or after
    10 s). Cutting everything before sending anything would put every cut before the first request."""
    from consumer import audio_copy

    path = tmp_path / "long.webm"
    _long_recording(path, 75)
    upload(aws, "audio/long.webm", path)
    events: list[tuple[str, str]] = []
    openai_stub.on_request = lambda request: events.append(("sent", request.filename))
    close = audio_copy._Part.close

    def slow_close(part: audio_copy._Part) -> None:
        if not part.path.name.endswith("part000.webm"):
            with contextlib.suppress(AssertionError):
                wait_for(openai_stub.count, timeout=10, what="a request before the next part is closed")
        close(part)
        events.append(("cut", part.path.name))

    monkeypatch.setattr(audio_copy._Part, "close", slow_close)
    send_job(aws, "slow-cut", "audio/long.webm")
    run_daemon(transcriber=_capped_backend(openai_stub), transcribe_parallelism=4)
    [body] = wait_for(lambda: wordpress.terminal("slow-cut"), timeout=90, what="callback")
    assert body["status"] == "completed"
    cuts = [name for kind, name in events if kind == "cut"]
    assert len(cuts) == 4 and cuts == sorted(cuts)
    assert events.index(("sent", "original.part000.webm")) < events.index(("cut", cuts[-1]))


@pytest.mark.timeout(120)
def test_requests_in_flight_are_bounded_across_jobs(run_daemon, aws, openai_stub, wordpress, tmp_path):
    """Two jobs of four parts, two at a time each, TRANSCRIBE_MAX_REQUESTS=3: never 4 at once, and 3 only
    when both jobs are sending (one job alone has at most 2)."""
    path = tmp_path / "long.webm"
    _long_recording(path, 75)
    for job in ("a", "b"):
        upload(aws, f"audio/{job}.webm", path)
        send_job(aws, f"shared-{job}", f"audio/{job}.webm")
    openai_stub.latency = 1.0
    run_daemon(transcriber=_capped_backend(openai_stub), concurrency=2, transcribe_parallelism=2,
               transcribe_max_requests=3)
    wait_for(lambda: all(wordpress.terminal(f"shared-{j}") for j in ("a", "b")), timeout=90, what="both callbacks")
    assert openai_stub.count() == 8
    assert openai_stub.peak_in_flight == 3


@pytest.mark.timeout(120)
def test_a_retry_sends_only_the_parts_still_missing(run_daemon, aws, openai_stub, wordpress, tmp_path):
    """Parts sent side by side, the third to arrive fails (slowly, so all four are on the wire): the retry
    cuts the same parts and sends that one alone."""
    path = tmp_path / "long.webm"
    _long_recording(path, 75)
    upload(aws, "audio/long.webm", path)
    openai_stub.script.extend([Reply(), Reply(), Reply(500, delay=1.0)])
    send_job(aws, "retry-parts", "audio/long.webm")
    run_daemon(transcriber=_capped_backend(openai_stub), transcribe_parallelism=4)
    [body] = wait_for(lambda: wordpress.terminal("retry-parts"), timeout=90, what="callback")
    assert body["status"] == "completed"
    names = [r.filename for r in openai_stub.requests]
    assert len(names) == 5 and sorted(set(names)) == [f"original.part{i:03d}.webm" for i in range(4)]
    assert names[4:] == [names[2]]  # only the part that failed went up again
    assert len(body["transcript"]["segments"]) == 4
