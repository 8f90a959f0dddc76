"""Configuration: the one validated `Settings` object, built at start-up from the environment and `.env`.

Variable names of the old Flask sidecar are kept (AWS_REGION, S3_BUCKET, OPENAI_API_KEY, SIDE_CAR_SECRET,
WP_SIDE_CAR_CALLBACK, WP_SERVER_TOKEN, SEND_X_SERVER_TOKEN_HEADER). Nothing here runs at import time;
`load_settings()` turns every problem into a `ConfigError` line that names the variable, field errors
and cross-field problems together: a first pass finds the invalid fields, a second builds the object with
those at their defaults so the cross-field rules can still be checked (`load_settings_leniently`).

Prod is strict (`ENVIRONMENT=prod`): jobs must be signed, the callback must be https (also to a loopback
host: in prod a plain-http callback is a dev or test leftover, and a WordPress on the same host has an
https name too), and the transcriber must be named, not guessed from whether OPENAI_API_KEY is set.
"""

from __future__ import annotations

import ipaddress
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from consumer.errors import ConfigError

SQS_MAX_VISIBILITY = 12 * 60 * 60

# Set while load_settings_leniently builds its second pass: the cross-field validator then leaves the
# problems to the caller instead of raising them.
_LENIENT: ContextVar[bool] = ContextVar("settings_lenient", default=False)


