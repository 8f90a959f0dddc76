"""The OpenAI backend through the real SDK against the reference-built stand-in: per-model requests and
replies, refusals of our own parameters, the error tables, and stitching."""

from __future__ import annotations

import threading

import openai
import pytest

from consumer.errors import PermanentError, RetryableError
from consumer.models import Segment, Transcript
from consumer.transcribe import AudioPart, RequestSlots, SharedTranscriber, stitch, transcribe_parts
from consumer.transcribe_openai import OpenAITranscriber
from tests.conftest import SPEECH
from tests.stack import wait_for
from tests.stack.openai_stub import Reply, audio_duration, error

SECONDS = audio_duration(SPEECH.read_bytes())


def backend(stub, *, model="gpt-transcribe", timeout=10.0, response_format="auto"):
    client = openai.OpenAI(api_key="sk-test", base_url=stub.base_url, max_retries=0, timeout=timeout)
    return OpenAITranscriber(client, model=model, response_format=response_format)


def speech(duration: float | None = SECONDS, name: str = "recording.wav") -> AudioPart:
    return AudioPart(SPEECH, name, duration=duration)


def test_gpt_transcribe_gets_json_with_languages_and_one_measured_segment(openai_stub):
    t = backend(openai_stub).transcribe(speech(), language="de", prompt="ACME")
    [req] = openai_stub.requests
    assert req.filename == "recording.wav" and req.data == SPEECH.read_bytes()
    assert req.fields["response_format"] == "json" and "timestamp_granularities" not in req.lists
    assert req.lists["languages"] == ["de"] and "language" not in req.fields and req.fields["prompt"] == "ACME"
    assert t.text.startswith("transcript of recording.wav") and t.language == "de"
    # json has no timestamps: one segment over the part, from our own measurement.
    assert t.segments == [Segment(start=0.0, end=SECONDS, text=t.text)] and t.duration_seconds == SECONDS


@pytest.mark.parametrize("model", ["gpt-4o-transcribe", "gpt-4o-mini-transcribe"])
def test_gpt_4o_models_get_json_and_language(openai_stub, model):
    t = backend(openai_stub, model=model).transcribe(speech(), language="en", prompt=None)
    [req] = openai_stub.requests
    assert req.fields["response_format"] == "json" and req.fields["language"] == "en" and not req.lists
    assert len(t.segments) == 1 and t.duration_seconds == SECONDS and not openai_stub.refused


def test_whisper_1_gets_verbose_json_with_segment_timestamps(openai_stub):
    t = backend(openai_stub, model="whisper-1").transcribe(speech(), language="en", prompt="ACME")
    [req] = openai_stub.requests
    assert req.fields["response_format"] == "verbose_json" and req.lists["timestamp_granularities"] == ["segment"]
    assert req.fields["language"] == "en" and req.fields["prompt"] == "ACME"
    assert [s.text for s in t.segments] == ["first half", "second half"] and t.duration_seconds == SECONDS


def test_diarize_gets_no_prompt_and_a_chunking_strategy(openai_stub):
    backend(openai_stub, model="gpt-4o-transcribe-diarize").transcribe(speech(), language=None, prompt="ACME")
    [req] = openai_stub.requests
    assert "prompt" not in req.fields and req.fields["chunking_strategy"] == "auto"


def test_duration_comes_from_usage_seconds_when_we_did_not_measure(openai_stub):
    t = backend(openai_stub).transcribe(speech(duration=None), language=None, prompt=None)
    assert t.duration_seconds == pytest.approx(SECONDS, abs=1.0)  # usage.seconds is whole seconds


def test_verbose_json_refused_falls_back_to_json_once_and_remembers(openai_stub, caplog):
    t = backend(openai_stub, model="gpt-4o-transcribe", response_format="verbose_json")
    first = t.transcribe(speech(), language=None, prompt=None)
    [(refused, status, body)] = openai_stub.refused
    assert status == 400 and body["error"]["param"] == "response_format"
    assert refused.fields["response_format"] == "verbose_json"
    t.transcribe(speech(), language=None, prompt=None)
    assert [r.fields["response_format"] for r in openai_stub.requests] == ["json", "json"]
    assert len(openai_stub.refused) == 1 and first.text and len(first.segments) == 1
    assert [r.message for r in caplog.records].count("transcription_param_refused") == 1


