"""Job records on a real (moto, server mode) S3 with conditional writes: the claim, the handle, the states."""

from __future__ import annotations

import time

import pytest

from consumer.errors import RetryableError
from consumer.jobrecord import JobRecord, State
from consumer.models import ErrorInfo, Transcript
from consumer.records import ClaimLostError, RecordStore, claim


@pytest.fixture
def store(aws):
    return RecordStore(aws.s3, aws.bucket, "transcripts/")


def take(store, job_id, owner, *, ttl=60.0, now=None):
    now = time.time() if now is None else now
    return claim(store, job_id=job_id, s3_key="a.wav", owner=owner, until=now + ttl, now=now)


def test_a_new_job_is_claimed_with_one_create(store, aws):
    handle = take(store, "j1", "host-a")
    record, etag = store.read("j1")
    assert record == handle.record and etag == handle.etag and record.state(time.time()) is State.RUNNING
    assert aws.s3.head_object(Bucket=aws.bucket, Key="transcripts/j1.job.json")["ContentType"] == "application/json"


def test_the_claim_is_exclusive_until_it_expires_or_is_released(store):
    a = take(store, "job", "host-a")
    with pytest.raises(ClaimLostError) as err:
        take(store, "job", "host-b")
    assert err.value.code == "job_in_progress" and 55 < err.value.delay <= 62
    a.renew(time.time() + 120)
    a.release()
    assert store.read("job")[0].state(time.time()) is State.WAITING
    assert take(store, "job", "host-b").record.claim.owner == "host-b"


def test_an_expired_claim_is_taken_over_and_the_old_holder_can_neither_renew_nor_write(store):
    old = take(store, "job2", "crashed", ttl=-1)
    new = take(store, "job2", "survivor")
    assert new.record.claim.owner == "survivor"
    with pytest.raises(ClaimLostError):
        old.renew(time.time() + 60)
    with pytest.raises(ClaimLostError):
        old.save(lambda r: r.completing(Transcript(text="late"), model="m", audio_etag='"e"'))
    old.release()  # not ours any more: leaves the survivor's claim alone
    assert store.read("job2")[0].held_by("survivor")


def test_a_write_whose_answer_was_lost_carries_on_while_the_claim_is_ours(store):
    """botocore retries a PUT whose answer was lost; the retry meets 412 on our own success."""
    handle = take(store, "job3", "me")
    stale = handle.etag
    handle.save(lambda r: r.with_part("plan", '"e"', 0, Transcript(text="zero")))
    handle.etag = stale  # as if the answer of that write had been lost
    record = handle.save(lambda r: r.with_part("plan", '"e"', 1, Transcript(text="one")))
    assert set(record.parts) == {"0", "1"} and store.read("job3")[0] == record


def test_an_unreadable_record_is_replaced(store, aws):
    aws.s3.put_object(Bucket=aws.bucket, Key="transcripts/j4.job.json", Body=b"{not json")
    assert store.read("j4")[0] is None
    assert take(store, "j4", "me").record.held_by("me")


def test_an_acknowledged_completion_is_read_not_claimed(store):
    handle = take(store, "j5", "first")
    handle.save(lambda r: r.completing(Transcript(text="hi"), model="m", audio_etag='"e"'))
    handle.save(lambda r: r.acknowledged(time.time()).released())
    etag = handle.etag
    again = take(store, "j5", "copy")
    assert again.etag == etag and again.record.state(time.time()) is State.COMPLETED  # no write


def test_states_follow_the_story():
    now = time.time()
    r = JobRecord.new("j", "a.wav", owner="me", until=now + 60, now=now)
    assert r.state(now) is State.RUNNING and r.released().state(now) is State.WAITING
    completing = r.completing(Transcript(text="t"), model="m", audio_etag='"e"')
    assert completing.state(now) is State.COMPLETING
    assert completing.acknowledged(now).state(now) is State.COMPLETED
    failing = r.failing(ErrorInfo(code="audio_not_found", message="gone", retryable=False))
    assert failing.state(now) is State.FAILING and failing.acknowledged(now).state(now) is State.FAILED
    # A redrive tries a failed job again, parts kept; a completed one stays completed.
    kept = failing.with_part("p", '"e"', 0, Transcript(text="paid"))
    assert kept.redriven("r1", now=now).state(now) is State.RUNNING and kept.redriven("r1", now=now).parts
    assert completing.redriven("r1", now=now).state(now) is State.COMPLETING
    # Parts of another cut of the recording are not mixed in.
    assert set(kept.with_part("other", '"f"', 1, Transcript(text="x")).parts) == {"1"}


def test_s3_errors_other_than_conflicts_are_not_taken_for_a_lost_claim(store, aws):
    broken = RecordStore(aws.s3, "no-such-bucket-here", "transcripts/")
    with pytest.raises(RetryableError) as err:
        take(broken, "j6", "me")
    assert err.value.code == "s3_unavailable"


def test_record_writes_skip_the_100_continue_round_trip_and_big_bodies_keep_it(make_settings, aws):
    """botocore asks every PutObject to wait for `100 Continue`; the daemon's client sends small bodies at once."""
    from consumer.aws import EXPECT_MIN_BYTES, make_clients

    _, s3 = make_clients(make_settings())
    expect: dict[str, str | None] = {}
    s3.meta.events.register("before-send.s3.PutObject", lambda request, **_: expect.__setitem__(
        request.url.rsplit("/", 1)[-1], request.headers.get("Expect")))
    take(RecordStore(s3, aws.bucket, "transcripts/"), "small", "me")
    s3.put_object(Bucket=aws.bucket, Key="big.bin", Body=b"\0" * EXPECT_MIN_BYTES)
    assert expect["small.job.json"] is None and expect["big.bin"] in ("100-continue", b"100-continue"), expect
