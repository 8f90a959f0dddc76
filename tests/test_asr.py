"""The local faster-whisper backend on real speech, and its start-up configuration errors.

The model is the one `make model` fetches (WHISPER_MODEL, set by `make test`, or .cache/models/whisper-base).
A missing model fails these tests rather than skipping them: a skipped ASR test would hide a broken backend.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from consumer.errors import ConfigError, PermanentError, RetryableError
from consumer.models import Transcript
from consumer.settings import load_settings
from consumer.transcribe import AudioPart
from consumer.transcribe_local import LocalWhisperTranscriber

REPO = Path(__file__).resolve().parents[1]
SPEECH = REPO / "tests" / "fixtures" / "speech"
MIN_WORD_RECALL = 0.8


def model_dir() -> Path:
    """The fetched model directory, or a test failure that says how to get it."""
    path = Path(os.environ.get("WHISPER_MODEL") or REPO / ".cache" / "models" / "whisper-base")
    if not (path / "model.bin").is_file():
        pytest.fail(f"no Whisper model at {path}: run `make model` (make test does it first)", pytrace=False)
    return path


def words(text: str) -> list[str]:
    """Lowercase words with punctuation stripped."""
    return re.findall(r"[a-z0-9']+", text.lower())


def word_recall(reference: str, hypothesis: str) -> float:
    """Share of the reference's words (with multiplicity) that the hypothesis contains."""
    ref = Counter(words(reference))
    found = ref & Counter(words(hypothesis))
    return sum(found.values()) / max(1, sum(ref.values()))


@pytest.fixture(scope="module")
def transcriber() -> LocalWhisperTranscriber:
    settings = load_settings(env_file=None, transcriber="local", whisper_model=str(model_dir()))
    return LocalWhisperTranscriber.from_settings(settings)


@pytest.fixture
def sentence() -> str:
    return (SPEECH / "sentence_en.txt").read_text().strip()


@pytest.fixture
def speech_part() -> AudioPart:
    return AudioPart(path=SPEECH / "sentence_en.wav", filename="sentence_en.wav")


def assert_heard(result: Transcript, sentence: str) -> None:
    recall = word_recall(sentence, result.text)
    assert recall >= MIN_WORD_RECALL, f"heard {result.text!r} for {sentence!r} (recall {recall:.0%})"


# ------------------------------------------------------------------------------- real speech (asr)


@pytest.mark.asr
@pytest.mark.timeout(60)
def test_transcribes_the_spoken_sentence(
    transcriber: LocalWhisperTranscriber, speech_part: AudioPart, sentence: str
) -> None:
    result = transcriber.transcribe(speech_part, language=None, prompt=None)

    assert_heard(result, sentence)
    assert result.language == "en"  # detected, none was given
    assert result.no_speech is False
    assert transcriber.model == f"faster-whisper:{model_dir().resolve().name}"


@pytest.mark.asr
@pytest.mark.timeout(60)
def test_segments_are_ordered_and_within_the_audio(
    transcriber: LocalWhisperTranscriber, speech_part: AudioPart
) -> None:
    result = transcriber.transcribe(speech_part, language="en", prompt="A farm near a river.")

    assert result.duration_seconds == pytest.approx(6.7, abs=0.1)  # what make_speech.sh writes
    assert result.segments, "no segments"
    previous_end = 0.0
    for segment in result.segments:
        assert previous_end <= segment.start <= segment.end <= result.duration_seconds + 0.5
        assert segment.text == segment.text.strip() and segment.text
        previous_end = segment.end
    assert result.text == " ".join(s.text for s in result.segments)


@pytest.mark.asr
@pytest.mark.timeout(90)
def test_two_threads_share_one_model(
    transcriber: LocalWhisperTranscriber, speech_part: AudioPart, sentence: str
) -> None:
    both_started = threading.Barrier(2, timeout=30)  # so the two calls really overlap

    def run() -> Transcript:
        both_started.wait()
        return transcriber.transcribe(speech_part, language=None, prompt=None)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = [f.result(timeout=80) for f in [pool.submit(run), pool.submit(run)]]

    for result in results:
        assert_heard(result, sentence)


