"""`sidecar dev`: the daemon on an embedded local stack when no queue is configured.

Starts moto in server mode on 127.0.0.1 (SQS and S3 over real HTTP), creates a queue, a DLQ wired by a
redrive policy and a bucket, starts a stand-in WordPress that prints every callback, enqueues a sample
recording, and runs the daemon against all of it. Needs the `dev` extra (moto[server]).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3

log = logging.getLogger("consumer.devstack")

LOCAL_BUCKET = "salestrainer-local"
LOCAL_QUEUE = "salestrainer-jobs"
LOCAL_TOKEN = "local-dev-token"
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
