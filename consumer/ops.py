"""Operator commands besides the daemon: `sidecar check` (reach every dependency) and `sidecar enqueue`
(whose signing and sending, `send_job`, `sidecar intake` shares).

`check --probe` also sends `data/probe.wav` (one second of speech, 16 kHz WAV) to the configured
transcriber with exactly the request a job would send, so a model, key or format the endpoint refuses is
seen before traffic meets it (deploy.sh runs it before restarting prod). It costs a fraction of a cent.
"""

from __future__ import annotations

import json
import mimetypes
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from botocore.exceptions import BotoCoreError, ClientError

from consumer.errors import ConfigError, ConsumerError
from consumer.signing import sign
from consumer.sqs import SqsQueue

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient

    from consumer.settings import Settings
    from consumer.transcribe import Transcriber

Check = tuple[str, Callable[[], str]]
PROBE_CLIP = Path(__file__).resolve().parent / "data" / "probe.wav"


def run_checks(checks: list[Check], out: Callable[[str], None] = print) -> bool:
    """Run each check, print one line with a pass/fail mark, return True when all passed."""
    ok = True
    for name, fn in checks:
        try:
            detail = fn()
            out(f"[ ok ] {name}: {detail}")
        except (ConsumerError, ConfigError, ClientError, BotoCoreError, OSError) as exc:
            ok = False
            out(f"[FAIL] {name}: {exc}")
        except Exception as exc:  # noqa: BLE001  (a check must report, never crash the report)
            ok = False
            out(f"[FAIL] {name}: {type(exc).__name__}: {exc}")
    return ok


def dependency_checks(settings: Settings, sqs: SQSClient, s3: S3Client, *, probe: bool = False) -> list[Check]:
    """The checks `sidecar check` runs, in order (`probe`: transcribe the probe clip as a job would)."""

    def config() -> str:
        problems = settings.run_problems()
        if problems:
            raise ConfigError(problems)
        return f"environment={settings.environment}, transcriber={settings.transcriber_kind}"

    def bucket() -> str:
        s3.head_bucket(Bucket=settings.s3_bucket or "")
        return f"s3://{settings.s3_bucket} reachable"

    def queue() -> str:
        q = SqsQueue(sqs, settings.sqs_queue_url or "")
        visible, in_flight = q.counts()
        policy = q.redrive_policy()
        if not policy and not settings.sqs_dlq_url:
            raise ConfigError(["SQS_DLQ_URL: not set and the queue has no RedrivePolicy (`run` needs a DLQ)"])
        dlq = f"DLQ after {policy[1]} receives" if policy else f"no RedrivePolicy, DLQ {settings.sqs_dlq_url}"
        return f"{visible} visible, {in_flight} in flight; {dlq}"

    def transcriber() -> str:
        from consumer.transcribe import build_transcriber
        from consumer.transcribe_openai import OpenAITranscriber

        backend = build_transcriber(settings)
        if probe:
            return probe_transcriber(backend)
        if isinstance(backend, OpenAITranscriber):
            backend.client.models.list()
            return f"OpenAI reachable, model {backend.model}"
        return f"local model {backend.model} loaded"

    def callback() -> str:
        parts = urlsplit(settings.wp_side_car_callback or "")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname or "", port), timeout=5):
            pass
        return f"{parts.hostname}:{port} accepts connections"

    return [("configuration", config), ("S3 bucket", bucket), ("SQS queue", queue),
            ("transcription", transcriber), ("WordPress callback host", callback)]


def probe_transcriber(backend: Transcriber) -> str:
    """Transcribe the probe clip the way a job's part is sent; raise with the endpoint's own words if refused."""
    from consumer.transcribe import AudioPart
    from consumer.transcribe_openai import OpenAITranscriber

    part = AudioPart(PROBE_CLIP, PROBE_CLIP.name, duration=1.0)
    transcript = backend.transcribe(part, language=None, prompt=None)
    if isinstance(backend, OpenAITranscriber):
        refused = backend.refused
        if refused:  # jobs would still complete, but not as configured: say so before traffic does
            raise ConfigError([f"TRANSCRIBE_MODEL {backend.model}: the endpoint refused `{param}` (jobs would "
                               f"fall back without it): {error}" for param, error in refused.items()])
        how = f"{backend.model} ({backend.response_format})"
    else:
        how = backend.model
    if not transcript.text:
        raise ConfigError([f"{how}: transcribed 1 s of speech as empty text (is it the right model?)"])
    return f"{how} transcribed the probe clip: {transcript.text!r}"


def enqueue(settings: Settings, sqs: SQSClient, s3: S3Client, source: str, *, job_id: str | None = None,
            metadata: dict[str, Any] | None = None, language: str | None = None) -> dict[str, str]:
    """Upload a local file (when `source` is one) to S3, then sign and send a job for it."""
    if not settings.sqs_queue_url or not settings.s3_bucket:
        raise ConfigError([p for p in settings.run_problems() if p.startswith(("SQS_QUEUE_URL", "S3_BUCKET"))])
    job_id = job_id or f"job-{uuid.uuid4().hex[:16]}"
    path = Path(source)
    if path.is_file():
        key = f"{settings.s3_key_prefix or ''}{job_id}{path.suffix.lower()}"
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        s3.upload_file(str(path), settings.s3_bucket, key, ExtraArgs={"ContentType": ctype})
    else:
        key = source
    body: dict[str, Any] = {"job_id": job_id, "s3_key": key}
    if metadata is not None:
        body["metadata"] = metadata
    if language:
        body["language"] = language
    message_id = send_job(settings, sqs, body)
    return {"job_id": job_id, "s3_key": key, "message_id": message_id}


def signed_job(settings: Settings, body: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """The job's body as sent (compact JSON) and its attributes (signed by the first SIDE_CAR_SECRET, if set)."""
    raw = json.dumps(body, separators=(",", ":"))
    return raw, ({"signature": sign(raw, settings.secrets)} if settings.secrets else {})


def send_job(settings: Settings, sqs: SQSClient, body: dict[str, Any]) -> str:
    """Sign a job and put it on SQS_QUEUE_URL; its MessageId."""
    raw, attributes = signed_job(settings, body)
    return SqsQueue(sqs, settings.sqs_queue_url or "").send(raw, attributes)