@pytest.mark.asr
@pytest.mark.timeout(60)
def test_undecodable_audio_is_permanent(transcriber: LocalWhisperTranscriber, tmp_path: Path) -> None:
    not_audio = tmp_path / "call.mp3"
    not_audio.write_text("this is not audio\n")

    with pytest.raises(PermanentError) as caught:
        transcriber.transcribe(AudioPart(path=not_audio, filename="call.mp3"), language=None, prompt=None)
    assert caught.value.code == "unsupported_audio"


@pytest.mark.asr
@pytest.mark.timeout(60)
def test_vanished_part_is_retryable(transcriber: LocalWhisperTranscriber, tmp_path: Path) -> None:
    gone = AudioPart(path=tmp_path / "gone.wav", filename="gone.wav")

    with pytest.raises(RetryableError) as caught:
        transcriber.transcribe(gone, language=None, prompt=None)
    assert caught.value.code == "transcription_unavailable"


@pytest.mark.asr
@pytest.mark.timeout(60)
def test_unknown_language_is_rejected(transcriber: LocalWhisperTranscriber, speech_part: AudioPart) -> None:
    with pytest.raises(PermanentError) as caught:
        transcriber.transcribe(speech_part, language="zz", prompt=None)
    assert caught.value.code == "transcription_rejected"


@pytest.mark.asr
@pytest.mark.timeout(60)
def test_slower_than_the_timeout_is_retryable(speech_part: AudioPart) -> None:
    impatient = LocalWhisperTranscriber(model_dir(), device="cpu", timeout=1e-6)

    with pytest.raises(RetryableError) as caught:
        impatient.transcribe(speech_part, language="en", prompt=None)
    assert caught.value.code == "transcription_unavailable"
    assert "TRANSCRIBE_TIMEOUT" in caught.value.message


@pytest.mark.asr
def test_limits_let_the_audio_stage_chunk_long_recordings(transcriber: LocalWhisperTranscriber) -> None:
    assert transcriber.limits.max_bytes is None
    assert transcriber.limits.formats is None
    assert transcriber.limits.max_seconds == 300
    assert transcriber.supports_prompt is True


@pytest.mark.timeout(60)
def test_a_long_recording_is_cut_for_the_workers_the_model_has() -> None:
    """Cuts cost accuracy (bench 9): the local model asks for two parts per worker, not TRANSCRIBE_PARALLELISM."""
    from consumer.transcribe import parts_hint

    two = LocalWhisperTranscriber(model_dir(), device="cpu", num_workers=2, cpu_threads=1)
    assert two.parts_at_once == 4
    assert parts_hint(two, 8) == 4 and parts_hint(two, 3) == 3


# ---------------------------------------------------------------------- start-up configuration


def build(**overrides: object) -> LocalWhisperTranscriber:
    return LocalWhisperTranscriber.from_settings(load_settings(env_file=None, transcriber="local", **overrides))


@pytest.mark.timeout(30)
def test_missing_model_directory_names_whisper_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        build(whisper_model=str(tmp_path / "no-such-model"))
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("WHISPER_MODEL: ")
    assert "make model" in caught.value.problems[0]


@pytest.mark.timeout(30)
def test_directory_without_model_files_names_whisper_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        build(whisper_model=str(tmp_path))
    assert caught.value.problems[0].startswith("WHISPER_MODEL: ")
    assert "model.bin" in caught.value.problems[0]


def fake_model_dir(path: Path) -> Path:
    """A directory with the model's file names but not a model in them."""
    for name in ("config.json", "tokenizer.json", "vocabulary.json"):
        (path / name).write_text("{}")
    (path / "model.bin").write_bytes(b"not a CTranslate2 model\n")
    return path


@pytest.mark.timeout(30)
def test_corrupt_model_names_whisper_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        build(whisper_model=str(fake_model_dir(tmp_path)))
    assert caught.value.problems[0].startswith("WHISPER_MODEL: cannot load")
    assert "\n" not in caught.value.problems[0]


@pytest.mark.timeout(30)
def test_unsupported_compute_type_names_whisper_compute_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:  # checked before the model is read
        build(whisper_model=str(fake_model_dir(tmp_path)), whisper_device="cpu", whisper_compute_type="bogus")
    assert caught.value.problems[0].startswith("WHISPER_COMPUTE_TYPE: ")
