"""`sidecar run` as a subprocess: 20 signed jobs end to end, metrics and health, a clean SIGTERM."""

from __future__ import annotations

import json
import signal
import urllib.request

import pytest

from tests.conftest import OPENAI_KEY, SECRET, TOKEN, send_job, upload
from tests.stack import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def scrape(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, line_prefix: str, default: float | None = None) -> float:
    for line in text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    if default is not None:
        return default
    raise AssertionError(f"{line_prefix} not in metrics")


def test_twenty_signed_jobs_end_to_end(spawn_daemon, aws, openai_stub, wordpress):
    upload(aws, "audio/shared.wav")
    daemon = spawn_daemon({"CONCURRENCY": "4"})
    daemon.wait_ready()
    for i in range(20):
        send_job(aws, f"job-{i:02d}", "audio/shared.wav", extra={"metadata": {"n": i}})

    wait_for(lambda: len(wordpress.accepted()) >= 20, timeout=90, what="20 callbacks")
    bodies = wordpress.accepted()
    assert sorted(b["job_id"] for b in bodies) == [f"job-{i:02d}" for i in range(20)]
    assert all(b["status"] == "completed" and b["metadata"] == {"n": int(b["job_id"][4:])} for b in bodies)
    assert all("authorization" not in c.headers for c in wordpress.received)
    wait_for(lambda: aws.counts() == (0, 0), timeout=30, what="empty queue")

    def settled():  # the queue empties first; each slot frees once its job's claim is released too
        status, text = scrape(daemon.metrics_port, "/metrics")
        assert status == 200
        return metric(text, 'sidecar_jobs_in_progress') == 0 and text

    text = wait_for(settled, timeout=30, what="every job settled")
    assert metric(text, 'sidecar_jobs_total{outcome="completed"}') == 20
    assert metric(text, 'sidecar_stage_duration_seconds_count{stage="transcribe"}') == 20
    assert metric(text, 'sidecar_stage_duration_seconds_count{stage="download"}') == 20
    assert metric(text, 'sidecar_stage_duration_seconds_count{stage="callback"}') == 20
    assert metric(text, 'sidecar_job_duration_seconds_count') == 20
    assert metric(text, 'sidecar_message_age_seconds_count') == 20
    assert metric(text, 'sidecar_audio_seconds_total{model="gpt-transcribe"}') > 20
    # Deletes that coincide go out as one DeleteMessageBatch: at most one request per job.
    deletes = (metric(text, 'sidecar_sqs_requests_total{operation="DeleteMessage"}', 0)
               + metric(text, 'sidecar_sqs_requests_total{operation="DeleteMessageBatch"}', 0))
    assert 1 <= deletes <= 20
    status, body = scrape(daemon.metrics_port, "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["in_flight"] == 0
    assert set(health) == {"status", "version", "package_version", "last_poll_age_s", "in_flight"}

    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    logs = daemon.log_path.read_text()
    for secret in (SECRET, TOKEN, OPENAI_KEY):
        assert secret not in logs
    completed = daemon.events("job_completed")
    assert len(completed) == 20
    assert all({"job_id", "message_id", "receive_count", "stage", "duration_s"} <= set(r) for r in completed)
    assert daemon.events("message_received") and daemon.events("daemon_stopped")


def test_missing_configuration_exits_2_with_one_line_per_variable(spawn_daemon):
    daemon = spawn_daemon({"SQS_QUEUE_URL": "", "WP_SERVER_TOKEN": "", "CONCURRENCY": "zero"})
    assert daemon.proc.wait(30) == 2
    out = daemon.log_path.read_text()
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.startswith("configuration error:")]
    assert any("CONCURRENCY" in line for line in lines), out
