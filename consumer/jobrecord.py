"""A job's whole story in one record: who holds it, what it was made from, what was paid for, what was said.

One small JSON object per job in S3 (`<RESULTS_PREFIX><job_id>.job.json`, `records.py`), written only with
conditional requests (create-only, then compare-and-swap on the ETag). Every decision about a job that
outlives one delivery is read from it; nothing else keeps flags of its own. Modelled on Powertools'
idempotency record: a small status, an in-progress expiry (the claim), the stored result.

    (no record) --claim--> RUNNING --transcript + "completed" attempted--> COMPLETING --2xx--> COMPLETED
                              |  ^                                             |  (any receive: re-send
                              |  | claim expires / released / retried          |   `completed` from the
                              v  |                                             |   stored transcript only)
                            WAITING (parts paid for so far are kept)            v
                              |                                        DLQ `callback_undelivered`
                              | permanent error, last receive, age > MAX_JOB_AGE
                              v
                           FAILING ("failed" attempted) --2xx--> FAILED --DLQ copy sent--> (delete)

States are derived from the fields, never stored: `outcome` is the terminal callback that has been
*attempted* (written before the callback goes out, so a crash cannot forget it), `acknowledged_at` says
WordPress answered 2xx. The invariants the code holds (docs/contract.md, "One job, one story"):

- once `completed` has been attempted, only `completed` is ever sent again, from the stored transcript;
- a `failed` that WordPress acknowledged is not sent again for a copy of the same delivery (an operator's
  redrive, carrying a new `redrive_id`, or WordPress enqueuing the job again with another recording,
  starts a new round for a job that did not complete);
- the claim is held or lost: a renewal that finds it gone or someone else's stops the attempt;
- parts are stored as they are transcribed, so a retry pays only for the parts still missing;
- no job lives forever: past MAX_JOB_AGE from `first_seen` it fails as `job_expired`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field

from consumer.models import ErrorInfo, Transcript


class State(StrEnum):
    RUNNING = "running"  # claimed, no terminal callback attempted yet
    WAITING = "waiting"  # unclaimed (or the claim expired), no terminal callback attempted yet
    COMPLETING = "completing"  # `completed` attempted, not acknowledged
    COMPLETED = "completed"  # `completed` acknowledged
    FAILING = "failing"  # `failed` attempted, not acknowledged
    FAILED = "failed"  # `failed` acknowledged


class Claim(BaseModel):
    """Who runs the job now, and until when (unix seconds; renewed with the message's visibility)."""

    owner: str
    until: float


class JobRecord(BaseModel):
    """The durable state of one job."""

    job_id: str
    s3_key: str
    first_seen: float = Field(description="When the job was first claimed; its age bounds its life.")
    claim: Claim | None = None
    audio_etag: str | None = Field(default=None, description="The recording the parts and transcript were made from.")
    plan: str | None = Field(default=None, description="Which cut of the recording `parts` belong to.")
    parts: dict[str, Transcript] = Field(default_factory=dict, description="Part index -> its transcript.")
    transcript: Transcript | None = None
    model: str | None = None
    outcome: Literal["completed", "failed"] | None = Field(default=None, description="Terminal callback attempted.")
    error: ErrorInfo | None = None
    acknowledged_at: float | None = None
    dead_lettered_at: float | None = None
    redrives: list[str] = Field(default_factory=list, description="Redrive rounds this job has seen.")

    # ------------------------------------------------------------------ reading the story

    def state(self, now: float) -> State:
        if self.outcome == "completed":
            return State.COMPLETED if self.acknowledged_at else State.COMPLETING
        if self.outcome == "failed":
            return State.FAILED if self.acknowledged_at else State.FAILING
        return State.RUNNING if self.claim and self.claim.until > now else State.WAITING

    def held_by(self, owner: str) -> bool:
        return self.claim is not None and self.claim.owner == owner

    def claimed_elsewhere(self, owner: str, now: float) -> bool:
        return self.claim is not None and self.claim.owner != owner and self.claim.until > now

    # ------------------------------------------------------------------ transitions (each a new record)

    @classmethod
    def new(cls, job_id: str, s3_key: str, *, owner: str, until: float, now: float) -> JobRecord:
        return cls(job_id=job_id, s3_key=s3_key, first_seen=now, claim=Claim(owner=owner, until=until))

    def claimed(self, owner: str, until: float) -> JobRecord:
        return self.model_copy(update={"claim": Claim(owner=owner, until=until)})

    def released(self) -> JobRecord:
        return self.model_copy(update={"claim": None})

    def redriven(self, redrive_id: str, *, now: float) -> JobRecord:
        """A new round chosen by an operator, with a fresh MAX_JOB_AGE: a job that did not complete is tried
        again (parts kept); one that did has `completed` sent again from its transcript."""
        return self.new_round(now).model_copy(update={"redrives": [*self.redrives, redrive_id]})

    def new_round(self, now: float, *, s3_key: str | None = None) -> JobRecord:
        """Start over from what was paid for: a redrive, or WordPress sending a failed job again with a new
        recording. `completed` stays (it is re-sent, never contradicted); a `failed` is forgotten."""
        update: dict[str, object] = {"first_seen": now, "acknowledged_at": None, "dead_lettered_at": None}
        if self.outcome == "failed":
            update |= {"outcome": None, "error": None}
        if s3_key is not None:
            update["s3_key"] = s3_key
        return self.model_copy(update=update)

    def with_part(self, plan: str, audio_etag: str, index: int, transcript: Transcript) -> JobRecord:
        parts = dict(self.parts) if self.plan == plan else {}  # another cut: what was paid for no longer fits
        parts[str(index)] = transcript
        return self.model_copy(update={"plan": plan, "audio_etag": audio_etag, "parts": parts})

    def completing(self, transcript: Transcript, *, model: str, audio_etag: str | None) -> JobRecord:
        """The transcript is stored and `completed` is about to be sent: from now on nothing else is."""
        return self.model_copy(update={"transcript": transcript, "model": model, "outcome": "completed",
                                       "audio_etag": audio_etag or self.audio_etag, "error": None})

    def failing(self, error: ErrorInfo) -> JobRecord:
        return self.model_copy(update={"outcome": "failed", "error": error})

    def acknowledged(self, now: float) -> JobRecord:
        return self.model_copy(update={"acknowledged_at": now})

    def dead_lettered(self, now: float) -> JobRecord:
        return self.model_copy(update={"dead_lettered_at": now, "claim": None})