def is_loopback_host(host: str | None) -> bool:
    """True for localhost and loopback addresses (where plain http is acceptable)."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Every knob of the daemon and its tools; the field name upper-cased is the environment variable."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # --- where it runs
    environment: Literal["dev", "prod", "test"] = Field(
        "dev", description="dev, prod or test; prod requires signed jobs, an https callback and a named TRANSCRIBER."
    )

    # --- AWS (boto3 also reads its own variables and profiles; these exist so .env files work too)
    aws_region: str = Field("us-east-1", description="AWS region of the queue and the bucket.")
    aws_endpoint_url: str | None = Field(None, description="Endpoint for local stacks (moto, LocalStack).")
    aws_access_key_id: SecretStr | None = Field(None, description="Only for .env use; else boto3's own chain.")
    aws_secret_access_key: SecretStr | None = Field(None, description="Pairs with AWS_ACCESS_KEY_ID.")
    aws_session_token: SecretStr | None = Field(None, description="For temporary credentials.")

    # --- queue
    sqs_queue_url: str | None = Field(None, description="URL of the job queue (required to run).")
    sqs_dlq_url: str | None = Field(
        None, description="Dead-letter queue; found from RedrivePolicy if unset (one of the two is required)."
    )
    concurrency: int = Field(4, ge=1, le=64, description="Worker threads = jobs in flight per process.")
    visibility_timeout: int = Field(120, ge=2, le=SQS_MAX_VISIBILITY, description="Seconds a job is hidden.")
    heartbeat_interval: float | None = Field(
        None, gt=0, description="Seconds between visibility extensions (default: a third of the timeout)."
    )
    poll_wait_seconds: int = Field(20, ge=0, le=20, description="SQS long-poll wait.")
    shutdown_grace: float = Field(60, ge=0, description="Seconds in-flight jobs get after SIGTERM.")
    retry_base_delay: float = Field(15, ge=0, description="First retry backoff, seconds; doubles per attempt.")
    retry_max_delay: float = Field(900, ge=0, le=SQS_MAX_VISIBILITY, description="Backoff cap, seconds.")
    queue_metrics_interval: float = Field(60, gt=0, description="Seconds between queue-depth polls.")
    max_receives: int = Field(
        5, ge=1, le=1000, description="Attempts before a job fails for good, when the queue has no RedrivePolicy."
    )

    # --- audio in S3
    s3_bucket: str | None = Field(None, description="Default bucket of the recordings.")
    s3_allowed_buckets: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Other buckets a job may name (comma-separated)."
    )
    s3_key_prefix: str | None = Field(None, description="When set, every s3_key must start with it.")
    results_prefix: str = Field("transcripts/", description="Where job records (<job_id>.job.json) are kept.")
    max_job_age: float = Field(
        SQS_MAX_VISIBILITY, gt=0, description="Seconds from a job's first claim after which it fails as job_expired."
    )
    max_audio_bytes: int = Field(1024**3, gt=0, description="Largest recording accepted, bytes.")
    max_audio_seconds: float = Field(4 * 3600, gt=0, description="Longest recording accepted, seconds.")
    temp_dir: Path | None = Field(None, description="Parent of the private work directory.")

    # --- transcription
    transcriber: Literal["openai", "local"] | None = Field(
        None, description="openai or local; empty: openai when an OpenAI key or base URL is set (not in prod)."
    )
    openai_api_key: SecretStr | None = Field(None, description="OpenAI API key.")
    openai_base_url: str | None = Field(None, description="OpenAI-compatible endpoint (the SDK's own name).")
    transcribe_model: str = Field("gpt-transcribe", description="OpenAI transcription model.")
    transcribe_response_format: Literal["auto", "json", "verbose_json"] = Field(
        "auto", description="auto: what the model is documented to take (verbose_json only for whisper-1); "
        "verbose_json for a compatible server that gives segments."
    )
    openai_max_retries: int = Field(
        1, ge=0, le=5, description="SDK retries per attempt; they stack with SQS redelivery."
    )
    transcribe_timeout: float = Field(600, gt=0, description="Seconds one transcription request may take.")
    transcribe_parallelism: int = Field(
        8, ge=1, le=16, description="Parts of one recording sent at once; a long one is cut into this many "
        "(local model: at most two per worker)."
    )
    transcribe_max_requests: int = Field(
        16, ge=1, le=256, description="Transcription requests in flight at once, all jobs together."
    )
    whisper_model: str = Field("base", description="faster-whisper model name or CTranslate2 directory.")
    whisper_device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the local model runs.")
    whisper_compute_type: str | None = Field(None, description="Default int8 on CPU, float16 on CUDA.")

    # --- signing (SIDE_CAR_SECRET may hold several comma-separated secrets: the first signs, any verifies)
    side_car_secret: SecretStr | None = Field(None, description="Job signing secrets, comma-separated.")
    require_signature: bool | None = Field(None, description="Default: true when SIDE_CAR_SECRET is set.")
    signature_max_age: int | None = Field(None, gt=0, description="Reject signatures older than this.")

    # --- WordPress callback
    wp_side_car_callback: str | None = Field(None, description="URL of .../salestrainer/v1/upload-complete.")
    wp_server_token: SecretStr | None = Field(None, description="Sent in the callback body (server_token).")
    send_x_server_token_header: bool = Field(True, description="Also send the token as X-Server-Token.")
    allow_insecure_callback: bool = Field(False, description="Permit http:// to a non-loopback host.")
    callback_timeout: float = Field(30, gt=0, description="Seconds for the callback (connect and read).")

    # --- `sidecar intake`: the old sidecar's POST /transcribe, turned into signed jobs (the cut-over)
    intake_host: str = Field("127.0.0.1", description="Address of `sidecar intake` (the old POST /transcribe).")
    intake_port: int = Field(9010, ge=0, le=65535, description="Port of `sidecar intake` (0: any).")
    intake_secret_header: str | None = Field(
        "X-Side-Car-Secret", description="Header intake reads SIDE_CAR_SECRET from (besides Authorization: Bearer)."
    )
    intake_secret_field: str | None = Field(
        "secret", description="JSON body field intake reads SIDE_CAR_SECRET from (the old sidecar's)."
    )

    # --- observability
    metrics_host: str = Field("127.0.0.1", description="Address of /metrics and /health.")
    metrics_port: int = Field(
        9002, ge=0, le=65535, description="Port of /metrics and /health (0: any; `sidecar dev` defaults to 9102)."
    )
    health_stall_seconds: float = Field(90, gt=0, description="Poll-loop silence after which /health is 503.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field("INFO", description="Log threshold.")
    log_format: Literal["json", "text"] = Field("json", description="json (one object a line) or text.")
    log_file: Path | None = Field(None, description="Also append logs here (the old sidecar.log).")

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: object) -> object:
        if isinstance(data, dict):
            data = {k: (None if v == "" else v) for k, v in data.items()}
            for key in ("s3_allowed_buckets", "S3_ALLOWED_BUCKETS"):
                if key in data:
                    data[key] = _split_csv(data[key]) or []
            for key in ("log_level", "LOG_LEVEL"):
                level = data.get(key)
                if isinstance(level, str):
                    data[key] = level.upper()
        return data

    @model_validator(mode="after")
    def _cross_field(self) -> Settings:
        if _LENIENT.get():
            return self
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # ---------------------------------------------------------------- derived values

    @property
    def secrets(self) -> list[str]:
        """Signing secrets, first one signs."""
        raw = self.side_car_secret.get_secret_value() if self.side_car_secret else ""
        return [s.strip() for s in raw.split(",") if s.strip()]

    @property
    def signature_required(self) -> bool:
        return bool(self.secrets) if self.require_signature is None else self.require_signature

    @property
    def transcriber_kind(self) -> Literal["openai", "local"]:
        if self.transcriber:
            return self.transcriber
        return "openai" if (self.openai_api_key or self.openai_base_url) else "local"

    @property
    def heartbeat_every(self) -> float:
        return self.heartbeat_interval or max(1.0, self.visibility_timeout / 3)

    @property
    def allowed_buckets(self) -> set[str]:
        return {b for b in [self.s3_bucket, *self.s3_allowed_buckets] if b}

    def secret_values(self) -> list[str]:
        """Every secret's plain value, for the log redaction filter."""
        fields = (self.openai_api_key, self.wp_server_token, self.aws_secret_access_key, self.aws_session_token)
        values = [f.get_secret_value() for f in fields if f is not None]
        return [v for v in [*values, *self.secrets] if len(v) >= 4]

    def problems(self) -> list[str]:
        """Cross-field problems, one line each naming the variable."""
        out: list[str] = []
        prod = self.environment == "prod"
        if prod:
            out += self._prod_problems()
        if self.require_signature and not self.secrets:
            out.append("REQUIRE_SIGNATURE: true needs SIDE_CAR_SECRET")
        if self.heartbeat_interval and self.heartbeat_interval >= self.visibility_timeout:
            out.append("HEARTBEAT_INTERVAL: must be shorter than VISIBILITY_TIMEOUT")
        if self.wp_side_car_callback:
            out += self._callback_problems(self.wp_side_car_callback, prod=prod)
        if self.transcriber == "openai" and not (self.openai_api_key or self.openai_base_url):
            out.append("OPENAI_API_KEY: required when TRANSCRIBER=openai (or set OPENAI_BASE_URL for a "
                       "compatible server)")
        if self.transcribe_response_format == "verbose_json":
            from consumer.transcribe_openai import MODELS

            profile = MODELS.get(self.transcribe_model)
            if profile and profile.response_format != "verbose_json":
                out.append(f"TRANSCRIBE_RESPONSE_FORMAT: {self.transcribe_model} replies only json "
                           "(the API refuses verbose_json); use auto")
        if self.retry_max_delay < self.retry_base_delay:
            out.append("RETRY_MAX_DELAY: must be at least RETRY_BASE_DELAY")
        return out

    def _callback_problems(self, url: str, *, prod: bool) -> list[str]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return ["WP_SIDE_CAR_CALLBACK: not an http(s) URL"]
        if parts.scheme == "http" and prod:
            return ["WP_SIDE_CAR_CALLBACK: https is required when ENVIRONMENT=prod (also to a loopback host); "
                    "use the site's https URL"]
        if parts.scheme == "http" and not (self.allow_insecure_callback or is_loopback_host(parts.hostname)):
            return ["WP_SIDE_CAR_CALLBACK: https is required (or ALLOW_INSECURE_CALLBACK=true)"]
        if parts.username or parts.password:
            return ["WP_SIDE_CAR_CALLBACK: must not carry credentials"]
        return []

    def _prod_problems(self) -> list[str]:
        out = []
        if not self.secrets:
            out.append("SIDE_CAR_SECRET: required when ENVIRONMENT=prod (jobs must be signed)")
        if self.require_signature is False:
            out.append("REQUIRE_SIGNATURE: must not be false when ENVIRONMENT=prod (unsigned jobs would be "
                       "accepted); leave it empty or set it to true")
        if self.allow_insecure_callback:
            out.append("ALLOW_INSECURE_CALLBACK: must be false when ENVIRONMENT=prod (the callback carries "
                       "WP_SERVER_TOKEN)")
        if self.transcriber is None:
            out.append("TRANSCRIBER: required when ENVIRONMENT=prod: openai or local (prod does not guess it "
                       "from whether OPENAI_API_KEY is set)")
        return out

    def intake_problems(self) -> list[str]:
        """What `sidecar intake` needs beyond what every command needs."""
        out = [p for p in self.run_problems() if p.startswith(("SQS_QUEUE_URL", "S3_BUCKET"))]
        if not self.secrets:
            out.append("SIDE_CAR_SECRET: required by `sidecar intake` (it authenticates WordPress and signs the jobs)")
        header = self.intake_secret_header
        if header and not re.fullmatch(r"[A-Za-z0-9-]+", header):
            out.append(f"INTAKE_SECRET_HEADER: {header!r} is not an HTTP header name")
        if header and header.lower() == "authorization":
            out.append("INTAKE_SECRET_HEADER: Authorization: Bearer is always accepted; name another header or none")
        return out

    def run_problems(self) -> list[str]:
        """What `sidecar run` needs beyond what every command needs."""
        out = []
        if not self.sqs_queue_url:
            out.append("SQS_QUEUE_URL: required (the job queue's URL)")
        if not self.s3_bucket:
            out.append("S3_BUCKET: required (the recordings' bucket)")
        if not self.wp_side_car_callback:
            out.append("WP_SIDE_CAR_CALLBACK: required (WordPress upload-complete URL)")
        if not self.wp_server_token:
            out.append("WP_SERVER_TOKEN: required (sent in the callback body)")
        return out


