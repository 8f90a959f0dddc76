"""The SQS adapter: receive, delete, change visibility, send and inspect queues; botocore errors mapped.

Only the worker loop and the operator tools (`sidecar dlq`, `sidecar enqueue`) call it. Every request
is reported through `on_request(operation)` so the worker can count them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from consumer.aws import translate_aws_error
from consumer.errors import RetryableError

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

SQS_ERRORS: dict[str, tuple[bool, str]] = {
    "ReceiptHandleIsInvalid": (False, "receipt_expired"),
    "InvalidParameterValue": (False, "receipt_expired"),  # e.g. "message does not exist or is not in flight"
    "MessageNotInflight": (False, "receipt_expired"),
    "AWS.SimpleQueueService.NonExistentQueue": (False, "queue_not_found"),
    "QueueDoesNotExist": (False, "queue_not_found"),
    "AccessDenied": (False, "queue_access_denied"),
    "OverLimit": (True, "sqs_unavailable"),
}
SYSTEM_ATTRIBUTES = ["ApproximateReceiveCount", "SentTimestamp", "ApproximateFirstReceiveTimestamp"]
MAX_ATTRIBUTES = 10  # SQS allows ten message attributes per message


@dataclass(frozen=True)
class Message:
    """One received SQS message, with what the pipeline and the settle step need."""

    message_id: str
    receipt_handle: str
    body: str
    receive_count: int = 1
    sent_timestamp: float | None = None  # unix seconds
    attributes: dict[str, str] = field(default_factory=dict)  # String message attributes

    @classmethod
    def from_sqs(cls, raw: Any) -> Message:
        system = raw.get("Attributes", {})
        attrs = {
            k: v["StringValue"]
            for k, v in raw.get("MessageAttributes", {}).items()
            if v.get("DataType", "").startswith(("String", "Number")) and "StringValue" in v
        }
        sent = system.get("SentTimestamp")
        return cls(
            message_id=raw["MessageId"],
            receipt_handle=raw["ReceiptHandle"],
            body=raw.get("Body", ""),
            receive_count=int(system.get("ApproximateReceiveCount", 1)),
            sent_timestamp=int(sent) / 1000 if sent else None,
            attributes=attrs,
        )


def string_attributes(values: dict[str, str]) -> dict[str, Any]:
    return {k: {"DataType": "String", "StringValue": v} for k, v in values.items() if v != ""}


class SqsQueue:
    """One queue, by URL."""

    def __init__(self, client: SQSClient, url: str, *, on_request: Callable[[str], None] | None = None):
        self.client = client
        self.url = url
        self._on_request = on_request or (lambda op: None)

    def _call(self, operation: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        self._on_request(operation)
        try:
            return fn(QueueUrl=self.url, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise translate_aws_error(exc, SQS_ERRORS, default_code="sqs_unavailable", what=operation) from exc

    def receive(self, max_messages: int, *, wait_seconds: int, visibility_timeout: int) -> list[Message]:
        resp = self._call(
            "ReceiveMessage", self.client.receive_message,
            MaxNumberOfMessages=max(1, min(10, max_messages)),
            WaitTimeSeconds=wait_seconds,
            VisibilityTimeout=visibility_timeout,
            MessageSystemAttributeNames=SYSTEM_ATTRIBUTES,
            MessageAttributeNames=["All"],
        )
        return [Message.from_sqs(m) for m in resp.get("Messages", [])]

    def delete(self, message: Message) -> None:
        self._call("DeleteMessage", self.client.delete_message, ReceiptHandle=message.receipt_handle)

    def delete_batch(self, messages: Sequence[Message]) -> list[Message]:
        """Delete up to ten messages in one request; returns those that failed."""
        if len(messages) == 1:
            self.delete(messages[0])
            return []
        entries = [{"Id": str(i), "ReceiptHandle": m.receipt_handle} for i, m in enumerate(messages)]
        resp = self._call("DeleteMessageBatch", self.client.delete_message_batch, Entries=entries)
        return [messages[int(f["Id"])] for f in resp.get("Failed", [])]

    def change_visibility(self, message: Message, seconds: int) -> None:
        self._call(
            "ChangeMessageVisibility", self.client.change_message_visibility,
            ReceiptHandle=message.receipt_handle, VisibilityTimeout=int(seconds),
        )

    def change_visibility_batch(self, items: Sequence[tuple[Message, int]]) -> list[Message]:
        """Change up to ten visibilities in one request; returns the messages that failed."""
        if len(items) == 1:
            self.change_visibility(*items[0])
            return []
        entries = [
            {"Id": str(i), "ReceiptHandle": m.receipt_handle, "VisibilityTimeout": int(s)}
            for i, (m, s) in enumerate(items)
        ]
        resp = self._call(
            "ChangeMessageVisibilityBatch", self.client.change_message_visibility_batch, Entries=entries
        )
        return [items[int(f["Id"])][0] for f in resp.get("Failed", [])]

    def send(self, body: str, attributes: dict[str, str] | None = None, *, delay_seconds: int = 0) -> str:
        resp = self._call(
            "SendMessage", self.client.send_message,
            MessageBody=body, MessageAttributes=string_attributes(attributes or {}), DelaySeconds=delay_seconds,
        )
        return str(resp["MessageId"])

    def attributes(self, names: Iterable[str]) -> dict[str, str]:
        resp = self._call("GetQueueAttributes", self.client.get_queue_attributes, AttributeNames=list(names))
        return dict(resp.get("Attributes", {}))

    def counts(self) -> tuple[int, int]:
        """(visible, in flight), approximately."""
        a = self.attributes(["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])
        return int(a.get("ApproximateNumberOfMessages", 0)), int(a.get("ApproximateNumberOfMessagesNotVisible", 0))

    def redrive_policy(self) -> tuple[str, int] | None:
        """(DLQ ARN, maxReceiveCount) from the queue's RedrivePolicy, or None."""
        raw = self.attributes(["RedrivePolicy"]).get("RedrivePolicy")
        if not raw:
            return None
        policy = json.loads(raw)
        return str(policy["deadLetterTargetArn"]), int(policy["maxReceiveCount"])

    def purge(self) -> None:
        self._call("PurgeQueue", self.client.purge_queue)


