"""The SQS adapter against moto: message parsing, batches, and deletes coalesced when they coincide."""

from __future__ import annotations

import threading

import pytest

from consumer.errors import PermanentError
from consumer.sqs import DeleteBatcher, SqsQueue
from tests.stack import wait_for


def fill(aws, n):
    for i in range(n):
        aws.sqs.send_message(QueueUrl=aws.queue_url, MessageBody=f"m{i}",
                             MessageAttributes={"signature": {"DataType": "String", "StringValue": f"s{i}"}})


def test_receive_parses_system_and_message_attributes(aws):
    fill(aws, 1)
    ops = []
    [m] = SqsQueue(aws.sqs, aws.queue_url, on_request=ops.append).receive(5, wait_seconds=1, visibility_timeout=30)
    assert m.body == "m0" and m.receive_count == 1 and m.sent_timestamp and m.attributes == {"signature": "s0"}
    assert ops == ["ReceiveMessage"]


def test_coinciding_deletes_share_a_batch(aws):
    fill(aws, 8)
    ops: list[str] = []
    queue = SqsQueue(aws.sqs, aws.queue_url, on_request=ops.append)
    messages = []
    while len(messages) < 8:
        messages += queue.receive(10, wait_seconds=1, visibility_timeout=60)
    batcher = DeleteBatcher(queue)
    barrier = threading.Barrier(8)

    def delete(m):
        barrier.wait()
        batcher.delete(m)

    threads = [threading.Thread(target=delete, args=(m,)) for m in messages]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    deletes = [op for op in ops if op.startswith("Delete")]
    assert 1 <= len(deletes) < 8  # eight threads released together cannot all have gone alone
    assert aws.counts() == (0, 0)


def test_a_lone_delete_is_a_plain_delete(aws):
    fill(aws, 1)
    ops: list[str] = []
    queue = SqsQueue(aws.sqs, aws.queue_url, on_request=ops.append)
    [m] = queue.receive(1, wait_seconds=1, visibility_timeout=60)
    DeleteBatcher(queue).delete(m)
    assert ops[-1] == "DeleteMessage"


def test_missing_queue_is_a_permanent_error(aws):
    queue = SqsQueue(aws.sqs, aws.queue_url + "-nope")
    with pytest.raises(PermanentError) as err:
        queue.counts()
    assert err.value.code == "queue_not_found"


class _BrokenQueue:
    def __init__(self):
        self.calls = 0

    def delete_batch(self, messages):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("connection pool exploded")
        return []


def test_a_crashing_batch_reaches_every_waiter_and_the_batcher_recovers():
    from consumer.sqs import Message

    batcher = DeleteBatcher(_BrokenQueue())
    with pytest.raises(RuntimeError):
        batcher.delete(Message("m1", "r1", "b"))
    batcher.delete(Message("m2", "r2", "b"))  # not wedged: a later delete goes through


class _StandInQueue:
    """Accepts every delete: the race below is in the batcher's own locking, not on the wire."""

    def delete_batch(self, messages):
        return []


class _HookedLock:
    """A lock that runs `hook` (once, in the releasing thread) after the Nth release by the first thread."""

    def __init__(self, nth, hook):
        self._lock = threading.Lock()
        self._nth, self._hook = nth, hook
        self._owner = None
        self.releases = 0

    def __enter__(self):
        self._lock.acquire()
        self._owner = self._owner or threading.get_ident()

    def __exit__(self, *exc):
        self._lock.release()
        if threading.get_ident() == self._owner:
            self.releases += 1
            if self.releases == self._nth:
                self._hook()


def test_a_delete_queued_as_the_leader_steps_down_is_not_stranded():
    """The leader finds nothing pending and leaves; a delete queued at that very moment must be sent (by
    itself, as the new leader) rather than wait for a leader that has gone."""
    from consumer.sqs import Message

    batcher = DeleteBatcher(_StandInQueue())
    late = threading.Thread(target=batcher.delete, args=(Message(message_id="late", receipt_handle="r2", body=""),),
                            daemon=True)

    def queue_a_delete_now():
        late.start()  # and let it queue itself (or, as the new leader, finish) before the old leader goes on
        wait_for(lambda: batcher._pending or not late.is_alive(), timeout=5, what="the late delete queued")

    # Releases by the leader: queue its delete, take a batch, find nothing pending (the third).
    batcher._lock = _HookedLock(3, queue_a_delete_now)
    batcher.delete(Message(message_id="first", receipt_handle="r1", body=""))
    late.join(10)
    assert not late.is_alive(), "the late delete waits for a leader that has left"
