"""The command line as an operator uses it: help, schema, enqueue, check, dlq tools."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from consumer.dlq import DLQ_ATTRIBUTES
from tests.conftest import SECRET, SPEECH, send_job
from tests.stack import wait_for
from tests.stack.openai_stub import Reply, error

pytestmark = pytest.mark.timeout(120)


def sidecar(*args: str, env: dict[str, str] | None = None, cwd=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "consumer", *args], capture_output=True, text=True, timeout=90,
                          env={**os.environ, **(env or {})}, cwd=cwd)


@pytest.mark.parametrize("args", [(), ("run",), ("dev",), ("check",), ("enqueue",), ("intake",), ("schema",),
                                  ("dlq",), ("dlq", "redrive"), ("dlq", "purge")])
def test_every_command_has_help(args):
    out = sidecar(*args, "--help")
    assert out.returncode == 0 and "usage: sidecar" in out.stdout and len(out.stdout) > 150


def test_schema_commands_print_json_schema():
    job = json.loads(sidecar("schema", "job").stdout)
    assert job["required"] == ["job_id", "s3_key"]
    assert {"string", "integer"} == {alt["type"] for alt in job["properties"]["job_id"]["anyOf"]}
    callback = json.loads(sidecar("schema", "callback").stdout)
    assert {"server_token", "job_id", "status"} <= set(callback["required"])


def test_enqueue_uploads_signs_and_sends(aws, env, tmp_path):
    out = sidecar("enqueue", str(SPEECH), "--job-id", "cli-1", "--metadata", '{"post_id": 3}', env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    sent = json.loads(out.stdout)
    assert sent["job_id"] == "cli-1" and sent["s3_key"].endswith(".wav")
    assert aws.s3.get_object(Bucket=aws.bucket, Key=sent["s3_key"])["Body"].read() == SPEECH.read_bytes()
    [m] = aws.sqs.receive_message(QueueUrl=aws.queue_url, MessageAttributeNames=["All"])["Messages"]
    from consumer.signing import verify

    verify(m["Body"], m["MessageAttributes"]["signature"]["StringValue"], [SECRET])
    assert json.loads(m["Body"])["metadata"] == {"post_id": 3}


def test_enqueue_rejects_bad_metadata_without_a_traceback(env, tmp_path):
    out = sidecar("enqueue", "audio/x.wav", "--metadata", "{nope", env=env, cwd=tmp_path)
    assert out.returncode == 2 and "--metadata" in out.stderr and "Traceback" not in out.stderr


def test_check_passes_against_the_local_stack(env, tmp_path):
    out = sidecar("check", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith("[ ok ]") for line in lines)
    for secret in (env["OPENAI_API_KEY"], env["WP_SERVER_TOKEN"], env["SIDE_CAR_SECRET"]):
        assert secret not in out.stdout + out.stderr


@pytest.mark.parametrize("model", ["gpt-transcribe", "gpt-4o-transcribe", "whisper-1"])
def test_check_probe_sends_the_clip_as_a_job_would(env, tmp_path, openai_stub, model):
    out = sidecar("check", "--probe", env={**env, "TRANSCRIBE_MODEL": model}, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert any(line.startswith(f"[ ok ] transcription: {model} (") for line in out.stdout.splitlines())
    [request] = openai_stub.requests  # one request, the shape a job's would have; nothing refused
    assert request.model == model and request.filename == "probe.wav" and not openai_stub.refused
    assert request.fields["response_format"] == ("verbose_json" if model == "whisper-1" else "json")


@pytest.mark.parametrize(("extra", "expected"), [
    # The API's own words reach the operator: an unknown model ...
    ({"TRANSCRIBE_MODEL": "whisper-9000-typo"}, "The model `whisper-9000-typo` does not exist"),
    # ... and a format a compatible server or model will not give (jobs would fall back; deploy must not).
    ({"TRANSCRIBE_MODEL": "gpt-4o-transcribe", "TRANSCRIBE_RESPONSE_FORMAT": "verbose_json"}, None),
])
def test_check_probe_prints_the_endpoints_refusal(env, tmp_path, openai_stub, extra, expected):
    if expected is None:  # a configuration error: the transcription check is skipped, nothing is sent
        out = sidecar("check", "--probe", env={**env, **extra}, cwd=tmp_path)
        assert out.returncode == 2 and not openai_stub.requests, out.stdout
        assert "[FAIL] configuration: TRANSCRIBE_RESPONSE_FORMAT" in out.stdout
        assert "[skip] transcription: needs TRANSCRIBE_RESPONSE_FORMAT (see its line above)" in out.stdout
        return
    out = sidecar("check", "--probe", env={**env, **extra}, cwd=tmp_path)
    assert out.returncode == 1
    [fail] = [line for line in out.stdout.splitlines() if line.startswith("[FAIL]")]
    assert fail.startswith("[FAIL] transcription:") and expected in fail and "Traceback" not in out.stderr


def test_check_probe_fails_when_the_endpoint_refuses_an_optional_parameter(env, tmp_path, openai_stub):
    """Jobs would fall back to json and complete, but not as configured: the deploy checkpoint stops."""
    openai_stub.script.append(Reply(400, body=error("timestamps are not supported here",
                                                    param="timestamp_granularities[]")))
    out = sidecar("check", "--probe", env={**env, "TRANSCRIBE_MODEL": "whisper-1"}, cwd=tmp_path)
    assert out.returncode == 1, out.stdout
    [fail] = [line for line in out.stdout.splitlines() if line.startswith("[FAIL]")]
    assert "refused `timestamp_granularities`" in fail and "timestamps are not supported here" in fail
    assert [r.fields["response_format"] for r in openai_stub.requests] == ["verbose_json", "json"]


def test_check_fails_with_a_mark_per_failure(env, tmp_path):
    out = sidecar("check", env={**env, "WP_SIDE_CAR_CALLBACK": "http://127.0.0.1:9/cb", "S3_BUCKET": "nope-bucket"},
                  cwd=tmp_path)
    assert out.returncode == 1
    fails = [line for line in out.stdout.splitlines() if line.startswith("[FAIL]")]
    assert any("S3 bucket" in f for f in fails) and any("callback" in f for f in fails)


def test_a_queue_without_a_dead_letter_queue_is_refused(aws, env, tmp_path):
    """Nowhere to put a job that fails for good: `run` refuses to start, `check` says why."""
    bare = aws.sqs.create_queue(QueueName=f"no-dlq-{os.getpid()}")["QueueUrl"]
    bare_env = {**env, "SQS_QUEUE_URL": bare, "SQS_DLQ_URL": ""}
    out = sidecar("run", env=bare_env, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "configuration error: SQS_DLQ_URL: not set and the queue has no RedrivePolicy" in out.stderr
    out = sidecar("check", env=bare_env, cwd=tmp_path)
    assert out.returncode == 1
    assert any(line.startswith("[FAIL]") and "SQS_DLQ_URL" in line for line in out.stdout.splitlines())


def test_dlq_ls_redrive_purge(aws, env, tmp_path, run_daemon, wordpress):
    for i in range(3):
        send_job(aws, f"dead-{i}", "audio/missing.wav")
    rd = run_daemon()
    wait_for(lambda: len(aws.dlq_messages()) == 3, timeout=60, what="three dead letters")
    rd.stop()
    out = sidecar("dlq", "ls", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = out.stdout.strip().splitlines()[1:]
    assert sorted(r.split("\t")[0] for r in rows) == ["dead-0", "dead-1", "dead-2"]
    assert all(r.split("\t")[1] == "audio_not_found" for r in rows)
    for row in rows:  # failed_at in ISO-8601 UTC, within the minute of the test
        failed_at = datetime.strptime(row.split("\t")[2], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert abs(failed_at.timestamp() - time.time()) < 120, row

    out = sidecar("dlq", "redrive", "--job-id", "nope", env=env, cwd=tmp_path)
    assert out.returncode == 1 and "error: no such job nope in the DLQ" in out.stderr, out.stderr
    wait_for(lambda: aws.counts(aws.dlq_url) == (3, 0), timeout=10, what="nothing moved, everything handed back")

    out = sidecar("dlq", "redrive", "--job-id", "dead-1", env=env, cwd=tmp_path)
    assert out.returncode == 0 and "redrove 1" in out.stderr
    wait_for(lambda: aws.counts() == (1, 0), timeout=10, what="redriven message in the source queue")
    [m] = aws.sqs.receive_message(QueueUrl=aws.queue_url, MessageAttributeNames=["All"])["Messages"]
    assert json.loads(m["Body"])["job_id"] == "dead-1"
    assert "signature" in m["MessageAttributes"] and not set(DLQ_ATTRIBUTES) & set(m["MessageAttributes"])

    assert sidecar("dlq", "redrive", env=env, cwd=tmp_path).returncode == 2
    assert sidecar("dlq", "purge", env=env, cwd=tmp_path).returncode == 2
    out = sidecar("dlq", "purge", "--yes", env=env, cwd=tmp_path)
    assert out.returncode == 0
    wait_for(lambda: aws.counts(aws.dlq_url) == (0, 0), timeout=10, what="purged")


def test_env_file_names_the_instances_variables(env, tmp_path):
    """`--env-file` reads a systemd EnvironmentFile, as deploy.sh's probe does; a missing one is one line."""
    env_file = tmp_path / "prod.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    out = sidecar("--env-file", str(env_file), "check", env={}, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    missing = sidecar("--env-file", str(tmp_path / "nope.env"), "check", env=env, cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"configuration error: --env-file {tmp_path / 'nope.env'}: no such file, or not readable by this user (sudo?)"]


