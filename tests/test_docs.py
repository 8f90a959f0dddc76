"""The runbook (docs/operations.md), README.md and .env.example against the things they describe: the
log line's keys and stream, the unit's stop timeout, the packages the runbook's commands need, and the
table that maps the old runbook's names to the new ones."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

from consumer.logs import setup_logging

ROOT = Path(__file__).resolve().parent.parent
RUNBOOK = ROOT / "docs" / "operations.md"
README = ROOT / "README.md"
ENV_EXAMPLE = ROOT / ".env.example"
UNIT = ROOT / "systemd" / "salestrainer-sidecar@.service"


def _shell_lines(text: str) -> list[str]:
    """The lines of the ```sh blocks."""
    return [ln for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL) for ln in block.splitlines()]


def _a_log_line() -> dict[str, object]:
    """One JSON line as the daemon writes it, through its own logging set-up."""
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging(stream=stream, environ={})
        logging.getLogger("consumer.worker").info("job_completed", extra={"job_id": "j-1"})
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert isinstance(line, dict)
    return line


def test_jq_filters_read_keys_the_daemon_writes() -> None:
    line = _a_log_line()
    assert line["event"] == "job_completed" and "message" not in line
    for doc in (RUNBOOK, README):
        for command in _shell_lines(doc.read_text()):
            if "journalctl" in command and "| jq" in command:
                jq_filter = command.split("| jq", 1)[1]
                assert not re.search(r"(?<!\w)message\b", jq_filter), f"{doc.name}: the key is event: {command}"
                # journalctl -u also prints systemd's plain-text lines about the unit (journalctl(1), -u);
                # jq stops at the first line that is not JSON unless it reads raw lines and skips them.
                raw = re.match(r" -\w*R\w* 'fromjson\? \| ", jq_filter)
                assert raw, f"{doc.name}: jq -R 'fromjson? | …': {command}"


def test_the_docs_say_logs_go_to_stderr() -> None:
    for doc in (RUNBOOK, README, ENV_EXAMPLE):
        text = doc.read_text()
        assert not re.search(r"stdout \(the journal\)|logs? [^.\n]*to stdout", text), f"{doc.name} says stdout"
    assert "JSON lines to stderr" in RUNBOOK.read_text()


def test_env_example_states_the_units_stop_timeout() -> None:
    unit = re.search(r"^TimeoutStopSec=(\d+)$", UNIT.read_text(), re.MULTILINE)
    assert unit
    stated = re.findall(r"TimeoutStopSec \((\d+)\)", ENV_EXAMPLE.read_text())
    assert stated == [unit[1]], stated


def test_the_install_step_installs_what_the_runbook_runs() -> None:
    text = RUNBOOK.read_text()
    installs = [ln for ln in _shell_lines(text) if "apt-get install" in ln]
    assert len(installs) == 1, installs
    packages = set(installs[0].split("install", 1)[1].split()) - {"-y"}
    commands = " ".join(_shell_lines(text))
    for tool in ("git", "make", "curl", "jq", "logrotate"):
        assert re.search(rf"(?<![\w-]){tool}\b", commands), f"the runbook no longer runs {tool}"
        assert tool in packages, f"the runbook runs {tool} but the install step does not install it"


def test_old_runbook_names_are_mapped() -> None:
    text = RUNBOOK.read_text()
    section = text.split("## Coming from the old runbook", 1)[1].split("\n## ", 1)[0]
    rows = {m[0]: m[1] for m in re.findall(r"^\| (.+?) \| (.+?) \|$", section, re.MULTILINE)}
    for old, new in {
        "`salestrainer-sidecar` (dev)": "`salestrainer-sidecar@dev`",
        "`salestrainer-sidecar-prod`": "`salestrainer-sidecar@prod`",
        "`/var/www/salestrainer-*/sidecar`": "`/opt/salestrainer-sidecar/<instance>`",
        "`POST /transcribe`": "enqueue",
        "`test-s3-flow.sh`": "`sidecar enqueue",
        "`sidecar.log`": "LOG_FILE=",
        "`curl http://127.0.0.1:9002/health`": "127.0.0.1:9003",
    }.items():
        found = [v for k, v in rows.items() if old in k]
        assert found, f"the old name {old} is not in the table"
        assert new in found[0], (old, found[0])
