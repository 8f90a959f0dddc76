"""The fetch stage: one S3 object streamed to a private temp file, never whole in memory.

The object's size is checked from the response headers before a byte of the body is read, and again
while streaming. The download runs beside the job's claim (pipeline.py), which may stop it: a copy of a
job that is done or being re-sent from its record has no use for the recording. botocore errors are
translated by `S3_ERRORS`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from consumer.aws import translate_aws_error
from consumer.errors import PermanentError, RetryableError

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
}


@dataclass(frozen=True)
class AudioObject:
    """What the GET's headers say about the recording."""

    bucket: str
    key: str
    size: int
    etag: str
    content_type: str | None = None


def check_size(obj: AudioObject, max_bytes: int) -> None:
    if obj.size == 0:
        raise PermanentError(f"s3://{obj.bucket}/{obj.key} is 0 bytes: nothing to transcribe", code="unsupported_audio")
    if obj.size > max_bytes:
        raise PermanentError(
            f"recording is {obj.size} bytes, over MAX_AUDIO_BYTES={max_bytes}", code="audio_too_large"
        )


def download(s3: S3Client, bucket: str, key: str, dest: Path, *, max_bytes: int,
             stop: threading.Event | None = None) -> AudioObject:
    """Stream the object into dest (created 0600); its size is checked from the response headers first.

    One GET, no HEAD before it: the headers carry the size and ETag, and an oversized or empty object is
    refused before a byte of its body is read. Setting `stop` (the recording turned out not to be needed)
    ends the download before the GET or at the next chunk, with RetryableError(download_stopped).
    """
    try:
        if stop is not None and stop.is_set():
            raise _stopped(bucket, key)
        resp = s3.get_object(Bucket=bucket, Key=key)
        body = resp["Body"]
        with contextlib.closing(body):  # a refused or failed download frees its connection
            obj = AudioObject(bucket, key, int(resp["ContentLength"]), str(resp["ETag"]), resp.get("ContentType"))
            check_size(obj, max_bytes)
            written = 0
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                for chunk in body.iter_chunks(CHUNK_BYTES):
                    if stop is not None and stop.is_set():
                        raise _stopped(bucket, key)
                    written += len(chunk)
                    if written > max_bytes:
                        raise PermanentError(
                            f"recording grew past MAX_AUDIO_BYTES={max_bytes} while downloading",
                            code="audio_too_large",
                        )
                    out.write(chunk)
    except (ClientError, BotoCoreError) as exc:
        raise translate_aws_error(exc, S3_ERRORS, default_code="s3_unavailable", what=f"s3://{bucket}/{key}") from exc
    return obj


def _stopped(bucket: str, key: str) -> RetryableError:
    return RetryableError(f"the download of s3://{bucket}/{key} was stopped: not needed", code="download_stopped")
