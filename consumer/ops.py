"""Operator commands besides the daemon: `sidecar check` (reach every dependency) and `sidecar enqueue`."""

from __future__ import annotations

import json
import mimetypes
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from botocore.exceptions import BotoCoreError, ClientError

from consumer.errors import ConfigError, ConsumerError
from consumer.signing import sign
from consumer.sqs import SqsQueue

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient

    from consumer.settings import Settings

Check = tuple[str, Callable[[], str]]


def run_checks(checks: list[Check], out: Callable[[str], None] = print) -> bool:
    """Run each check, print one line with a pass/fail mark, return True when all passed."""
    ok = True
    for name, fn in checks:
        try:
            detail = fn()
            out(f"[ ok ] {name}: {detail}")
        except (ConsumerError, ConfigError, ClientError, BotoCoreError, OSError) as exc:
            ok = False
            out(f"[FAIL] {name}: {exc}")
        except Exception as exc:  # noqa: BLE001  (a check must report, never crash the report)
            ok = False
            out(f"[FAIL] {name}: {type(exc).__name__}: {exc}")
    return ok


def dependency_checks(settings: Settings, sqs: SQSClient, s3: S3Client) -> list[Check]:
    """The checks `sidecar check` runs, in order."""

    def config() -> str:
        problems = settings.run_problems()
        if problems:
            raise ConfigError(problems)
        return f"environment={settings.environment}, transcriber={settings.transcriber_kind}"

    def bucket() -> str:
        s3.head_bucket(Bucket=settings.s3_bucket or "")
        return f"s3://{settings.s3_bucket} reachable"

    def queue() -> str:
        q = SqsQueue(sqs, settings.sqs_queue_url or "")
        visible, in_flight = q.counts()
        policy = q.redrive_policy()
        if not policy and not settings.sqs_dlq_url:
            raise ConfigError(["SQS_DLQ_URL: not set and the queue has no RedrivePolicy (`run` needs a DLQ)"])
        dlq = f"DLQ after {policy[1]} receives" if policy else f"no RedrivePolicy, DLQ {settings.sqs_dlq_url}"
        return f"{visible} visible, {in_flight} in flight; {dlq}"

    def transcriber() -> str:
        from consumer.transcribe import OpenAITranscriber, build_transcriber

        backend = build_transcriber(settings)
        if isinstance(backend, OpenAITranscriber):
            backend.client.models.list()
            return f"OpenAI reachable, model {backend.model}"
        return f"local model {backend.model} loaded"

    def callback() -> str:
        parts = urlsplit(settings.wp_side_car_callback or "")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname or "", port), timeout=5):
            pass
        return f"{parts.hostname}:{port} accepts connections"

    return [("configuration", config), ("S3 bucket", bucket), ("SQS queue", queue),
            ("transcription", transcriber), ("WordPress callback host", callback)]


def enqueue(settings: Settings, sqs: SQSClient, s3: S3Client, source: str, *, job_id: str | None = None,
            metadata: dict[str, Any] | None = None, language: str | None = None) -> dict[str, str]:
    """Upload a local file (when `source` is one) to S3, then sign and send a job for it."""
    if not settings.sqs_queue_url or not settings.s3_bucket:
        raise ConfigError([p for p in settings.run_problems() if p.startswith(("SQS_QUEUE_URL", "S3_BUCKET"))])
    job_id = job_id or f"job-{uuid.uuid4().hex[:16]}"
    path = Path(source)
    if path.is_file():
        key = f"{settings.s3_key_prefix or ''}{job_id}{path.suffix.lower()}"
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        s3.upload_file(str(path), settings.s3_bucket, key, ExtraArgs={"ContentType": ctype})
    else:
        key = source
    body: dict[str, Any] = {"job_id": job_id, "s3_key": key}
    if metadata is not None:
        body["metadata"] = metadata
    if language:
        body["language"] = language
    raw = json.dumps(body, separators=(",", ":"))
    attributes = {"signature": sign(raw, settings.secrets)} if settings.secrets else {}
    message_id = SqsQueue(sqs, settings.sqs_queue_url).send(raw, attributes)
    return {"job_id": job_id, "s3_key": key, "message_id": message_id}
