"""The transcript store that makes jobs idempotent: `<RESULTS_PREFIX><job_id>.json` in S3.

A stored transcript whose `audio_etag` matches the recording lets a redelivered job skip transcription
(OpenAI is not paid twice); `delivered_at` marks a job WordPress has acknowledged, so a duplicate
delivery is deleted without a second callback.

While a job runs, `<RESULTS_PREFIX><job_id>.lease` says who runs it and until when (S3 conditional
writes: If-None-Match to take a free lease, If-Match to take over an expired one). The worker renews it
with every heartbeat, so a copy of the job delivered elsewhere (a duplicate message, or a message whose
visibility could not be extended) waits instead of being transcribed twice. The expiry is wall-clock
time: hosts need NTP, as they do for SQS and S3 request signing anyway.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ValidationError

from consumer.aws import translate_aws_error
from consumer.errors import ConsumerError, PermanentError, RetryableError
from consumer.models import Transcript

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

RESULT_ERRORS: dict[str, tuple[bool, str]] = {
    "NoSuchKey": (False, "result_not_found"),
    "404": (False, "result_not_found"),
    "PreconditionFailed": (True, "lease_taken"),
    "412": (True, "lease_taken"),
    "ConditionalRequestConflict": (True, "lease_taken"),  # a concurrent conditional write won
    "409": (True, "lease_taken"),
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


class Lease(BaseModel):
    """Who is running a job, and until when (unix seconds)."""

    job_id: str
    owner: str
    expires_at: float
    etag: str = ""


class ResultStore:
    """Reads and writes stored results in one bucket under one prefix."""

    def __init__(self, s3: S3Client, bucket: str, prefix: str) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix

    def key(self, job_id: str) -> str:
        return f"{self.prefix}{job_id}.json"

    def _read(self, key: str, what: str) -> tuple[bytes, str] | None:
        """(body, ETag) of an object under the prefix, or None when there is none."""
        try:
            resp = self.s3.get_object(Bucket=self.bucket, Key=key)
            return resp["Body"].read(), str(resp["ETag"])
        except (ClientError, BotoCoreError) as exc:
            err = translate_aws_error(exc, RESULT_ERRORS, default_code="s3_unavailable", what=what)
            if err.code == "result_not_found":
                return None
            raise err from exc

    def get(self, job_id: str) -> StoredResult | None:
        found = self._read(self.key(job_id), "read result")
        if found is None:
            return None
        try:
            return StoredResult.model_validate_json(found[0])
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

    # ------------------------------------------------------------------ leases

    def lease_key(self, job_id: str) -> str:
        return f"{self.prefix}{job_id}.lease"

    def _write_lease(self, lease: Lease, **condition: str) -> Lease:
        body = lease.model_dump_json(exclude={"etag"}).encode()
        try:
            resp = self.s3.put_object(Bucket=self.bucket, Key=self.lease_key(lease.job_id), Body=body,
                                      ContentType="application/json", **condition)  # type: ignore[arg-type]
        except (ClientError, BotoCoreError) as exc:
            raise translate_aws_error(exc, RESULT_ERRORS, default_code="s3_unavailable", what="write lease") from exc
        return lease.model_copy(update={"etag": str(resp["ETag"])})

    def _read_lease(self, job_id: str) -> Lease | None:
        found = self._read(self.lease_key(job_id), "read lease")
        if found is None:
            return None
        raw, etag = found
        try:
            return Lease.model_validate_json(raw).model_copy(update={"etag": etag})
        except ValidationError:
            return Lease(job_id=job_id, owner="?", expires_at=0, etag=etag)  # unreadable: as good as expired

    def acquire(self, job_id: str, owner: str, *, until: float) -> Lease:
        """Take the job's lease, or raise RetryableError(job_in_progress) while someone else holds it."""
        wanted = Lease(job_id=job_id, owner=owner, expires_at=until)
        try:
            return self._write_lease(wanted, IfNoneMatch="*")
        except RetryableError as exc:
            if exc.code != "lease_taken":
                raise
        current = self._read_lease(job_id)
        now = time.time()
        if current is None:  # released between our write and our read
            try:
                return self._write_lease(wanted, IfNoneMatch="*")
            except RetryableError as exc:
                if exc.code != "lease_taken":
                    raise
                raise RetryableError(f"job {job_id} was just taken elsewhere", code="job_in_progress") from exc
        if current.owner != owner and current.expires_at > now:
            raise RetryableError(f"job {job_id} is running elsewhere ({current.owner})", code="job_in_progress",
                                 delay=min(current.expires_at - now, 900) + 1)
        try:
            return self._write_lease(wanted, IfMatch=current.etag)  # expired (or our own): take it over
        except ConsumerError as exc:
            if exc.code == "result_not_found":  # its holder released it meanwhile: it is free again
                with contextlib.suppress(RetryableError):
                    return self._write_lease(wanted, IfNoneMatch="*")
            elif exc.code != "lease_taken":
                raise
            raise RetryableError(f"job {job_id} was just taken over elsewhere", code="job_in_progress") from exc

    def renew(self, lease: Lease, *, until: float) -> Lease:
        """Push the expiry on; raises RetryableError(lease_taken) if someone took the lease over."""
        try:
            return self._write_lease(lease.model_copy(update={"expires_at": until}), IfMatch=lease.etag)
        except RetryableError as exc:
            # A renewal whose response was lost succeeded anyway, and botocore's retry then fails on the old
            # ETag: when the lease is still ours, carry on from the ETag it has now.
            current = self._read_lease(lease.job_id) if exc.code == "lease_taken" else None
            if current is None or current.owner != lease.owner:
                raise
            return self._write_lease(current.model_copy(update={"expires_at": until}), IfMatch=current.etag)

    def release(self, lease: Lease) -> None:
        """Give the lease up if it is still ours (conditional on its ETag, so a takeover is never undone)."""
        try:
            self._delete_lease(lease.job_id, lease.etag)
            return
        except RetryableError as exc:
            if exc.code != "lease_taken":
                raise
        except PermanentError as exc:  # already gone
            if exc.code == "result_not_found":
                return
            raise
        # Our ETag is stale (a renewal whose answer was lost): delete only if the lease is still ours.
        current = self._read_lease(lease.job_id)
        if current is not None and current.owner == lease.owner:
            self._delete_lease(lease.job_id, current.etag)

    def _delete_lease(self, job_id: str, etag: str) -> None:
        try:
            self.s3.delete_object(Bucket=self.bucket, Key=self.lease_key(job_id), IfMatch=etag)
        except (ClientError, BotoCoreError) as exc:
            raise translate_aws_error(exc, RESULT_ERRORS, default_code="s3_unavailable",
                                      what="release lease") from exc
