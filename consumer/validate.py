"""The validate stage: raw SQS message -> JobMessage, or InvalidMessageError saying why.

Order matters: the size cap comes before anything else touches the body, and the signature is checked
on the raw bytes before the JSON is parsed, so an unsigned body never reaches the parser.
"""

from __future__ import annotations

import json
import unicodedata
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from consumer.errors import InvalidMessageError, PermanentError
from consumer.models import JobMessage, readable_job_id
from consumer.signing import verify

if TYPE_CHECKING:
    from consumer.settings import Settings
    from consumer.sqs import Message

MAX_BODY_BYTES = 256 * 1024
MAX_KEY_BYTES = 1024


def _hint(data: Any, field: str) -> str | None:
    value = data.get(field) if isinstance(data, dict) else None
    if field == "job_id":
        return readable_job_id(value)
    return value[:MAX_KEY_BYTES] if isinstance(value, str) else None


def _metadata_hint(data: dict[str, Any]) -> dict[str, Any] | None:
    """The metadata to echo on a failed callback, when it is itself acceptable (WordPress finds its record
    by it, e.g. post_id); None when it is missing or is what was wrong."""
    value = data.get("metadata")
    if isinstance(value, list) and not value:
        return {}
    try:
        return JobMessage.model_validate({"job_id": "x", "s3_key": "x", "metadata": value}).metadata
    except (ValidationError, RecursionError):
        return None


def _key_problem(key: str, prefix: str | None) -> str | None:
    if len(key.encode()) > MAX_KEY_BYTES:
        return f"s3_key is longer than {MAX_KEY_BYTES} bytes"
    if key.startswith("/"):
        return "s3_key must not start with '/'"
    if any(seg in ("..", ".") for seg in key.split("/")):
        return "s3_key must not contain '.' or '..' segments"
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co") for ch in key):
        return "s3_key contains control or invisible characters"
    if unicodedata.normalize("NFC", key) != key:
        return "s3_key is not NFC-normalised unicode"
    if prefix and not key.startswith(prefix):
        return f"s3_key must start with S3_KEY_PREFIX ({prefix!r})"
    return None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity cannot be echoed back to WordPress verbatim


def _load_json(body: str) -> Any:
    try:
        data = json.loads(body, parse_constant=_no_constants)
    except RecursionError:  # deeply nested arrays exhaust the parser's stack
        raise InvalidMessageError("body is nested too deeply") from None
    except ValueError as exc:
        raise InvalidMessageError(f"body is not JSON: {exc.args[0][:120]}") from None
    return data


def _encodable(value: Any) -> bool:
    """False when JSON escapes like \\ud800 parsed into lone surrogates, which UTF-8 cannot carry."""
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except (UnicodeEncodeError, RecursionError):
        return False
    return True


def parse_job(message: Message, settings: Settings) -> JobMessage:
    """Check size, signature, shape and input rules; legacy `{"s3_key"}` bodies get their first MessageId."""
    if len(message.body.encode()) > MAX_BODY_BYTES:
        raise InvalidMessageError(f"body is larger than {MAX_BODY_BYTES} bytes", code="body_too_large")
    if settings.signature_required:
        try:
            verify(message.body, message.attributes.get("signature"), settings.secrets,
                   max_age=settings.signature_max_age)
        except PermanentError as exc:
            # No job_id rides along: an unauthenticated message must not make us fail a real job.
            raise InvalidMessageError(exc.message, code="bad_signature") from None
    data = _load_json(message.body)
    if not isinstance(data, dict):
        raise InvalidMessageError(f"body must be a JSON object, not {type(data).__name__}")
    job_id, s3_key = _hint(data, "job_id"), _hint(data, "s3_key")
    if not _encodable(data):
        raise InvalidMessageError("body contains an unpaired UTF-16 surrogate escape", job_id=job_id,
                                  s3_key=s3_key if _encodable(s3_key) else None)
    if "job_id" not in data and set(data) <= {"s3_key"}:
        # The old HTTP endpoint's body: the job is named by its first MessageId, which every copy we make
        # (requeue, dead letter, redrive) carries as the `job_id` attribute.
        job_id = message.attributes.get("job_id") or message.message_id
        data = {**data, "job_id": job_id}
    try:
        job = JobMessage.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        what = first["msg"].removeprefix("Value error, ")
        raise InvalidMessageError(f"{where}: {what} ({exc.error_count()} problem(s))", job_id=job_id,
                                  s3_key=s3_key, metadata=_metadata_hint(data)) from None
    bucket = job.s3_bucket or settings.s3_bucket
    if bucket not in settings.allowed_buckets:
        raise InvalidMessageError(
            f"bucket {bucket!r} is not S3_BUCKET or in S3_ALLOWED_BUCKETS", code="forbidden_input",
            job_id=job.job_id, s3_key=job.s3_key, metadata=job.metadata,
        )
    problem = _key_problem(job.s3_key, settings.s3_key_prefix)
    if problem:
        raise InvalidMessageError(problem, code="forbidden_input", job_id=job.job_id, s3_key=job.s3_key,
                                  metadata=job.metadata)
    return job
