"""Housekeeping for the worker: visibility heartbeats, claim renewals, queue-depth gauges, the watchdog.

Part of the worker layer (it extends visibility on the worker's in-flight messages), kept apart so
worker.py stays the loop and the settle step. One thread; its slow I/O (S3 claim renewals, queue-depth
polls) goes to two helper threads so it can never delay a visibility extension or the watchdog.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from consumer.errors import ConsumerError
from consumer.settings import SQS_MAX_VISIBILITY

if TYPE_CHECKING:
    from consumer.pipeline import Attempt
    from consumer.sqs import Message
    from consumer.worker import InFlight, Worker

log = logging.getLogger("consumer.worker")
STATUS_EVERY = 10.0  # seconds between STATUS= updates to systemd
HEARTBEAT_RETRY = 5.0  # seconds before a failed visibility extension is tried again


class Housekeeper:
    """Runs beside a Worker until the worker's in-flight jobs are settled."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.settings = worker.settings
        self.metrics = worker.metrics

    def run(self) -> None:
        tick = min(1.0, self.settings.heartbeat_every / 2)
        next_depth = self.worker.clock()
        # Claim renewals (S3) and depth polls go to their own threads: a slow S3 or a slow
        # GetQueueAttributes must not delay the visibility extensions or the watchdog.
        # One thread per job and one for the depths, so one hung renewal cannot starve the others.
        io = ThreadPoolExecutor(max_workers=self.settings.concurrency + 1, thread_name_prefix="housekeeping-io")
        busy: set[str] = set()

        def once(key: str, fn: Callable[[], None]) -> None:
            if key not in busy:  # the previous call for this key is still running: skip a beat
                busy.add(key)
                io.submit(fn).add_done_callback(lambda _: busy.discard(key))

        next_status = self.worker.clock()
        try:
            while not self.worker.done.wait(tick):
                now = self.worker.clock()
                if now - self.worker.last_tick < self.settings.health_stall_seconds:
                    self.worker.notifier.watchdog()  # only while the poll loop makes progress
                if now >= next_status and self.worker.notifier.ready_sent:  # what `systemctl status` shows
                    next_status = now + STATUS_EVERY
                    self.worker.notifier.status(f"polling; {self.worker.in_flight} job(s) in flight")
                for attempt in self._heartbeat(now):
                    once(attempt.message.receipt_handle, lambda a=attempt: self._renew_claim(a))  # type: ignore[misc]
                if now >= next_depth:
                    next_depth = now + self.settings.queue_metrics_interval
                    once("depths", self._observe_depths)
        finally:
            io.shutdown(wait=False, cancel_futures=True)

    def _renew_claim(self, attempt: Attempt) -> None:
        # Renewed even when SQS refused the extension: the claim is what keeps a redelivered copy of a
        # still-running job from being transcribed a second time elsewhere.
        if not self.worker.pipeline.renew_claim(attempt, until=time.time() + self.settings.visibility_timeout):
            log.warning("claim_renewal_failed", extra=self.worker.log_fields(attempt))

    def _heartbeat(self, now: float) -> list[Attempt]:
        """Extend the visibility of every job due for it (batched); returns those jobs."""
        due: list[tuple[Message, int]] = []
        on_wire: list[InFlight] = []
        extended: list[Attempt] = []
        with self.worker.cond:
            for f in self.worker.inflight.values():
                # A released or hushed message gets its visibility from the worker; ours would undo it.
                if f.released or f.quiet or now - f.extended < self.settings.heartbeat_every:
                    continue
                f.extended = now
                extended.append(f.attempt)
                # SQS caps a message's total invisibility at 12 h from its receipt.
                seconds = min(self.settings.visibility_timeout, int(SQS_MAX_VISIBILITY - (now - f.received)) - 1)
                if seconds > 0:
                    f.extending = True
                    on_wire.append(f)
                    due.append((f.message, seconds))
                else:
                    self.metrics.heartbeats.labels("failed").inc()
                    log.warning("visibility_cap_reached", extra={"message_id": f.message.message_id})
        failed: set[str] = set()
        try:
            failed = self._extend(due)
        finally:
            with self.worker.cond:
                for f in on_wire:
                    f.extending = False
                    if f.message.receipt_handle in failed:  # again soon, not a whole interval later
                        f.extended = now - self.settings.heartbeat_every + HEARTBEAT_RETRY
                self.worker.cond.notify_all()
        return extended

    def _extend(self, due: list[tuple[Message, int]]) -> set[str]:
        """Send the extensions, ten to a request; returns the receipt handles that failed."""
        failed_handles: set[str] = set()
        for i in range(0, len(due), 10):
            batch = due[i:i + 10]
            try:
                failed = self.worker.heartbeat_queue.change_visibility_batch(batch)
            except ConsumerError as exc:
                failed = [m for m, _ in batch]
                log.warning("heartbeat_failed", extra={"error": str(exc)})
            failed_handles.update(m.receipt_handle for m in failed)
            self.metrics.heartbeats.labels("ok").inc(len(batch) - len(failed))
            self.metrics.heartbeats.labels("failed").inc(len(failed))
        return failed_handles

    def _observe_depths(self) -> None:
        for name, q in (("main", self.worker.queue), ("dlq", self.worker.dlq)):
            try:
                visible, in_flight = q.counts()
            except ConsumerError as exc:
                log.warning("queue_depth_failed", extra={"queue": name, "error": str(exc)})
                continue
            self.metrics.queue_messages.labels(name, "visible").set(visible)
            self.metrics.queue_messages.labels(name, "in_flight").set(in_flight)
