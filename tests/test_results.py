"""Stored results and job leases on a real (moto) S3 with conditional writes."""

from __future__ import annotations

import time

import pytest

from consumer.errors import RetryableError
from consumer.models import Transcript
from consumer.results import ResultStore, StoredResult


@pytest.fixture
def store(aws):
    return ResultStore(aws.s3, aws.bucket, "transcripts/")


def test_result_round_trip_and_delivery_mark(store):
    assert store.get("j1") is None
    stored = StoredResult(job_id="j1", s3_key="a.wav", audio_etag='"e"', model="m",
                          transcript=Transcript(text="hello"), created_at=time.time())
    store.put(stored)
    assert store.get("j1") == stored
    store.mark_delivered(stored)
    assert store.get("j1").delivered_at is not None


def test_unreadable_result_counts_as_none(store, aws):
    aws.s3.put_object(Bucket=aws.bucket, Key="transcripts/j2.json", Body=b"{not json")
    assert store.get("j2") is None


def test_lease_is_exclusive_until_it_expires_or_is_released(store):
    now = time.time()
    a = store.acquire("job", "host-a", until=now + 60)
    with pytest.raises(RetryableError) as err:
        store.acquire("job", "host-b", until=now + 60)
    assert err.value.code == "job_in_progress" and 55 < err.value.delay <= 62
    a = store.renew(a, until=now + 120)
    store.release(a)
    b = store.acquire("job", "host-b", until=now + 60)
    assert b.owner == "host-b"


def test_expired_lease_is_taken_over_and_the_old_holder_cannot_renew(store):
    old = store.acquire("job2", "crashed", until=time.time() - 1)
    new = store.acquire("job2", "survivor", until=time.time() + 60)
    assert new.owner == "survivor"
    with pytest.raises(RetryableError) as err:
        store.renew(old, until=time.time() + 60)
    assert err.value.code == "lease_taken"
    store.release(old)  # not the owner any more: leaves the survivor's lease alone
    with pytest.raises(RetryableError):
        store.acquire("job2", "third", until=time.time() + 60)


def test_takeover_of_a_lease_released_meanwhile_takes_the_free_lease(store, monkeypatch):
    """The expired lease we read is deleted by its holder before our If-Match write lands: S3 answers
    NoSuchKey, and the now-free lease is taken instead of failing the job."""
    from consumer.results import Lease

    store.acquire("job3", "crashed", until=time.time() - 1)
    stale = store._read_lease("job3")
    store.release(stale)
    monkeypatch.setattr(store, "_read_lease", lambda job_id: Lease(job_id=job_id, owner="crashed", expires_at=0,
                                                                   etag=stale.etag))
    lease = store.acquire("job3", "survivor", until=time.time() + 60)
    assert lease.owner == "survivor"


def test_a_lease_retaken_between_our_read_and_write_is_a_wait_not_a_failure(store, monkeypatch):
    """Our first write finds the lease held; our read finds it gone (released); by our second write a third
    delivery holds it again. That is the job running elsewhere (a deferral), not an error of the job."""
    store.acquire("job4", "other", until=time.time() + 60)
    monkeypatch.setattr(store, "_read_lease", lambda job_id: None)
    with pytest.raises(RetryableError) as err:
        store.acquire("job4", "late", until=time.time() + 60)
    assert err.value.code == "job_in_progress"
