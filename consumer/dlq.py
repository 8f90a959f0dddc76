"""Operator tools for the dead-letter queue: list, redrive to the source queue, purge.

Redrive is our own (receive -> send to source -> delete) because StartMessageMoveTask cannot select
single jobs and local stacks (moto) do not implement it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from consumer.sqs import Message, SqsQueue

DLQ_ATTRIBUTES = ("error_code", "error_message", "failed_at", "source_message_id", "receive_count")
LIST_VISIBILITY = 60  # long enough to walk the whole queue without seeing a message twice


@dataclass(frozen=True)
class DeadLetter:
    message: Message

    @property
    def job_id(self) -> str:
        try:
            data = json.loads(self.message.body)
            return str(data.get("job_id") or data.get("s3_key") or "?") if isinstance(data, dict) else "?"
        except ValueError:
            return "?"

    def row(self) -> str:
        a = self.message.attributes
        return "\t".join([self.job_id, a.get("error_code", "?"), a.get("failed_at", "?"),
                          a.get("receive_count", "?"), a.get("error_message", "")[:80]])


class Progress:
    """One self-updating stderr line (plain lines when not a terminal); too small to justify a dependency."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.count = 0
        self.tty = sys.stderr.isatty()

    def step(self) -> None:
        self.count += 1
        if self.tty:
            print(f"\r{self.label}: {self.count}", end="", file=sys.stderr, flush=True)
        elif self.count % 100 == 0:
            print(f"{self.label}: {self.count}", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(("\r" if self.tty else "") + f"{self.label}: {self.count} done", file=sys.stderr, flush=True)


def walk(dlq: SqsQueue, *, wait_seconds: int = 1) -> Iterator[DeadLetter]:
    """Every message of the DLQ once; each stays hidden while walked (until released or deleted)."""
    seen: set[str] = set()
    while True:
        batch = dlq.receive(10, wait_seconds=wait_seconds, visibility_timeout=LIST_VISIBILITY)
        if not batch:
            return
        repeats = [m for m in batch if m.message_id in seen]
        if repeats:  # walked longer than LIST_VISIBILITY: hand them back, keep going
            dlq.change_visibility_batch([(m, 0) for m in repeats])
            if len(repeats) == len(batch) and len(seen) > 0:
                return  # only repeats left: every message has been seen
        for m in batch:
            if m.message_id not in seen:
                seen.add(m.message_id)
                yield DeadLetter(m)


def list_dead_letters(dlq: SqsQueue, out: Callable[[str], None] = print) -> int:
    out("job_id\terror_code\tfailed_at\treceive_count\terror_message")
    walked = []
    for letter in walk(dlq):
        walked.append(letter.message)
        out(letter.row())
    for i in range(0, len(walked), 10):  # make them visible again: listing must not delay a redrive
        dlq.change_visibility_batch([(m, 0) for m in walked[i:i + 10]])
    return len(walked)


def redrive(dlq: SqsQueue, source: SqsQueue, *, job_ids: set[str] | None) -> int:
    """Move matching messages (all when job_ids is None) back to the source queue, body and signature intact."""
    progress = Progress("redriven")
    skipped = []
    for letter in walk(dlq):
        if job_ids is not None and letter.job_id not in job_ids:
            skipped.append(letter.message)
            continue
        original = {k: v for k, v in letter.message.attributes.items() if k not in DLQ_ATTRIBUTES}
        source.send(letter.message.body, original)
        dlq.delete(letter.message)
        progress.step()
    for i in range(0, len(skipped), 10):
        dlq.change_visibility_batch([(m, 0) for m in skipped[i:i + 10]])
    progress.close()
    return progress.count
