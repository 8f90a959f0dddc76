"""Where job records live (S3, conditional writes only) and the handle one delivery holds on its job's record.

    RecordStore   read / create (If-None-Match: *) / replace (If-Match: <ETag>) one record; S3 errors
                  translated by `RECORD_ERRORS`, here and nowhere else
    JobHandle     the record as this delivery last wrote it, and its ETag; every write for the job goes
                  through `save`, one at a time, so the worker, its chunk threads and the housekeeper's
                  renewals never race each other
    claim()       take the job for this delivery (one request for a new job), or defer while another
                  delivery holds it

S3 answers a failed condition with 412 (PreconditionFailed) or, for a concurrent conditional write, 409
(ConditionalRequestConflict) (S3 user guide, "conditional requests"). A write whose answer was lost and
that botocore retried meets 412 on its own earlier success: `save` re-reads, and carries on only while the
claim is still ours. The claim's expiry is wall-clock time: hosts need NTP, as SQS and S3 request signing
need anyway.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from consumer.aws import translate_aws_error
from consumer.errors import ConsumerError, RetryableError
from consumer.jobrecord import JobRecord

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

RECORD_ERRORS: dict[str, tuple[bool, str]] = {
    "NoSuchKey": (False, "record_not_found"),
    "404": (False, "record_not_found"),
    "PreconditionFailed": (True, "record_conflict"),
    "412": (True, "record_conflict"),
    "ConditionalRequestConflict": (True, "record_conflict"),  # a concurrent conditional write won
    "409": (True, "record_conflict"),
    # The bucket and prefix are ours: a denial or a missing bucket is a configuration fix away.
    "AccessDenied": (True, "s3_unavailable"),
    "NoSuchBucket": (True, "s3_unavailable"),
}
MAX_DEFER = 900  # longest a copy waits for another delivery's claim (SQS DelaySeconds cap)


class ClaimLostError(RetryableError):
    """Another delivery holds (or took over) the job: this one does nothing more and waits."""

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        super().__init__(message, code="job_in_progress", delay=delay)


class RecordStore:
    """Job records in one bucket under one prefix."""

    def __init__(self, s3: S3Client, bucket: str, prefix: str) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix

    def key(self, job_id: str) -> str:
        return f"{self.prefix}{job_id}.job.json"

    def read(self, job_id: str) -> tuple[JobRecord | None, str] | None:
        """(record, ETag), (None, ETag) for an unreadable object, or None when there is no record."""
        try:
            resp = self.s3.get_object(Bucket=self.bucket, Key=self.key(job_id))
            raw, etag = resp["Body"].read(), str(resp["ETag"])
        except (ClientError, BotoCoreError) as exc:
            err = translate_aws_error(exc, RECORD_ERRORS, default_code="s3_unavailable", what="read job record")
            if err.code == "record_not_found":
                return None
            raise err from exc
        try:
            return JobRecord.model_validate_json(raw), etag
        except ValidationError:
            log.warning("job_record_unreadable", extra={"job_id": job_id})
            return None, etag

    def create(self, record: JobRecord) -> str:
        """Write a record where there is none; raises RetryableError(record_conflict) otherwise."""
        return self._put(record, IfNoneMatch="*")

    def replace(self, record: JobRecord, etag: str) -> str:
        """Write over the record with this ETag; raises RetryableError(record_conflict) if it changed."""
        return self._put(record, IfMatch=etag)

    def _put(self, record: JobRecord, **condition: str) -> str:
        body = record.model_dump_json(exclude_none=True).encode()
        try:
            resp = self.s3.put_object(Bucket=self.bucket, Key=self.key(record.job_id), Body=body,
                                      ContentType="application/json", **condition)  # type: ignore[arg-type]
        except (ClientError, BotoCoreError) as exc:
            raise translate_aws_error(exc, RECORD_ERRORS, default_code="s3_unavailable",
                                      what="write job record") from exc
        return str(resp["ETag"])


class JobHandle:
    """One delivery's hold on its job's record."""

    def __init__(self, store: RecordStore, record: JobRecord, etag: str, owner: str, *, created: bool = False) -> None:
        self.store = store
        self.record = record
        self.etag = etag
        self.owner = owner
        self.created = created  # this delivery wrote the record first: the job had no story before it
        self._lock = threading.Lock()

    def save(self, change: Callable[[JobRecord], JobRecord]) -> JobRecord:
        """Apply `change` and write it, conditional on the record being as we left it; ClaimLostError if the
        claim is no longer ours (taken over, or the record gone)."""
        with self._lock:
            new = change(self.record)
            try:
                self.etag = self.store.replace(new, self.etag)
            except ConsumerError as exc:
                if exc.code == "record_not_found":  # deleted under us (an operator): not ours to write
                    raise ClaimLostError(f"job {self.record.job_id}: its record is gone") from exc
                if exc.code != "record_conflict":
                    raise
                current = self.store.read(self.record.job_id)
                if current is None or current[0] is None or not current[0].held_by(self.owner):
                    raise ClaimLostError(f"job {self.record.job_id}: another delivery took it over") from exc
                # Our own earlier write landed (its answer was lost): carry on from it.
                new = change(current[0])
                try:
                    self.etag = self.store.replace(new, current[1])
                except RetryableError as again:
                    if again.code == "record_conflict":
                        raise ClaimLostError(f"job {self.record.job_id}: another delivery took it over") from again
                    raise
            self.record = new
            return new

    def renew(self, until: float) -> None:
        """Push the claim's expiry on (the housekeeper, with each heartbeat); ClaimLostError when it is gone."""
        def push(record: JobRecord) -> JobRecord:
            if not record.held_by(self.owner):
                raise ClaimLostError(f"job {record.job_id}: the claim is no longer ours")
            return record.claimed(self.owner, until)

        self.save(push)

    def release(self) -> None:
        """Give the claim up (a retry or a hand-back), so the next delivery takes the job at once."""
        if self.record.held_by(self.owner):
            with contextlib.suppress(ClaimLostError):  # not ours any more: nothing to give up
                self.save(lambda record: record.released())


def claim(store: RecordStore, *, job_id: str, s3_key: str, owner: str, until: float, now: float) -> JobHandle:
    """Take the job for this delivery: create its record (one request), or take over an unclaimed or
    expired one; raise ClaimLostError (a deferral) while another delivery holds it."""
    fresh = JobRecord.new(job_id, s3_key, owner=owner, until=until, now=now)
    try:
        return JobHandle(store, fresh, store.create(fresh), owner, created=True)
    except RetryableError as exc:
        if exc.code != "record_conflict":
            raise
    found = store.read(job_id)
    if found is None:  # deleted between our write and our read (an operator): start again once
        return JobHandle(store, fresh, store.create(fresh), owner, created=True)
    record, etag = found
    if record is not None and record.outcome == "completed" and record.acknowledged_at:
        return JobHandle(store, record, etag, owner)  # a duplicate: read only, nothing to claim
    if record is None:
        log.warning("job_record_replaced", extra={"job_id": job_id, "why": "unreadable"})
        record = fresh
    if record.claimed_elsewhere(owner, now):
        assert record.claim is not None
        raise ClaimLostError(f"job {job_id} is running elsewhere ({record.claim.owner})",
                        delay=min(record.claim.until - now, MAX_DEFER) + 1)
    taken = record.claimed(owner, until)
    try:
        return JobHandle(store, taken, store.replace(taken, etag), owner)
    except RetryableError as exc:
        if exc.code == "record_conflict":
            raise ClaimLostError(f"job {job_id} was just taken by another delivery") from exc
        raise
