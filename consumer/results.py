"""The transcript store that makes jobs idempotent: `<RESULTS_PREFIX><job_id>.json` in S3.

A stored transcript whose `audio_etag` matches the recording lets a redelivered job skip transcription
(OpenAI is not paid twice); `delivered_at` marks a job WordPress has acknowledged, so a duplicate
delivery is deleted without a second callback.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ValidationError

from consumer.aws import translate_aws_error
from consumer.models import Transcript

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

RESULT_ERRORS: dict[str, tuple[bool, str]] = {
    "NoSuchKey": (False, "result_not_found"),
    "404": (False, "result_not_found"),
    "AccessDenied": (True, "s3_unavailable"),  # the results prefix is ours: a denial is a config fix away
}


class StoredResult(BaseModel):
    """The stored outcome of one job."""

    job_id: str
    s3_key: str
    audio_etag: str
    model: str
    transcript: Transcript
    created_at: float
    delivered_at: float | None = None


class ResultStore:
    """Reads and writes stored results in one bucket under one prefix."""

    def __init__(self, s3: S3Client, bucket: str, prefix: str) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix

    def key(self, job_id: str) -> str:
        return f"{self.prefix}{job_id}.json"

    def get(self, job_id: str) -> StoredResult | None:
        try:
            resp = self.s3.get_object(Bucket=self.bucket, Key=self.key(job_id))
            raw = resp["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            err = translate_aws_error(exc, RESULT_ERRORS, default_code="s3_unavailable", what="read result")
            if err.code == "result_not_found":
                return None
            raise err from exc
        try:
            return StoredResult.model_validate_json(raw)
        except ValidationError:
            return None  # an unreadable result is as good as none: transcribe again

    def put(self, result: StoredResult) -> None:
        body = json.dumps(result.model_dump(mode="json"), ensure_ascii=False).encode()
        try:
            self.s3.put_object(
                Bucket=self.bucket, Key=self.key(result.job_id), Body=body, ContentType="application/json"
            )
        except (ClientError, BotoCoreError) as exc:
            raise translate_aws_error(exc, RESULT_ERRORS, default_code="s3_unavailable", what="store result") from exc

    def mark_delivered(self, result: StoredResult) -> StoredResult:
        done = result.model_copy(update={"delivered_at": time.time()})
        self.put(done)
        return done
