"""The worker loop: the only code that touches SQS for jobs.

Threads of one process:
    poller       receives only as many messages as there are idle workers, hands them over
    workers (N)  run `Pipeline.process`, then `settle` (the one place deciding delete/retry/dead-letter)
    housekeeper  heartbeats (visibility extensions), claim renewals, queue-depth gauges, the systemd
                 watchdog (housekeeping.py)

Shutdown is two-phase, sized to systemd's TimeoutStopSec: stop receiving at once, give in-flight jobs
SHUTDOWN_GRACE seconds, then release what is left (visibility 0) so another instance takes it at once.
A job whose callback is already on the wire, or that is being settled, is not released but finished
(up to CALLBACK_TIMEOUT more): released, WordPress could hear of it twice.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Any

from consumer import __version__
from consumer.errors import ConsumerError, InvalidMessageError, PermanentError, RetryableError
from consumer.housekeeping import Housekeeper
from consumer.metrics import Metrics
from consumer.pipeline import Attempt, Pipeline
from consumer.release import running_release
from consumer.sdnotify import Notifier
from consumer.settings import SQS_MAX_VISIBILITY, Settings
from consumer.sqs import DeleteBatcher, Message, SqsQueue

log = logging.getLogger("consumer.worker")
# Not failures of the job itself, so they never spend its receive budget (on a last permitted receive the
# message is re-sent fresh) and never fail it; MAX_JOB_AGE bounds them. Another delivery holds its claim;
# this daemon is stopping; OpenAI throttles or the account is out of credit; the deployment is misconfigured
# (a key, a model, a URL, WordPress' route): alerted on, and nothing is lost while someone fixes it.
DEFERRALS = frozenset({"job_in_progress", "shutting_down", "rate_limited", "quota_exceeded",
                       "transcription_misconfigured", "callback_misconfigured"})
MAX_SEND_DELAY = 900  # SQS DelaySeconds cap
RECEIVE_ERROR_BACKOFF = (1.0, 30.0)  # first and longest pause after a failed ReceiveMessage
REJECTED_BODY_CHARS = 200  # enough to recognise a bad message in the log, not enough to flood it
HEARTBEAT_WAIT = 10.0  # longest wait for a heartbeat on the wire before changing the same message's visibility
SETTLE_MARGIN = 15.0  # at shutdown, beyond CALLBACK_TIMEOUT, for a settling job's DLQ send and delete
POLL_JOIN_MARGIN = 5.0  # beyond POLL_WAIT_SECONDS, for the last long poll to come back at shutdown
RESERVE_FROM = 3  # permitted receives from which the last is kept in reserve for crash recovery


@dataclass
class InFlight:
    """A message between receipt and settlement. The flags are read and written under `Worker.cond`."""

    attempt: Attempt
    received: float
    extended: float
    released: bool = False  # handed back at shutdown: another instance owns it now
    settling: bool = False  # its worker is settling it: shutdown leaves it to finish
    quiet: bool = False  # its worker changes its visibility or deletes it: no more heartbeats
    extending: bool = False  # a heartbeat for it is on the wire

    @property
    def message(self) -> Message:
        return self.attempt.message


def carried(message: Message, attempt: Attempt) -> dict[str, str]:
    """The attributes a copy of the message takes along: its own, and the job_id, so a legacy
    `{"s3_key"}` job keeps the id it got from its first MessageId across requeues and redrives."""
    job_id = attempt.job_id or message.attributes.get("job_id") or message.message_id
    return {**message.attributes, "job_id": job_id}


class Worker:
    """Consumes one queue with a bounded pool of threads until stopped (or drained)."""

    def __init__(self, *, settings: Settings, queue: SqsQueue, dlq: SqsQueue, max_receive_count: int | None,
                 pipeline: Pipeline, metrics: Metrics, notifier: Notifier | None = None,
                 stop: threading.Event | None = None, clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random, heartbeat_queue: SqsQueue | None = None) -> None:
        self.settings = settings
        self.queue = queue
        self.heartbeat_queue = heartbeat_queue or queue  # the same queue over a client with short timeouts
        self.deleter = DeleteBatcher(queue)
        self.dlq = dlq
        self.max_receive_count = max_receive_count
        self.pipeline = pipeline
        self.metrics = metrics
        self.notifier = notifier or Notifier(None)
        self.stop = stop or threading.Event()
        self.clock = clock
        self.rng = rng
        # Keyed by receipt handle: one message can be delivered again while its first copy still runs.
        self.inflight: dict[str, InFlight] = {}
        self.cond = threading.Condition()
        self._handoff: SimpleQueue[Attempt | None] = SimpleQueue()
        self.done = threading.Event()  # housekeeping outlives `stop` until in-flight jobs are settled
        self.last_tick = clock()

    # ------------------------------------------------------------------ lifecycle

    def run(self, *, drain: bool = False) -> int:
        """Consume until `stop` is set (or, with drain, until the queue is empty); returns an exit status."""
        threads = [threading.Thread(target=self._work_loop, name=f"worker-{i}", daemon=True)
                   for i in range(self.settings.concurrency)]
        threads.append(threading.Thread(target=Housekeeper(self).run, name="housekeeper", daemon=True))
        poller = threading.Thread(target=self._poll_loop, args=(drain,), name="poller", daemon=True)
        for t in [*threads, poller]:
            t.start()
        log.info("daemon_started", extra={"version": running_release(), "package_version": __version__,
                                          "concurrency": self.settings.concurrency,
                                          "queue_url": self.queue.url})
        self.stop.wait()
        stopped_at = self.clock()
        self.notifier.stopping("stopping: finishing in-flight jobs")
        log.info("shutdown_started", extra={"in_flight": self.in_flight, "grace_s": self.settings.shutdown_grace})
        finished = self._wait_idle(self.settings.shutdown_grace)
        if not finished:
            # One deadline for the rest, counted from the signal: what systemd's TimeoutStopSec must cover.
            finish_by = stopped_at + self.settings.shutdown_grace + self.settings.callback_timeout + SETTLE_MARGIN
            released = self._release_all(finish_by)
            log.info("grace_expired", extra={"released": released, "finishing": self.in_flight - released})
            # A job whose callback is on the wire, or that is being settled, is finished, not released.
            self._wait_finishing(finish_by - self.clock())
        # The last long poll may still return messages: the poller hands them back (it sees `stop`), but
        # only while this process lives. Left behind, each would stay hidden for VISIBILITY_TIMEOUT.
        poll_left = max(0.0, stopped_at + self.settings.poll_wait_seconds + POLL_JOIN_MARGIN - self.clock())
        if poller.is_alive() and poll_left > 0:
            log.info("waiting_for_last_poll", extra={"up_to_s": round(poll_left, 1),
                                                     "hint": "a second signal exits at once"})
            poller.join(poll_left)
        for _ in range(self.settings.concurrency):
            self._handoff.put(None)
        self.done.set()
        log.info("daemon_stopped", extra={"released": not finished})
        return 0

    def request_stop(self) -> None:
        self.stop.set()
        with self.cond:
            self.cond.notify_all()

    @property
    def in_flight(self) -> int:
        with self.cond:
            return len(self.inflight)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(alive, body) for GET /health: alive while the poll loop keeps ticking."""
        age = self.clock() - self.last_tick
        ok = age < self.settings.health_stall_seconds
        return ok, {"status": "ok" if ok else "stalled", "version": running_release(), "package_version": __version__,
                    "last_poll_age_s": round(age, 3), "in_flight": self.in_flight}

    def _wait_idle(self, timeout: float) -> bool:
        deadline = self.clock() + timeout
        with self.cond:
            while self.inflight:
                left = deadline - self.clock()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.5))
        return True

    def _wait_finishing(self, timeout: float) -> bool:
        deadline = self.clock() + timeout
        with self.cond:
            while any(not f.released for f in self.inflight.values()):
                left = deadline - self.clock()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.5))
        return True

    def _await_heartbeats(self, entries: list[InFlight]) -> None:
        """Wait (holding `cond`, bounded) until no heartbeat for these entries is on the wire: one landing
        after a visibility change of ours would undo it."""
        deadline = self.clock() + HEARTBEAT_WAIT
        while any(f.extending for f in entries) and (left := deadline - self.clock()) > 0:
            self.cond.wait(min(left, 0.5))

    def _release_all(self, deadline: float) -> int:
        """Hand back every job not being settled yet (in parallel, until `deadline`); returns how many."""
        with self.cond:
            pending = []
            for f in self.inflight.values():
                # Not one being settled, nor one whose callback is on the wire (cancel says no): those finish.
                if f.released or f.settling or not f.attempt.cancel("shutting_down"):
                    continue
                f.released = True  # and cancelled: it starts no further stage, so no store and no callback
                pending.append(f)
            self._await_heartbeats(pending)

        def hand_back(f: InFlight) -> None:
            # The claim too, or the instance that takes the message over would only meet it and wait.
            self.pipeline.release_claim(f.attempt)
            self._give_back(f.message, f.attempt)
            log.info("job_released", extra={"message_id": f.message.message_id})

        # In parallel: one slow S3 or SQS call must not hold back the other hand-backs.
        threads = [threading.Thread(target=hand_back, args=(f,), name="release", daemon=True) for f in pending]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - self.clock()))
        return len(pending)

    # ------------------------------------------------------------------ poller

    def _poll_loop(self, drain: bool) -> None:
        failures = 0
        while not self.stop.is_set():
            self.last_tick = self.clock()
            idle = self._wait_for_idle_slot()
            if idle == 0:
                continue
            paused = self.pipeline.gate.remaining()
            if paused > 0:  # receiving now would only burn receive counts
                self.stop.wait(min(paused, 1.0))
                continue
            try:
                messages = self.queue.receive(min(idle, 10), wait_seconds=self.settings.poll_wait_seconds,
                                              visibility_timeout=self.settings.visibility_timeout)
            except ConsumerError as exc:
                failures += 1
                self.metrics.errors.labels("receive", exc.code).inc()
                log.warning("receive_failed", extra={"error": str(exc), "failures": failures})
                self.stop.wait(min(RECEIVE_ERROR_BACKOFF[1], RECEIVE_ERROR_BACKOFF[0] * 2 ** (failures - 1)))
                continue
            failures = 0
            self.last_tick = self.clock()
            self.metrics.last_poll.set_to_current_time()
            self.notifier.ready(f"polling {self.queue.url}")
            for message in messages:
                self._accept(message)
            if drain and not messages and self.in_flight == 0:
                self.request_stop()

    def _wait_for_idle_slot(self) -> int:
        with self.cond:
            idle = self.settings.concurrency - len(self.inflight)
            if idle <= 0:
                self.cond.wait(1.0)
                idle = self.settings.concurrency - len(self.inflight)
            return max(0, idle)

    def _accept(self, message: Message) -> None:
        now = self.clock()
        if message.sent_timestamp:
            self.metrics.message_age.observe(max(0.0, time.time() - message.sent_timestamp))
        attempt = Attempt(message=message, visible_until=time.time() + self.settings.visibility_timeout)
        with self.cond:  # under the lock shutdown's wait for idle takes: either it sees the job, or we see `stop`
            stopping = self.stop.is_set()
            if not stopping:
                self.inflight[message.receipt_handle] = InFlight(attempt, received=now, extended=now)
        if stopping:  # received during shutdown: give it straight back
            self._give_back(message, attempt)
            return
        self.metrics.in_progress.inc()
        log.info("message_received", extra={"message_id": message.message_id,
                                            "receive_count": message.receive_count})
        self._handoff.put(attempt)

    # ------------------------------------------------------------------ workers

    def _work_loop(self) -> None:
        while (attempt := self._handoff.get()) is not None:
            message = attempt.message
            error: ConsumerError | None = None
            try:
                self.pipeline.process(attempt)
            except ConsumerError as exc:
                error = exc
            except Exception as exc:  # a bug must cost one retry, not the worker thread
                log.exception("job_crashed", extra=self.log_fields(attempt))
                error = RetryableError(f"internal error: {type(exc).__name__}: {exc}", code="internal_error")
            try:
                self.settle(attempt, error)
            except Exception:  # the message will reappear after its visibility timeout
                log.exception("settle_failed", extra=self.log_fields(attempt))
            finally:
                # Only now: a failure callback is part of the job, and a copy must not run beside it.
                self.pipeline.release_claim(attempt)
                with self.cond:
                    self.inflight.pop(message.receipt_handle, None)
                    self.cond.notify_all()
                self.metrics.in_progress.dec()

    def log_fields(self, attempt: Attempt, **more: Any) -> dict[str, Any]:
        hint = more.pop("job_hint", None)  # the job_id read from a message that failed validation
        return {"job_id": attempt.job_id or hint, "message_id": attempt.message.message_id,
                "receive_count": attempt.message.receive_count, "stage": attempt.stage,
                "duration_s": round(time.monotonic() - attempt.started, 3), **more}

    # ------------------------------------------------------------------ settle: the one place

    def settle(self, attempt: Attempt, error: ConsumerError | None) -> None:
        """Delete on success, back off a retryable failure, fail and dead-letter a permanent one."""
        message = attempt.message
        with self.cond:
            entry = self.inflight.get(message.receipt_handle)
            if entry:
                if entry.released:
                    return  # shutdown already handed it back; another instance owns it now
                entry.settling = True
        for stage, seconds in attempt.durations.items():
            self.metrics.stage_duration.labels(stage).observe(seconds)
        self.metrics.job_duration.observe(time.monotonic() - attempt.started)
        if error is None:
            self._hush(message)
            self.deleter.delete(message)
            self.pipeline.acknowledge(attempt)  # after the delete: off the critical path
            outcome = attempt.outcome or "completed"
            if outcome == "completed":
                self.metrics.transcriptions.labels(attempt.source or "api").inc()
                if attempt.source != "cached":  # transcribed now (api or local), not re-sent from the record
                    self.metrics.audio_seconds.labels(attempt.model or "").inc(attempt.audio_seconds)
            self._outcome(attempt, outcome)
            return
        self.metrics.errors.labels(attempt.stage, error.code).inc()
        if isinstance(error, RetryableError) and self._may_retry(attempt, error):
            self._retry(attempt, error)
            return
        self._fail(attempt, error)

    def _last_attempt(self, message: Message) -> bool:
        """Whether this receive is the daemon's last. With three or more permitted it gives up one early:
        the redrive policy's own last receive is kept for a delivery whose daemon died mid-job (kill -9, an
        OOM kill, a reboot), so the job is still failed by us, with a callback and its reason, and not moved
        to the DLQ silently by SQS."""
        if self.max_receive_count is None:
            return False
        final = self.max_receive_count - 1 if self.max_receive_count >= RESERVE_FROM else self.max_receive_count
        return message.receive_count >= final

    def _may_retry(self, attempt: Attempt, error: RetryableError) -> bool:
        """A deferral always waits (until the job grows too old); anything else while receives are left."""
        if attempt.expired:
            return error.code in ("job_in_progress", "shutting_down")  # another delivery will finish it
        return error.code in DEFERRALS or not self._last_attempt(attempt.message)

    def backoff(self, receive_count: int, error: RetryableError) -> int:
        """Seconds until the next attempt: capped exponential with jitter, or Retry-After when that is
        longer (never shorter: a short Retry-After must not spend the receives in seconds)."""
        s = self.settings
        ceiling = min(s.retry_max_delay, s.retry_base_delay * 2 ** max(0, receive_count - 1))
        backoff = ceiling / 2 + self.rng() * ceiling / 2  # "equal jitter": spread, but never near zero
        if error.code in ("job_in_progress", "shutting_down") and error.delay is not None:
            backoff = error.delay  # not a failure: come back when the other delivery's claim ends
        elif error.delay is not None:
            backoff = max(backoff, error.delay)
        return int(min(SQS_MAX_VISIBILITY, max(0.0, backoff)))

    def _hush(self, message: Message) -> None:
        """No more heartbeats for this message, and none still on the wire: one landing after our
        visibility change would undo it. Until now they went on (a failure callback may take a while)."""
        with self.cond:
            entry = self.inflight.get(message.receipt_handle)
            if entry:
                entry.quiet = True
                self._await_heartbeats([entry])

    def _retry(self, attempt: Attempt, error: RetryableError) -> None:
        self._hush(attempt.message)
        delay = self.backoff(attempt.message.receive_count, error)
        if self._last_attempt(attempt.message):  # only deferrals get here: keep the job alive, fresh
            self._requeue(attempt.message, attempt, delay)
        else:
            # SQS caps a message's invisibility at 12 h from its receipt, not from now.
            left = SQS_MAX_VISIBILITY - int(time.monotonic() - attempt.started) - 1
            self.queue.change_visibility(attempt.message, max(0, min(delay, left)))
        self._outcome(attempt, "retried", error=error, retry_in_s=delay)

    def _requeue(self, message: Message, attempt: Attempt, delay: int = 0) -> None:
        """Send the message again (receive count starts over) and delete this copy.

        Used where the job has not failed but its receive count is spent: handing it back would let the
        redrive policy dead-letter it without a word to WordPress.
        """
        self.queue.send(message.body, carried(message, attempt), delay_seconds=min(MAX_SEND_DELAY, delay))
        self.deleter.delete(message)

    def _give_back(self, message: Message, attempt: Attempt) -> None:
        """Make a message another instance can take at once (shutdown)."""
        try:
            if self._last_attempt(message):
                self._requeue(message, attempt)
            else:
                self.queue.change_visibility(message, 0)
        except ConsumerError as exc:  # it reappears after its visibility timeout instead
            log.warning("release_failed", extra={"message_id": message.message_id, "error": str(exc)})

    def _fail(self, attempt: Attempt, error: ConsumerError) -> None:
        record = attempt.record
        if record is not None and record.outcome == "completed" and isinstance(error, RetryableError):
            # WordPress may have the transcript: never a `failed` now. Redriven, it gets `completed` again.
            error = RetryableError(f"the completed callback was not acknowledged: {error.message}",
                                   code="callback_undelivered")
        reported = False
        if error.code not in ("bad_signature", "callback_rejected", "callback_undelivered"):
            try:
                reported = self.pipeline.report_failure(attempt, error)
            except RetryableError as cb_error:
                # Keep the job until WordPress can be told; a deferral (the job runs elsewhere now, or
                # this daemon is stopping) is never a reason to give up on telling it.
                if self._may_retry(attempt, cb_error):
                    self._retry(attempt, cb_error)
                    return
                error = RetryableError(f"{error.message} (WordPress was not told: {cb_error.message})",
                                       code="callback_undelivered")
            except PermanentError as cb_error:
                log.error("failure_callback_rejected", extra=self.log_fields(attempt, error=str(cb_error)))
            except Exception:  # the message must still reach the DLQ with its reason
                log.exception("failure_callback_crashed", extra=self.log_fields(attempt))
        more: dict[str, Any] = {}
        if isinstance(error, InvalidMessageError):
            self.metrics.rejected.labels(error.code).inc()
            more["body"] = attempt.message.body[:REJECTED_BODY_CHARS]
            more["job_hint"] = error.job_id
        self._hush(attempt.message)
        self._dead_letter(attempt, error)
        self._outcome(attempt, "failed" if reported else "dead_lettered", error=error, **more)

    def _dead_letter(self, attempt: Attempt, error: ConsumerError) -> None:
        """Copy the message to the DLQ with why it failed (once per delivery), then delete it from the source."""
        message = attempt.message
        if not self.pipeline.already_dead_lettered(attempt):  # a copy came back after the delete failed
            extra = {"error_code": error.code, "error_message": error.message[:1000],
                     "failed_at": str(int(time.time())), "source_message_id": message.message_id,
                     "receive_count": str(message.receive_count)}
            keep = {k: v for k, v in carried(message, attempt).items() if k not in extra}
            attributes = dict(list(keep.items())[: 10 - len(extra)]) | extra  # SQS allows ten attributes
            self.dlq.send(message.body, attributes)
            self.pipeline.mark_dead_lettered(attempt)
        self.deleter.delete(message)

    def _outcome(self, attempt: Attempt, outcome: str, *, error: ConsumerError | None = None, **more: Any) -> None:
        self.metrics.jobs.labels(outcome).inc()
        fields = self.log_fields(attempt, outcome=outcome, **more)
        if error is not None:
            fields |= {"error_code": error.code, "error": error.message[:500]}
        event = {"completed": "job_completed", "duplicate": "job_duplicate", "retried": "job_retried",
                 "failed": "job_failed", "dead_lettered": "job_dead_lettered"}[outcome]
        level = logging.WARNING if outcome in ("failed", "dead_lettered") else logging.INFO
        log.log(level, event, extra=fields)
