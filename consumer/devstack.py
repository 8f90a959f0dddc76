"""`sidecar dev`: the daemon on an embedded local stack when no queue is configured.

Starts moto in server mode on 127.0.0.1 (SQS and S3 over real HTTP), creates a queue, a DLQ wired by a
redrive policy and a bucket, starts a stand-in WordPress that prints every callback, enqueues a sample
recording, and runs the daemon against all of it. Needs the `dev` extra (moto[server]).

A second shell reaches the same stack through `.cache/devstack.env` (written at start, removed at exit):
`sidecar --env-file .cache/devstack.env enqueue PATH`. Its side port defaults to DEV_METRICS_PORT, never
prod's 9002, so `make run` on the prod host cannot take prod's port.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3

if TYPE_CHECKING:
    from consumer.settings import Settings

log = logging.getLogger("consumer.devstack")

LOCAL_BUCKET = "salestrainer-local"
LOCAL_QUEUE = "salestrainer-jobs"
LOCAL_TOKEN = "local-dev-token"
LOCAL_SECRET = "local-dev-signing-secret"  # signs the jobs of both shells when .env names no SIDE_CAR_SECRET
DEV_METRICS_PORT = 9102
SECOND_SHELL_ENV = Path(".cache") / "devstack.env"
# What `enqueue` and `dlq` need to reach the stack; the rest of the configuration is the daemon's.
# (Not the transcriber's: a real OPENAI_API_KEY is not copied into another file.)
SECOND_SHELL_VARS = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "SQS_QUEUE_URL",
                     "SQS_DLQ_URL", "S3_BUCKET", "S3_KEY_PREFIX", "SIDE_CAR_SECRET", "WP_SIDE_CAR_CALLBACK",
                     "WP_SERVER_TOKEN")
SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "speech" / "sentence_en.wav"


def create_queues_and_bucket(endpoint: str, region: str, *, prefix: str = LOCAL_QUEUE,
                             bucket: str = LOCAL_BUCKET, max_receives: int = 5) -> dict[str, str]:
    """Queue + DLQ (redrive after max_receives) + bucket on a local endpoint; returns their names/URLs."""
    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=region)
    sqs = session.client("sqs", endpoint_url=endpoint)
    s3 = session.client("s3", endpoint_url=endpoint)
    dlq_url = sqs.create_queue(QueueName=f"{prefix}-dlq", Attributes={"MessageRetentionPeriod": "1209600"})["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    policy = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receives)})
    url = sqs.create_queue(QueueName=prefix, Attributes={"RedrivePolicy": policy})["QueueUrl"]
    if region == "us-east-1":
        s3.create_bucket(Bucket=bucket)
    else:
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})  # type: ignore[typeddict-item]
    return {"queue_url": url, "dlq_url": dlq_url, "bucket": bucket}


class CallbackPrinter:
    """A stand-in WordPress endpoint that logs each callback's status and transcript."""

    def __init__(self, on_callback: Callable[[dict[str, Any]], None] | None = None) -> None:
        printer = on_callback or self._log

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                try:
                    printer(json.loads(self.rfile.read(length)))
                finally:
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, name="wp-stand-in", daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/wp-json/salestrainer/v1/upload-complete"

    @staticmethod
    def _log(body: dict[str, Any]) -> None:
        transcript = body.get("transcript") or {}
        log.info("wordpress_received_callback", extra={
            "job_id": body.get("job_id"), "status": body.get("status"),
            "transcript": transcript.get("text"), "error": body.get("error")})


def start_local_stack(region: str = "us-east-1") -> dict[str, str]:
    """Start moto and the WordPress stand-in; returns the settings overrides that point at them."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:  # pragma: no cover - depends on the install
        raise SystemExit("the embedded stack needs moto: pip install -e '.[dev]' (make run does this)") from None
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    names = create_queues_and_bucket(endpoint, region)
    printer = CallbackPrinter()
    log.info("local_stack_started", extra={"endpoint": endpoint, **names, "callback": printer.url})
    return {
        "aws_endpoint_url": endpoint, "aws_region": region,
        "aws_access_key_id": "testing", "aws_secret_access_key": "testing",
        "sqs_queue_url": names["queue_url"], "sqs_dlq_url": names["dlq_url"], "s3_bucket": names["bucket"],
        "wp_side_car_callback": printer.url, "wp_server_token": LOCAL_TOKEN,
    }


def local_overrides(settings: Settings, stack: dict[str, str]) -> dict[str, str]:
    """The stack's overrides, plus a signing secret when the configuration has none."""
    return stack if settings.secrets else {**stack, "side_car_secret": LOCAL_SECRET}


def second_shell_env(settings: Settings) -> dict[str, str]:
    """VAR -> value for a second shell: the stack's endpoint, test credentials, queue, bucket and secret."""
    out = {}
    for var in SECOND_SHELL_VARS:
        value = getattr(settings, var.lower())
        if value is not None and not isinstance(value, str):
            value = value.get_secret_value()
        if value:
            out[var] = value
    return out


def announce_second_shell(settings: Settings, path: Path = SECOND_SHELL_ENV) -> Path:
    """Write the second shell's environment (mode 0600) and print how to use it; returns the file."""
    env = second_shell_env(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("# The `make run` stack, for a second shell; removed when it stops.\n")
        f.writelines(f"{var}={value}\n" for var, value in env.items())
    own_secrets = set(settings.secret_values()) - {LOCAL_SECRET, LOCAL_TOKEN, "testing"}
    shown = "".join(f"    {var}={'(in the file)' if value in own_secrets else value}\n" for var, value in env.items())
    print(f"\nThe local stack, for a second shell ({path}, removed when this stops):\n{shown}"
          f"  e.g. .venv/bin/sidecar --env-file {path} enqueue tests/fixtures/speech/sentence_en.wav\n"
          f"  or, for the aws CLI: set -a; . {path}; set +a\n", file=sys.stderr, flush=True)
    return path
