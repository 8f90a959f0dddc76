"""Real local servers the tests (and benchmarks) run the daemon against: moto, OpenAI and WordPress stand-ins."""

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.05, what: str = "") -> T:
    """Poll `condition` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


def require_tool(name: str, how_to_install: str) -> str:
    """Path of a command-line tool (the virtualenv's own first), or skip the test saying how to get it."""
    import shutil
    import sys

    import pytest

    beside_python = Path(sys.executable).with_name(name)
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if found is None:
        reason = f"{name} not installed ({how_to_install})"
        print(reason)
        pytest.skip(reason)
    return found


def wait_healthy(proc: subprocess.Popen[bytes], port: int, log_path: Path, *, timeout: float = 60,
                 what: str = "daemon") -> None:
    """Wait until a server subprocess answers 200 on /health; fail at once, with its log, if it exits."""
    import urllib.request

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited early ({proc.returncode}):\n"
                                 f"{log_path.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    wait_for(healthy, timeout=timeout, interval=0.1, what=f"{what} /health")


def stop_process(proc: subprocess.Popen[bytes], *, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds: a test server never outlives its test."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
