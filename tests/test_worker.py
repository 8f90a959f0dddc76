"""The worker loop in-process against real local servers: the happy path, settle, heartbeat, health."""

from __future__ import annotations

import json
import urllib.request

from tests.conftest import SPEECH, TOKEN, send_job, upload
from tests.stack import wait_for


def test_job_is_transcribed_called_back_and_deleted(run_daemon, aws, openai_stub, wordpress):
    upload(aws, "audio/call-1.wav")
    send_job(aws, "job-1", "audio/call-1.wav", extra={"metadata": {"post_id": 42}, "language": "en"})
    rd = run_daemon(serve=True)

    [body] = wait_for(lambda: wordpress.accepted(), timeout=30, what="callback")
    assert body["status"] == "completed"
    assert body["job_id"] == "job-1" and body["s3_key"] == "audio/call-1.wav"
    assert body["server_token"] == TOKEN
    assert body["metadata"] == {"post_id": 42}
    assert body["attempt"] == 1
    assert body["transcript"]["text"].startswith("transcript of ")
    assert 2.0 < body["transcript"]["duration_seconds"] < 10.0
    # gpt-transcribe replies json: one segment over the recording, spanning our own measurement.
    [segment] = body["transcript"]["segments"]
    assert segment["start"] == 0 and segment["end"] == body["transcript"]["duration_seconds"]
    assert set(body["timings"]) == {"download_ms", "transcribe_ms", "total_ms"}

    # On the wire: the token in the body and X-Server-Token, never Authorization.
    [cb] = wordpress.received
    assert "authorization" not in cb.headers
    assert cb.headers["x-server-token"] == TOKEN
    assert cb.headers["idempotency-key"] == "job-1"
    assert cb.headers["content-type"] == "application/json"
    assert cb.headers["user-agent"].startswith("salestrainer-sidecar/")

    # The SDK sent the recording with a filename whose extension matches the format, and the language.
    [req] = openai_stub.requests
    assert req.filename.endswith(".wav") and req.data == SPEECH.read_bytes()
    assert req.model == "gpt-transcribe" and req.lists.get("languages") == ["en"]

    wait_for(lambda: aws.counts() == (0, 0), what="message deleted")
    port = rd.daemon.side_port.port

    def health():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.status == 200
            return json.loads(r.read())

    # The message is deleted first; the slot is free once the job's lease is released too.
    body = wait_for(lambda: (h := health())["in_flight"] == 0 and h, timeout=10, what="no job in flight")
    assert body["status"] == "ok"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'sidecar_jobs_total{outcome="completed"} 1.0' in text
    assert 'sidecar_sqs_requests_total{operation="ReceiveMessage"}' in text
    assert rd.stop() == 0


def test_drain_mode_exits_once_the_queue_is_empty(run_daemon, aws, wordpress):
    upload(aws, "audio/drain.wav")
    for i in range(3):
        send_job(aws, f"drain-{i}", "audio/drain.wav")
    rd = run_daemon(drain=True)
    rd.thread.join(60)
    assert not rd.thread.is_alive() and rd.result == [0]
    assert sorted(b["job_id"] for b in wordpress.accepted()) == ["drain-0", "drain-1", "drain-2"]
    assert aws.counts() == (0, 0)


def test_a_heartbeat_lands_or_fails_within_the_workers_wait_for_it():
    """The worker waits HEARTBEAT_WAIT for a heartbeat on the wire before changing the same message's
    visibility; the heartbeat client's timeouts (one attempt) keep every heartbeat inside that wait."""
    from consumer.aws import HEARTBEAT_CONFIG
    from consumer.worker import HEARTBEAT_WAIT

    assert HEARTBEAT_CONFIG.retries == {"mode": "standard", "total_max_attempts": 1}
    assert HEARTBEAT_CONFIG.connect_timeout + HEARTBEAT_CONFIG.read_timeout < HEARTBEAT_WAIT


def test_a_failed_heartbeat_is_tried_again_within_seconds(make_settings, aws):
    """Not a whole interval later: with a third of the visibility between heartbeats, one failure would
    otherwise leave a single chance before the message reappears."""
    from consumer.app import build_daemon
    from consumer.aws import make_clients
    from consumer.errors import RetryableError
    from consumer.housekeeping import HEARTBEAT_RETRY, Housekeeper
    from consumer.pipeline import Attempt
    from consumer.sqs import Message
    from consumer.worker import InFlight

    class FlakySqs:  # the heartbeat queue: fails once, then accepts
        def __init__(self):
            self.calls = 0

        def change_visibility_batch(self, items):
            self.calls += 1
            if self.calls == 1:
                raise RetryableError("ChangeMessageVisibility: timed out", code="sqs_unavailable")
            return []

    settings = make_settings(visibility_timeout=120)
    sqs, s3 = make_clients(settings)
    worker = build_daemon(settings, sqs=sqs, s3=s3).worker
    worker.heartbeat_queue = flaky = FlakySqs()
    entry = InFlight(Attempt(message=Message(message_id="m", receipt_handle="r", body="")), received=0.0, extended=0.0)
    worker.inflight["r"] = entry
    housekeeper = Housekeeper(worker)
    every = settings.heartbeat_every

    housekeeper._heartbeat(every)  # due: fails
    assert flaky.calls == 1 and not entry.extending
    housekeeper._heartbeat(every + HEARTBEAT_RETRY - 0.1)
    assert flaky.calls == 1
    housekeeper._heartbeat(every + HEARTBEAT_RETRY)  # tried again, long before another full interval
    assert flaky.calls == 2
    housekeeper._heartbeat(every + HEARTBEAT_RETRY + every - 0.1)  # succeeded: the usual interval again
    assert flaky.calls == 2
    assert worker.metrics.heartbeats.labels("failed")._value.get() == 1
    assert worker.metrics.heartbeats.labels("ok")._value.get() == 1
