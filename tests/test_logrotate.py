"""systemd/salestrainer-sidecar.logrotate: `logrotate -d` accepts it, it matches the LOG_FILE the docs
name and works as the unit's user, and a real rotation leaves the daemon's open log file writing on.

The rotation runs logrotate for real on the shipped file, with only the directory and the `su` user
changed to ones the test owns, while a process set up with the daemon's own logging keeps LOG_FILE open.
"""

from __future__ import annotations

import fnmatch
import grp
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

from tests.stack import require_tool, wait_for

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "systemd" / "salestrainer-sidecar.logrotate"
UNIT = ROOT / "systemd" / "salestrainer-sidecar@.service"
LOG_DIR = "/var/log/salestrainer-sidecar"
# The LOG_FILE the runbook and .env.example give as the example.
DOCUMENTED_LOG_FILE = "/var/log/salestrainer-sidecar/prod/sidecar.log"

# Logs each line read from stdin as one event, through the daemon's own logging set-up (LOG_FILE).
WRITER = """
import logging, sys
from pathlib import Path
from consumer.logs import setup_logging
setup_logging(log_file=Path(sys.argv[1]), stream=open("/dev/null", "w"))
log = logging.getLogger("consumer.test")
for line in sys.stdin:
    log.info("test_line", extra={"n": int(line)})
"""


def _logrotate() -> str:
    return require_tool("logrotate", "scripts/install-system-deps.sh installs the logrotate package")


def _directives() -> tuple[str, list[str]]:
    """The file's one path pattern and the directives of its block."""
    lines = [ln.strip() for ln in CONFIG.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert lines[0].endswith("{") and lines[-1] == "}", lines
    return lines[0].removesuffix("{").strip(), lines[1:-1]


def _config_for(tmp_path: Path) -> Path:
    """The shipped file, its directory moved under tmp_path and `su` set to the user running the test."""
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    text = CONFIG.read_text()
    assert f"{LOG_DIR}/" in text and "su salestrainer www-data" in text
    text = text.replace(f"{LOG_DIR}/", f"{tmp_path / 'log'}/").replace("su salestrainer www-data", f"su {user} {group}")
    config = tmp_path / "salestrainer-sidecar"
    config.write_text(text)
    config.chmod(0o644)  # logrotate ignores a config file others may write
    return config


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_logrotate(), *args], capture_output=True, text=True, timeout=60, check=False)


def test_the_pattern_covers_the_documented_log_file_and_not_the_rotated_ones() -> None:
    pattern, _ = _directives()
    assert fnmatch.fnmatch(DOCUMENTED_LOG_FILE, pattern), pattern
    assert fnmatch.fnmatch("/var/log/salestrainer-sidecar/dev/sidecar.log", pattern), pattern
    for rotated in ("sidecar.log.1", "sidecar.log.2.gz"):
        assert not fnmatch.fnmatch(f"/var/log/salestrainer-sidecar/prod/{rotated}", pattern), rotated


def test_rotates_as_the_units_user_with_copytruncate() -> None:
    """The daemon never reopens LOG_FILE, so only copytruncate keeps it writing into the live file."""
    _, directives = _directives()
    unit = {k: v for k, _, v in (ln.partition("=") for ln in UNIT.read_text().splitlines() if "=" in ln)}
    assert f"su {unit['User']} {unit['Group']}" in directives, directives
    assert "copytruncate" in directives
    assert "create" not in " ".join(directives).split()  # create would swap the inode under the daemon


def test_debug_run_accepts_the_file(tmp_path: Path) -> None:
    config = _config_for(tmp_path)
    (tmp_path / "log" / "prod").mkdir(parents=True)
    (tmp_path / "log" / "prod" / "sidecar.log").write_text("{}\n")
    # -f: a first run only records the file in the state; forced, -d shows what a rotation would do.
    proc = _run("-d", "-f", "-s", str(tmp_path / "state"), str(config))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "error" not in output.lower(), output
    assert f"considering log {tmp_path / 'log' / 'prod' / 'sidecar.log'}" in output, output
    assert "copying" in output and "truncating" in output, output


def test_debug_run_reports_a_broken_file(tmp_path: Path) -> None:
    """The check above can fail: logrotate -d exits non-zero on a directive it cannot honour."""
    config = _config_for(tmp_path)
    config.write_text(config.read_text().replace("copytruncate", "copytruncate\n    rotate fourteen"))
    proc = _run("-d", "-s", str(tmp_path / "state"), str(config))
    assert proc.returncode != 0, proc.stdout + proc.stderr


def test_rotation_keeps_the_running_writer_on_the_live_file(tmp_path: Path) -> None:
    config = _config_for(tmp_path)
    log_file = tmp_path / "log" / "prod" / "sidecar.log"
    log_file.parent.mkdir(parents=True)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(log_file)], stdin=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert writer.stdin is not None
    try:
        for n in (1, 2):
            writer.stdin.write(f"{n}\n")
        writer.stdin.flush()
        wait_for(lambda: log_file.exists() and len(log_file.read_text().splitlines()) == 2, timeout=30,
                 what="two lines in LOG_FILE")

        proc = _run("-f", "-s", str(tmp_path / "state"), str(config))
        assert proc.returncode == 0, proc.stdout + proc.stderr

        writer.stdin.write("3\n")
        writer.stdin.flush()
        wait_for(lambda: log_file.stat().st_size > 0, timeout=30, what="a line after the rotation")
    finally:
        writer.stdin.close()
        writer.wait(timeout=30)

    rotated = log_file.with_name("sidecar.log.1")  # delaycompress: the newest rotation stays plain
    assert [json.loads(line)["n"] for line in rotated.read_text().splitlines()] == [1, 2]
    live = log_file.read_bytes()
    assert b"\0" not in live, "the writer kept its old offset: the truncated file became sparse"
    assert [json.loads(line)["n"] for line in live.decode().splitlines()] == [3]
    assert json.loads(live.decode().splitlines()[0])["event"] == "test_line"
