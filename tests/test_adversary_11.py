"""Issue 11's promises attacked with ordinary sequences and hostile inputs: each test here reproduces a
bug, is marked `xfail(strict=True)` until the code is fixed, and says in its docstring what it does.

Sources for the facts used (see also /tmp/helper/reality-additions-adversary11.md):
  - the real API refuses a language Whisper does not know with HTTP 400 naming `param: "language"`
    ("Invalid language 'zh-tw'. Language parameter must be specified in ISO-639-1 format.", code
    `invalid_language_format`; its list of supported values is quoted in jambonz/jambonz-api-server
    PR #402), so one job's language hint can draw a 400 that says nothing about the deployment;
  - faster-whisper's `decode_audio` (the local backend's default decoder) decodes `container.decode(audio=0)`,
    the file's *first* audio stream, while the daemon measures `container.streams.best("audio")`;
  - systemd.exec(5) / sd-daemon(3): a line on the journal stream without a `<N>` prefix is stored at the
    unit's SyslogLevel (info).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import openai
import pytest

from consumer import audio
from consumer.check import probe_transcriber
from consumer.errors import ConfigError, PermanentError
from consumer.transcribe import AudioLimits, AudioPart
from consumer.transcribe_local import MAX_PART_SECONDS
from consumer.transcribe_openai import OpenAITranscriber
from tests.conftest import SPEECH
from tests.stack import openai_stub as stand_in
from tests.stack.openai_stub import error

RATE = 16_000
LIMIT = 60.0  # MAX_AUDIO_SECONDS in the audio tests
# The real API's refusal of a language Whisper does not support (quoted in public clients' tests and
# threads; its list of supported values in jambonz-api-server PR #402). `eo` (Esperanto) is ISO-639-1
# and a WordPress locale, so it passes the job schema, but it is not in that list.
UNSUPPORTED_LANGUAGE = error("Invalid language 'eo'. Language parameter must be specified in ISO-639-1 format.",
                             param="language", code="invalid_language_format")


def backend(stub: stand_in.OpenAIStub, model: str) -> OpenAITranscriber:
    client = openai.OpenAI(api_key="sk-test", base_url=stub.base_url, max_retries=0, timeout=10.0)
    return OpenAITranscriber(client, model=model)


def speech() -> AudioPart:
    return AudioPart(SPEECH, "recording.wav", duration=stand_in.audio_duration(SPEECH.read_bytes()))


# ------------------------------------------------------------------------------------------- requests

@pytest.mark.parametrize(("model", "param"), [("whisper-1", "language"), ("gpt-4o-transcribe", "language"),
                                            ("gpt-transcribe", "languages")])
def test_one_jobs_unsupported_language_does_not_strip_the_hint_from_every_later_job(openai_stub, model, param):
    """Sequence: job 1 carries language `eo` (valid ISO-639-1, valid in the job schema, not supported by
    Whisper); the API answers 400 with `param: "language"`. The backend takes that as "this endpoint
    refuses the `language` parameter", drops it and remembers that for the life of the process. Job 2
    carries `de`: it is sent without any language, and so is every job after it, silently (one WARNING
    for the whole process). The refusal was about a value of one job, not about the parameter."""
    t = backend(openai_stub, model)  # the stand-in refuses `eo` as the API does (param `language[s]`)
    t.transcribe(speech(), language="eo", prompt=None)  # the job itself goes on without its hint: fine
    t.transcribe(speech(), language="de", prompt=None)
    last = openai_stub.requests[-1]
    sent = last.fields.get("language") or (last.lists.get("languages") or [None])[0]
    assert sent == "de", (last.fields, last.lists.get("languages"))
    assert [body["error"]["param"] for _, _, body in openai_stub.refused] == [param]


def test_the_probe_sends_the_optional_fields_a_job_sends(openai_stub, monkeypatch):
    """Sequence: the endpoint refuses `languages[]` for the configured model (here the stand-in's
    gpt-transcribe rule is turned off: an API revision, a proxy or a compatible server that does not
    take it). A job from WordPress carries a language (get_locale), so every job meets a 400 naming
    `languages` and falls back without its hint. `check --probe` (deploy checkpoint 2) transcribes the
    clip with language=None and prompt=None, so the field is never sent, nothing is refused, and the
    probe passes: the refusal first meets traffic, which is what the probe was for."""
    rules = stand_in.MODELS["gpt-transcribe"]
    monkeypatch.setitem(stand_in.MODELS, "gpt-transcribe", dataclasses.replace(rules, languages=False))
    job = backend(openai_stub, "gpt-transcribe")
    job.transcribe(speech(), language="de", prompt=None)
    assert "languages" in job.refused  # what traffic meets
    with pytest.raises(ConfigError):
        probe_transcriber(backend(openai_stub, "gpt-transcribe"))


# ------------------------------------------------------------------------------------------ stand-in

def test_the_stand_in_serves_every_documented_model(openai_stub):
    """REALITY.md (SDK docstring of `model`) lists gpt-4o-mini-transcribe-2025-12-15; the daemon's MODELS
    has a profile for it. TRANSCRIBE_MODEL=gpt-4o-mini-transcribe-2025-12-15 against the stand-in gets
    404 "does not exist", so neither the pipeline nor `check --probe` can be tested with it."""
    t = backend(openai_stub, "gpt-4o-mini-transcribe-2025-12-15")
    assert t.transcribe(speech(), language="en", prompt=None).text
    assert openai_stub.requests[-1].fields["response_format"] == "json"


def test_the_stand_in_refuses_a_language_the_api_does_not_support(openai_stub):
    """The real API answers 400 invalid_language_format (param `language`) for a code outside Whisper's
    list (jambonz-api-server PR #402 quotes the list). The stand-in accepts `eo` and answers 200."""
    backend(openai_stub, "whisper-1").transcribe(speech(), language="eo", prompt=None)
    assert [body["error"]["param"] for _, _, body in openai_stub.refused] == ["language"]


# ------------------------------------------------------------------------------------------- audio

def two_stream_webm(path: Path, *, first: int, best: int) -> Path:
    """A WebM with two Opus streams: stream 0 holds `first` seconds (not default, low bitrate), stream 1
    holds `best` seconds (flagged default), so FFmpeg's best audio stream is stream 1."""
    with av.open(str(path), "w", format="webm") as out:
        streams = []
        for seconds, default, bit_rate in ((first, False, 6_000), (best, True, 32_000)):
            stream = out.add_stream("libopus", rate=RATE)
            stream.layout = "mono"
            stream.bit_rate = bit_rate
            stream.disposition = av.stream.Disposition.default if default else av.stream.Disposition(0)
            streams.append((stream, seconds))
        for stream, seconds in streams:
            written = 0
            for second in range(seconds):
                t = (written + np.arange(RATE)) / RATE
                pcm = (0.3 * 32767 * np.sin(2 * np.pi * 220 * t)).astype(np.int16) if second % 2 else \
                    np.zeros(RATE, np.int16)
                frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
                frame.sample_rate, frame.pts = RATE, written
                written += RATE
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
    return path


@pytest.mark.timeout(120)
def test_the_local_backend_never_decodes_more_than_its_part_limit_from_a_two_stream_file(tmp_path):
    """Sequence: a recording with two audio streams, stream 0 holding 330 s (in a real attack: hours)
    and stream 1, flagged default, 5 s. `audio.probe` measures `streams.best("audio")`, stream 1: 5 s,
    under MAX_AUDIO_SECONDS (60 here) and under the local backend's MAX_PART_SECONDS, so `prepare`
    hands the original file to the local backend as one part. The local backend decodes it with
    faster-whisper's `decode_audio`, which takes `audio=0`: all 330 s, in memory at once (about 1.1 MB
    of features per second: hours of it is the OOM kill issue 11 was about). Expected: the probe
    refuses it (audio_too_long) or no part handed over decodes to more than MAX_PART_SECONDS."""
    from faster_whisper.audio import decode_audio

    path = two_stream_webm(tmp_path / "two.webm", first=int(MAX_PART_SECONDS) + 30, best=5)
    try:
        info = audio.probe(path, max_seconds=LIMIT)
        audio.check_limits(info, max_bytes=1 << 30, max_seconds=LIMIT)
    except PermanentError as exc:
        assert exc.code == "audio_too_long"
        return
    local = AudioLimits(max_bytes=None, max_seconds=MAX_PART_SECONDS, formats=None)
    for part in audio.prepare(path, info, local, tmp_path, max_total_seconds=LIMIT):
        decoded = len(decode_audio(str(part.path), sampling_rate=RATE)) / RATE
        assert decoded <= MAX_PART_SECONDS, f"{part.filename}: faster-whisper decodes {decoded:.0f} s"


def test_a_wav_with_metadata_after_its_data_is_not_refused_as_too_long(tmp_path):
    """Sequence: a 50 s WAV, MAX_AUDIO_SECONDS 60, with a 1 MB `id3 ` chunk after the `data` chunk (tags
    and cover art that recorders and editors append after the audio; RIFF allows any chunk there). The
    wav demuxer with `ignore_length`, which `audio_measure.measure_wav_to_end` uses to defeat a lying
    data size, reads everything after `data` as samples: 1 MB is 31 s of 16 kHz mono, so the recording
    "holds more than 60 s" and fails for good (audio_too_long). audio_measure's docstring calls a
    trailing chunk "a few milliseconds of audio here: harmless"; that holds for a LIST chunk only."""
    path = tmp_path / "tagged.wav"
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=RATE)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, RATE * 50), np.int16), format="s16", layout="mono")
        frame.sample_rate, frame.pts = RATE, 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    data = path.read_bytes()
    tag = b"id3 " + (1_000_000).to_bytes(4, "little") + bytes(1_000_000)  # RIFF chunk: id, u32 LE size, body
    path.write_bytes(data[:4] + (len(data) - 8 + len(tag)).to_bytes(4, "little") + data[8:] + tag)
    info = audio.probe(path, max_seconds=LIMIT)
    assert info.duration == pytest.approx(50, abs=0.5)


