"""The daemon as a process against a third-party OpenAI-compatible server: faster-whisper-server from PyPI.

Our OpenAI stand-in is only as true as what we believe; this server is someone else's code. It parses the
multipart body the OpenAI SDK builds (python-multipart), decodes the audio we send (PyAV), runs the Whisper base
model `make model` fetched, and answers with its own JSON. Each job goes the whole way: S3 (moto), SQS, the
daemon, the server, the WordPress stand-in. The server and its pins: tests/stack/whisper_server.py and
scripts/install_thirdparty_server.py (`make thirdparty-server`, which `make test` runs first).

A missing model or server fails these tests rather than skipping them: a skip would hide that nothing checked
our requests against a real server.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import pytest

from tests.conftest import DaemonProcess, free_port, send_job, upload
from tests.stack import wait_for
from tests.stack.whisper_server import WhisperServer, installed_server
from tests.test_asr import SPEECH, model_dir, word_recall

pytestmark = pytest.mark.timeout(120)

SENTENCE = (SPEECH / "sentence_en.txt").read_text().strip()
SPOKEN_SECONDS = 6.7  # what make_speech.sh writes
MIN_WORD_RECALL = 0.8
ACCEPTED = '"POST /v1/audio/transcriptions HTTP/1.1" 200'


@pytest.fixture(scope="module")
def whisper_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WhisperServer]:
    command = installed_server()
    if command is None:
        pytest.fail("faster-whisper-server is not installed: run `make thirdparty-server` (make test does it first)",
                    pytrace=False)
    log_path = tmp_path_factory.mktemp("whisper-server") / "server.log"
    server = WhisperServer(command, model_dir(), port=free_port(), log_path=log_path).start()
    yield server
    server.stop()


def run_job(spawn_daemon: Any, aws: Any, wordpress: Any, server: WhisperServer, *, path: Path,
            settings: dict[str, str], job: dict[str, Any] | None = None) -> tuple[dict[str, Any], DaemonProcess]:
    """Upload `path`, send a signed job for it to a daemon using `server`: its callback, the daemon."""
    before = len(server.requests(ACCEPTED))
    daemon = spawn_daemon({"OPENAI_BASE_URL": server.base_url, "TRANSCRIBER": "openai", "TRANSCRIBE_TIMEOUT": "60",
                           **settings})
    daemon.wait_ready()
    key = upload(aws, f"calls/{path.name}", path)
    send_job(aws, "job-thirdparty", key, extra=job)

    def terminal() -> list[dict[str, Any]]:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited:\n{daemon.log_path.read_text()[-3000:]}")
        return wordpress.terminal("job-thirdparty")

    [body] = wait_for(terminal, timeout=90, what="the job's callback")
    assert body["status"] == "completed", f"{body.get('error')}\nserver log:\n{server.log()[-3000:]}"
    assert len(server.requests(ACCEPTED)) == before + 1, "the transcription did not come from faster-whisper-server"
    assert not daemon.events("transcription_param_refused")
    return body, daemon


def assert_heard(transcript: dict[str, Any]) -> None:
    recall = word_recall(SENTENCE, transcript["text"])
    assert recall >= MIN_WORD_RECALL, f"heard {transcript['text']!r} for {SENTENCE!r} (recall {recall:.0%})"
    assert transcript["text"] == transcript["text"].strip()  # the server's segments start with a space
    assert transcript["duration_seconds"] == pytest.approx(SPOKEN_SECONDS, abs=0.2)  # our measurement


def assert_timed_segments(transcript: dict[str, Any]) -> None:
    """Segments as verbose_json gives them: the server's own timings, in order, within the audio."""
    assert transcript["segments"], "no segments"
    previous_end = 0.0
    for segment in transcript["segments"]:
        assert previous_end <= segment["start"] < segment["end"] <= transcript["duration_seconds"] + 0.5
        assert segment["text"]
        previous_end = segment["end"]


def aiff_of(wav: Path, dest: Path) -> Path:
    """The same speech as big-endian PCM in AIFF: a container the API does not take, so the daemon transcodes it."""
    with av.open(str(wav)) as src, av.open(str(dest), "w", format="aiff") as out:
        stream = out.add_stream("pcm_s16be", rate=src.streams.audio[0].rate)
        stream.layout = src.streams.audio[0].layout.name
        for frame in src.decode(audio=0):
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return dest


