"""One job, one story: the ten sequences of ordinary events of issue 12, each against real servers (moto in
server mode, the OpenAI and WordPress stand-ins on the wire), asserting what WordPress received, in order,
what was billed, and where the message ended."""

from __future__ import annotations

import json
import threading
import time
import wave

import numpy as np
import pytest

from consumer.dlq import redrive
from consumer.jobrecord import JobRecord
from consumer.records import RecordStore
from consumer.sqs import SqsQueue
from tests.conftest import send_job, upload
from tests.stack import wait_for
from tests.stack.aws import AwsStack
from tests.stack.openai_stub import Reply
from tests.test_pipeline import _long_recording

pytestmark = pytest.mark.timeout(150)


def story(wordpress, job_id):
    """Every callback WordPress took in for the job, in order: (status, what it answered)."""
    return [(c.body["status"], c.status_returned) for c in wordpress.received if c.body["job_id"] == job_id]


def record(aws, job_id) -> JobRecord:
    found = RecordStore(aws.s3, aws.bucket, "transcripts/").read(job_id)
    assert found and found[0] is not None
    return found[0]


def dead_codes(aws):
    return [m["MessageAttributes"]["error_code"]["StringValue"] for m in aws.dlq_messages()]


def test_1_a_late_answer_then_a_deleted_recording_is_still_completed(run_daemon, aws, openai_stub, wordpress):
    """WordPress stores `completed` but answers after CALLBACK_TIMEOUT, then deletes the recording."""
    upload(aws, "audio/j1.wav")
    wordpress.delays.append(3.0)  # longer than CALLBACK_TIMEOUT=1
    send_job(aws, "j1", "audio/j1.wav")
    run_daemon(callback_timeout=1)
    wait_for(lambda: story(wordpress, "j1"), timeout=30, what="first callback taken in")
    aws.s3.delete_object(Bucket=aws.bucket, Key="audio/j1.wav")
    wait_for(lambda: len(story(wordpress, "j1")) == 2, timeout=30, what="the callback re-sent")
    wait_for(lambda: aws.counts() == (0, 0), timeout=30, what="message deleted")
    assert story(wordpress, "j1") == [("completed", 200), ("completed", 200)]
    assert openai_stub.count() == 1 and aws.dlq_messages() == []
    assert record(aws, "j1").acknowledged_at is not None


def test_2_3_unreachable_wordpress_on_the_last_receive_dead_letters_without_failed_and_redrive_completes(
        moto_server, run_daemon, openai_stub, wordpress):
    """The last permitted receive meets a retryable callback error after `completed` was attempted: the DLQ
    gets it as callback_undelivered, WordPress never hears `failed`; the recording then expires, and a
    redrive re-sends `completed` from the stored transcript."""
    aws = AwsStack.create(moto_server, max_receives=2)
    upload(aws, "audio/j2.wav")
    wordpress.statuses.extend([503, 503, 503, 503, 503, 503])  # urllib3 retries 503 twice within an attempt
    send_job(aws, "j2", "audio/j2.wav")
    rd = run_daemon(sqs_queue_url=aws.queue_url, s3_bucket=aws.bucket)
    wait_for(lambda: dead_codes(aws) == ["callback_undelivered"], timeout=60, what="dead letter")
    assert {status for status, _ in story(wordpress, "j2")} == {"completed"}
    aws.s3.delete_object(Bucket=aws.bucket, Key="audio/j2.wav")  # the recording expires meanwhile
    moved = redrive(SqsQueue(aws.sqs, aws.dlq_url), SqsQueue(aws.sqs, aws.queue_url), job_ids={"j2"})
    assert moved == 1
    wait_for(lambda: story(wordpress, "j2")[-1] == ("completed", 200), timeout=30, what="completed re-sent")
    wait_for(lambda: aws.counts() == (0, 0) and aws.counts(aws.dlq_url) == (0, 0), timeout=30, what="all settled")
    assert {status for status, _ in story(wordpress, "j2")} == {"completed"} and openai_stub.count() == 1
    rd.stop()