def test_a_refused_optional_parameter_is_dropped_and_the_job_kept(openai_stub):
    openai_stub.script.append(Reply(400, body=error("`languages` is not supported", param="languages[]")))
    t = backend(openai_stub)
    assert t.transcribe(speech(), language="de", prompt=None).text
    assert [r.lists.get("languages") for r in openai_stub.requests] == [["de"], None]


def test_a_refused_model_keeps_the_job_as_misconfigured(openai_stub):
    openai_stub.script.append(Reply(400, body=error("model not allowed for this project", param="model")))
    with pytest.raises(RetryableError) as err:
        backend(openai_stub).transcribe(speech(), language=None, prompt=None)
    assert err.value.code == "transcription_misconfigured"


def test_an_unknown_model_is_not_the_recordings_fault(openai_stub):
    with pytest.raises(RetryableError) as err:
        backend(openai_stub, model="whisper-9000").transcribe(speech(), language=None, prompt=None)
    assert err.value.code == "transcription_misconfigured" and "does not exist" in err.value.message


def test_a_file_whose_name_lies_is_rejected_for_good(openai_stub):
    with pytest.raises(PermanentError) as err:
        backend(openai_stub).transcribe(speech(name="recording.mp3"), language=None, prompt=None)
    assert err.value.code == "transcription_rejected" and "Invalid file format" in err.value.message


@pytest.mark.parametrize(("reply", "kind", "code", "delay"), [
    (Reply.rate_limited(retry_after="7"), RetryableError, "rate_limited", 7.0),
    (Reply.rate_limited(retry_after_ms="1500"), RetryableError, "rate_limited", 1.5),
    (Reply.insufficient_quota(), RetryableError, "quota_exceeded", None),
    (Reply(500), RetryableError, "transcription_unavailable", None),
    (Reply(503), RetryableError, "transcription_unavailable", None),
    (Reply(401), RetryableError, "transcription_misconfigured", None),
    (Reply(400), PermanentError, "transcription_rejected", None),
    (Reply(413), PermanentError, "audio_too_large", None),
    (Reply(422), PermanentError, "transcription_rejected", None),
])
def test_errors_are_translated_by_table(openai_stub, reply, kind, code, delay):
    openai_stub.script.append(reply)
    with pytest.raises(kind) as err:
        backend(openai_stub).transcribe(speech(), language=None, prompt=None)
    assert err.value.code == code
    if delay is not None:
        assert err.value.delay == pytest.approx(delay)


def test_timeout_is_retryable(openai_stub):
    openai_stub.script.append(Reply(delay=5))
    with pytest.raises(RetryableError) as err:
        backend(openai_stub, timeout=0.5).transcribe(speech(), language=None, prompt=None)
    assert err.value.code == "transcription_unavailable"


def test_connection_refused_is_retryable():
    client = openai.OpenAI(api_key="sk", base_url="http://127.0.0.1:9/v1", max_retries=0, timeout=2)
    with pytest.raises(RetryableError):
        OpenAITranscriber(client, model="whisper-1").transcribe(speech(), language=None, prompt=None)


def test_chunks_sequential_chain_the_previous_text_as_prompt(openai_stub):
    parts = [AudioPart(SPEECH, f"c{i}.wav", offset=i * SECONDS, duration=SECONDS) for i in range(3)]
    t = transcribe_parts(backend(openai_stub), parts, language=None, prompt="ctx", parallelism=1)
    prompts = [r.fields.get("prompt") for r in openai_stub.requests]
    assert prompts[0] == "ctx" and prompts[1].startswith("transcript of c0.wav")
    assert t.text.count("transcript of") == 3


