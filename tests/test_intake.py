"""`sidecar intake`: the old sidecar's POST /transcribe, answered on a real socket, queued on moto's SQS
and completed by the daemon, which calls the WordPress stand-in back."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from consumer.intake import Intake, IntakeServer
from consumer.settings import Settings
from consumer.signing import verify
from tests.conftest import SECRET, free_port, upload
from tests.stack import wait_for
from tests.stack.aws import AwsStack
from tests.stack.wordpress import WordPressStub

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def start_intake(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., str]]:
    """Start an intake server (settings from the local stack plus overrides); its base URL."""
    servers: list[IntakeServer] = []

    def start(**overrides: Any) -> str:
        settings = make_settings(**overrides)
        from consumer.aws import make_clients

        sqs, _ = make_clients(settings)
        server = IntakeServer(Intake(settings, sqs), host="127.0.0.1", port=0).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        server.stop()


def queued(aws: AwsStack) -> list[dict[str, Any]]:
    """Every message on the job queue (taken off it)."""
    out = []
    while True:
        got = aws.sqs.receive_message(QueueUrl=aws.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                      MessageAttributeNames=["All"]).get("Messages", [])
        if not got:
            return out
        for m in got:
            aws.sqs.delete_message(QueueUrl=aws.queue_url, ReceiptHandle=m["ReceiptHandle"])
        out.extend(got)


def one_line_error(resp: requests.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.text.count("\n") == 1 and resp.text.endswith("\n") and "Traceback" not in resp.text
    body = dict(json.loads(resp.text))
    assert set(body) == {"error", "message"} and body["message"]
    return body


@pytest.mark.parametrize("how", ["header", "bearer", "body"])
def test_the_old_call_is_queued_as_a_signed_job(start_intake, aws, how):
    url = start_intake()
    headers, body = {}, {"s3_key": "audio/old-call.webm"}
    if how == "header":
        headers["X-Side-Car-Secret"] = SECRET
    elif how == "bearer":
        headers["Authorization"] = f"Bearer {SECRET}"
    else:
        body["secret"] = SECRET
    resp = requests.post(f"{url}/transcribe", json=body, headers=headers, timeout=10)
    assert resp.status_code == 202, resp.text
    answer = resp.json()
    assert answer["ok"] is True and answer["status"] == "queued" and answer["job_id"].startswith("intake-")
    [message] = queued(aws)
    assert message["MessageId"] == answer["message_id"]
    verify(message["Body"], message["MessageAttributes"]["signature"]["StringValue"], [SECRET])
    assert json.loads(message["Body"]) == {"job_id": answer["job_id"], "s3_key": "audio/old-call.webm"}
    assert SECRET not in message["Body"]


def test_wrong_or_missing_secret_is_401_and_queues_nothing(start_intake, aws):
    url = start_intake()
    cases = [
        ({}, {"s3_key": "audio/a.wav"}),
        ({"X-Side-Car-Secret": "not-it"}, {"s3_key": "audio/a.wav"}),
        ({"Authorization": "Bearer not-it"}, {"s3_key": "audio/a.wav"}),
        ({"Authorization": f"Basic {SECRET}"}, {"s3_key": "audio/a.wav"}),  # only Bearer carries it
        ({}, {"s3_key": "audio/a.wav", "secret": "not-it"}),
        ({}, {"s3_key": "audio/a.wav", "secret": ["x"]}),
        ({"X-Side-Car-Secret": SECRET[:-1]}, {"s3_key": "audio/a.wav"}),
    ]
    for headers, body in cases:
        resp = requests.post(f"{url}/transcribe", json=body, headers=headers, timeout=10)
        assert one_line_error(resp, 401)["error"] == "unauthorized", (headers, body)
    # Not JSON and no secret: still 401, so an unauthenticated caller learns nothing about bodies.
    resp = requests.post(f"{url}/transcribe", data=b"not json", timeout=10)
    one_line_error(resp, 401)
    assert queued(aws) == []


def test_the_secret_header_and_field_are_configurable(start_intake, aws):
    url = start_intake(intake_secret_header="X-Old-Secret", intake_secret_field="")
    for headers, body in [({"X-Side-Car-Secret": SECRET}, {"s3_key": "audio/a.wav"}),
                          ({}, {"s3_key": "audio/a.wav", "secret": SECRET})]:
        one_line_error(requests.post(f"{url}/transcribe", json=body, headers=headers, timeout=10), 401)
    resp = requests.post(f"{url}/transcribe", json={"s3_key": "audio/a.wav"}, headers={"x-old-secret": SECRET},
                         timeout=10)
    assert resp.status_code == 202, resp.text
    assert len(queued(aws)) == 1


@pytest.mark.parametrize(("body", "code", "says"), [
    (b"not json", "invalid_request", "JSON object"),
    (b"[1, 2]", "invalid_request", "JSON object"),
    (b'{"s3_key": "audio/a.wav", "job_id": "a b"', "invalid_request", "JSON object"),
    (b"{}", "invalid_request", "s3_key is required"),
    (b'{"s3_key": 5}', "invalid_message", "s3_key:"),
    (b'{"s3_key": "../etc/passwd"}', "forbidden_input", "'..'"),
    (b'{"s3_key": "audio/a.wav", "s3_bucket": "someone-elses"}', "forbidden_input", "bucket"),
    (b'{"s3_key": "audio/a.wav", "language": "english"}', "invalid_message", "language:"),
    (b'{"s3_key": "audio/a.wav", "job_id": true}', "invalid_message", "job_id:"),
    (b'{"s3_key": "audio/a.wav", "metadata": [1]}', "invalid_message", "metadata:"),
    (b'{"s3_key": "audio/a.wav", "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}", "invalid_request",
     "JSON object"),
])
def test_bad_bodies_are_400_with_one_line(start_intake, aws, body, code, says):
    url = start_intake()
    resp = requests.post(f"{url}/transcribe", data=body, headers={"X-Side-Car-Secret": SECRET,
                                                                   "Content-Type": "application/json"}, timeout=10)
    answer = one_line_error(resp, 400)
    assert answer["error"] == code and says in answer["message"], answer
    assert queued(aws) == []


def test_http_edges_answer_one_line_of_json(start_intake, aws):
    url = start_intake()
    auth = {"X-Side-Car-Secret": SECRET}
    assert requests.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    one_line_error(requests.get(f"{url}/transcribe", timeout=10), 405)
    one_line_error(requests.delete(f"{url}/health", timeout=10), 405)
    one_line_error(requests.post(f"{url}/elsewhere", json={"s3_key": "audio/a"}, headers=auth, timeout=10), 404)
    big = json.dumps({"s3_key": "audio/a.wav", "pad": "x" * 300_000})
    assert one_line_error(requests.post(f"{url}/transcribe", data=big, headers=auth, timeout=10),
                          413)["error"] == "body_too_large"
    chunks = iter([b'{"s3_key": ', b'"audio/a.wav"}'])  # requests sends a generator chunked
    one_line_error(requests.post(f"{url}/transcribe", data=chunks, headers=auth, timeout=10), 411)
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # not HTTP at all
        s.sendall(b"GARBAGE\r\n\r\n")
        raw = s.makefile("rb").read().decode()
    assert raw.startswith("HTTP/1.0 400") and raw.rstrip().endswith("}") and "Traceback" not in raw
    assert queued(aws) == []


def test_the_fastapi_sidecars_call_keeps_its_ids(start_intake, aws):
    url = start_intake()
    body = {"object_key": "audio/s-9.webm", "session_id": "s-9", "scenario_id": 4, "mime_type": "audio/webm",
            "callback_url": "https://elsewhere.example/steal", "secret": SECRET, "job_id": 1234}
    resp = requests.post(f"{url}/process-s3", json=body, timeout=10)
    assert resp.status_code == 202 and resp.json()["job_id"] == "1234"
    [message] = queued(aws)
    assert json.loads(message["Body"]) == {"job_id": 1234, "s3_key": "audio/s-9.webm",
                                           "metadata": {"session_id": "s-9", "scenario_id": 4}}


def test_an_unreachable_queue_is_503(start_intake, aws):
    url = start_intake(sqs_queue_url=aws.queue_url + "-gone")
    resp = requests.post(f"{url}/transcribe", json={"s3_key": "audio/a.wav"}, headers={"X-Side-Car-Secret": SECRET},
                         timeout=30)
    assert one_line_error(resp, 503)["error"] == "queue_unavailable"


@pytest.mark.timeout(90)
def test_the_old_call_completes_and_wordpress_gets_the_callback(start_intake, run_daemon, aws,
                                                                wordpress: WordPressStub):
    key = upload(aws, "audio/cutover-1.wav")
    url = start_intake()
    resp = requests.post(f"{url}/transcribe", json={"s3_key": key, "metadata": {"post_id": 31}},
                         headers={"X-Side-Car-Secret": SECRET}, timeout=10)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    run_daemon()
    [callback] = wait_for(lambda: wordpress.terminal(job_id), timeout=60, what="the completed callback")
    assert callback["status"] == "completed" and callback["s3_key"] == key
    assert callback["metadata"] == {"post_id": 31} and callback["transcript"]["text"]


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_sidecar_intake_command_serves_until_sigterm(env: dict[str, str], aws, tmp_path: Path):
    port = free_port()
    log_path = tmp_path / "intake.log"
    child_env = {**os.environ, **env, "INTAKE_PORT": str(port)}
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "consumer", "intake"], cwd=tmp_path, env=child_env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            assert proc.poll() is None, log_path.read_text()
            try:
                return requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(up, timeout=30, what="intake /health")
        resp = requests.post(f"http://127.0.0.1:{port}/transcribe", json={"s3_key": "audio/a.wav"},
                             headers={"Authorization": f"Bearer {SECRET}"}, timeout=10)
        assert resp.status_code == 202
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    events = [json.loads(line).get("event") for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert events[:1] == ["intake_listening"] and "intake_job_queued" in events and events[-1] == "intake_stopping"
    assert SECRET not in log_path.read_text()
    assert [json.loads(m["Body"])["job_id"] for m in queued(aws)] == [resp.json()["job_id"]]
