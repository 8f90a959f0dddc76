"""The OpenAI backend through the real SDK against the stand-in: requests, error tables, stitching."""

from __future__ import annotations

import openai
import pytest

from consumer.errors import PermanentError, RetryableError
from consumer.models import Segment, Transcript
from consumer.transcribe import AudioPart, OpenAITranscriber, stitch, transcribe_parts
from tests.conftest import SPEECH
from tests.stack.openai_stub import Reply


def backend(stub, *, model="gpt-transcribe", timeout=10.0):
    client = openai.OpenAI(api_key="sk-test", base_url=stub.base_url, max_retries=0, timeout=timeout)
    return OpenAITranscriber(client, model=model)


def test_sends_file_with_its_extension_and_parses_verbose_json(openai_stub):
    t = backend(openai_stub).transcribe(AudioPart(SPEECH, "recording.wav"), language="en", prompt="ACME")
    [req] = openai_stub.requests
    assert req.filename == "recording.wav" and req.data == SPEECH.read_bytes()
    assert req.fields["language"] == "en" and req.fields["prompt"] == "ACME"
    assert req.fields["response_format"] == "verbose_json"
    assert t.text.startswith("transcript of recording.wav") and len(t.segments) == 2
    assert t.duration_seconds and t.duration_seconds > 1


@pytest.mark.parametrize(("reply", "kind", "code", "delay"), [
    (Reply(429, {"retry-after": "7"}), RetryableError, "rate_limited", 7.0),
    (Reply(429, {"retry-after-ms": "1500"}), RetryableError, "rate_limited", 1.5),
    (Reply(500), RetryableError, "transcription_unavailable", None),
    (Reply(503), RetryableError, "transcription_unavailable", None),
    (Reply(401), RetryableError, "transcription_unavailable", None),
    (Reply(400), PermanentError, "transcription_rejected", None),
    (Reply(413), PermanentError, "audio_too_large", None),
    (Reply(422), PermanentError, "transcription_rejected", None),
])
def test_errors_are_translated_by_table(openai_stub, reply, kind, code, delay):
    openai_stub.script.append(reply)
    with pytest.raises(kind) as err:
        backend(openai_stub).transcribe(AudioPart(SPEECH, "a.wav"), language=None, prompt=None)
    assert err.value.code == code
    if delay is not None:
        assert err.value.delay == pytest.approx(delay)


def test_timeout_is_retryable(openai_stub):
    openai_stub.script.append(Reply(delay=5))
    with pytest.raises(RetryableError) as err:
        backend(openai_stub, timeout=0.5).transcribe(AudioPart(SPEECH, "a.wav"), language=None, prompt=None)
    assert err.value.code == "transcription_unavailable"


def test_connection_refused_is_retryable():
    client = openai.OpenAI(api_key="sk", base_url="http://127.0.0.1:9/v1", max_retries=0, timeout=2)
    with pytest.raises(RetryableError):
        OpenAITranscriber(client, model="whisper-1").transcribe(AudioPart(SPEECH, "a.wav"), language=None,
                                                                 prompt=None)


def test_chunks_sequential_chain_the_previous_text_as_prompt(openai_stub):
    parts = [AudioPart(SPEECH, f"c{i}.wav", offset=i * 3.0, duration=3.0) for i in range(3)]
    t = transcribe_parts(backend(openai_stub), parts, language=None, prompt="ctx", parallelism=1)
    prompts = [r.fields.get("prompt") for r in openai_stub.requests]
    assert prompts[0] == "ctx" and prompts[1].startswith("transcript of c0.wav")
    assert t.text.count("transcript of") == 3


def test_chunks_in_parallel_are_stitched_in_order(openai_stub):
    parts = [AudioPart(SPEECH, f"c{i}.wav", offset=i * 10.0, duration=10.0) for i in range(4)]
    t = transcribe_parts(backend(openai_stub), parts, language=None, prompt=None, parallelism=4)
    assert [s.start for s in t.segments] == sorted(s.start for s in t.segments)
    assert t.text.index("c0.wav") < t.text.index("c3.wav")


def test_stitch_shifts_segments_by_real_offsets():
    parts = [AudioPart(SPEECH, "a", offset=0.0, duration=9.5), AudioPart(SPEECH, "b", offset=9.5, duration=4.0)]
    results = [Transcript(text="one", segments=[Segment(start=0, end=9.5, text="one")]),
               Transcript(text="two", segments=[Segment(start=0.5, end=3.9, text="two")])]
    t = stitch(parts, results)
    assert t.text == "one two" and t.duration_seconds == 13.5
    assert [(s.start, s.end) for s in t.segments] == [(0, 9.5), (10.0, 13.4)]
