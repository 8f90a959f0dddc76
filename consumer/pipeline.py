"""The job pipeline: `Pipeline.process` lists the stages in order; each stage lives in its own module.

    validate (validate.py) -> claim (records.py: the job's record says what is left to do)
                              + download (fetch.py), side by side: neither pays for nor says anything
        -> prepare (audio.py) -> transcribe (transcribe.py, parts stored as paid for)
        -> store (the transcript, and that `completed` is being sent) -> callback (deliver.py)

What a delivery does is read from the job's record (jobrecord.py draws its states): a job whose
`completed` was acknowledged is a duplicate; one whose `completed` was attempted re-sends it from the
stored transcript, whatever became of the recording; one whose `failed` was attempted re-sends that; a
job older than MAX_JOB_AGE fails as `job_expired`. Stages return values or raise ConsumerError; the
pipeline never touches SQS and never decides what happens to a message (that is `worker.Worker.settle`),
but it writes the record's transitions the worker asks for (`report_failure`, `acknowledge`,
`mark_dead_lettered`, `release_claim`). Per-stage timings are recorded on the `Attempt`.

Another thread may cancel an attempt (shutdown hands its message back; a renewal finds the claim lost; the
job grew too old): it then starts no further stage. The callback stage commits it instead: from there on
it finishes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from consumer import audio, fetch
from consumer.deliver import Deliverer
from consumer.errors import ConsumerError, InvalidMessageError, PermanentError, RetryableError
from consumer.jobrecord import JobRecord, State
from consumer.models import CallbackPayload, ErrorInfo, JobMessage, Timings, Transcript
from consumer.records import ClaimLostError, JobHandle, RecordStore, claim
from consumer.transcribe import Transcriber, parts_hint, transcribe_parts
from consumer.validate import parse_job

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from consumer.backpressure import RateGate
    from consumer.settings import Settings
    from consumer.sqs import Message

log = logging.getLogger("consumer.pipeline")
HOST = socket.gethostname()
CLAIM_WAIT = 10.0  # seconds a hand-back waits for a claim in flight before giving it up to its expiry
CANCELLED = {"shutting_down": "the message was handed back at shutdown",
             "job_in_progress": "the job's claim was taken over by another delivery",
             "job_expired": "the job is older than MAX_JOB_AGE"}


@dataclass
class Attempt:
    """One delivery of one message through the pipeline: what the worker logs, measures and settles by."""

    message: Message
    started: float = field(default_factory=time.monotonic)
    visible_until: float = 0.0  # wall-clock end of the message's invisibility; the claim expires with it
    job: JobMessage | None = None
    handle: JobHandle | None = None  # this delivery's hold on the job's record
    stage: str = "validate"
    durations: dict[str, float] = field(default_factory=dict)
    outcome: Literal["completed", "duplicate"] | None = None
    source: str | None = None  # the transcriber's source ("api", "local"), or "cached" when re-sent from the record
    audio_seconds: float = 0.0
    model: str | None = None
    expired: bool = False  # older than MAX_JOB_AGE: nothing is retried any more
    # Why this attempt must start no further stage, set from another thread: "shutting_down" (the worker
    # hands the message back at shutdown), "job_in_progress" (another delivery took the claim over) or
    # "job_expired" (renewals stopped at MAX_JOB_AGE).
    cancelled: str | None = None
    # Set when the callback is about to go out: past that point the attempt is finished, never cancelled
    # (WordPress may already have heard; a second instance would make it hear twice).
    committed: bool = False
    claiming: futures.Future[JobRecord] | None = None  # the claim, once sent (it runs beside the download)
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def job_id(self) -> str | None:
        return self.job.job_id if self.job else None

    @property
    def record(self) -> JobRecord | None:
        return self.handle.record if self.handle else None

    def cancel(self, reason: str) -> bool:
        """Stop the attempt at its next stage; False when it is committed already (it will finish)."""
        with self._guard:
            if self.committed:
                return False
            self.cancelled = self.cancelled or reason
            return True

    def commit(self) -> None:
        """Pass the point of no return, unless cancelled (then raise the deferral it was cancelled for)."""
        with self._guard:
            if self.cancelled:
                raise RetryableError(f"stopped: {CANCELLED[self.cancelled]}", code=self.cancelled)
            self.committed = True

    @property
    def owner(self) -> str:
        """Who holds the claim: this process and this delivery of the message."""
        return f"{HOST}:{os.getpid()}:{self.message.message_id}:{self.message.receive_count}"

    def timings(self) -> Timings:
        ms = {k: int(v * 1000) for k, v in self.durations.items()}
        return Timings(
            download_ms=ms.get("download", 0),
            transcribe_ms=ms.get("prepare", 0) + ms.get("transcribe", 0),
            total_ms=int((time.monotonic() - self.started) * 1000),
        )


class Pipeline:
    """Runs one message through the stages; everything it needs is handed in."""

    def __init__(self, *, settings: Settings, s3: S3Client, transcriber: Transcriber, deliverer: Deliverer,
                 records: RecordStore, gate: RateGate, workdir: Path) -> None:
        self.settings = settings
        self.s3 = s3
        self.transcriber = transcriber
        self.deliverer = deliverer
        self.records = records
        self.gate = gate
        self.workdir = workdir

    # ------------------------------------------------------------------ the claim, for the worker layer

    def release_claim(self, attempt: Attempt) -> None:
        """Give the claim up so the next delivery starts at once (best effort: an unreleased claim expires).

        A claim still in flight (a hand-back at shutdown can come while it is) is waited for first, or it
        would land after the release and make the next instance wait for it to expire."""
        if attempt.claiming is not None:
            futures.wait([attempt.claiming], timeout=CLAIM_WAIT)
        if attempt.handle is not None:
            with contextlib.suppress(ConsumerError):
                attempt.handle.release()

    def renew_claim(self, attempt: Attempt, *, until: float) -> bool:
        """Extend a running job's claim with its message's visibility (the housekeeper's heartbeat)."""
        handle = attempt.handle
        if handle is None or not handle.record.held_by(handle.owner):
            return True
        if time.time() - handle.record.first_seen > self.settings.max_job_age:
            attempt.cancel("job_expired")  # no job lives forever: let the claim lapse, stop at the next stage
            return False
        try:
            handle.renew(until)
        except ClaimLostError:
            attempt.cancel("job_in_progress")  # someone else runs the job now: storing or calling back twice
            return False
        except ConsumerError:
            return False
        return True

    # ------------------------------------------------------------------ the stages

    @contextmanager
    def _stage(self, attempt: Attempt, name: str) -> Iterator[None]:
        attempt.stage = name
        if name == "callback":
            attempt.commit()
        elif attempt.cancelled:  # checked between stages: a running request is not torn down mid-way
            raise RetryableError(f"stopped before {name}: {CANCELLED[attempt.cancelled]}", code=attempt.cancelled)
        start = time.monotonic()
        try:
            yield
        finally:
            attempt.durations[name] = attempt.durations.get(name, 0.0) + time.monotonic() - start

    def process(self, attempt: Attempt) -> None:
        """Run every stage the job's record says is left; returns normally on success (incl. a duplicate)."""
        with self._stage(attempt, "validate"):
            job = attempt.job = parse_job(attempt.message, self.settings)
        jobdir: Path | None = None
        try:
            record, fetched, jobdir = self._claim_and_download(attempt, job)
            now = time.time()
            state = record.state(now)
            if state is State.COMPLETED:
                attempt.outcome = "duplicate"
                return
            if state in (State.FAILING, State.FAILED):  # told (or telling) WordPress `failed`: the worker finishes that
                error = record.error or ErrorInfo(code="internal_error", message="failed", retryable=False)
                raise PermanentError(error.message, code=error.code)
            if state is State.COMPLETING:
                if attempt.expired:
                    raise PermanentError("the completed callback was never acknowledged", code="callback_undelivered")
                transcript, attempt.source, attempt.model = record.transcript, "cached", record.model
            else:
                if attempt.expired:
                    raise PermanentError(f"the job is older than MAX_JOB_AGE ({self.settings.max_job_age:.0f} s)",
                                         code="job_expired")
                if isinstance(fetched, Exception):
                    attempt.stage = "download"
                    raise fetched
                assert attempt.handle is not None and jobdir is not None
                transcript = self._transcribe(attempt, job, attempt.handle, fetched, jobdir)
                attempt.source, attempt.model = self.transcriber.source, self.transcriber.model
        finally:
            if jobdir is not None:
                shutil.rmtree(jobdir, ignore_errors=True)
        attempt.audio_seconds = (transcript.duration_seconds or 0.0) if transcript else 0.0
        with self._stage(attempt, "callback"):
            self.deliverer.post(self._payload(attempt, job, transcript=transcript))
        attempt.outcome = "completed"

    def _claim_and_download(self, attempt: Attempt, job: JobMessage
                            ) -> tuple[JobRecord, fetch.AudioObject | Exception, Path | None]:
        """The claim (an S3 write, in a thread of its own) and the recording's download, side by side.

        Neither pays for nor says anything: the transcription waits for the claim. Side by side they save
        the shorter of two round trips on every job; a delivery that finds the job done, failing or taken
        (rare) stops its download as soon as the claim's answer is in, having read a chunk or so for nothing.
        Whatever the download raises (an S3 error, a full disk) is returned, not raised: it counts only if
        the record says the audio is needed. Returns the record, the download or its error, the job's dir."""
        if attempt.cancelled:
            raise RetryableError(f"stopped before claim: {CANCELLED[attempt.cancelled]}", code=attempt.cancelled)
        not_needed = threading.Event()
        claiming = attempt.claiming = futures.Future()
        # A daemon thread per claim, not a pool: nothing to shut down, and nothing for the interpreter to
        # join at exit (a shutdown waits for a claim in flight in `release_claim`, bounded).
        threading.Thread(target=self._claim, args=(attempt, job, not_needed, claiming), name="claim",
                         daemon=True).start()
        fetched: fetch.AudioObject | Exception
        jobdir: Path | None = None
        try:
            with self._stage(attempt, "download"):
                jobdir = Path(tempfile.mkdtemp(prefix=f"{attempt.message.message_id}-", dir=self.workdir))
                fetched = fetch.download(self.s3, job.s3_bucket or self.settings.s3_bucket or "", job.s3_key,
                                         jobdir / "original", max_bytes=self.settings.max_audio_bytes, stop=not_needed)
        except Exception as exc:  # noqa: BLE001 - judged once the record is read, raised only if it matters
            fetched = exc
        finally:
            futures.wait([claiming])  # it sets attempt.handle, which the worker reads once we return
        attempt.stage = "claim"
        try:
            return claiming.result(), fetched, jobdir
        except BaseException:
            if jobdir is not None:
                shutil.rmtree(jobdir, ignore_errors=True)
            raise

    def _claim(self, attempt: Attempt, job: JobMessage, not_needed: threading.Event,
               done: futures.Future[JobRecord]) -> None:
        start = time.monotonic()
        try:
            handle = attempt.handle = claim(self.records, job_id=job.job_id, s3_key=job.s3_key,
                                            owner=attempt.owner, until=attempt.visible_until, now=time.time())
            record = self._new_round(attempt, job, handle)
            now = time.time()
            attempt.expired = now - record.first_seen > self.settings.max_job_age
            if attempt.expired or record.state(now) not in (State.RUNNING, State.WAITING):
                not_needed.set()
        except BaseException as exc:  # noqa: BLE001 - handed to the worker's thread through the future
            not_needed.set()
            done.set_exception(exc)
            return
        finally:
            attempt.durations["claim"] = time.monotonic() - start
        done.set_result(record)
        if attempt.cancelled == "shutting_down":
            # Handed back while the claim was on the wire: `release_claim` may have stopped waiting for it,
            # and the next instance must not meet a claim nobody will run or release.
            self.release_claim(attempt)

    def _new_round(self, attempt: Attempt, job: JobMessage, handle: JobHandle) -> JobRecord:
        """What this message changes in the story before it is read: another recording under a job_id that
        completed is a conflict (nothing is said); another recording for a job that did not complete, or an
        operator's redrive (a `redrive_id` the record has not seen), starts a new round, claimed by us."""
        record, now = handle.record, time.time()
        if record.s3_key != job.s3_key:
            if record.outcome == "completed":
                raise PermanentError(f"job_id {job.job_id} already completed for {record.s3_key}",
                                     code="job_id_conflict")
            log.info("job_new_recording", extra={"job_id": job.job_id, "was": record.s3_key, "now": job.s3_key})
            return handle.save(lambda r: r.new_round(now, s3_key=job.s3_key))
        redrive_id = attempt.message.attributes.get("redrive_id")
        if redrive_id and redrive_id not in record.redrives:
            return handle.save(lambda r: r.redriven(redrive_id, now=now).claimed(handle.owner, attempt.visible_until))
        return record

    def _transcribe(self, attempt: Attempt, job: JobMessage, handle: JobHandle, obj: fetch.AudioObject,
                    jobdir: Path) -> Transcript:
        path = jobdir / "original"
        limit = self.settings.max_audio_seconds
        with self._stage(attempt, "prepare"):
            info = audio.probe(path, max_seconds=limit)
            audio.check_limits(info, max_bytes=self.settings.max_audio_bytes, max_seconds=limit)
            speech = audio.has_speech(path, info, max_seconds=limit)
            # Lazy: the parts are cut while the first ones are sent, in the transcribe stage.
            hint = parts_hint(self.transcriber, self.settings.transcribe_parallelism)
            cut = audio.cut(path, info, self.transcriber.limits, jobdir, max_total_seconds=limit,
                            parts_hint=hint) if speech else None
        with self._stage(attempt, "transcribe"):
            if cut is None:
                transcript = Transcript(text="", duration_seconds=info.duration, no_speech=True)
            else:
                self.gate.wait()
                transcript = self._call_transcriber(job, cut, handle, audio_etag=obj.etag)
        with self._stage(attempt, "store"):
            handle.save(lambda r: r.completing(transcript, model=self.transcriber.model, audio_etag=obj.etag))
        return transcript

    def _call_transcriber(self, job: JobMessage, cut: audio.Cut, handle: JobHandle, *,
                          audio_etag: str) -> Transcript:
        """Transcribe the parts not yet paid for, storing each as it arrives (one part: nothing to store)."""
        # Known before any part is cut: the cut is deterministic for one recording (its ETag), model,
        # limits and cut algorithm, which `cut.plan` names, so part i is the same audio on every retry.
        plan = "|".join([audio_etag, self.transcriber.model, cut.plan])
        record = handle.record
        known = {int(i): t for i, t in record.parts.items()} if record.plan == plan else {}

        def keep(index: int, transcript: Transcript) -> None:
            handle.save(lambda r: r.with_part(plan, audio_etag, index, transcript))

        try:
            return transcribe_parts(self.transcriber, cut.parts, language=job.language, prompt=job.prompt,
                                    # one part: sent from this thread, no pool to start for it
                                    parallelism=self.settings.transcribe_parallelism if cut.count > 1 else 1,
                                    known=known,
                                    on_part=keep if cut.count > 1 else None)
        except RetryableError as exc:
            if exc.code == "rate_limited":
                self.gate.pause(exc.delay)
            elif exc.code == "quota_exceeded":  # someone has to pay before a retry helps: pause the longest
                pause = self.settings.retry_max_delay
                log.error("openai_quota_exhausted", extra={"job_id": job.job_id, "pause_s": pause,
                                                           "error": exc.message})
                self.gate.pause(pause)
            raise

    def _payload(self, attempt: Attempt, job: JobMessage, *, transcript: Transcript | None = None,
                 error: ErrorInfo | None = None) -> CallbackPayload:
        token = self.settings.wp_server_token
        return CallbackPayload(
            server_token=token.get_secret_value() if token else "",
            job_id=job.job_id, s3_key=job.s3_key,
            status="failed" if error else "completed",
            transcript=transcript, model=attempt.model or self.transcriber.model,
            error=error, metadata=job.metadata, attempt=attempt.message.receive_count, timings=attempt.timings(),
        )

    # ------------------------------------------------------------------ terminal transitions

    def report_failure(self, attempt: Attempt, error: ConsumerError) -> bool:
        """Send the terminal `failed` callback if the job's record allows it; False when nothing was sent.

        Never after `completed` was attempted, never again once WordPress acknowledged a `failed`, and never
        without the record: a delivery that could not read it (an S3 error at the claim) says nothing, and
        an invalid copy of a job that has a story says nothing either (the job is not this copy)."""
        job = attempt.job
        invalid = job is None
        if invalid and isinstance(error, InvalidMessageError) and error.job_id:
            job = JobMessage.model_construct(job_id=error.job_id, s3_key=error.s3_key or "", metadata=error.metadata)
        if job is None:
            return False
        handle = attempt.handle
        if handle is None:
            try:  # the claim serialises this with any delivery running the job (ClaimLostError: wait for it)
                handle = attempt.handle = claim(self.records, job_id=job.job_id, s3_key=job.s3_key,
                                                owner=attempt.owner, until=attempt.visible_until, now=time.time())
            except ClaimLostError:
                raise
            except ConsumerError:
                return False  # the story cannot be read: the DLQ keeps the job, WordPress is not told wrong
            attempt.expired = time.time() - handle.record.first_seen > self.settings.max_job_age
            told_by_copy = handle.record.outcome == "failed" and handle.record.s3_key == job.s3_key
            if invalid and not handle.created and not told_by_copy:
                return False  # a valid delivery's job: this bad copy is not its failure
        record = handle.record
        if record.outcome == "completed" or record.state(time.time()) is State.FAILED:
            return False
        info = ErrorInfo(code=error.code, message=error.message, retryable=error.retryable)
        if record.outcome != "failed":
            record = handle.save(lambda r: r.failing(info))  # attempted: written before it goes out
        info = record.error or info
        with self._stage(attempt, "callback"):
            self.deliverer.post(self._payload(attempt, job, error=info))
        with contextlib.suppress(ConsumerError):
            handle.save(lambda r: r.acknowledged(time.time()))
        return True

    def acknowledge(self, attempt: Attempt) -> None:
        """WordPress answered 2xx to `completed`: record it and give the claim up (off the critical path)."""
        if attempt.handle is not None and attempt.outcome == "completed":
            with contextlib.suppress(ConsumerError):
                attempt.handle.save(lambda r: r.acknowledged(time.time()).released())

    def already_dead_lettered(self, attempt: Attempt) -> bool:
        record = attempt.record
        return record is not None and record.dead_lettered_at is not None

    def mark_dead_lettered(self, attempt: Attempt) -> None:
        """The DLQ has its copy: a returning copy of this delivery is only deleted."""
        if attempt.handle is not None:
            with contextlib.suppress(ConsumerError):
                attempt.handle.save(lambda r: r.dead_lettered(time.time()))