# ------------------------------------------------------------------------------------------ journald

def test_every_line_on_the_journal_stream_carries_a_priority(tmp_path):
    """Sequence: `sidecar run` under systemd (stderr is the journal stream JOURNAL_STREAM names) with a
    configuration the daemon refuses (here WP_SERVER_TOKEN unset; the same path prints "configuration
    error: SQS_QUEUE_URL: cannot read the queue ..." after logging is set up, and "error: ..." for an AWS
    error). `main()` prints those lines with `print(..., file=sys.stderr)`, bypassing the logging
    formatter that adds `<N>`, so journald stores the reason the release failed at info, and
    `journalctl -p err` (deploy checkpoint 5, the runbook) shows systemd's "Failed to start" at most,
    never why."""
    stderr = tmp_path / "stderr"
    stderr.touch()
    stat = stderr.stat()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}",
           "SQS_QUEUE_URL": "http://127.0.0.1:9/000000000000/jobs", "S3_BUCKET": "recordings",
           "AWS_REGION": "us-east-1", "OPENAI_API_KEY": "sk-test", "WP_SIDE_CAR_CALLBACK": "http://127.0.0.1:9/cb"}
    with stderr.open("ab") as err:
        proc = subprocess.run([sys.executable, "-m", "consumer", "run"], stderr=err, stdout=subprocess.DEVNULL,
                              env=env, cwd=tmp_path, timeout=60, check=False)
    lines = stderr.read_text().splitlines()
    assert proc.returncode == 2 and any("WP_SERVER_TOKEN" in line for line in lines), lines
    assert all(line.startswith("<3>") for line in lines if "WP_SERVER_TOKEN" in line), lines
