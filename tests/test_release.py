"""scripts/release.sh, deploy.sh and rollback.sh as subprocesses, against a temporary bare `origin`, its
clones, stand-in `systemctl`/`journalctl` on PATH and a stand-in /health server on a loopback port."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
UNIT = "salestrainer-sidecar@prod"

if shutil.which("git") is None:  # pragma: no cover - git is part of every checkout's toolbox
    pytest.skip("git is not installed", allow_module_level=True)

SYSTEMCTL = """#!/usr/bin/env bash
# Stand-in: logs the call; `restart` records what the checkout runs now; `is-active` says active.
echo "systemctl $*" >> "$STUB_STATE/calls"
case $1 in
  restart) git -C "$STUB_CHECKOUT" describe --tags > "$STUB_STATE/running" ;;
  is-active) echo active ;;
esac
"""

JOURNALCTL = """#!/usr/bin/env bash
# Stand-in: logs the call; prints the error lines the test planted for the release running now.
echo "journalctl $*" >> "$STUB_STATE/calls"
running=$(cat "$STUB_STATE/running" 2>/dev/null || true)
cat "$STUB_STATE/journal-$running" 2>/dev/null || true
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
    proc = run_script("release.sh", "--yes", cwd=work, env=day1)
    assert proc.stdout.strip() == "prod-2025-03-04-2"
    assert "fix: second release of the day" in proc.stderr

    commit(work, "feat: next day", env)
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
        return self.calls().count(f"systemctl restart {UNIT}")


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
    assert f"systemctl restart {UNIT}" in calls
    assert f"systemctl is-active {UNIT}" in calls
    assert any(c.startswith(f"journalctl -u {UNIT} --since @") and "-p err" in c for c in calls)
    assert host.health_requests >= 1
    assert proc.stderr.count("Does this look correct? [y/N] y (--yes)") == 4


def test_deploy_checkpoints_ask_each_time(host: Host) -> None:
    proc = deploy(host, TAGS["B"], answers="y\n" * 5)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("Does this look correct? [y/N]") == 4
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
    host.unhealthy.add(TAGS["C"])
    proc = deploy(host, TAGS["C"], "--yes")
    assert proc.returncode == 1
    assert "answered 503, not 200" in proc.stderr
    assert f"Rolled back to {TAGS['A']}" in proc.stderr
    assert host.head() == TAGS["A"]
    assert host.restarts() == 2


def test_failed_health_offers_rollback_and_n_keeps_the_release(host: Host) -> None:
    host.unhealthy.add(TAGS["C"])
    # Deploy? y; version ok? y; restart ok? y; health fails; roll back? n
    proc = deploy(host, TAGS["C"], answers="y\ny\ny\nn\n")
    assert proc.returncode == 1
    assert f"Roll back {UNIT} to {TAGS['A']}? [y/N]" in proc.stderr
    assert host.head() == TAGS["C"]
    assert host.restarts() == 1


def test_errors_in_the_journal_fail_the_deploy(host: Host) -> None:
    (host.state / f"journal-{TAGS['B']}").write_text("2025-01-02T10:00:00 host sidecar[1]: Traceback\n")
    proc = deploy(host, TAGS["B"], "--yes")
    assert proc.returncode == 1
    assert "errors in the journal" in proc.stderr
    assert "Traceback" in proc.stderr
    assert host.head() == TAGS["A"]


def test_rollback_redeploys_the_previous_tag_in_tag_order(host: Host) -> None:
    assert deploy(host, TAGS["C"], "--yes").returncode == 0
    proc = run_script("rollback.sh", "--yes", "--dir", str(host.checkout), cwd=host.checkout, env=host.env)
    assert proc.returncode == 0, proc.stderr
    # prod-2025-01-02-9 comes before prod-2025-01-02-10 (N compared as a number).
    assert host.head() == TAGS["B"]
    assert git(host.checkout, "rev-parse", "--abbrev-ref", "HEAD", env=host.env) == "HEAD"


def test_rollback_of_the_first_tag_has_nowhere_to_go(host: Host) -> None:
    proc = run_script("rollback.sh", "--yes", "--dir", str(host.checkout), cwd=host.checkout, env=host.env)
    assert proc.returncode == 1
    assert "nothing to roll back to" in proc.stderr
    assert host.restarts() == 0
