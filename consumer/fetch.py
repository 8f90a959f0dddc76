"""The fetch stage: one S3 object streamed to a private temp file, never whole in memory.

The object's size is checked from its metadata before a byte is downloaded, and again while streaming
(the object may change between the two calls). botocore errors are translated by `S3_ERRORS`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from consumer.aws import translate_aws_error
from consumer.errors import PermanentError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

CHUNK_BYTES = 1024 * 1024

S3_ERRORS: dict[str, tuple[bool, str]] = {
    "NoSuchKey": (False, "audio_not_found"),
    "404": (False, "audio_not_found"),
    "NotFound": (False, "audio_not_found"),
    "NoSuchBucket": (False, "audio_not_found"),
    # Without s3:ListBucket a missing key answers 403, so a denial is indistinguishable from absence.
    # With s3:ListBucket granted (deploy/cloudformation.yaml) a missing key answers 404, so a 403 is a
    # real denial: a policy or KMS change an operator will fix. Retried, it is not lost meanwhile.
    "AccessDenied": (True, "s3_unavailable"),
    "403": (True, "s3_unavailable"),
    "400": (True, "s3_unavailable"),  # HEAD has no error body: an expired token looks like this
    "InvalidObjectState": (False, "audio_not_found"),  # archived (Glacier) objects
    "PreconditionFailed": (True, "s3_unavailable"),  # replaced between HEAD and GET; fetch again
    "412": (True, "s3_unavailable"),
}


@dataclass(frozen=True)
class AudioObject:
    """What HEAD says about the recording."""

    bucket: str
    key: str
    size: int
    etag: str
    content_type: str | None = None


def head(s3: S3Client, bucket: str, key: str) -> AudioObject:
    """Size and ETag of the recording (raises audio_not_found, s3_unavailable)."""
    try:
        resp = s3.head_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError) as exc:
        raise translate_aws_error(exc, S3_ERRORS, default_code="s3_unavailable", what=f"s3://{bucket}/{key}") from exc
    return AudioObject(bucket, key, int(resp["ContentLength"]), str(resp["ETag"]), resp.get("ContentType"))


def check_size(obj: AudioObject, max_bytes: int) -> None:
    if obj.size == 0:
        raise PermanentError(f"s3://{obj.bucket}/{obj.key} is 0 bytes: nothing to transcribe", code="unsupported_audio")
    if obj.size > max_bytes:
        raise PermanentError(
            f"recording is {obj.size} bytes, over MAX_AUDIO_BYTES={max_bytes}", code="audio_too_large"
        )


def download(s3: S3Client, obj: AudioObject, dest: Path, *, max_bytes: int) -> Path:
    """Stream the object (pinned to the HEAD's ETag) into dest, created 0600."""
    try:
        resp = s3.get_object(Bucket=obj.bucket, Key=obj.key, IfMatch=obj.etag)
        body = resp["Body"]
        written = 0
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out, contextlib.closing(body):  # a failed download frees its connection
            for chunk in body.iter_chunks(CHUNK_BYTES):
                written += len(chunk)
                if written > max_bytes:
                    raise PermanentError(
                        f"recording grew past MAX_AUDIO_BYTES={max_bytes} while downloading", code="audio_too_large"
                    )
                out.write(chunk)
    except (ClientError, BotoCoreError) as exc:
        raise translate_aws_error(
            exc, S3_ERRORS, default_code="s3_unavailable", what=f"s3://{obj.bucket}/{obj.key}"
        ) from exc
    return dest