def test_4_a_failed_callback_is_not_repeated_when_the_dead_letter_copy_fails(
        moto_server, run_daemon, openai_stub, wordpress):
    """The DLQ send after an acknowledged `failed` fails: the message comes back, and WordPress hears
    nothing more; the DLQ gets one copy once it can. A second copy of the same job changes nothing either."""
    aws = AwsStack.create(moto_server)
    spare = aws.sqs.create_queue(QueueName=f"spare-dlq-{time.monotonic_ns()}")["QueueUrl"]
    aws.sqs.delete_queue(QueueUrl=spare)  # the DLQ is gone: sending to it fails
    send_job(aws, "j4", "audio/missing.wav")
    send_job(aws, "j4", "audio/missing.wav")  # a duplicate message of the same job
    run_daemon(sqs_queue_url=aws.queue_url, s3_bucket=aws.bucket, sqs_dlq_url=spare, visibility_timeout=3,
               concurrency=1)
    wait_for(lambda: story(wordpress, "j4"), timeout=30, what="failed callback")
    aws.sqs.create_queue(QueueName=spare.rsplit("/", 1)[1])  # the DLQ is back
    wait_for(lambda: aws.counts() == (0, 0), timeout=60, what="both copies settled")
    assert story(wordpress, "j4") == [("failed", 200)]
    letters = aws.sqs.receive_message(QueueUrl=spare, MaxNumberOfMessages=10, MessageAttributeNames=["All"])
    assert [m["MessageAttributes"]["error_code"]["StringValue"] for m in letters.get("Messages", [])] == [
        "audio_not_found"]


class ReDeadLettering(SqsQueue):
    """A source queue whose consumer fails every job at once: what is sent comes straight back to the DLQ
    as a new message (a new MessageId), as the daemon's dead-lettering does."""

    def __init__(self, sqs, url, dlq: SqsQueue) -> None:
        super().__init__(sqs, url)
        self.dlq = dlq
        self.sent = 0

    def send(self, body, attributes=None, **kw):  # type: ignore[override]
        self.sent += 1
        return self.dlq.send(body, {**(attributes or {}), "error_code": "audio_not_found"})


def test_5_a_redrive_of_jobs_that_still_fail_ends(aws):
    dlq = SqsQueue(aws.sqs, aws.dlq_url)
    for i in range(3):
        dlq.send(json.dumps({"job_id": f"j5-{i}", "s3_key": "audio/gone.wav"}), {"error_code": "audio_not_found"})
    source = ReDeadLettering(aws.sqs, aws.queue_url, dlq)
    done: list[int] = []
    worker = threading.Thread(target=lambda: done.append(redrive(dlq, source, job_ids=None)), daemon=True)
    worker.start()
    worker.join(60)
    assert done == [3] and source.sent == 3  # each letter there at the start moved once; the run ended
    assert len(aws.dlq_messages()) == 3  # the copies that came back wait for the next run


def test_5_redrive_all_with_a_running_daemon_ends(run_daemon, aws, openai_stub, wordpress):
    send_job(aws, "j5", "audio/gone.wav")
    run_daemon()
    wait_for(lambda: dead_codes(aws) == ["audio_not_found"], timeout=30, what="dead letter")
    done: list[int] = []
    worker = threading.Thread(target=lambda: done.append(
        redrive(SqsQueue(aws.sqs, aws.dlq_url), SqsQueue(aws.sqs, aws.queue_url), job_ids=None)), daemon=True)
    worker.start()
    worker.join(60)
    assert done == [1]
    wait_for(lambda: len(story(wordpress, "j5")) == 2, timeout=30, what="the redriven round failed again")
    # An operator's redrive is a new round: WordPress hears the second `failed`, and nothing loops.
    assert story(wordpress, "j5") == [("failed", 200), ("failed", 200)]
    wait_for(lambda: len(aws.dlq_messages()) == 1, timeout=30, what="one dead letter again")


def test_6_a_legacy_job_keeps_its_id_across_dead_letter_and_redrive(run_daemon, aws, openai_stub, wordpress):
    message_id = send_job(aws, None, None, secret=None, body=json.dumps({"s3_key": "audio/late.wav"}))
    rd = run_daemon(require_signature=False, side_car_secret=None)
    wait_for(lambda: dead_codes(aws) == ["audio_not_found"], timeout=30, what="dead letter")
    assert [c.body["job_id"] for c in wordpress.received] == [message_id]
    upload(aws, "audio/late.wav")  # the recording arrives after all
    assert redrive(SqsQueue(aws.sqs, aws.dlq_url), SqsQueue(aws.sqs, aws.queue_url), job_ids={message_id}) == 1
    wait_for(lambda: len(wordpress.received) == 2, timeout=30, what="the redriven job completed")
    assert [(c.body["job_id"], c.body["status"]) for c in wordpress.received] == [
        (message_id, "failed"), (message_id, "completed")]
    assert record(aws, message_id).transcript is not None
    rd.stop()


