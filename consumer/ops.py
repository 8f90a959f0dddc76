"""`sidecar enqueue` (whose signing and sending, `send_job`, `sidecar intake` shares). `sidecar check`
lives in check.py.

A source that is a local file is uploaded; anything else is sent as an S3 key, except one that looks
like a local path (absolute, ~, ./, ../, a bare file name, or in a directory that exists here) that the
bucket does not have either: that is a mistyped path, and as a key it would only become a dead letter.
"""

from __future__ import annotations

import json
import mimetypes
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from consumer.errors import ConfigError, PermanentError
from consumer.signing import sign
from consumer.sqs import SqsQueue

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient

    from consumer.settings import Settings


def looks_local(source: str) -> bool:
    """True for what a shell would have completed as a path rather than what an S3 key looks like."""
    return (source.startswith(("/", "~", "./", "../")) or "/" not in source
            or Path(source).expanduser().parent.is_dir())


def refuse_unless_in_bucket(s3: S3Client, bucket: str, source: str) -> None:
    """Raise audio_not_found unless s3://bucket/source exists (a 403 cannot tell: refused as well)."""
    try:
        s3.head_object(Bucket=bucket, Key=source)
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status not in (403, 404):
            raise
        seen = "no object" if status == 404 else "no object these credentials can see"
        raise PermanentError(f"{source}: no such local file (in {os.getcwd()}), and {seen} s3://{bucket}/{source}; "
                             "check the path", code="audio_not_found") from None


def enqueue(settings: Settings, sqs: SQSClient, s3: S3Client, source: str, *, job_id: str | None = None,
            metadata: dict[str, Any] | None = None, language: str | None = None) -> dict[str, str]:
    """Upload a local file (when `source` is one) to S3, then sign and send a job for it."""
    if not settings.sqs_queue_url or not settings.s3_bucket:
        raise ConfigError([p for p in settings.run_problems() if p.startswith(("SQS_QUEUE_URL", "S3_BUCKET"))])
    job_id = job_id or f"job-{uuid.uuid4().hex[:16]}"
    path = Path(source).expanduser()
    if path.is_file():
        key = f"{settings.s3_key_prefix or ''}{job_id}{path.suffix.lower()}"
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        s3.upload_file(str(path), settings.s3_bucket, key, ExtraArgs={"ContentType": ctype})
    else:
        key = source
        if looks_local(source):
            refuse_unless_in_bucket(s3, settings.s3_bucket, source)
    body: dict[str, Any] = {"job_id": job_id, "s3_key": key}
    if metadata is not None:
        body["metadata"] = metadata
    if language:
        body["language"] = language
    message_id = send_job(settings, sqs, body)
    return {"job_id": job_id, "s3_key": key, "message_id": message_id}


def signed_job(settings: Settings, body: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """The job's body as sent (compact JSON) and its attributes (signed by the first SIDE_CAR_SECRET, if set)."""
    raw = json.dumps(body, separators=(",", ":"))
    return raw, ({"signature": sign(raw, settings.secrets)} if settings.secrets else {})


def send_job(settings: Settings, sqs: SQSClient, body: dict[str, Any]) -> str:
    """Sign a job and put it on SQS_QUEUE_URL; its MessageId."""
    raw, attributes = signed_job(settings, body)
    return SqsQueue(sqs, settings.sqs_queue_url or "").send(raw, attributes)
