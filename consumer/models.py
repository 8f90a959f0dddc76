"""The wire contracts: the SQS job message (v1), the transcript, and the WordPress callback payload.

These pydantic models are the single source of truth for docs/contract.md and `sidecar schema`. The job
message takes what PHP naturally sends (docs/contract.md, "What PHP sends"): an integer job_id, a
WordPress locale for `language`, `[]` for empty metadata; each is normalised here, so every later stage
sees one shape (job_id a string, language ISO-639-1, metadata an object).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

JOB_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
# PHP_INT_MAX on 64-bit PHP: the largest integer json_encode() writes as an integer (PHP manual, "Integers").
MAX_INT_JOB_ID = 2**63 - 1
# `de`, or a WordPress locale as get_locale() returns it (`de_DE`, `pt_BR`, `de_DE_formal`) or as
# get_bloginfo('language') does (`de-DE`). WordPress developer reference: get_locale(), get_bloginfo().
LANGUAGE_PATTERN = r"^[a-z]{2}(?:[_-][A-Z]{2}(?:_[a-z0-9]+)?)?$"
MAX_METADATA_BYTES = 16 * 1024
MAX_METADATA_DEPTH = 32  # far beyond any real use; pydantic cannot serialise past 255 levels
_JOB_ID = re.compile(JOB_ID_PATTERN)
_LANGUAGE = re.compile(LANGUAGE_PATTERN)


def readable_job_id(value: Any) -> str | None:
    """The job_id as it is echoed back (an integer as its decimal string), or None when it is not one."""
    if isinstance(value, str):
        return value if _JOB_ID.fullmatch(value) else None
    # bool is an int in Python (and true/false are never ids); 0 and negatives are PHP's "no id" and
    # error values, and would make unrelated jobs share one idempotency key.
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_INT_JOB_ID:
        return str(value)
    return None


def metadata_bytes(value: Any) -> int:
    """Size of metadata as the UTF-8 bytes of its compact JSON, however it was escaped on the wire."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass"))


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, counting no further than limit + 1."""
    if limit < 0 or not isinstance(value, (dict, list)):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(child, limit - 1) for child in children), default=0)


class JobMessage(BaseModel):
    """Body of an SQS job message, contract v1."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: Annotated[str, WithJsonSchema({
        "anyOf": [{"type": "string", "pattern": JOB_ID_PATTERN},
                  {"type": "integer", "minimum": 1, "maximum": MAX_INT_JOB_ID}],
    })] = Field(description="Caller's id for the job (an integer is taken as its decimal string); echoed back.")
    s3_key: str = Field(min_length=1, max_length=1024, description="Key of the audio object.")
    s3_bucket: str | None = Field(
        default=None, min_length=3, max_length=63, description="Bucket; defaults to S3_BUCKET."
    )
    language: str | None = Field(
        default=None, pattern=LANGUAGE_PATTERN,
        description="Language hint: ISO-639-1 ('de') or a WordPress locale ('de_DE', taken as 'de').",
    )
    prompt: str | None = Field(default=None, max_length=4000, description="Vocabulary/context hint.")
    metadata: Annotated[dict[str, Any] | None, WithJsonSchema({
        "anyOf": [{"type": "object"}, {"type": "array", "maxItems": 0}, {"type": "null"}],
    })] = Field(default=None, description="Opaque object echoed back in the callback (<= 16 KiB as compact "
                "UTF-8 JSON); [] (PHP's empty array) is taken as {}.")

    @field_validator("job_id", mode="before")
    @classmethod
    def _integer_job_id(cls, value: Any) -> Any:
        if isinstance(value, bool) or (isinstance(value, int) and readable_job_id(value) is None):
            raise ValueError(f"must be a string or an integer from 1 to {MAX_INT_JOB_ID}")
        if isinstance(value, str) and not _JOB_ID.fullmatch(value):
            raise ValueError("must be 1-128 characters of A-Z a-z 0-9 . _ : -")
        return str(value) if isinstance(value, int) else value

    @field_validator("language", mode="before")
    @classmethod
    def _iso_language(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value  # None, or pydantic's own "Input should be a valid string"
        if not _LANGUAGE.fullmatch(value):
            raise ValueError(f"{value[:40]!r} is neither an ISO-639-1 code ('de') nor a WordPress locale ('de_DE')")
        return value[:2]

    @field_validator("metadata", mode="before")
    @classmethod
    def _php_empty_array(cls, value: Any) -> Any:
        return {} if isinstance(value, list) and not value else value  # json_encode([]) is "[]", not "{}"

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        if _depth(value, MAX_METADATA_DEPTH) > MAX_METADATA_DEPTH:
            raise ValueError(f"metadata is nested deeper than {MAX_METADATA_DEPTH} levels")
        if metadata_bytes(value) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is larger than {MAX_METADATA_BYTES} bytes as compact UTF-8 JSON")
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
