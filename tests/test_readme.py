"""The README's configuration table is generated from Settings; it must not drift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_configuration_table_matches_settings():
    table = subprocess.run([sys.executable, "scripts/config_table.py"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.strip()
    assert table in (ROOT / "README.md").read_text(), "regenerate: python scripts/config_table.py"


def test_readme_shows_the_two_commands_first():
    text = (ROOT / "README.md").read_text()
    assert text.index("make run") < text.index("## Configuration")
    assert "make test" in text.split("## How a job flows")[0]
