"""Logging set-up: JSON (or text) records with stable event names, redaction of every secret, and
syslog priorities for journald.

Events are logged as `log.info("job_completed", extra={...})`: the message is the event name and the
ids (`job_id`, `message_id`, `receive_count`, `stage`, `duration_s`) travel as fields.

Under systemd stderr is a stream to journald, which gives every line the unit's `SyslogLevel=` (info)
unless the line starts with an sd-daemon priority prefix such as `<3>` (systemd.exec(5) `SyslogLevel=`,
`SyslogLevelPrefix=`; sd-daemon(3)). So when stderr really is that stream, each line carries its
record's prefix and `journalctl -p err` finds the errors; journald removes the prefix, so the stored
message is the plain JSON object. LOG_FILE never gets prefixes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
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


# Python level -> syslog priority, the N of sd-daemon(3)'s "<N>" (SD_CRIT "<2>", SD_ERR "<3>", SD_WARNING "<4>",
# SD_INFO "<6>", SD_DEBUG "<7>"); a level between two of these gets the lower one's priority.
SYSLOG_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
SYSLOG_DEBUG = 7

# journald ends a record at a newline and at NUL (journald.conf(5) `LineMax=`).
_JOURNAL_LINE_BREAK = re.compile("[\n\x00]")


def syslog_priority(levelno: int) -> int:
    """The syslog priority (0 most urgent .. 7 debug) of a Python log level."""
    return next((priority for level, priority in SYSLOG_PRIORITIES if levelno >= level), SYSLOG_DEBUG)


def stream_is_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Whether `stream` is the journal stream that systemd names in JOURNAL_STREAM ("<device>:<inode>").

    systemd.exec(5) `$JOURNAL_STREAM`: compare the stream's device and inode with the variable; that it
    is set is not enough, because a process started from a service inherits it while its stderr may
    have been redirected elsewhere (a pipe, a file, a test's capture).
    """
    try:
        device, inode = (int(part) for part in environ.get("JOURNAL_STREAM", "").split(":"))
        stat = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):  # unset or malformed; a stream without a file descriptor
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


class JournalPriorityFormatter(logging.Formatter):
    """Wraps a formatter and starts every line of its output with the record's `<N>` priority prefix.

    journald takes each line's priority from that line's own prefix, so a multi-line record (a text
    traceback) gets the prefix on every line; otherwise its later lines would be stored at info. A JSON
    record is one line already (json escapes newlines).
    """

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in _JOURNAL_LINE_BREAK.split(self.inner.format(record)))


def say(text: str, *, level: int = logging.ERROR, stream: TextIO | None = None,
        environ: Mapping[str, str] | None = None) -> None:
    """Print an operator's line to stderr (a command's one-line answer), with its `<N>` priority on every
    line when stderr is the journal stream: a service that exits with `configuration error: …` must show it
    in `journalctl -p err`, not at info."""
    out = stream or sys.stderr
    if stream_is_journal(out, os.environ if environ is None else environ):
        text = "\n".join(f"<{syslog_priority(level)}>{line}" for line in _JOURNAL_LINE_BREAK.split(text))
    print(text, file=out, flush=True)


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
    stream: TextIO | None = None, environ: Mapping[str, str] | None = None,
) -> None:
    """Configure the root logger: stderr (the journal under systemd) and optionally LOG_FILE.

    `environ` (default: os.environ) is where JOURNAL_STREAM is looked up.
    """
    if fmt == "json":
        inner: logging.Formatter = JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger", "message": "event"},
            timestamp=False,
        )
    else:
        inner = TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    formatter = RedactingFormatter(inner, list(secrets))
    out = stream or sys.stderr
    console = logging.StreamHandler(out)
    journal = stream_is_journal(out, os.environ if environ is None else environ)
    console.setFormatter(JournalPriorityFormatter(formatter) if journal else formatter)
    handlers: list[logging.Handler] = [console]
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(formatter)
        handlers.append(file_handler)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    # boto and the HTTP stacks are chatty at INFO/DEBUG and may echo request details.
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "httpx2", "openai", "s3transfer", "werkzeug",
                  "faster_whisper"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
