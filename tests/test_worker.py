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
    assert [s["text"] for s in body["transcript"]["segments"]] == ["first half", "second half"]
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
    assert req.model == "gpt-transcribe" and req.fields.get("language") == "en"

    wait_for(lambda: aws.counts() == (0, 0), what="message deleted")
    port = rd.daemon.side_port.port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        health = json.loads(r.read())
    assert r.status == 200 and health["status"] == "ok" and health["in_flight"] == 0
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
