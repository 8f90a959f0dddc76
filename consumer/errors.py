"""The project's exception tree: every failure a stage can raise, and whether it is worth retrying.

    ConsumerError                  code, message; never raised itself
    ├── RetryableError             the job may succeed later; optional delay (seconds) hint
    │     s3_unavailable, transcription_unavailable, callback_unavailable, internal_error (a bug);
    │     deferrals, which never spend a job's receives (worker.DEFERRALS): shutting_down,
    │     job_in_progress (records.ClaimLostError), rate_limited, quota_exceeded,
    │     transcription_misconfigured, callback_misconfigured; callback_undelivered (DLQ reason only)
    └── PermanentError             retrying cannot help; the job is failed and dead-lettered
          │ audio_not_found, audio_too_large, audio_too_long, unsupported_audio,
          │ transcription_rejected, callback_rejected, job_expired, job_id_conflict
          └── InvalidMessageError  the message is not a valid job (what could be read rides along)
                invalid_message, bad_signature, forbidden_input, body_too_large

    ConfigError                    a setting is missing or invalid (start-up only, exit status 2)

Stages raise these; third-party errors (botocore, openai, requests, PyAV) are translated into them in
the adapter that calls the library, by tables. Only `worker.settle` decides what a failure does to a
message.
"""

from __future__ import annotations

from typing import Any


class ConsumerError(Exception):
    """Base of every error a pipeline stage raises; carries a stable machine-readable code."""

    retryable: bool = False
    default_code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class RetryableError(ConsumerError):
    """A transient failure: the message goes back to the queue after a backoff."""

    retryable = True
    default_code = "temporarily_unavailable"

    def __init__(self, message: str, *, code: str | None = None, delay: float | None = None) -> None:
        super().__init__(message, code=code)
        self.delay = delay


class PermanentError(ConsumerError):
    """A failure retrying cannot fix: WordPress is told and the message is dead-lettered."""

    default_code = "invalid_message"


class InvalidMessageError(PermanentError):
    """A message that is not a valid job; carries what could be read of it for the failed callback."""

    def __init__(
        self, message: str, *, code: str = "invalid_message", job_id: str | None = None, s3_key: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.job_id = job_id
        self.s3_key = s3_key
        self.metadata = metadata  # echoed on the failed callback: WordPress finds its record by it (post_id)


class ConfigError(Exception):
    """Invalid or missing configuration; one line per problem, each naming the variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