def test_7_a_delivery_whose_claim_is_taken_and_released_stops(run_daemon, aws, openai_stub, wordpress):
    """Another delivery took the claim over and gave it up while this one was transcribing: this one must
    neither store nor call back."""
    upload(aws, "audio/j7.wav")
    openai_stub.latency = 6
    send_job(aws, "j7", "audio/j7.wav")
    rd = run_daemon(visibility_timeout=6, retry_base_delay=30, retry_max_delay=30)
    wait_for(lambda: openai_stub.count() == 1, timeout=30, what="transcription started")
    store = RecordStore(aws.s3, aws.bucket, "transcripts/")
    mine, etag = store.read("j7")
    store.replace(mine.claimed("elsewhere", time.time() + 60).released(), etag)  # taken over, then released
    wait_for(lambda: rd.daemon.metrics.errors.labels("transcribe", "job_in_progress")._value.get()
             + rd.daemon.metrics.errors.labels("store", "job_in_progress")._value.get() >= 1,
             timeout=30, what="the attempt stopped")
    assert wordpress.received == [] and store.read("j7")[0].transcript is None


def test_8_a_job_past_max_job_age_fails_instead_of_living_forever(run_daemon, aws, openai_stub, wordpress):
    upload(aws, "audio/j8.wav")
    openai_stub.latency = 5
    send_job(aws, "j8", "audio/j8.wav")
    run_daemon(visibility_timeout=3, max_job_age=2)
    wait_for(lambda: story(wordpress, "j8"), timeout=60, what="terminal callback")
    [body] = wordpress.terminal("j8")
    assert body["status"] == "failed" and body["error"]["code"] == "job_expired"
    wait_for(lambda: dead_codes(aws) == ["job_expired"], timeout=30, what="dead letter")
    assert openai_stub.count() == 1  # renewals stopped at the age limit; nothing was sent again


def test_9_parts_paid_for_are_kept_when_one_part_fails(run_daemon, aws, openai_stub, wordpress, tmp_path):
    path = tmp_path / "long.webm"
    _long_recording(path, 150)
    upload(aws, "audio/long.webm", path)
    import dataclasses

    import openai

    from consumer.transcribe_openai import OpenAITranscriber

    backend = OpenAITranscriber(openai.OpenAI(api_key="sk", base_url=openai_stub.base_url, max_retries=0),
                                model="gpt-transcribe")
    backend.limits = dataclasses.replace(backend.limits, max_seconds=30.0)
    openai_stub.script.extend([Reply(), Reply(), Reply(), Reply(), Reply(500)])  # the fifth part fails once
    send_job(aws, "j9", "audio/long.webm")
    run_daemon(transcriber=backend, transcribe_parallelism=1)
    wait_for(lambda: wordpress.terminal("j9"), timeout=90, what="completed")
    parts = len(record(aws, "j9").parts)
    assert parts >= 5 and openai_stub.count() == parts + 1  # only the failed part was sent again
    assert story(wordpress, "j9") == [("completed", 200)]


def test_10_short_retry_after_does_not_spend_the_receives(moto_server, run_daemon, openai_stub, wordpress):
    """Three 429s with retry-after-ms: 500 and only two receives allowed: the job is never failed nor
    dead-lettered, and each wait is the backoff the receive count calls for, not half a second."""
    aws = AwsStack.create(moto_server, max_receives=2)
    upload(aws, "audio/j10.wav")
    openai_stub.script.extend([Reply.rate_limited(retry_after_ms="500")] * 3)
    send_job(aws, "j10", "audio/j10.wav")
    rd = run_daemon(sqs_queue_url=aws.queue_url, s3_bucket=aws.bucket, retry_base_delay=2, retry_max_delay=2)
    wait_for(lambda: wordpress.terminal("j10"), timeout=90, what="completed")
    assert story(wordpress, "j10") == [("completed", 200)] and aws.dlq_messages() == []
    assert rd.worker.backoff(1, _rate_limited(0.5)) >= 1  # equal jitter: at least half of RETRY_BASE_DELAY


def test_10_insufficient_quota_pauses_intake_and_fails_nothing(run_daemon, aws, openai_stub, wordpress, caplog):
    upload(aws, "audio/q.wav")
    openai_stub.script.append(Reply.insufficient_quota())
    send_job(aws, "q", "audio/q.wav")
    rd = run_daemon(retry_base_delay=1, retry_max_delay=2)
    wait_for(lambda: wordpress.terminal("q"), timeout=60, what="completed once paid")
    assert story(wordpress, "q") == [("completed", 200)]
    assert rd.daemon.metrics.backpressure_seconds._value.get() >= 1.5
    assert any(r.message == "openai_quota_exhausted" and r.levelname == "ERROR" for r in caplog.records)


