"""The SQS adapter against moto: message parsing, batches, and deletes coalesced when they coincide."""

from __future__ import annotations

import threading

import pytest

from consumer.errors import PermanentError
from consumer.sqs import DeleteBatcher, SqsQueue


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
