"""Which release this process runs: read once at start-up, shown by /health, sidecar_build_info and the logs.

deploy.sh writes the tag it checked out to `<checkout>/RELEASE` (the checkout is the parent of this
package: deploy installs it editable). The daemon reads that file when it starts, so a checkout that
has moved on since (a deploy whose restart failed) does not change what a running daemon reports:
it says what runs, not what is on disk. Without the file (a developer's checkout) `git describe` of the
package's directory stands in; outside a git checkout, "unreleased".
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
RELEASE_FILE = "RELEASE"
UNRELEASED = "unreleased"


def read_release(package_dir: Path = PACKAGE_DIR) -> str:
    """The stamped tag, else `git describe --tags --always --dirty` of the checkout, else "unreleased"."""
    try:
        stamped = (package_dir.parent / RELEASE_FILE).read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError):
        stamped = []
    if stamped and stamped[0].strip():
        return stamped[0].strip()[:128]
    try:
        described = subprocess.run(
            ["git", "-C", str(package_dir), "describe", "--tags", "--always", "--dirty"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):  # no git on the host, or it hung
        return UNRELEASED
    return described.stdout.strip() if described.returncode == 0 and described.stdout.strip() else UNRELEASED


@functools.cache
def running_release() -> str:
    """This process's release, read the first time it is asked for (at start-up) and never again."""
    return read_release()