def _rate_limited(delay):
    from consumer.errors import RetryableError

    return RetryableError("429", code="rate_limited", delay=delay)


def test_a_new_job_costs_three_s3_requests_before_its_callback(run_daemon, aws, openai_stub, wordpress):
    """Claim (create), recording (GET), transcript with its outcome (PUT); the acknowledgement after."""
    calls: list[tuple[str, int]] = []  # (S3 operation, callbacks WordPress had taken in when it was sent)

    def note(request, **_) -> None:
        calls.append((request.method + " " + request.url.split("?")[0].rsplit("/", 1)[-1], len(wordpress.received)))

    upload(aws, "audio/rt.wav")
    send_job(aws, "rt", "audio/rt.wav")
    runner = run_daemon(drain=True, s3_hooks=[note]).thread
    runner.join(60)
    assert not runner.is_alive() and story(wordpress, "rt") == [("completed", 200)]
    before = [op for op, seen in calls if seen == 0]
    # The claim and the download go out side by side (either may be sent first); the transcript's PUT after.
    assert sorted(before[:2]) == ["GET rt.wav", "PUT rt.job.json"] and before[2:] == ["PUT rt.job.json"], calls
    assert [op for op, seen in calls if seen] == ["PUT rt.job.json"]  # the acknowledgement, after


def test_nothing_is_paid_for_before_the_claim_is_held(run_daemon, aws, openai_stub, wordpress):
    """The claim runs beside the download, but every transcription request finds the claim already written."""
    held: list[str | None] = []

    def check(_request) -> None:
        found = RecordStore(aws.s3, aws.bucket, "transcripts/").read("paid")
        held.append(found[0].claim.owner if found and found[0] and found[0].claim else None)

    openai_stub.on_request = check
    upload(aws, "audio/paid.wav")
    send_job(aws, "paid", "audio/paid.wav")
    run_daemon()
    wait_for(lambda: story(wordpress, "paid"), timeout=30, what="the callback")
    assert len(held) == 1 and held[0], held


def test_a_copy_of_a_job_being_re_sent_does_not_read_the_whole_recording(run_daemon, aws, openai_stub, wordpress,
                                                                         tmp_path, monkeypatch):
    """A re-send comes from the record: the recording's download, begun beside the claim, is stopped."""
    from consumer import fetch

    rate, seconds = 16_000, 120  # 3.8 MB of 16-bit mono: several download chunks
    t = np.arange(rate * seconds) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2")
    with wave.open(str(tmp_path / "big.wav"), "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    upload(aws, "audio/big.wav", tmp_path / "big.wav")
    read: list[int] = []
    real = fetch.download

    class FirstChunkWaits:
        """The `stop` event, but the check after the first chunk waits (2 s at most) for the claim's answer:
        on loopback the whole recording would otherwise be read before the claim is answered."""

        def __init__(self, event: threading.Event) -> None:
            self.event, self.checks = event, 0

        def is_set(self) -> bool:
            self.checks += 1
            if self.checks == 2:
                self.event.wait(2.0)
            return self.event.is_set()

    def counting(s3, bucket, key, dest, *, stop, **kwargs):
        try:
            return real(s3, bucket, key, dest, stop=FirstChunkWaits(stop), **kwargs)
        finally:
            read.append(dest.stat().st_size if dest.exists() else 0)

    monkeypatch.setattr(fetch, "download", counting)
    wordpress.delays.append(3.0)  # WordPress takes the first `completed` in after CALLBACK_TIMEOUT=1
    send_job(aws, "big", "audio/big.wav")
    run_daemon(callback_timeout=1)
    wait_for(lambda: story(wordpress, "big"), timeout=60, what="the first callback")
    paid = openai_stub.count()
    wait_for(lambda: len(story(wordpress, "big")) == 2, timeout=60, what="the callback re-sent")
    assert story(wordpress, "big") == [("completed", 200), ("completed", 200)] and openai_stub.count() == paid
    assert read[0] == (tmp_path / "big.wav").stat().st_size and len(read) == 2, read
    assert read[1] <= fetch.CHUNK_BYTES, read  # at most the chunk in flight when the claim's answer came
