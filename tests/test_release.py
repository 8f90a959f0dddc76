"""scripts/release.sh, deploy.sh and rollback.sh as subprocesses, against a temporary bare `origin`, its
clones, stand-in `systemctl`/`journalctl` on PATH and a stand-in /health server on a loopback port.
The stand-in systemctl runs a release's service (for some tests the real daemon) with its output on a
journal stream, stamped as it arrives; the stand-in journalctl reads that stream's priorities the way
journald does and selects records by time (--since) as journalctl does."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import send_job, stack_env
from tests.stack.aws import AwsStack
from tests.stack.openai_stub import OpenAIStub
from tests.stack.wordpress import WordPressStub

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
UNIT = "salestrainer-sidecar@prod"

if shutil.which("git") is None:  # pragma: no cover - git is part of every checkout's toolbox
    pytest.skip("git is not installed", allow_module_level=True)

SYSTEMCTL = """#!/usr/bin/env bash
# Stand-in for systemctl: logs the call. `start` (and `restart`) records what the checkout runs now and,
# when the test gave that release a service ($STUB_STATE/exec-<tag>, a bash script), runs it the way the
# unit does with StandardOutput=journal and StandardError=journal: stdout and stderr share one stream to
# journald, and JOURNAL_STREAM holds that stream's device and inode in decimal, "<dev>:<ino>"
# (systemd.exec(5), $JOURNAL_STREAM). Here the stream is a pipe to a reader standing in for journald: it
# keeps the raw lines ($STUB_STATE/journal-<tag>) and appends each to the unit's journal ($STUB_STATE/
# journal) stamped with its time of arrival in microseconds, as journald stamps a record when it reads it
# (sd_journal_get_realtime_usec(3)); bash's EPOCHREALTIME has that resolution.
# A Type=notify start returns at READY=1; this one returns when the service ends, so all it logged is in
# the journal before deploy.sh reads it. A service that exits non-zero is a start that failed, as in
# systemd 252 (Debian 12): systemd logs "Main process exited, code=exited, status=N/FAILURE" at notice
# (src/core/service.c service_sigchld_event), "Failed with result 'exit-code'." at warning
# (service_enter_dead) and "Failed to start <unit> - <Description>." at err (src/core/job.c
# job_done_messages[JOB_FAILED] = LOG_ERR), stored here with those priorities as "<N>" prefixes; the
# start job fails, so systemctl prints "Job for … failed because the control process exited with error
# code." and exits 1. Restart=on-failure then holds the unit in auto-restart: is-active says
# "activating", exit 3; exit status 2 is RestartPreventExitStatus=, so "failed" (systemctl(1) is-active).
# `stop` stops nothing: every service here has already ended.
echo "systemctl $*" >> "$STUB_STATE/calls"
journal=$STUB_STATE/journal

systemd_says() { printf '%s\\t%s\\n' "$EPOCHREALTIME" "$1" >> "$journal"; }

start() {
  local unit=$1 running service stream status
  running=$(git -C "$STUB_CHECKOUT" describe --tags)
  printf '%s\\n' "$running" > "$STUB_STATE/running"
  rm -f "$STUB_STATE/state"
  service=$STUB_STATE/exec-$running
  [[ -f $service ]] || return 0
  stream=$STUB_STATE/journal-$running
  : > "$stream"
  bash -c 'export JOURNAL_STREAM=$(stat -L -c %d:%i /proc/$$/fd/1); exec bash "$1" </dev/null 2>&1' _ "$service" |
    while IFS= read -r line || [[ -n $line ]]; do
      printf '%s\\n' "$line" >> "$stream"
      printf '%s\\t%s\\n' "$EPOCHREALTIME" "$line" >> "$journal"
    done
  status=${PIPESTATUS[0]}
  ((status == 0)) && return 0
  systemd_says "<5>$unit.service: Main process exited, code=exited, status=$status/FAILURE"
  systemd_says "<4>$unit.service: Failed with result 'exit-code'."
  systemd_says "<3>Failed to start $unit.service - SalesTrainer sidecar SQS consumer (${unit#*@})."
  if ((status == 2)); then echo failed; else echo activating; fi > "$STUB_STATE/state"
  echo "Job for $unit.service failed because the control process exited with error code." >&2
  echo "See \\"systemctl status $unit.service\\" and \\"journalctl -xeu $unit.service\\" for details." >&2
  return 1
}

case $1 in
  start | restart) start "$2" || exit 1 ;;
  stop) ;;
  is-active)
    state=$(cat "$STUB_STATE/state" 2>/dev/null || echo active)
    echo "$state"
    [[ $state == active ]] || exit 3
    ;;
esac
"""

JOURNALCTL = """#!/usr/bin/env bash
# Stand-in for journalctl: logs the call; prints the messages of the unit's journal ($STUB_STATE/journal,
# "<usec time><TAB><line>" per record, see the systemctl stand-in), one unit's records in arrival order,
# reading each line's priority the way journald reads a stream:
#  - A line's priority is its sd-daemon prefix "<N>", which is removed (systemd.exec(5) SyslogLevelPrefix=,
#    default true; sd-daemon(3)). journald's parser takes N in one to three digits with value 0-7, so
#    "<3>", "<03>" and "<003>" are err and "<8>" or "<13>" is no prefix (systemd src/basic/syslog-util.c
#    syslog_parse_priority(), called without facility by src/journal/journald-stream.c).
#  - A line without a prefix gets the unit's SyslogLevel=, default info (6) (systemd.exec(5) SyslogLevel=;
#    the unit does not set it). An empty message is not stored (journald-stream.c).
#  - -p/--priority takes a level, emerg (0) .. debug (7) or its number, and shows records at that level or
#    more important; or a range FROM..TO, both ends included, in either order (journalctl(1) --priority=;
#    src/journal/journalctl.c). Anything else: "Unknown log level", status 1.
#  - -S/--since @SECONDS[.FRACTION] shows records stamped at or after it; the fraction counts to the
#    microsecond, further digits are ignored (journalctl(1) --since; systemd.time(7) "@" timestamps;
#    src/basic/time-util.c parse_sec; the fraction is observed accepted by journalctl 252, docs/reality.md).
#    Other forms are not modelled: "Failed to parse timestamp", status 1, as journalctl says for a bad one.
#  - -n/--lines N shows the last N of the records selected.
# Not modelled: -o (the message alone is printed), -u (one unit), journald's LineMax= splitting.
echo "journalctl $*" >> "$STUB_STATE/calls"

