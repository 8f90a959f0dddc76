"""moto in server mode on a free loopback port; boto3 talks to it over real HTTP."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

from consumer.devstack import create_queues_and_bucket

REGION = "us-east-1"
_names = itertools.count(1)


class MotoServer:
    def __init__(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def session(self) -> boto3.session.Session:
        return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                     region_name=REGION)

    def client(self, service: str) -> Any:
        return self.session().client(service, endpoint_url=self.endpoint)  # type: ignore[call-overload]

    def stop(self) -> None:
        self.server.stop()


@dataclass
class AwsStack:
    """A fresh queue, DLQ and bucket (unique names: moto's SQS slows down as queues grow)."""

    moto: MotoServer
    queue_url: str
    dlq_url: str
    bucket: str
    sqs: Any
    s3: Any

    @classmethod
    def create(cls, moto: MotoServer, *, max_receives: int = 5) -> AwsStack:
        n = next(_names)
        tag = f"t{os.getpid()}-{n}"
        names = create_queues_and_bucket(moto.endpoint, REGION, prefix=f"jobs-{tag}", bucket=f"audio-{tag}",
                                         max_receives=max_receives)
        return cls(moto, names["queue_url"], names["dlq_url"], names["bucket"], moto.client("sqs"), moto.client("s3"))

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.moto.endpoint, "AWS_REGION": REGION, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "SQS_QUEUE_URL": self.queue_url, "S3_BUCKET": self.bucket}

    def counts(self, url: str | None = None) -> tuple[int, int]:
        attrs = self.sqs.get_queue_attributes(
            QueueUrl=url or self.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])

    def dlq_messages(self) -> list[dict[str, Any]]:
        """Every DLQ message; they are hidden while collected, then made visible again for the code under test."""
        out: dict[str, dict[str, Any]] = {}
        for _ in range(50):
            resp = self.sqs.receive_message(QueueUrl=self.dlq_url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                            VisibilityTimeout=30, MessageAttributeNames=["All"])
            batch = resp.get("Messages", [])
            if not batch:
                break
            out.update({m["MessageId"]: m for m in batch})
        handles = [m["ReceiptHandle"] for m in out.values()]
        for i in range(0, len(handles), 10):
            self.sqs.change_message_visibility_batch(QueueUrl=self.dlq_url, Entries=[
                {"Id": str(n), "ReceiptHandle": h, "VisibilityTimeout": 0} for n, h in enumerate(handles[i:i + 10])])
        return list(out.values())
