"""Logging: JSON events with their fields, no secret in any record (exception text included), and
sd-daemon priority prefixes on stderr exactly when stderr is the journal stream."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from consumer.logs import REDACTED, RedactingFormatter, setup_logging, stream_is_journal, syslog_priority

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


# ---------------------------------------------------------------- priorities for journald

# journald's reading of a stream line (systemd src/basic/syslog-util.c syslog_parse_priority, no facility):
# "<N>" with N 0-7 in one to three digits; anything else leaves the line at the unit's SyslogLevel=.
PREFIX = re.compile(r"<0{0,2}([0-7])>")


@pytest.fixture
def stderr_file(tmp_path: Path) -> Iterator[TextIO]:
    """A stream with a real file descriptor, as a service's stderr has."""
    with (tmp_path / "stderr").open("w+", encoding="utf-8") as stream:
        yield stream
    logging.getLogger().handlers.clear()


def journal_stream_of(stream: TextIO) -> str:
    """JOURNAL_STREAM as systemd sets it for this stream: device and inode in decimal (systemd.exec(5))."""
    stat = os.fstat(stream.fileno())
    return f"{stat.st_dev}:{stat.st_ino}"


def written(stream: TextIO) -> list[str]:
    logging.shutdown()
    stream.seek(0)
    return stream.read().splitlines()


def log_each_level() -> None:
    log = logging.getLogger("consumer.worker")
    log.debug("poll_empty")
    log.info("job_completed", extra={"job_id": "j1"})
    log.warning("job_failed", extra={"job_id": "j2"})
    log.error("failure_callback_rejected", extra={"job_id": "j3"})
    log.critical("worker_died")


@pytest.mark.parametrize(("levelno", "priority"), [
    (logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6), (logging.DEBUG, 7),
    (logging.ERROR + 5, 3), (logging.INFO - 1, 7), (logging.NOTSET, 7),
])
def test_syslog_priority_of_each_level(levelno, priority):
    assert syslog_priority(levelno) == priority


def test_json_lines_carry_their_priority_on_the_journal_stream(stderr_file):
    setup_logging(level="DEBUG", fmt="json", stream=stderr_file,
                  environ={"JOURNAL_STREAM": journal_stream_of(stderr_file)})
    log_each_level()
    lines = written(stderr_file)
    assert len(lines) == 5
    priorities = []
    for line in lines:
        match = PREFIX.match(line)
        assert match, line
        record = json.loads(line[match.end():])  # what journald stores: the prefix removed, one JSON object
        priorities.append((record["level"], int(match.group(1))))
    assert priorities == [("DEBUG", 7), ("INFO", 6), ("WARNING", 4), ("ERROR", 3), ("CRITICAL", 2)]


def test_a_json_traceback_stays_one_line_at_error(stderr_file):
    setup_logging(level="INFO", fmt="json", stream=stderr_file, secrets=SECRETS,
                  environ={"JOURNAL_STREAM": journal_stream_of(stderr_file)})
    try:
        raise RuntimeError(f"boom\nsecond line {SECRETS[0]}")
    except RuntimeError:
        logging.getLogger("consumer.worker").exception("job_crashed")
    [line] = written(stderr_file)
    assert line.startswith("<3>{")
    record = json.loads(line[3:])
    assert "Traceback" in record["exc_info"] and "second line" in record["exc_info"]
    assert SECRETS[0] not in line


def test_every_line_of_a_text_traceback_carries_the_prefix(stderr_file):
    """journald would store an unprefixed line at info: `journalctl -p err` must see the whole traceback."""
    setup_logging(level="INFO", fmt="text", stream=stderr_file,
                  environ={"JOURNAL_STREAM": journal_stream_of(stderr_file)})
    try:
        raise ValueError("bad\x00value\nsecond line")
    except ValueError:
        logging.getLogger("consumer.worker").exception("job_crashed")
    logging.getLogger("consumer.worker").warning("job_failed")
    lines = written(stderr_file)
    assert len(lines) > 4  # message, "Traceback …", frames, the exception's own two lines
    assert all(line.startswith("<3>") for line in lines[:-1]), lines
    assert lines[-1].startswith("<4>") and "job_failed" in lines[-1]
    assert "<3>second line" in lines and "<3>value" in lines  # a NUL ends a journald record too


@pytest.mark.parametrize("journal_stream", [
    None,  # not under systemd
    "other",  # inherited from a parent whose stderr was the journal, while ours goes elsewhere
    "0:0", "12", "a:b", "1:2:3", "",  # malformed
])
def test_no_prefix_unless_journal_stream_names_this_stream(stderr_file, tmp_path, journal_stream):
    if journal_stream == "other":
        with (tmp_path / "elsewhere").open("w") as other:
            journal_stream = journal_stream_of(other)
    environ = {} if journal_stream is None else {"JOURNAL_STREAM": journal_stream}
    assert not stream_is_journal(stderr_file, environ)
    setup_logging(level="DEBUG", fmt="json", stream=stderr_file, environ=environ)
    log_each_level()
    lines = written(stderr_file)
    assert [json.loads(line)["level"] for line in lines] == ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def test_a_stream_without_a_file_descriptor_is_not_the_journal(capture):
    assert not stream_is_journal(capture, {"JOURNAL_STREAM": "1:1"})
    setup_logging(level="INFO", fmt="json", stream=capture, environ={"JOURNAL_STREAM": "1:1"})
    logging.getLogger("consumer").error("failure_callback_rejected")
    assert json.loads(capture.getvalue())["level"] == "ERROR"


def test_journal_stream_is_read_from_the_process_environment_by_default(stderr_file, monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream_of(stderr_file))
    setup_logging(level="INFO", fmt="json", stream=stderr_file)
    logging.getLogger("consumer").error("failure_callback_rejected")
    [line] = written(stderr_file)
    assert line.startswith("<3>{")


def test_log_file_never_gets_prefixes(stderr_file, tmp_path):
    path = tmp_path / "sidecar.log"
    setup_logging(level="INFO", fmt="json", log_file=path, stream=stderr_file,
                  environ={"JOURNAL_STREAM": journal_stream_of(stderr_file)})
    logging.getLogger("consumer").error("failure_callback_rejected", extra={"job_id": "j3"})
    [line] = written(stderr_file)
    assert line.startswith("<3>")
    [in_file] = path.read_text().splitlines()
    assert json.loads(in_file) == json.loads(line[3:])


def test_a_commands_one_line_answer_reaches_journald_at_its_priority(stderr_file, tmp_path):
    """`configuration error: …` from main() must show in `journalctl -p err`; elsewhere it stays plain."""
    from consumer.logs import say

    say("configuration error: A\nsecond line", stream=stderr_file,
        environ={"JOURNAL_STREAM": journal_stream_of(stderr_file)})
    say("redrove 2 message(s)", level=logging.INFO, stream=stderr_file,
        environ={"JOURNAL_STREAM": journal_stream_of(stderr_file)})
    plain = (tmp_path / "plain").open("w+")
    say("configuration error: B", stream=plain, environ={"JOURNAL_STREAM": journal_stream_of(stderr_file)})
    assert written(stderr_file) == ["<3>configuration error: A", "<3>second line", "<6>redrove 2 message(s)"]
    assert written(plain) == ["configuration error: B"]