# ------------------------------------------------------------------ answers, not tracebacks

PROD_MISTAKES = {"ENVIRONMENT": "prod", "REQUIRE_SIGNATURE": "false", "ALLOW_INSECURE_CALLBACK": "true",
                 "TRANSCRIBER": "", "CONCURRENCY": "0"}


def test_prod_mistakes_refuse_run_and_fail_check_with_the_same_lines(env, tmp_path):
    """One line per variable, field errors and cross-field problems at once; `check` skips what needs them."""
    bad = {**env, **PROD_MISTAKES, "S3_BUCKET": ""}
    run = sidecar("run", env=bad, cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    refused = [line.removeprefix("configuration error: ") for line in run.stderr.strip().splitlines()]
    assert [p.split(":")[0] for p in refused] == [
        "CONCURRENCY", "REQUIRE_SIGNATURE", "ALLOW_INSECURE_CALLBACK", "TRANSCRIBER", "WP_SIDE_CAR_CALLBACK"]
    assert "WP_SIDE_CAR_CALLBACK: https is required when ENVIRONMENT=prod" in refused[-1]  # the stand-in's http://

    out = sidecar("check", env=bad, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert [f"[FAIL] configuration: {p}" for p in refused] == lines[:5]
    assert lines[5:] == [
        "[FAIL] configuration: S3_BUCKET: required (the recordings' bucket)",
        "[skip] S3 bucket: S3_BUCKET is not set",
        lines[7],  # the queue does not depend on any of them: it is still reached
        "[skip] transcription: needs TRANSCRIBER (see its line above)",
        "[skip] WordPress callback host: needs WP_SIDE_CAR_CALLBACK (see its line above)",
    ]
    assert lines[7].startswith("[ ok ] SQS queue:")


def test_check_compares_the_model_with_the_endpoints_list(env, tmp_path, openai_stub):
    out = sidecar("check", env={**env, "TRANSCRIBE_MODEL": "whisper-9000-typo"}, cwd=tmp_path)
    assert out.returncode == 1, out.stdout
    [fail] = [line for line in out.stdout.splitlines() if line.startswith("[FAIL]")]
    assert fail.startswith("[FAIL] transcription: TRANSCRIBE_MODEL: whisper-9000-typo is not among the ")
    assert "did you mean whisper-1" in fail and not openai_stub.requests  # nothing transcribed, nothing paid


def test_an_endpoint_that_lists_no_models_is_not_a_failure(env, tmp_path, openai_stub):
    """faster-whisper-server answers 404 to GET /models: the model cannot be compared, and check says so."""
    openai_stub.lists_models = False
    out = sidecar("check", env={**env, "TRANSCRIBE_MODEL": "Systran/faster-whisper-base"}, cwd=tmp_path)
    assert out.returncode == 0, out.stdout
    [line] = [line for line in out.stdout.splitlines() if "transcription" in line]
    assert line.startswith("[ ok ] transcription:") and "does not list models (404 on /models)" in line


def without_aws_credentials(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """An environment in which boto3's chain finds nothing: no keys, no profile files, no instance role."""
    base = {k: v for k, v in {**os.environ, **env}.items()
            if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    return {**base, "HOME": str(tmp_path), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.mark.parametrize("source", [str(SPEECH), "audio/some-key.wav"])
def test_enqueue_without_aws_credentials_says_where_boto3_looks(env, tmp_path, source):
    out = subprocess.run([sys.executable, "-m", "consumer", "enqueue", source], capture_output=True, text=True,
                         timeout=60, env=without_aws_credentials(env, tmp_path), cwd=tmp_path)
    assert out.returncode == 1
    [line] = out.stderr.strip().splitlines()
    assert "no usable AWS credentials" in line and "~/.aws/credentials" in line and "instance role" in line


@pytest.mark.parametrize("typo", ["tests/fixtures/speech/sentence_en.wa", "./sentence_en.wav", "sentence_en.wav"])
def test_enqueue_refuses_a_mistyped_path(aws, env, typo):
    """Not a local file, and not in the bucket: it would only become an S3 key and a dead letter."""
    root = Path(__file__).resolve().parent.parent
    out = sidecar("enqueue", typo, env=env, cwd=root)
    assert out.returncode == 1
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(f"error: audio_not_found: {typo}: no such local file") and "check the path" in line
    assert aws.counts() == (0, 0)


def test_enqueue_takes_a_path_like_key_the_bucket_has(aws, env, tmp_path):
    aws.s3.put_object(Bucket=aws.bucket, Key="call.wav", Body=SPEECH.read_bytes())
    out = sidecar("enqueue", "call.wav", "--job-id", "in-bucket", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["s3_key"] == "call.wav"


@pytest.mark.parametrize("command", ["run", "dev"])
def test_a_port_in_use_is_one_line_naming_metrics_port(env, tmp_path, command):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        bad = {**env, "METRICS_PORT": str(port)}
        if command == "dev":  # the embedded stack: nothing may start before the port is checked
            bad |= {"SQS_QUEUE_URL": ""}
        out = sidecar(command, env=bad, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"configuration error: METRICS_PORT: 127.0.0.1:{port} is in use (another sidecar? prod listens on 9002); "
        "set METRICS_PORT to a free port, or 0 for any free port"]
    assert not (tmp_path / ".cache" / "devstack.env").exists()


def test_dev_defaults_to_a_port_that_is_not_prods(env, tmp_path):
    """Without METRICS_PORT, `make run` (sidecar dev) takes 9102, never prod's 9002: shown by taking 9102."""
    dev_env = {k: v for k, v in {**os.environ, **env}.items() if k != "METRICS_PORT"} | {"SQS_QUEUE_URL": ""}
    try:
        taken = socket.create_server(("127.0.0.1", 9102))
    except OSError:
        taken = None  # something else has it: the answer must name it all the same
    try:
        out = subprocess.run([sys.executable, "-m", "consumer", "dev"], capture_output=True, text=True, timeout=60,
                             env=dev_env, cwd=tmp_path)
    finally:
        if taken:
            taken.close()
    assert out.returncode == 2 and "METRICS_PORT: 127.0.0.1:9102 is in use" in out.stderr, out.stderr