@pytest.mark.parametrize(("model", "per_part"), [("gpt-transcribe", 1), ("whisper-1", 2)])
def test_chunks_in_parallel_are_stitched_in_order(openai_stub, model, per_part):
    parts = [AudioPart(SPEECH, f"c{i}.wav", offset=i * SECONDS, duration=SECONDS) for i in range(4)]
    t = transcribe_parts(backend(openai_stub, model=model), parts, language=None, prompt=None, parallelism=4)
    assert [s.start for s in t.segments] == sorted(s.start for s in t.segments)
    assert len(t.segments) == 4 * per_part and t.segments[-1].end == pytest.approx(4 * SECONDS)
    assert t.text.index("c0.wav") < t.text.index("c3.wav")


def test_stitch_shifts_segments_by_real_offsets():
    parts = [AudioPart(SPEECH, "a", offset=0.0, duration=9.5), AudioPart(SPEECH, "b", offset=9.5, duration=4.0)]
    results = [Transcript(text="one", segments=[Segment(start=0, end=9.5, text="one")]),
               Transcript(text="two", segments=[Segment(start=0.5, end=3.9, text="two")])]
    t = stitch(parts, results)
    assert t.text == "one two" and t.duration_seconds == 13.5
    assert [(s.start, s.end) for s in t.segments] == [(0, 9.5), (10.0, 13.4)]


def test_each_backend_names_its_sidecar_transcriptions_source(openai_stub):
    """A local model's transcript is counted as source="local", an API call's as "api"."""
    from consumer.transcribe_local import LocalWhisperTranscriber

    client = openai.OpenAI(api_key="sk-x", base_url=openai_stub.base_url)
    assert OpenAITranscriber(client, model="gpt-transcribe").source == "api"
    assert LocalWhisperTranscriber.source == "local"


def test_parts_are_sent_while_the_rest_are_still_being_cut(openai_stub):
    """The cut hands over part 0 and then waits for its request to reach the stand-in: only streaming passes."""
    order: list[str] = []
    openai_stub.on_request = lambda request: order.append(f"sent {request.filename}")

    def slow_cut():
        for i in range(4):
            order.append(f"cut c{i}.wav")
            yield AudioPart(SPEECH, f"c{i}.wav", offset=i * SECONDS, duration=SECONDS)
            if i == 0:  # a slow cut: the next part comes only once the first is on the wire
                wait_for(openai_stub.count, timeout=10, what="part 0 sent before part 1 is cut")

    t = transcribe_parts(backend(openai_stub), slow_cut(), language=None, prompt=None, parallelism=4)
    assert order.index("sent c0.wav") < order.index("cut c1.wav") < order.index("cut c3.wav")
    assert [s.start for s in t.segments] == [i * SECONDS for i in range(4)]


def test_request_slots_are_first_come_first_served():
    """A slot given back goes to the longest waiter, not to the thread that gave it back and asks again."""
    slots = RequestSlots(1)
    slots.acquire()
    got: list[str] = []

    def take(name: str) -> None:
        with slots:
            got.append(name)

    first = threading.Thread(target=take, args=("first waiter",))
    first.start()
    wait_for(lambda: slots._waiters, timeout=5, what="a waiter queued")
    slots.release()
    take("the releaser again")  # would barge in with threading.Semaphore
    first.join(5)
    assert got == ["first waiter", "the releaser again"]


def test_shared_transcriber_bounds_requests_of_all_callers(openai_stub):
    openai_stub.latency = 0.3
    shared = SharedTranscriber(backend(openai_stub), RequestSlots(2))
    parts = [AudioPart(SPEECH, f"c{i}.wav", offset=i * SECONDS, duration=SECONDS) for i in range(3)]
    jobs = [threading.Thread(target=transcribe_parts, args=(shared, parts),
                             kwargs={"language": None, "prompt": None, "parallelism": 3}) for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(30)
    assert openai_stub.count() == 6 and openai_stub.peak_in_flight == 2
    assert (shared.model, shared.limits, shared.source) == ("gpt-transcribe", shared.inner.limits, "api")


def test_the_api_is_cut_for_as_many_parts_as_are_sent_at_once():
    from consumer.transcribe import parts_hint

    api = OpenAITranscriber(client=None, model="gpt-transcribe")  # type: ignore[arg-type]
    assert api.parts_at_once is None and parts_hint(api, 8) == 8
    assert SharedTranscriber(api, RequestSlots(4)).parts_at_once is None
