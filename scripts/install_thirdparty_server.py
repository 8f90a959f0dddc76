"""Install faster-whisper-server, the third-party OpenAI-compatible transcription server the tests use.

The end-to-end test tests/test_thirdparty_openai.py runs the daemon against someone else's implementation
of `POST /v1/audio/transcriptions` (faster-whisper-server on PyPI, MIT), so that real multipart parsing and
real replies check what our stand-in only assumes. The server is an application with its own dependency
tree (FastAPI, uvicorn, python-multipart), so it gets a virtualenv of its own and never touches .venv.

    python scripts/install_thirdparty_server.py [--root .cache/thirdparty]

The pins live in scripts/faster-whisper-server.txt. The virtualenv is named after that file's hash, so a
finished one is reused (no network) and a changed pin builds a fresh one; older ones are removed (about
500 MB each). A directory is marked finished only after pip succeeded, and an unfinished one is rebuilt.

Prints the virtualenv's path. Exit status 0 when it is ready, 1 on any failure with a one-line reason.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PINS = REPO / "scripts" / "faster-whisper-server.txt"
DEFAULT_ROOT = REPO / ".cache" / "thirdparty"
NAME = "faster-whisper-server"
FINISHED = ".installed"  # written last: its presence means pip finished


class InstallError(Exception):
    """The server could not be installed; the message is the one line the operator sees."""


def venv_dir(root: Path = DEFAULT_ROOT, pins: Path = PINS) -> Path:
    """Where the virtualenv for these pins lives (whether or not it is installed yet)."""
    digest = hashlib.sha256(pins.read_bytes()).hexdigest()[:12]
    return root / f"{NAME}-{digest}"


def server_command(venv: Path) -> Path:
    """The server's console script inside the virtualenv."""
    return venv / "bin" / NAME


def is_installed(venv: Path) -> bool:
    return (venv / FINISHED).is_file() and server_command(venv).is_file()


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line]
        raise InstallError(f"{what} failed: {lines[-1] if lines else f'exit status {result.returncode}'}")


def install(root: Path = DEFAULT_ROOT, pins: Path = PINS) -> Path:
    """The installed virtualenv for `pins` under `root`, building it when it is missing or unfinished."""
    venv = venv_dir(root, pins)
    if is_installed(venv):
        return venv
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(f"{NAME}-*"):  # earlier pins, or an interrupted build of these
        shutil.rmtree(old, ignore_errors=True)
    started = time.monotonic()
    print(f"installing {NAME} into {venv} (pinned in {pins.name})", file=sys.stderr)
    _run([sys.executable, "-m", "venv", str(venv)], "creating the virtualenv")
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
          "--no-input", "-r", str(pins)], "pip install")
    if not server_command(venv).is_file():
        raise InstallError(f"pip reported success but {server_command(venv)} is missing")
    (venv / FINISHED).write_text(pins.read_text())
    print(f"installed {NAME} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return venv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="directory holding the virtualenvs")
    args = parser.parse_args(argv)
    try:
        print(install(args.root.resolve()))
    except (InstallError, OSError) as exc:
        print(f"install_thirdparty_server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