def load_settings(env_file: str | Path | None = ".env", **overrides: Any) -> Settings:
    """Build Settings from the environment (and .env), or raise ConfigError naming each variable."""
    settings, problems = load_settings_leniently(env_file, **overrides)
    if problems:
        raise ConfigError(problems)
    return settings


def load_settings_leniently(env_file: str | Path | None = ".env", **overrides: Any) -> tuple[Settings, list[str]]:
    """(settings, every problem): invalid fields are reported and left at their defaults, so the
    cross-field rules are checked in the same pass and `check` can go on with what is valid."""
    try:
        settings = Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]  # pydantic-settings kwarg
    except ValidationError as exc:
        field_problems, broken = _field_problems(exc)
    else:
        return settings, []
    defaults = {name: Settings.model_fields[name].get_default(call_default_factory=True) for name in broken}
    token = _LENIENT.set(True)
    try:
        settings = Settings(_env_file=env_file, **{**overrides, **defaults})  # type: ignore[call-arg]
    except ValidationError:  # cannot happen with defaults; report what the first pass found
        raise ConfigError(field_problems) from None
    finally:
        _LENIENT.reset(token)
    # A rule that involves a field replaced by its default would judge the default: that field's own
    # line already says what is wrong.
    named = re.compile(r"\b(" + "|".join(name.upper() for name in sorted(broken)) + r")\b") if broken else None
    return settings, field_problems + [p for p in settings.problems() if not (named and named.search(p))]


def _field_problems(exc: ValidationError) -> tuple[list[str], set[str]]:
    problems: list[str] = []
    broken: set[str] = set()
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        if not loc:
            continue  # the cross-field rules: the lenient pass asks `problems()` for them again
        if loc[0] in Settings.model_fields:
            broken.add(loc[0])
        problems.append(f"{'.'.join(loc).upper()}: {msg}")
    return problems, broken
