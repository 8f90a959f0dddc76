"""Logging: JSON events with their fields, and no secret in any record, exception text included."""

from __future__ import annotations

import io
import json
import logging

import pytest

from consumer.logs import REDACTED, RedactingFormatter, setup_logging

SECRETS = ["sk-live-abcdef123456", 'tok"with\\quotes', "sig-secret-999"]


@pytest.fixture
def capture():
    yield io.StringIO()
    logging.getLogger().handlers.clear()


def test_json_events_carry_fields(capture):
    setup_logging(level="INFO", fmt="json", secrets=SECRETS, stream=capture)
    logging.getLogger("consumer.worker").info("job_completed", extra={"job_id": "j1", "duration_s": 1.5})
    record = json.loads(capture.getvalue())
    assert record["event"] == "job_completed" and record["job_id"] == "j1" and record["level"] == "INFO"


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_every_secret_is_redacted_everywhere(capture, fmt):
    setup_logging(level="DEBUG", fmt=fmt, secrets=SECRETS, stream=capture)
    log = logging.getLogger("consumer.test")
    log.info("called with %s", SECRETS[0], extra={"header": SECRETS[1]})
    try:
        raise RuntimeError(f"upstream said: bad key {SECRETS[0]} / {SECRETS[2]}")
    except RuntimeError:
        log.exception("job_crashed")
    out = capture.getvalue()
    for secret in SECRETS:
        assert secret not in out
        assert json.dumps(secret)[1:-1] not in out
    assert REDACTED in out and "RuntimeError" in out


def test_log_file_gets_the_same_records(tmp_path, capture):
    path = tmp_path / "logs" / "sidecar.log"
    setup_logging(level="INFO", fmt="json", log_file=path, secrets=SECRETS, stream=capture)
    logging.getLogger("consumer").warning("job_failed", extra={"error": SECRETS[2]})
    logging.shutdown()
    assert "job_failed" in path.read_text() and SECRETS[2] not in path.read_text()


def test_redacting_formatter_prefers_the_longest_match():
    formatter = RedactingFormatter(logging.Formatter("%(message)s"), ["abcd", "abcdefgh"])
    record = logging.makeLogRecord({"msg": "x abcdefgh y"})
    assert formatter.format(record) == f"x {REDACTED} y"
