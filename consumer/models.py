"""The wire contracts: the SQS job message (v1), the transcript, and the WordPress callback payload.

These pydantic models are the single source of truth for docs/contract.md and `sidecar schema`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

JOB_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
MAX_METADATA_BYTES = 16 * 1024
MAX_METADATA_DEPTH = 32  # far beyond any real use; pydantic cannot serialise past 255 levels


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, counting no further than limit + 1."""
    if limit < 0 or not isinstance(value, (dict, list)):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(child, limit - 1) for child in children), default=0)


class JobMessage(BaseModel):
    """Body of an SQS job message, contract v1."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: str = Field(pattern=JOB_ID_PATTERN, description="Caller's id for the job; echoed back.")
    s3_key: str = Field(min_length=1, max_length=1024, description="Key of the audio object.")
    s3_bucket: str | None = Field(
        default=None, min_length=3, max_length=63, description="Bucket; defaults to S3_BUCKET."
    )
    language: str | None = Field(
        default=None, pattern=r"^[a-z]{2}$", description="ISO-639-1 language hint, e.g. 'en'."
    )
    prompt: str | None = Field(default=None, max_length=4000, description="Vocabulary/context hint.")
    metadata: dict[str, Any] | None = Field(
        default=None, description="Opaque object echoed back verbatim in the callback (<= 16 KiB)."
    )

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        if _depth(value, MAX_METADATA_DEPTH) > MAX_METADATA_DEPTH:
            raise ValueError(f"metadata is nested deeper than {MAX_METADATA_DEPTH} levels")
        if len(json.dumps(value, separators=(",", ":"))) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is larger than {MAX_METADATA_BYTES} bytes")
        return value


class Segment(BaseModel):
    """One timed piece of the transcript, in seconds from the start of the recording."""

    start: float
    end: float
    text: str


class Transcript(BaseModel):
    """What a transcriber returns."""

    text: str
    language: str | None = None
    duration_seconds: float | None = None
    segments: list[Segment] = Field(default_factory=list)
    no_speech: bool = False


class ErrorInfo(BaseModel):
    """Why a job failed, as WordPress sees it."""

    code: str
    message: str
    retryable: bool


class Timings(BaseModel):
    """Milliseconds spent in the stages of this attempt."""

    download_ms: int = 0
    transcribe_ms: int = 0
    total_ms: int = 0


class CallbackPayload(BaseModel):
    """JSON body POSTed to WP_SIDE_CAR_CALLBACK: exactly one terminal callback per job."""

    server_token: str = Field(description="WP_SERVER_TOKEN; in the body because the WAF strips Authorization.")
    job_id: str
    s3_key: str
    status: Literal["completed", "failed"]
    transcript: Transcript | None = None
    model: str | None = None
    error: ErrorInfo | None = None
    metadata: dict[str, Any] | None = None
    attempt: int = Field(ge=1, description="SQS ApproximateReceiveCount of this delivery.")
    timings: Timings = Field(default_factory=Timings)


SCHEMAS: dict[str, type[BaseModel]] = {"job": JobMessage, "callback": CallbackPayload}


def json_schema(name: str) -> dict[str, Any]:
    """JSON Schema of a contract by name ('job' or 'callback')."""
    return SCHEMAS[name].model_json_schema()
