"""consumer.release: the running release is the stamped tag, else git describe, else "unreleased";
/health and sidecar_build_info show it beside the package version."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from consumer import __version__
from consumer.metrics import Metrics
from consumer.release import UNRELEASED, read_release, running_release
from tests.stack import wait_for


def package_in(root: Path) -> Path:
    (root / "consumer").mkdir(parents=True)
    return root / "consumer"


def test_the_stamped_release_wins(tmp_path):
    package = package_in(tmp_path)
    (tmp_path / "RELEASE").write_text("prod-2025-03-04-2\n")
    assert read_release(package) == "prod-2025-03-04-2"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_without_a_stamp_git_describe_stands_in(tmp_path):
    package = package_in(tmp_path)
    (package / "__init__.py").write_text("")

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                       check=True, capture_output=True)

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    git("tag", "prod-2025-03-04-1")
    assert read_release(package) == "prod-2025-03-04-1"
    (tmp_path / "RELEASE").write_text("   \n")  # an empty stamp is no stamp
    assert read_release(package) == "prod-2025-03-04-1"
    (package / "__init__.py").write_text("# changed on disk\n")
    assert read_release(package) == "prod-2025-03-04-1-dirty"


def test_outside_a_checkout_it_is_unreleased(tmp_path):
    assert read_release(package_in(tmp_path / "site-packages")) == UNRELEASED


def test_build_info_carries_release_and_version():
    text = Metrics(release="prod-2025-03-04-2").render().decode()
    assert f'sidecar_build_info{{package_version="{__version__}",version="prod-2025-03-04-2"}} 1.0' in text


def test_health_shows_the_running_release_beside_the_version(run_daemon, caplog):
    caplog.set_level("INFO", logger="consumer.worker")
    rd = run_daemon(serve=True)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{rd.daemon.side_port.port}/health", timeout=5) as r:
            body = json.loads(r.read())
        assert body["version"] == running_release() and body["package_version"] == __version__
        assert body["version"] not in ("", __version__)
        text = rd.daemon.metrics.render().decode()
        assert f'version="{running_release()}"' in text
        started = wait_for(lambda: next((r for r in caplog.records if r.getMessage() == "daemon_started"), None),
                           timeout=10, what="daemon_started")
        assert started.version == running_release() and started.package_version == __version__  # type: ignore[attr-defined]
    finally:
        rd.stop()