level() {
  case $1 in
    emerg) echo 0 ;; alert) echo 1 ;; crit) echo 2 ;; err) echo 3 ;;
    warning) echo 4 ;; notice) echo 5 ;; info) echo 6 ;; debug) echo 7 ;;
    *) [[ $1 =~ ^[0-9]+$ ]] && ((10#$1 <= 7)) && echo $((10#$1)) ;;
  esac
}

low=0 high=7 since=0 lines=""
while (($#)); do
  case $1 in
    -p | --priority) spec=$2; shift ;;
    -p?*) spec=${1#-p} ;;
    --priority=*) spec=${1#--priority=} ;;
    -S | --since) since_spec=$2; shift ;;
    --since=*) since_spec=${1#--since=} ;;
    -n | --lines) lines=$2; shift ;;
    --lines=*) lines=${1#--lines=} ;;
  esac
  shift
done
if [[ -n ${spec+set} ]]; then
  if [[ $spec == *..* ]]; then
    from=$(level "${spec%%..*}") && to=$(level "${spec#*..}") ||
      { echo "Failed to parse log level range $spec" >&2; exit 1; }
    if ((from < to)); then low=$from high=$to; else low=$to high=$from; fi
  else
    high=$(level "$spec") || { echo "Unknown log level $spec" >&2; exit 1; }
  fi
fi
if [[ -n ${since_spec+set} ]]; then
  [[ $since_spec =~ ^@([0-9]+)(\\.([0-9]*))?$ ]] || { echo "Failed to parse timestamp: $since_spec" >&2; exit 1; }
  fraction=${BASH_REMATCH[3]}000000
  since=$((10#${BASH_REMATCH[1]} * 1000000 + 10#${fraction:0:6}))
fi

[[ -f $STUB_STATE/journal ]] || exit 0
prefix='^<0{0,2}([0-7])>(.*)$'
shown=()
while IFS=$'\\t' read -r stamp line || [[ -n $stamp ]]; do
  usec=${stamp//[.,]/}  # EPOCHREALTIME writes the locale's decimal point
  ((10#$usec >= since)) || continue
  priority=6 message=$line
  if [[ $line =~ $prefix ]]; then
    priority=${BASH_REMATCH[1]} message=${BASH_REMATCH[2]}
  fi
  [[ -n $message ]] && ((low <= priority && priority <= high)) && shown+=("$message")
done < "$STUB_STATE/journal"
if [[ -n $lines ]] && ((${#shown[@]} > lines)); then
  shown=("${shown[@]: -lines}")
fi
((${#shown[@]} == 0)) || printf '%s\\n' "${shown[@]}"
exit 0
"""


def git(cwd: Path, *args: str, env: dict[str, str]) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30, check=True)
    return proc.stdout.strip()


def commit(repo: Path, message: str, env: dict[str, str]) -> str:
    with (repo / "CHANGES").open("a") as changes:
        changes.write(message + "\n")
    git(repo, "add", "CHANGES", env=env)
    git(repo, "commit", "-q", "-m", message, env=env)
    return git(repo, "rev-parse", "HEAD", env=env)


def run_script(
    name: str, *args: str, cwd: Path, env: dict[str, str], answers: str = ""
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["bash", str(SCRIPTS / name), *args],
        cwd=cwd,
        env=env,
        input=answers,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    print(proc.stdout, proc.stderr, sep="\n")
    return proc


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A git identity and config of its own; stand-ins first on PATH."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text(
        "[user]\n\tname = Release Test\n\temail = release@example.invalid\n"
        "[init]\n\tdefaultBranch = main\n[advice]\n\tdetachedHead = false\n"
    )
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in {"systemctl": SYSTEMCTL, "journalctl": JOURNALCTL}.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    keep = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TMPDIR", "TZ")}
    return {
        **keep,
        "HOME": str(home),
        "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}",
        "GIT_CONFIG_NOSYSTEM": "1",
        "STUB_STATE": str(state),
    }


@pytest.fixture
def origin(tmp_path: Path, env: dict[str, str]) -> Path:
    path = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", str(path), env=env)
    return path


@pytest.fixture
def work(tmp_path: Path, origin: Path, env: dict[str, str]) -> Path:
    """A workstation clone with one pushed commit on main."""
    path = tmp_path / "work"
    git(tmp_path, "clone", "-q", str(origin), str(path), env=env)
    commit(path, "initial", env)
    git(path, "push", "-q", "origin", "main", env=env)
    return path


def remote_tags(origin: Path, env: dict[str, str]) -> list[str]:
    out = git(origin, "for-each-ref", "--format=%(refname:short)", "refs/tags", env=env)
    return out.split()


# ---------------------------------------------------------------- release.sh


def test_help(work: Path, env: dict[str, str]) -> None:
    for script in ("release.sh", "deploy.sh", "rollback.sh"):
        proc = run_script(script, "--help", cwd=work, env=env)
        assert proc.returncode == 0
        assert "Usage:" in proc.stdout


def test_next_tag_increments_numerically_and_rolls_over(
    tmp_path: Path, origin: Path, work: Path, env: dict[str, str]
) -> None:
    for tag in ("prod-2025-01-01-3", "prod-2025-01-02-1", "prod-2025-01-02-2", "prod-2025-01-02-9"):
        git(work, "tag", tag, env=env)
    git(work, "push", "-q", "origin", "--tags", env=env)
    # Someone else released -10 from another clone: it is only on origin, release.sh must fetch it.
    other = tmp_path / "other"
    git(tmp_path, "clone", "-q", str(origin), str(other), env=env)
    git(other, "tag", "prod-2025-01-02-10", env=env)
    git(other, "push", "-q", "origin", "prod-2025-01-02-10", env=env)
    commit(work, "feature: something new", env)
    git(work, "push", "-q", "origin", "main", env=env)

    proc = run_script("release.sh", "--dry-run", cwd=work, env={**env, "RELEASE_DATE": "2025-01-02"})
    assert proc.returncode == 0
    assert "Next tag: prod-2025-01-02-11" in proc.stderr
    assert "Commits since prod-2025-01-02-10:" in proc.stderr
    assert "feature: something new" in proc.stderr

    proc = run_script("release.sh", "--dry-run", cwd=work, env={**env, "RELEASE_DATE": "2025-01-03"})
    assert proc.returncode == 0
    assert "Next tag: prod-2025-01-03-1" in proc.stderr
    assert "prod-2025-01-02-11" not in remote_tags(origin, env)


def test_release_tags_and_pushes(origin: Path, work: Path, env: dict[str, str]) -> None:
    day1 = {**env, "RELEASE_DATE": "2025-03-04"}
    proc = run_script("release.sh", "--yes", cwd=work, env=day1)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "prod-2025-03-04-1"
    assert "prod-2025-03-04-1" in remote_tags(origin, env)
    assert git(origin, "cat-file", "-t", "prod-2025-03-04-1", env=env) == "tag"  # annotated
    assert git(origin, "rev-parse", "prod-2025-03-04-1^{commit}", env=env) == git(work, "rev-parse", "HEAD", env=env)

    # HEAD is released already: a second release of the same commit is refused.
    assert run_script("release.sh", "--yes", cwd=work, env=day1).returncode == 1

    commit(work, "fix: second release of the day", env)
    git(work, "push", "-q", "origin", "main", env=env)
    proc = run_script("release.sh", "--yes", cwd=work, env=day1)
    assert proc.stdout.strip() == "prod-2025-03-04-2"
    assert "fix: second release of the day" in proc.stderr

    commit(work, "feat: next day", env)
    git(work, "push", "-q", "origin", "main", env=env)
    proc = run_script("release.sh", "--yes", cwd=work, env={**env, "RELEASE_DATE": "2025-03-05"})
    assert proc.stdout.strip() == "prod-2025-03-05-1"
    assert set(remote_tags(origin, env)) == {"prod-2025-03-04-1", "prod-2025-03-04-2", "prod-2025-03-05-1"}


def test_release_asks_and_n_aborts(origin: Path, work: Path, env: dict[str, str]) -> None:
    day = {**env, "RELEASE_DATE": "2025-03-04"}
    proc = run_script("release.sh", cwd=work, env=day, answers="n\n")
    assert proc.returncode == 1
    assert "[y/N]" in proc.stderr
    assert "aborted" in proc.stderr
    assert remote_tags(origin, env) == []
    assert git(work, "tag", "--list", env=env) == ""

    proc = run_script("release.sh", cwd=work, env=day, answers="y\n")
    assert proc.returncode == 0
    assert remote_tags(origin, env) == ["prod-2025-03-04-1"]


def test_release_refuses_unless_on_main_clean_and_level_with_origin(
    tmp_path: Path, origin: Path, work: Path, env: dict[str, str]
) -> None:
    day = {**env, "RELEASE_DATE": "2025-03-04"}

    def refused(reason: str, *args: str) -> None:
        for extra in ((), ("--dry-run",)):
            proc = run_script("release.sh", "--yes", *extra, *args, cwd=work, env=day)
            assert proc.returncode == 1, proc.stderr
            assert f"error: {reason}" in proc.stderr
            assert "--force-from-here overrides" in proc.stderr
        assert remote_tags(origin, env) == [] and git(work, "tag", "--list", env=env) == ""

    # Another branch, even one level with main.
    git(work, "switch", "-q", "-c", "feature", env=env)
    refused("HEAD is on the branch feature, not the branch main")
    git(work, "switch", "-q", "--detach", "main", env=env)
    refused("HEAD is detached, not the branch main")
    git(work, "switch", "-q", "main", env=env)
    # Uncommitted changes to a tracked file (an untracked file is not part of any commit: no refusal).
    (work / "CHANGES").write_text("edited\n")
    refused("uncommitted changes to tracked files")
    git(work, "checkout", "-q", "--", "CHANGES", env=env)
    # A commit not pushed.
    commit(work, "local only", env)
    refused("1 commit(s) on HEAD are not on origin/main")
    git(work, "push", "-q", "origin", "main", env=env)
    # A commit pushed from another clone and not pulled here: release.sh fetches main to see it.
    other = tmp_path / "other"
    git(tmp_path, "clone", "-q", str(origin), str(other), env=env)
    commit(other, "someone else's", env)
    git(other, "push", "-q", "origin", "main", env=env)
    refused("1 commit(s) on origin/main are not on HEAD: git pull --ff-only")

    git(work, "pull", "-q", "--ff-only", env=env)
    (work / "untracked.txt").write_text("not in the release\n")
    proc = run_script("release.sh", "--yes", cwd=work, env=day)
    assert proc.returncode == 0, proc.stderr
    assert remote_tags(origin, env) == ["prod-2025-03-04-1"]


def test_release_force_from_here_releases_a_branch_and_says_so_in_the_tag(
    origin: Path, work: Path, env: dict[str, str]
) -> None:
    git(work, "switch", "-q", "-c", "hotfix", env=env)
    hotfix = commit(work, "fix: emergency", env)
    proc = run_script("release.sh", "--yes", "--force-from-here", cwd=work, env={**env, "RELEASE_DATE": "2025-03-04"})
    assert proc.returncode == 0, proc.stderr
    assert "warning: HEAD is on the branch hotfix, not the branch main" in proc.stderr
    assert "warning: releasing from here anyway (--force-from-here)" in proc.stderr
    assert git(origin, "rev-parse", "prod-2025-03-04-1^{commit}", env=env) == hotfix
    message = git(origin, "tag", "--list", "--format=%(contents:subject)", "prod-2025-03-04-1", env=env)
    assert message == ("Release prod-2025-03-04-1 (--force-from-here: HEAD is on the branch hotfix, not the branch "
                       "main: git switch main; 1 commit(s) on HEAD are not on origin/main: push them (through review) "
                       "first)")
    assert "--force-from-here" in run_script("release.sh", "--help", cwd=work, env=env).stdout


# ---------------------------------------------------------------- deploy.sh and rollback.sh


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        host: Host = self.server.host  # type: ignore[attr-defined]
        host.health_requests += 1
        running_file = host.state / "running"
        running = running_file.read_text().strip() if running_file.exists() else ""
        status = 503 if running in host.unhealthy else 200
        body = b'{"status": "ok"}' if status == 200 else b'{"status": "stalled"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Host:
    checkout: Path
    state: Path
    env: dict[str, str]
    unhealthy: set[str] = field(default_factory=set)
    health_requests: int = 0

    def head(self) -> str:
        return git(self.checkout, "describe", "--tags", env=self.env)

    def calls(self) -> list[str]:
        path = self.state / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def restarts(self) -> int:
        """How many times a release was started (deploy.sh stops, then starts)."""
        return sum(c in (f"systemctl start {UNIT}", f"systemctl restart {UNIT}") for c in self.calls())

    def journal(self) -> list[tuple[int, str]]:
        """The unit's journal as the stand-in journald stored it: (microseconds since the epoch, raw line)."""
        path = self.state / "journal"
        records = [line.split("\t", 1) for line in path.read_text().splitlines()] if path.exists() else []
        return [(int(stamp.replace(".", "")), line) for stamp, line in records]

    def history(self) -> list[list[str]]:
        """The checkout's deploy history: [event, name, commit, detail] per line, comments left out."""
        path = self.checkout / ".git" / "sidecar-deploys"
        lines = path.read_text().splitlines() if path.exists() else []
        return [line.split("\t")[1:] for line in lines if not line.startswith("#")]

    def service(self, tag: str, script: str) -> None:
        """What release `tag` runs when the stand-in systemctl (re)starts it: a bash script."""
        (self.state / f"exec-{tag}").write_text(script)

    def journal_stream(self, tag: str) -> list[str]:
        """The raw lines release `tag`'s service wrote to its journal stream, prefixes included."""
        return (self.state / f"journal-{tag}").read_text().splitlines()

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        """A command (a stand-in, found first on PATH) as deploy.sh would run it, in the checkout."""
        return subprocess.run(list(command), cwd=self.checkout, env=self.env, capture_output=True, text=True,
                              timeout=90, check=False)


TAGS = {"A": "prod-2025-01-01-1", "B": "prod-2025-01-02-9", "C": "prod-2025-01-02-10"}


@pytest.fixture
def host(tmp_path: Path, origin: Path, work: Path, env: dict[str, str]) -> Iterator[Host]:
    """Three releases on origin (A, B, C in tag order); the prod checkout runs A; /health on a free port."""
    for name, tag in TAGS.items():
        commit(work, f"change {name}", env)
        git(work, "tag", "-a", tag, "-m", f"Release {tag}", env=env)
    git(work, "push", "-q", "origin", "main", "--tags", env=env)

    checkout = tmp_path / "opt" / "prod"
    git(tmp_path, "clone", "-q", str(origin), str(checkout), env=env)
    git(checkout, "checkout", "-q", "--detach", TAGS["A"], env=env)
    state = Path(env["STUB_STATE"])
    (state / "running").write_text(TAGS["A"] + "\n")

    host = Host(checkout=checkout, state=state, env={})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    server.host = host  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "prod.env").write_text(
        f"# test instance\nENVIRONMENT=prod\nMETRICS_HOST=127.0.0.1\nMETRICS_PORT={server.server_port}\n"
    )
    host.env = {
        **env,
        "STUB_CHECKOUT": str(checkout),
        "DEPLOY_ENV_DIR": str(etc),
        "DEPLOY_SUDO": "",
        "DEPLOY_HEALTH_TIMEOUT": "3",
        "DEPLOY_INSTALL_CMD": 'echo "install $(git describe --tags)" >> "$STUB_STATE/calls"',
        "DEPLOY_PROBE_CMD": 'echo "probe $(git describe --tags) $ENV_FILE" >> "$STUB_STATE/calls"',
    }
    try:
        yield host
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def deploy(host: Host, *args: str, answers: str = "") -> subprocess.CompletedProcess[str]:
    return run_script("deploy.sh", *args, "--dir", str(host.checkout), cwd=host.checkout, env=host.env, answers=answers)


def test_deploy_happy_path(host: Host) -> None:
    proc = deploy(host, TAGS["C"], "--yes")
    assert proc.returncode == 0, proc.stderr
    assert git(host.checkout, "rev-parse", "--abbrev-ref", "HEAD", env=host.env) == "HEAD"  # detached
    assert host.head() == TAGS["C"]
    calls = host.calls()
    assert f"install {TAGS['C']}" in calls
    # Stopped, then started; is-active asked; the journal read from a fractional second on.
    stop, start = calls.index(f"systemctl stop {UNIT}"), calls.index(f"systemctl start {UNIT}")
    assert stop + 1 == start and f"systemctl restart {UNIT}" not in calls
    assert f"systemctl is-active {UNIT}" in calls
    [journal] = [c for c in calls if c.startswith(f"journalctl -u {UNIT} --since @") and "-p err" in c]
    assert re.search(r"--since @\d+\.\d{9} ", journal)
    # The new release is probed with the instance's env file before it is restarted.
    probe = calls.index(f"probe {TAGS['C']} {host.env['DEPLOY_ENV_DIR']}/prod.env")
    assert calls.index(f"install {TAGS['C']}") < probe < stop
    assert host.health_requests >= 1
    assert proc.stderr.count("Does this look correct? [y/N] y (--yes)") == 5
    # The plan showed what the deploy adds; the history says A was found running and C verified.
    assert "Commits being added:" in proc.stderr and "change C" in proc.stderr
    assert "Commits being removed:" not in proc.stderr
    commit_a, commit_c = (git(host.checkout, "rev-parse", f"{TAGS[t]}^{{commit}}", env=host.env) for t in "AC")
    assert host.history() == [
        ["found", TAGS["A"], commit_a, "at HEAD before this deploy"],
        ["deploy", TAGS["C"], commit_c, f"from {commit_a}"],
        ["verified", TAGS["C"], commit_c, ""],
    ]


def test_deploy_checkpoints_ask_each_time(host: Host) -> None:
    proc = deploy(host, TAGS["B"], answers="y\n" * 6)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("Does this look correct? [y/N]") == 5
    assert host.head() == TAGS["B"]


def test_deploy_n_at_the_first_prompt_changes_nothing(host: Host) -> None:
    proc = deploy(host, TAGS["C"], answers="n\n")
    assert proc.returncode == 1
    assert "aborted" in proc.stderr
    assert host.head() == TAGS["A"]
    assert host.restarts() == 0


@pytest.mark.parametrize("tag", ["v1.2.0", "main", "prod-2025-13-01-1", "prod-2025-01-02", "prod-2025-01-02-0"])
def test_deploy_refuses_a_non_prod_tag(host: Host, tag: str) -> None:
    if tag != "main":  # main is a branch; the others exist as tags, so only the name check stops them
        git(host.checkout, "tag", tag, env=host.env)
    proc = deploy(host, tag, "--yes")
    assert proc.returncode == 1
    assert "only prod-YYYY-MM-DD-N tags" in proc.stderr
    assert host.head() == TAGS["A"]
    assert host.calls() == []


def test_deploy_refuses_an_unknown_tag(host: Host) -> None:
    proc = deploy(host, "prod-2030-01-01-1", "--yes")
    assert proc.returncode == 1
    assert "no such tag" in proc.stderr
    assert host.head() == TAGS["A"]


def test_failed_health_rolls_back_to_what_ran_before(host: Host) -> None:
    host.service(TAGS["C"], "printf '%s\\n' '<6>started, but stalled'\n")
    host.unhealthy.add(TAGS["C"])
    proc = deploy(host, TAGS["C"], "--yes")
    assert proc.returncode == 1
    assert "answered 503, not 200" in proc.stderr
    # The journal's tail (whatever its priority) comes before the offer to roll back.
    tail = proc.stderr.index(f"The last 50 lines of the journal of {UNIT}:")
    assert tail < proc.stderr.index("started, but stalled") < proc.stderr.index(f"Roll back {UNIT} to {TAGS['A']}?")
    assert f"journalctl -u {UNIT} -n 50 --no-pager" in host.calls()
    assert "Commits being removed:" in proc.stderr[tail:]  # the rollback's plan
    assert f"Rolled back to {TAGS['A']}" in proc.stderr
    assert host.head() == TAGS["A"]
    assert host.restarts() == 2
    assert [event for event, *_ in host.history()] == ["found", "deploy", "failed", "rollback", "verified"]


def test_failed_health_offers_rollback_and_n_keeps_the_release(host: Host) -> None:
    host.unhealthy.add(TAGS["C"])
    # Deploy? y; version ok? y; probe ok? y; restart ok? y; health fails; roll back? n
    proc = deploy(host, TAGS["C"], answers="y\ny\ny\ny\nn\n")
    assert proc.returncode == 1
    assert "answered 503, not 200" in proc.stderr
    assert f"Roll back {UNIT} to {TAGS['A']}? [y/N]" in proc.stderr
    assert "Not rolling back" in proc.stderr
    assert host.head() == TAGS["C"]
    assert host.restarts() == 1


@pytest.mark.parametrize(("line", "fails"), [
    ("<3>Traceback (most recent call last):", True),
    ("<2>worker_died", True),
    ("<4>job_failed", False),  # a warning is not an error
    # journald stores a line without a prefix at SyslogLevel= (info): `-p err` never sees it, which is
    # why the daemon prefixes its lines when stderr is the journal.
    ("Traceback (most recent call last):", False),
])
def test_errors_in_the_journal_fail_the_deploy(host: Host, line: str, fails: bool) -> None:
    host.service(TAGS["B"], f"printf '%s\\n' {shlex.quote(line)} >&2\n")
    proc = deploy(host, TAGS["B"], "--yes")
    if fails:
        assert proc.returncode == 1
        assert "errors in the journal" in proc.stderr
        assert line[3:] + "\n" in proc.stderr  # journald removed the prefix
        assert host.head() == TAGS["A"]
    else:
        assert proc.returncode == 0, proc.stderr
        assert host.head() == TAGS["B"]


# ---------------------------------------------------------------- the stand-in journal


def test_the_stand_in_journal_reads_priorities_like_journald(host: Host) -> None:
    lines = ["<0>emerg", "<3>err", "<03>err in two digits", "<003>err in three digits", "<4>warning",
             "<5>notice", "<6>info", "no prefix", "<8>not a priority", "<13>not without a facility", "<7>debug",
             "<3>", ""]
    host.service(TAGS["B"], f"printf '%s\\n' {shlex.join(lines)} >&2\n")
    git(host.checkout, "checkout", "-q", "--detach", TAGS["B"], env=host.env)
    assert host.run("systemctl", "restart", UNIT).returncode == 0
    assert host.journal_stream(TAGS["B"]) == lines

    def shown(*args: str) -> list[str]:
        proc = host.run("journalctl", "-u", UNIT, *args, "--no-pager", "-q")
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    errors = ["emerg", "err", "err in two digits", "err in three digits"]
    info = ["info", "no prefix", "<8>not a priority", "<13>not without a facility"]
    assert shown("-p", "err") == shown("-p", "3") == shown("--priority=err") == shown("-perr") == errors
    assert shown("-p", "warning") == [*errors, "warning"]
    assert shown("-p", "info") == [*errors, "warning", "notice", *info]
    assert shown() == shown("-p", "debug") == shown("-p", "07") == [*errors, "warning", "notice", *info, "debug"]
    assert shown("-p", "warning..notice") == shown("-p", "5..4") == ["warning", "notice"]
    assert shown("-p", "0..0") == ["emerg"]
    for bad, message in [("ERR", "Unknown log level ERR"), ("8", "Unknown log level 8"),
                         ("3..", "Failed to parse log level range 3..")]:
        proc = host.run("journalctl", "-u", UNIT, "-p", bad)
        assert proc.returncode == 1 and message in proc.stderr

    # --since @SECONDS.FRACTION: records stamped at or after it, to the microsecond (more digits ignored).
    stamps = [t for t, _ in host.journal()]
    assert len(stamps) == len(lines) and stamps == sorted(stamps)
    warning = stamps[lines.index("<4>warning")]
    seconds, micro = divmod(warning, 1_000_000)

    def message(line: str) -> str:
        prefixed = re.fullmatch(r"<0{0,2}[0-7]>(.*)", line)
        return prefixed[1] if prefixed else line

    since_warning = [message(line) for t, line in zip(stamps, lines, strict=True) if t >= warning and message(line)]
    assert "warning" in since_warning and "err" not in since_warning
    assert shown("--since", f"@{seconds}.{micro:06d}999") == shown("-S", f"@{seconds}.{micro:06d}") == since_warning
    assert shown(f"--since=@{seconds}.{micro:06d}", "-p", "warning") == ["warning"]
    assert shown(f"--since=@{stamps[-1] // 1_000_000 + 1}") == []
    assert shown("--since", "@0", "-p", "err") == errors
    assert shown("-n", "2") == ["<13>not without a facility", "debug"]
    assert shown("-p", "err", "--lines=2") == ["err in two digits", "err in three digits"]
    for bad in ("10 min ago", "@1.2.3"):
        proc = host.run("journalctl", "-u", UNIT, "--since", bad)
        assert proc.returncode == 1 and f"Failed to parse timestamp: {bad}" in proc.stderr


@pytest.mark.e2e
def test_a_model_the_endpoint_refuses_stops_the_deploy_before_the_restart(
    host: Host, aws: AwsStack, openai_stub: OpenAIStub, wordpress: WordPressStub, tmp_path: Path
) -> None:
    """Checkpoint 2 runs the real `sidecar check --probe` with the instance's env file against the
    stand-in endpoint: a model it does not serve never reaches the restart, and the API's words are shown."""
    env_file = Path(host.env["DEPLOY_ENV_DIR"]) / "prod.env"
    # ENVIRONMENT=test, appended after the fixture's prod: prod requires an https callback, and the
    # WordPress stand-in serves http; what the probe does with the endpoint does not depend on it.
    stack = {**stack_env(aws, openai_stub, wordpress, tmp_path), "ENVIRONMENT": "test",
             "TRANSCRIBE_MODEL": "whisper-9000-typo"}
    lines = [f"{k}={v}" for k, v in stack.items() if k != "METRICS_PORT"]  # the file's own port is /health's
    env_file.write_text(env_file.read_text() + "\n".join(lines) + "\n")
    host.env["DEPLOY_PROBE_CMD"] = f'{shlex.quote(sys.executable)} -m consumer --env-file "$ENV_FILE" check --probe'
    proc = deploy(host, TAGS["C"], "--yes")
    assert proc.returncode == 1
    [fail] = [line for line in proc.stderr.splitlines() if line.startswith("[FAIL]")]
    assert fail.startswith("[FAIL] transcription:") and "OpenAI 404" in fail
    assert "whisper-9000-typo` does not exist" in fail
    assert "VERIFICATION FAILED: sidecar check --probe failed" in proc.stderr
    assert f"systemctl start {UNIT}" not in host.calls()[: host.calls().index(f"install {TAGS['A']}")]
    assert host.head() == TAGS["A"] and len(openai_stub.refused) == 1
    # With the model it serves, the same probe passes and the deploy goes on.
    env_file.write_text(env_file.read_text().replace("whisper-9000-typo", "whisper-1"))
    again = deploy(host, TAGS["C"], "--yes")
    assert again.returncode == 0, again.stderr
    assert len(openai_stub.requests) == 1


def daemon_service(aws: AwsStack, wordpress: WordPressStub, tmp_path: Path) -> str:
    """A service that runs the real daemon (`sidecar run --drain`) on the local stack, as ExecStart= does."""
    settings = {
        **aws.env(), "ENVIRONMENT": "test", "LOG_FORMAT": "json", "POLL_WAIT_SECONDS": "1", "METRICS_PORT": "0",
        "WP_SIDE_CAR_CALLBACK": wordpress.url, "WP_SERVER_TOKEN": "wp-token", "CALLBACK_TIMEOUT": "5",
        # Never called: the jobs here fail before transcription.
        "TRANSCRIBER": "openai", "OPENAI_API_KEY": "sk-unused", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "TEMP_DIR": str(tmp_path / "daemon-tmp"),
    }
    exports = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in settings.items())
    return f"unset NOTIFY_SOCKET\n{exports}exec {shlex.quote(sys.executable)} -m consumer run --drain\n"


def release_logging_an_error(host: Host, aws: AwsStack, wordpress: WordPressStub, tmp_path: Path) -> None:
    """Release B runs the real daemon with a job whose failure callback WordPress rejects: the daemon
    logs `failure_callback_rejected` at ERROR (and `job_dead_lettered` at WARNING)."""
    wordpress.statuses.append(400)
    send_job(aws, "journal-err-1", "missing/recording.wav", secret=None)
    host.service(TAGS["B"], daemon_service(aws, wordpress, tmp_path))


# Every line the daemon writes to a journal stream: "<N>" and one JSON object.
PREFIXED_JSON = re.compile(r"<([0-7])>(\{.*\})")


@pytest.mark.e2e
def test_journalctl_p_err_shows_what_the_real_daemon_logged_at_error(
    host: Host, aws: AwsStack, wordpress: WordPressStub, tmp_path: Path
) -> None:
    release_logging_an_error(host, aws, wordpress, tmp_path)
    git(host.checkout, "checkout", "-q", "--detach", TAGS["B"], env=host.env)
    assert host.run("systemctl", "restart", UNIT).returncode == 0

    stream = host.journal_stream(TAGS["B"])
    matches = [PREFIXED_JSON.fullmatch(line) for line in stream]
    assert stream and all(matches), stream
    levels = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}
    assert all(int(m[1]) == levels[json.loads(m[2])["level"]] for m in matches if m)

    def records(priority: str) -> list[dict[str, str]]:
        proc = host.run("journalctl", "-u", UNIT, "-p", priority, "--no-pager", "-q", "-o", "short-iso")
        assert proc.returncode == 0, proc.stderr
        return [json.loads(line) for line in proc.stdout.splitlines()]

    [error] = records("err")
    assert (error["event"], error["level"], error["job_id"]) == ("failure_callback_rejected", "ERROR", "journal-err-1")
    warnings = records("warning")
    assert {r["level"] for r in warnings} == {"ERROR", "WARNING"}
    assert "job_dead_lettered" in {r["event"] for r in warnings}
    everything = records("info")
    assert "metrics_listening" in {r["event"] for r in everything} and len(everything) == len(stream)


@pytest.mark.e2e
def test_a_release_whose_daemon_logs_an_error_fails_the_journal_checkpoint(
    host: Host, aws: AwsStack, wordpress: WordPressStub, tmp_path: Path
) -> None:
    release_logging_an_error(host, aws, wordpress, tmp_path)
    proc = deploy(host, TAGS["B"], "--yes")
    assert proc.returncode == 1
    shown = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert [r["event"] for r in shown] == ["failure_callback_rejected"]  # warnings and info are not errors
    assert "VERIFICATION FAILED: errors in the journal" in proc.stderr
    assert f"Rolled back to {TAGS['A']}" in proc.stderr
    assert host.head() == TAGS["A"]


def rollback(host: Host, *args: str, answers: str = "") -> subprocess.CompletedProcess[str]:
    return run_script("rollback.sh", *args, "--dir", str(host.checkout), cwd=host.checkout, env=host.env,
                      answers=answers)


def make_rollback(host: Host, args: str) -> subprocess.CompletedProcess[str]:
    """`make rollback ARGS=…` with the project's Makefile, as the operator types it."""
    proc = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "rollback", f"ARGS={args}"],
                          env=host.env, capture_output=True, text=True, timeout=90, check=False)
    print(proc.stdout, proc.stderr, sep="\n")
    return proc


def release(work: Path, tag: str, env: dict[str, str]) -> None:
    """One more commit on main, tagged `tag` and pushed with it."""
    commit(work, f"change {tag}", env)
    git(work, "tag", "-a", tag, "-m", f"Release {tag}", env=env)
    git(work, "push", "-q", "origin", "main", tag, env=env)


def test_rollback_goes_back_to_what_ran_not_to_the_previous_tag(host: Host) -> None:
    """Prod went A -> C: `make rollback` goes back to A; B, between them in tag order, never ran here."""
    assert deploy(host, TAGS["C"], "--yes").returncode == 0
    proc = rollback(host, "--yes")
    assert proc.returncode == 0, proc.stderr
    assert f"Rolling back from {TAGS['C']} to {TAGS['A']}" in proc.stderr
    # The plan lists the commits being removed, and nothing being added.
    plan = proc.stderr[proc.stderr.index("Commits being removed:"):proc.stderr.index("Roll back ")]
    assert "change C" in plan and "change B" in plan and "change A" not in plan
    assert "Commits being added:" not in proc.stderr
    assert host.head() == TAGS["A"]
    assert git(host.checkout, "rev-parse", "--abbrev-ref", "HEAD", env=host.env) == "HEAD"
    # A rollback skips the probe (it must not wait for the endpoint) and is recorded as one.
    probes = [c for c in host.calls() if c.startswith("probe ")]
    assert probes == [f"probe {TAGS['C']} {host.env['DEPLOY_ENV_DIR']}/prod.env"]
    assert [event for event, *_ in host.history()][-2:] == ["rollback", "verified"]


def test_rollback_never_picks_a_release_that_failed(host: Host, work: Path) -> None:
    """A -> C -> rollback (A) -> B; D crashes at start and is rolled back automatically (to B, which
    verified); E deploys. `make rollback` goes to B, not to D; again, to A, never forward to what it left."""
    d, e = "prod-2025-01-03-1", "prod-2025-01-03-2"
    release(work, d, host.env)
    release(work, e, host.env)
    assert deploy(host, TAGS["C"], "--yes").returncode == 0
    assert rollback(host, "--yes").returncode == 0 and host.head() == TAGS["A"]
    assert deploy(host, TAGS["B"], "--yes").returncode == 0

    host.service(d, "printf '%s\\n' '<3>config_invalid: SQS_QUEUE_URL is not set' >&2\nexit 1\n")
    host.service(TAGS["B"], "printf '%s\\n' '<6>daemon_started'\n")
    proc = deploy(host, d, "--yes")
    assert proc.returncode == 1
    assert "VERIFICATION FAILED: systemctl start salestrainer-sidecar@prod failed" in proc.stderr
    # The journal's tail, with systemd's own lines, before the offer to roll back.
    tail = proc.stderr.index(f"The last 50 lines of the journal of {UNIT}:")
    failed_line = f"Failed to start {UNIT}.service - SalesTrainer sidecar SQS consumer (prod)."
    assert tail < proc.stderr.index("config_invalid") < proc.stderr.index(failed_line)
    assert proc.stderr.index(failed_line) < proc.stderr.index(f"Roll back {UNIT} to {TAGS['B']}? [y/N]")
    # The rollback to B verified: its journal window opened after D's last record, "Failed to start"
    # at err included, however close together they were; and B's own record is inside it.
    assert f"Rolled back to {TAGS['B']}" in proc.stderr and host.head() == TAGS["B"]
    [since] = [float(c.split("--since @")[1].split()[0]) for c in host.calls() if "--since @" in c][-1:]
    journal = host.journal()
    d_records = [t for t, line in journal if "config_invalid" in line or "Failed to start" in line]
    [b_started] = [t for t, line in journal if "daemon_started" in line][-1:]
    assert len(d_records) == 2 and max(d_records) < since * 1e6 <= b_started

    assert deploy(host, e, "--yes").returncode == 0
    proc = make_rollback(host, f"--history --dir {host.checkout}")
    assert proc.returncode == 0 and f"make rollback would go from {e} to {TAGS['B']}" in proc.stderr
    assert host.head() == e  # --history changes nothing
    proc = make_rollback(host, f"--yes --dir {host.checkout}")
    assert proc.returncode == 0, proc.stderr
    assert f"Rolling back from {e} to {TAGS['B']}: the last release that verified here before it" in proc.stderr
    assert host.head() == TAGS["B"]
    proc = rollback(host, "--yes")
    assert proc.returncode == 0, proc.stderr
    assert f"Rolling back from {TAGS['B']} to {TAGS['A']}" in proc.stderr and host.head() == TAGS["A"]


def test_make_rollback_to_goes_where_it_is_told(host: Host) -> None:
    """`--to TAG` reaches rollback.sh through `make rollback ARGS=…`, whatever the history says."""
    assert deploy(host, TAGS["C"], "--yes").returncode == 0
    proc = make_rollback(host, f"--to {TAGS['B']} --yes --dir {host.checkout}")
    assert proc.returncode == 0, proc.stderr
    assert f"Rolling back from {TAGS['C']} to {TAGS['B']} (--to)" in proc.stderr
    assert host.head() == TAGS["B"]
    # B replaced C on the line of verified releases: the next rollback goes to A, not back to C.
    proc = rollback(host, "--yes")
    assert proc.returncode == 0 and host.head() == TAGS["A"]
    assert make_rollback(host, f"--to v9 --yes --dir {host.checkout}").returncode != 0


def test_a_failed_rollback_is_reported_and_not_rolled_back(host: Host) -> None:
    assert deploy(host, TAGS["C"], "--yes").returncode == 0
    host.unhealthy.add(TAGS["A"])
    proc = rollback(host, "--yes")
    assert proc.returncode == 1
    assert "VERIFICATION FAILED" in proc.stderr and "did not verify; not rolling back" in proc.stderr
    assert host.head() == TAGS["A"] and host.restarts() == 2
    assert host.history()[-1][0] == "failed"


def test_rollback_without_a_history_names_the_way_out(host: Host) -> None:
    proc = rollback(host, "--yes")
    assert proc.returncode == 1
    assert f"records no release that verified here before {TAGS['A']}" in proc.stderr
    assert "make rollback ARGS='--to prod-YYYY-MM-DD-N'" in proc.stderr
    assert host.restarts() == 0


def test_an_interrupted_deploy_never_becomes_a_rollback_target(host: Host) -> None:
    """A deploy cut off before it verified (here: the operator's "n" at a checkpoint, then no rollback)
    leaves that release at HEAD, unverified: a rollback from it goes to what verified before."""
    assert deploy(host, TAGS["B"], "--yes").returncode == 0
    # Deploy? y; version? y; probe? n -> failed; roll back? n
    assert deploy(host, TAGS["C"], answers="y\ny\nn\nn\n").returncode == 1
    assert host.head() == TAGS["C"]
    proc = rollback(host, "--yes")
    assert proc.returncode == 0, proc.stderr
    assert host.head() == TAGS["B"]


def test_deploy_stamps_the_release_the_daemon_reports(host: Host) -> None:
    """RELEASE in the checkout names the tag installed, also after an automatic rollback; the daemon reads it."""
    from consumer.release import read_release

    assert deploy(host, TAGS["B"], "--yes").returncode == 0
    assert (host.checkout / "RELEASE").read_text() == f"{TAGS['B']}\n"
    assert read_release(host.checkout / "consumer") == TAGS["B"]
    host.unhealthy.add(TAGS["C"])
    assert deploy(host, TAGS["C"], "--yes").returncode == 1
    assert (host.checkout / "RELEASE").read_text() == f"{TAGS['B']}\n"  # rolled back: B runs again
    # Untracked (and in .gitignore): not a local change that would make the next deploy refuse.
    assert git(host.checkout, "status", "--porcelain", "--untracked-files=no", env=host.env) == ""
