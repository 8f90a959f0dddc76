"""The job pipeline: `Pipeline.process` lists the stages in order; each stage lives in its own module.

    validate (validate.py) -> lease, fetch (results.py: a stored result?) -> download (fetch.py)
        -> prepare (audio.py) -> transcribe (transcribe.py) -> store (results.py) -> callback (deliver.py)

Stages return values or raise ConsumerError; the pipeline never touches SQS and never decides what
happens to a message (that is `worker.Worker.settle`). Everything after validation runs under the job's
lease (results.py), taken after validation and given up by the worker once the message is settled, so
two deliveries of one job never run at once, on any host. Per-stage timings are
recorded on the `Attempt` so the worker can observe them.

Another thread may cancel an attempt (shutdown hands its message back; a renewal finds its lease taken):
it then starts no further stage. The callback stage commits it instead: from there on it finishes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from consumer import audio, fetch
from consumer.deliver import Deliverer
from consumer.errors import ConsumerError, InvalidMessageError, RetryableError
from consumer.models import CallbackPayload, ErrorInfo, JobMessage, Timings, Transcript
from consumer.results import Lease, ResultStore, StoredResult
from consumer.transcribe import AudioPart, Transcriber, transcribe_parts
from consumer.validate import parse_job

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from consumer.backpressure import RateGate
    from consumer.settings import Settings
    from consumer.sqs import Message

HOST = socket.gethostname()
CANCELLED = {"shutting_down": "the message was handed back at shutdown",
             "job_in_progress": "the job's lease was taken over by another delivery"}


@dataclass
class Attempt:
    """One delivery of one message through the pipeline: what the worker logs and measures."""

    message: Message
    started: float = field(default_factory=time.monotonic)
    visible_until: float = 0.0  # wall-clock end of the message's invisibility; the lease expires with it
    job: JobMessage | None = None
    lease: Lease | None = None
    stage: str = "validate"
    durations: dict[str, float] = field(default_factory=dict)
    outcome: Literal["completed", "duplicate"] | None = None
    source: Literal["api", "cached"] | None = None
    audio_seconds: float = 0.0
    model: str | None = None
    # Why this attempt must start no further stage, set from another thread: "shutting_down" (the worker
    # hands the message back at shutdown) or "job_in_progress" (another delivery took the lease over).
    cancelled: str | None = None
    # Set when the callback is about to go out: past that point the attempt is finished, never cancelled
    # (WordPress may already have heard; a second instance would make it hear twice).
    committed: bool = False
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def job_id(self) -> str | None:
        return self.job.job_id if self.job else None

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
        """Who holds the lease: this process and this delivery of the message."""
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
                 results: ResultStore, gate: RateGate, workdir: Path) -> None:
        self.settings = settings
        self.s3 = s3
        self.transcriber = transcriber
        self.deliverer = deliverer
        self.results = results
        self.gate = gate
        self.workdir = workdir

    def release_lease(self, attempt: Attempt) -> None:
        """Give the job's lease up (best effort: an unreleased lease simply expires)."""
        lease, attempt.lease = attempt.lease, None
        if lease is not None:
            with contextlib.suppress(ConsumerError):
                self.results.release(lease)

    def renew_lease(self, attempt: Attempt, *, until: float) -> bool:
        """Extend a running job's lease with its message's visibility (called by the heartbeat)."""
        lease = attempt.lease
        if lease is None:
            return True
        try:
            renewed = self.results.renew(lease, until=until)
        except ConsumerError as exc:
            if exc.code == "lease_taken" and attempt.lease is lease:
                # Someone else runs the job now: storing or calling back from here would do it twice.
                attempt.cancel("job_in_progress")
            return False
        if attempt.lease is lease:  # not released by the worker while we renewed
            attempt.lease = renewed
        return True

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
        """Run every stage for one message; returns normally on success (incl. a duplicate)."""
        with self._stage(attempt, "validate"):
            job = attempt.job = parse_job(attempt.message, self.settings)
        # Held until the message is settled (the worker releases it), failure callback included.
        with self._stage(attempt, "lease"):
            attempt.lease = self.results.acquire(job.job_id, attempt.owner, until=attempt.visible_until)
        with self._stage(attempt, "fetch"):
            stored = self._stored_result(job)
        if stored and stored.delivered_at:
            attempt.outcome = "duplicate"
            return
        if stored:
            attempt.source = "cached"
        else:
            stored = self._transcribe(attempt, job)
            attempt.source = "api"
        attempt.model = stored.model
        attempt.audio_seconds = stored.transcript.duration_seconds or 0.0
        with self._stage(attempt, "callback"):
            self.deliverer.post(self._payload(attempt, job, transcript=stored.transcript))
        attempt.outcome = "completed"
        # WordPress has the transcript: from here on nothing may turn the job into a failure. If the
        # mark is lost, a duplicate delivery only re-sends the same callback (Idempotency-Key).
        with contextlib.suppress(ConsumerError):
            self.results.mark_delivered(stored)

    def _stored_result(self, job: JobMessage) -> StoredResult | None:
        """The stored result of this job, if it was made from the recording as it is now."""
        stored = self.results.get(job.job_id)
        if stored is None or stored.s3_key != job.s3_key:
            return None
        if stored.delivered_at:  # WordPress has it: a duplicate, whatever has become of the recording since
            return stored
        obj = fetch.head(self.s3, job.s3_bucket or self.settings.s3_bucket or "", job.s3_key)
        return stored if stored.audio_etag == obj.etag else None

    def _transcribe(self, attempt: Attempt, job: JobMessage) -> StoredResult:
        jobdir = Path(tempfile.mkdtemp(prefix=f"{attempt.message.message_id}-", dir=self.workdir))
        bucket = job.s3_bucket or self.settings.s3_bucket or ""
        try:
            with self._stage(attempt, "download"):
                obj = fetch.download(self.s3, bucket, job.s3_key, jobdir / "original",
                                     max_bytes=self.settings.max_audio_bytes)
                path = jobdir / "original"
            with self._stage(attempt, "prepare"):
                info = audio.probe(path, max_seconds=self.settings.max_audio_seconds)
                audio.check_limits(info, max_bytes=self.settings.max_audio_bytes,
                                   max_seconds=self.settings.max_audio_seconds)
                speech = audio.has_speech(path, info, max_seconds=self.settings.max_audio_seconds)
                parts = audio.prepare(path, info, self.transcriber.limits, jobdir,
                                      max_total_seconds=self.settings.max_audio_seconds) if speech else []
            with self._stage(attempt, "transcribe"):
                if not speech:
                    transcript = Transcript(text="", duration_seconds=info.duration, no_speech=True)
                else:
                    self.gate.wait()
                    transcript = self._call_transcriber(job, parts)
        finally:
            shutil.rmtree(jobdir, ignore_errors=True)
        with self._stage(attempt, "store"):
            stored = StoredResult(job_id=job.job_id, s3_key=job.s3_key, audio_etag=obj.etag,
                                  model=self.transcriber.model, transcript=transcript, created_at=time.time())
            self.results.put(stored)
        return stored

    def _call_transcriber(self, job: JobMessage, parts: list[AudioPart]) -> Transcript:
        try:
            return transcribe_parts(self.transcriber, parts, language=job.language, prompt=job.prompt,
                                    parallelism=self.settings.transcribe_parallelism)
        except RetryableError as exc:
            if exc.code == "rate_limited":
                self.gate.pause(exc.delay)
            raise

    def _payload(self, attempt: Attempt, job: JobMessage, *, transcript: Transcript | None = None,
                 error: ConsumerError | None = None) -> CallbackPayload:
        token = self.settings.wp_server_token
        return CallbackPayload(
            server_token=token.get_secret_value() if token else "",
            job_id=job.job_id, s3_key=job.s3_key,
            status="failed" if error else "completed",
            transcript=transcript, model=attempt.model or self.transcriber.model,
            error=ErrorInfo(code=error.code, message=error.message, retryable=error.retryable) if error else None,
            metadata=job.metadata, attempt=attempt.message.receive_count, timings=attempt.timings(),
        )

    def report_failure(self, attempt: Attempt, error: ConsumerError) -> bool:
        """Send the terminal `failed` callback; False when there is no job to report on."""
        job = attempt.job
        if job is None and isinstance(error, InvalidMessageError) and error.job_id:
            job = JobMessage.model_construct(job_id=error.job_id, s3_key=error.s3_key or "", metadata=error.metadata)
        if job is None:
            return False
        with self._stage(attempt, "callback"):
            self.deliverer.post(self._payload(attempt, job, error=error))
        return True
