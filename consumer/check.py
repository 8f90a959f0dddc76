"""`sidecar check`: every configuration problem, then every dependency reached, one marked line each.

    [FAIL] configuration: <one line per problem, each naming its variable>   (exit 2)
    [ ok ] / [FAIL] S3 bucket, SQS queue, transcription, WordPress callback host (exit 1 on a [FAIL])
    [skip] <check>: why (a variable it needs is unset or invalid: its line is above)

The configuration is loaded leniently (settings.load_settings_leniently), so field errors and cross-field
problems come out together and the checks that do not depend on a broken variable still run.

The transcription check compares TRANSCRIBE_MODEL with the endpoint's model list when the endpoint
lists models (api.openai.com does); an endpoint that answers 404 to GET /models (faster-whisper-server,
docs/reality.md) is reported as not listing them. `check --probe` instead transcribes `data/probe.wav`
(one second of speech, 16 kHz WAV) with exactly the request a job would send, so a model, key or format
the endpoint refuses is seen before traffic meets it (deploy.sh runs it before restarting prod). It
costs a fraction of a cent.
"""

from __future__ import annotations

import difflib
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from botocore.exceptions import BotoCoreError, ClientError

from consumer.aws import explain_aws_error
from consumer.errors import ConfigError, ConsumerError
from consumer.sqs import SqsQueue

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient

    from consumer.settings import Settings
    from consumer.transcribe import Transcriber
    from consumer.transcribe_openai import OpenAITranscriber

PROBE_CLIP = Path(__file__).resolve().parent / "data" / "probe.wav"
PROBE_LANGUAGE, PROBE_PROMPT = "en", "SalesTrainer"  # the clip says "Hello, testing." in English
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
AWS = ("AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
TRANSCRIPTION = ("TRANSCRIBER", "OPENAI_API_KEY", "OPENAI_BASE_URL", "TRANSCRIBE_MODEL", "TRANSCRIBE_RESPONSE_FORMAT",
                 "OPENAI_MAX_RETRIES", "TRANSCRIBE_TIMEOUT", "WHISPER_MODEL", "WHISPER_DEVICE", "WHISPER_COMPUTE_TYPE")


@dataclass(frozen=True)
class Check:
    """One dependency check: `run` returns what it saw or raises; it is skipped while a variable in
    `requires` is unset or invalid, or one in `uses` is invalid."""

    name: str
    run: Callable[[], str]
    requires: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()

    def blocked_by(self, settings: Settings, invalid: set[str]) -> str | None:
        for var in self.requires:
            if not getattr(settings, var.lower()):
                return f"{var} is not set"
        bad = [var for var in (*self.requires, *self.uses) if var in invalid]
        return f"needs {', '.join(bad)} (see its line above)" if bad else None


def check(settings: Settings, problems: list[str], checks: list[Check],
          out: Callable[[str], None] = print) -> int:
    """Print the configuration's problems and each check's line; the exit status."""
    problems = [*problems, *settings.run_problems()]
    for problem in problems:
        out(f"[FAIL] configuration: {problem}")
    if not problems:
        out(f"[ ok ] configuration: environment={settings.environment}, transcriber={settings.transcriber_kind}")
    invalid = {p.split(":", 1)[0] for p in problems}
    ok = True
    for c in checks:
        reason = c.blocked_by(settings, invalid)
        if reason:
            out(f"[skip] {c.name}: {reason}")
            continue
        line = run_one(c)
        ok = ok and line.startswith("[ ok ]")
        out(line)
    return EXIT_CONFIG if problems else EXIT_OK if ok else EXIT_FAILED


def run_one(c: Check) -> str:
    """One check's line; a check reports, it never crashes the report."""
    try:
        return f"[ ok ] {c.name}: {c.run()}"
    except (ClientError, BotoCoreError, ConsumerError, ConfigError, OSError) as exc:
        return f"[FAIL] {c.name}: {explain_aws_error(exc) or exc}"
    except Exception as exc:  # noqa: BLE001  (the SDK's own errors, say; the line names the type)
        return f"[FAIL] {c.name}: {type(exc).__name__}: {exc}"


def dependency_checks(settings: Settings, sqs: SQSClient, s3: S3Client, *, probe: bool = False) -> list[Check]:
    """The checks `sidecar check` runs, in order (`probe`: transcribe the probe clip as a job would)."""

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
            return model_listed(backend)
        return f"local model {backend.model} loaded"

    def callback() -> str:
        parts = urlsplit(settings.wp_side_car_callback or "")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname or "", port), timeout=5):
            pass
        return f"{parts.hostname}:{port} accepts connections"

    return [Check("S3 bucket", bucket, requires=("S3_BUCKET",), uses=AWS),
            Check("SQS queue", queue, requires=("SQS_QUEUE_URL",), uses=(*AWS, "SQS_DLQ_URL")),
            Check("transcription", transcriber, uses=TRANSCRIPTION),
            Check("WordPress callback host", callback, requires=("WP_SIDE_CAR_CALLBACK",))]


def model_listed(backend: OpenAITranscriber) -> str:
    """Compare TRANSCRIBE_MODEL with the endpoint's model list, when it keeps one."""
    import openai

    where = str(backend.client.base_url).rstrip("/")
    try:
        listed = [m.id for m in backend.client.models.list()]
    except openai.NotFoundError:
        return f"{where} reachable; it does not list models (404 on /models), so {backend.model} is not checked"
    if backend.model in listed:
        return f"{where} reachable, model {backend.model} listed"
    near = difflib.get_close_matches(backend.model, listed, n=3, cutoff=0.4)
    like = [m for m in listed if "transcribe" in m or "whisper" in m][:6]
    hint = f"; did you mean {' or '.join(near)}?" if near else f"; it has e.g. {', '.join(like or listed[:6])}"
    raise ConfigError([f"TRANSCRIBE_MODEL: {backend.model} is not among the {len(listed)} models {where} lists"
                       f"{hint}"])


def probe_transcriber(backend: Transcriber) -> str:
    """Transcribe the probe clip the way a job's part is sent; raise with the endpoint's own words if refused."""
    from consumer.transcribe import AudioPart
    from consumer.transcribe_openai import OpenAITranscriber

    part = AudioPart(PROBE_CLIP, PROBE_CLIP.name, duration=1.0)
    # With the optional fields a WordPress job carries (a language from get_locale, a vocabulary prompt), so
    # a field the endpoint refuses shows here, at deploy, and not first in traffic.
    transcript = backend.transcribe(part, language=PROBE_LANGUAGE, prompt=PROBE_PROMPT)
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