@pytest.mark.e2e
@pytest.mark.asr
def test_whisper_1_gets_verbose_json_for_a_wav_sent_as_it_is(spawn_daemon, aws, wordpress, whisper_server):
    body, daemon = run_job(spawn_daemon, aws, wordpress, whisper_server, path=SPEECH / "sentence_en.wav",
                           settings={"TRANSCRIBE_MODEL": "whisper-1"})

    transcript = body["transcript"]
    assert_heard(transcript)
    assert transcript["language"] == "en"  # detected by the server: only verbose_json carries it
    assert_timed_segments(transcript)
    assert body["model"] == "whisper-1"
    assert not daemon.events("audio_transcoded")


@pytest.mark.e2e
@pytest.mark.asr
def test_gpt_model_gets_json_for_our_opus_transcode(spawn_daemon, aws, wordpress, whisper_server, tmp_path):
    # The server answers with its one model whatever `model` names, so this is the request the daemon builds
    # for a gpt-* model (json), parsed and answered by a real server; the audio is the Ogg/Opus we make.
    body, daemon = run_job(spawn_daemon, aws, wordpress, whisper_server,
                           path=aiff_of(SPEECH / "sentence_en.wav", tmp_path / "sentence.aiff"),
                           settings={"TRANSCRIBE_MODEL": "gpt-4o-transcribe"})

    transcript = body["transcript"]
    assert_heard(transcript)
    assert transcript.get("language") is None  # json replies carry none, and the job gave no hint
    [segment] = transcript["segments"]  # json: one coarse segment for the one part sent, from our measurement
    assert segment["start"] == 0 and segment["end"] == transcript["duration_seconds"]
    assert segment["text"] == transcript["text"]
    assert body["model"] == "gpt-4o-transcribe"
    assert daemon.events("audio_transcoded")


@pytest.mark.e2e
@pytest.mark.asr
def test_server_model_with_verbose_json_configured_takes_language_and_prompt(
    spawn_daemon, aws, wordpress, whisper_server
):
    body, _ = run_job(spawn_daemon, aws, wordpress, whisper_server, path=SPEECH / "sentence_en.wav",
                      settings={"TRANSCRIBE_MODEL": "whisper-base", "TRANSCRIBE_RESPONSE_FORMAT": "verbose_json"},
                      job={"language": "en", "prompt": "A farm near a river."})

    transcript = body["transcript"]
    assert_heard(transcript)
    assert transcript["language"] == "en"
    assert_timed_segments(transcript)
    assert body["model"] == "whisper-base"


# ------------------------------------------------------------------ the installer (no network)


def installer() -> Any:
    from tests.stack import whisper_server

    return whisper_server._installer()


def test_every_package_of_the_server_is_pinned():
    module = installer()
    pins = [line for line in module.PINS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert "faster-whisper-server==0.0.3" in pins
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.\-]+", line) for line in pins), pins


def test_the_virtualenv_is_named_by_the_pins(tmp_path):
    module = installer()
    pins = tmp_path / "pins.txt"
    pins.write_text("faster-whisper-server==0.0.3\n")
    first = module.venv_dir(tmp_path, pins)
    pins.write_text("faster-whisper-server==0.0.4\n")
    assert module.venv_dir(tmp_path, pins) != first
    pins.write_text("faster-whisper-server==0.0.3\n")
    assert module.venv_dir(tmp_path, pins) == first


def finished_venv(module: Any, root: Path, pins: Path) -> Path:
    venv = module.venv_dir(root, pins)
    module.server_command(venv).parent.mkdir(parents=True)
    module.server_command(venv).write_text("#!/bin/sh\n")
    (venv / module.FINISHED).write_text(pins.read_text())
    return venv


def test_a_finished_virtualenv_is_reused_without_pip(tmp_path, monkeypatch):
    module = installer()
    pins = tmp_path / "pins.txt"
    pins.write_text("faster-whisper-server==0.0.3\n")
    venv = finished_venv(module, tmp_path / "root", pins)
    monkeypatch.setattr(module.subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a[0]}"))

    assert module.install(tmp_path / "root", pins) == venv


@pytest.mark.timeout(60)
def test_changed_pins_replace_the_old_virtualenv_and_a_missing_server_is_one_line(tmp_path):
    module = installer()
    pins = tmp_path / "pins.txt"
    pins.write_text("faster-whisper-server==0.0.3\n")
    old = finished_venv(module, tmp_path / "root", pins)
    pins.write_text("# nothing pinned: pip installs nothing, so the server's command is missing\n")

    with pytest.raises(module.InstallError) as caught:
        module.install(tmp_path / "root", pins)
    assert not old.exists()
    assert "faster-whisper-server is missing" in str(caught.value) and "\n" not in str(caught.value)
    assert not module.is_installed(module.venv_dir(tmp_path / "root", pins))  # unfinished: rebuilt next time