def queue_url_for_arn(client: SQSClient, arn: str) -> str:
    """URL of the queue an ARN names (arn:aws:sqs:region:account:name)."""
    parts = arn.split(":")
    name, account = parts[5], parts[4]
    try:
        return client.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)["QueueUrl"]
    except (ClientError, BotoCoreError) as exc:
        raise translate_aws_error(exc, SQS_ERRORS, default_code="sqs_unavailable", what="GetQueueUrl") from exc


class DeleteBatcher:
    """Coalesces deletes that coincide into DeleteMessageBatch requests; each caller waits for its own.

    Leader/follower rather than a timer: the first caller deletes at once (alone, a plain DeleteMessage),
    and deletes that arrive while its request is in flight are sent together by the same caller right
    after. A lone delete gains no latency; a busy pool makes up to ten times fewer requests.
    """

    def __init__(self, queue: SqsQueue) -> None:
        self.queue = queue
        self._pending: list[tuple[Message, Future[None]]] = []
        self._lock = threading.Lock()
        self._draining = False

    def delete(self, message: Message) -> None:
        done: Future[None] = Future()
        with self._lock:
            self._pending.append((message, done))
            lead = not self._draining
            self._draining = True
        if lead:
            self._drain()
        done.result()

    def _drain(self) -> None:
        while True:
            with self._lock:
                batch, self._pending = self._pending[:10], self._pending[10:]
                if not batch:
                    # Stepping down in the same critical section that found nothing pending: a delete
                    # queued after it finds no leader and leads itself, instead of waiting for one.
                    self._draining = False
                    return
            try:
                failed = {m.message_id for m in self.queue.delete_batch([m for m, _ in batch])}
            except Exception as exc:  # noqa: BLE001 - handed to every waiter; otherwise they block forever
                for _, done in batch:
                    done.set_exception(exc)
                continue
            for message, done in batch:
                if message.message_id in failed:
                    done.set_exception(RetryableError("delete failed (receipt expired?)", code="receipt_expired"))
                else:
                    done.set_result(None)
