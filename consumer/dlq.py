"""Operator tools for the dead-letter queue: list, redrive to the source queue, purge.

Redrive is our own (receive -> send to source -> delete) because StartMessageMoveTask cannot select
single jobs and local stacks (moto) do not implement it.

Why a walk hides what it reads: SQS has no peek. The only way to read a message is to receive it, and
nothing says which messages a receive returns, so a listing that received with visibility 0 (hiding
nothing) could get the same ten back every time and never know it had seen them all. Hiding each
message while the walk lasts is what makes it complete and finite. The price is that a walk must hand
back (visibility 0) every message it did not delete, however it ends: done, an AWS error, a broken
pipe, Ctrl-C. `Walk` does that on exit; if the hand-back itself fails, its error says how many stay
hidden and for how long, and `dlq ls` says how many were hidden when it started, so an empty listing
never passes for an empty DLQ.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType

from consumer.errors import ConsumerError, PermanentError
from consumer.sqs import Message, SqsQueue

DLQ_ATTRIBUTES = ("error_code", "error_message", "failed_at", "source_message_id", "receive_count")
# Long enough to walk a large DLQ without meeting a message twice; also the longest a message can stay
# hidden if handing it back fails.
LIST_VISIBILITY = 60
CLOCK_SKEW = 30.0  # seconds SQS's SentTimestamp may run ahead of this host's clock (NTP keeps it far smaller)


def iso_utc(epoch: str) -> str:
    """The worker's failed_at (unix seconds) as ISO-8601 UTC; anything else as it came."""
    try:
        return datetime.fromtimestamp(float(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):
        return epoch


@dataclass(frozen=True)
class DeadLetter:
    message: Message

    @property
    def job_id(self) -> str:
        """The body's job_id; a legacy `{"s3_key"}` job's travels in the `job_id` attribute."""
        try:
            data = json.loads(self.message.body)
        except ValueError:
            data = None
        if isinstance(data, dict) and data.get("job_id") is not None:
            return str(data["job_id"])
        legacy = isinstance(data, dict) and "s3_key" in data
        # Moved here by the redrive policy (no copy of ours), a message keeps its MessageId: the legacy job's id.
        return self.message.attributes.get("job_id") or (self.message.message_id if legacy else "?")

    def row(self) -> str:
        a = self.message.attributes
        return "\t".join([self.job_id, a.get("error_code", "?"), iso_utc(a.get("failed_at", "?")),
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


class Walk:
    """Every message of the DLQ once, each hidden while walked; on exit, every one not `settled` (deleted)
    is made visible again. Use it in a `with` block, so that happens however the block ends."""

    def __init__(self, dlq: SqsQueue, *, wait_seconds: int = 1) -> None:
        self.dlq = dlq
        self.wait_seconds = wait_seconds
        self.hidden: dict[str, Message] = {}  # by message id, with the latest receipt handle

    def __enter__(self) -> Walk:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.hand_back(list(self.hidden.values()))

    def __iter__(self) -> Iterator[DeadLetter]:
        seen: set[str] = set()
        while True:
            batch = self.dlq.receive(10, wait_seconds=self.wait_seconds, visibility_timeout=LIST_VISIBILITY)
            if not batch:
                return
            # Recorded before anything else can fail: a receipt we do not know of cannot be handed back.
            self.hidden.update((m.message_id, m) for m in batch)
            repeats = [m for m in batch if m.message_id in seen]
            if repeats:  # walked longer than LIST_VISIBILITY: hand them back, keep going
                self.hand_back(repeats)
                if len(repeats) == len(batch):
                    return  # only repeats left: every message has been seen
            for m in batch:
                if m.message_id not in seen:
                    seen.add(m.message_id)
                    yield DeadLetter(m)

    def settled(self, letter: DeadLetter) -> None:
        """The letter was deleted: nothing to hand back."""
        self.hidden.pop(letter.message.message_id, None)

    def hand_back(self, messages: list[Message]) -> None:
        """Make messages visible again, ten a request, trying every batch even when one fails."""
        stuck: list[Message] = []
        cause: ConsumerError | None = None
        for i in range(0, len(messages), 10):
            chunk = messages[i:i + 10]
            try:
                stuck += self.dlq.change_visibility_batch([(m, 0) for m in chunk])
            except ConsumerError as exc:
                stuck += chunk
                cause = exc
        for m in messages:
            self.hidden.pop(m.message_id, None)
        if stuck:
            raise PermanentError(
                f"{len(stuck)} dead letter(s) could not be made visible again and stay hidden for up to "
                f"{LIST_VISIBILITY} s{f': {cause}' if cause else ''}", code="dead_letters_hidden")


def list_dead_letters(dlq: SqsQueue, out: Callable[[str], None] = print,
                      note: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> int:
    """Print one row per dead letter and return how many; none stays hidden afterwards."""
    _, hidden_before = dlq.counts()
    out("job_id\terror_code\tfailed_at\treceive_count\terror_message")
    count = 0
    with Walk(dlq) as walk:  # listing must not delay a redrive: everything is handed back on exit
        for letter in walk:
            out(letter.row())
            count += 1
    if hidden_before:
        note(f"about {hidden_before} more dead letter(s) were hidden when the listing started (being redriven "
             f"or listed elsewhere, or left by an interrupted run); they reappear within {LIST_VISIBILITY} s "
             "unless deleted")
    return count


def redrive(dlq: SqsQueue, source: SqsQueue, *, job_ids: set[str] | None,
            clock: Callable[[], float] = time.time) -> int:
    """Move the matching dead letters that were there when it started (all when job_ids is None) back to
    the source queue, body and signature intact; returns how many. It ends, whatever happens to them.

    Each moved letter carries this run's `redrive_id`: the job's record takes it for an operator's new
    round (a job that failed is tried again; one that completed is only re-sent `completed`), and a
    letter that comes back to the DLQ during the run, carrying the same id, is not moved again. Letters
    sent to the DLQ after the run started are left for the next run.
    """
    run = uuid.uuid4().hex
    started = clock()
    progress = Progress("redriven")
    # Letters not chosen stay hidden until the walk ends (so it does not meet them again), then are handed
    # back. A letter sent but not deleted (the delete failed) is handed back too: a second copy of a job
    # is harmless (the job's record tells it apart), a hidden dead letter is not.
    with Walk(dlq) as walk:
        for letter in walk:
            message = letter.message
            if job_ids is not None and letter.job_id not in job_ids:
                continue
            if message.attributes.get("redrive_id") == run or (message.sent_timestamp or 0) > started + CLOCK_SKEW:
                continue  # not there when we started: this run has moved it already, or it is newer
            original = {k: v for k, v in message.attributes.items() if k not in DLQ_ATTRIBUTES}
            # The job's id travels with it: a legacy job moved here by the redrive policy itself has no
            # `job_id` attribute yet, and its MessageId (its id) changes when it is sent again.
            named = {"job_id": letter.job_id} if letter.job_id != "?" else {}
            source.send(message.body, named | original | {"redrive_id": run})
            dlq.delete(message)
            walk.settled(letter)
            progress.step()
    progress.close()
    return progress.count
