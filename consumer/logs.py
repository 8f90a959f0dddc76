"""Logging set-up: JSON (or text) records with stable event names, and redaction of every secret.

Events are logged as `log.info("job_completed", extra={...})`: the message is the event name and the
ids (`job_id`, `message_id`, `receive_count`, `stage`, `duration_s`) travel as fields.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

REDACTED = "[REDACTED]"


class RedactingFormatter(logging.Formatter):
    """Wraps a formatter and blanks every secret in its final output.

    Redacting the finished text (rather than msg and args) also covers extras, exception messages and
    tracebacks, which is where a leaked key usually hides. Secrets are matched raw and JSON-escaped.
    """

    def __init__(self, inner: logging.Formatter, secrets: Iterable[str]) -> None:
        super().__init__()
        self.inner = inner
        needles = set()
        for secret in secrets:
            if secret:
                needles.add(secret)
                needles.add(json.dumps(secret)[1:-1])
        self.needles = sorted(needles, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        for needle in self.needles:
            text = text.replace(needle, REDACTED)
        return text


class TextFormatter(logging.Formatter):
    """Human-readable lines with the event's fields appended as key=value."""

    _std = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        fields = {k: v for k, v in record.__dict__.items() if k not in self._std}
        if fields:
            base += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return base


def setup_logging(
    *, level: str = "INFO", fmt: str = "json", log_file: Path | None = None, secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Configure the root logger: stderr (the journal under systemd) and optionally LOG_FILE."""
    if fmt == "json":
        inner: logging.Formatter = JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger", "message": "event"},
            timestamp=False,
        )
    else:
        inner = TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    formatter = RedactingFormatter(inner, list(secrets))
    handlers: list[logging.Handler] = [logging.StreamHandler(stream or sys.stderr)]
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level)
    # boto and the HTTP stacks are chatty at INFO/DEBUG and may echo request details.
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "httpx2", "openai", "s3transfer", "werkzeug",
                  "faster_whisper"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
