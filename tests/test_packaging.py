"""pyproject.toml builds without setuptools' warnings, and the Makefile's virtualenv bootstrap says what
it is doing.

A fresh `pip install -e .` printed setuptools' BuildBackendWarning three times for `license = {text=…}`
(deprecated by PEP 639: an SPDX expression string, setuptools >= 77) and once for `consumer/data`, a
directory Python can import that `packages` did not list. The build needs setuptools from PyPI, so these
tests check the conditions behind those warnings rather than running the build.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_an_spdx_expression_and_the_backend_understands_it() -> None:
    license_ = PYPROJECT["project"]["license"]
    assert isinstance(license_, str), "a TOML table here is deprecated (PEP 639): use an SPDX expression"
    assert re.fullmatch(r"[A-Za-z0-9.+-]+", license_), license_
    assert not any(c.startswith("License ::") for c in PYPROJECT["project"].get("classifiers", [])), (
        "license classifiers beside a license expression are rejected by setuptools >= 77"
    )
    requires = PYPROJECT["build-system"]["requires"]
    minimum = [re.fullmatch(r"setuptools>=(\d+)", r.replace(" ", "")) for r in requires]
    assert any(m and int(m[1]) >= 77 for m in minimum), requires


def test_every_directory_of_the_package_is_listed() -> None:
    """setuptools warns about (and would leave out) an importable directory missing from `packages`."""
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"])
    package_data = PYPROJECT["tool"]["setuptools"].get("package-data", {})
    for directory in [ROOT / "consumer", *(p for p in (ROOT / "consumer").rglob("*") if p.is_dir())]:
        if directory.name == "__pycache__" or not any(f.is_file() for f in directory.iterdir()):
            continue
        name = ".".join(directory.relative_to(ROOT).parts)
        assert name in packages, f"{name} is not in [tool.setuptools] packages"
        data = [f for f in directory.iterdir() if f.is_file() and f.suffix not in (".py", ".pyc", ".typed")]
        for f in data:
            assert any(f.match(pattern) for pattern in package_data.get(name, [])), f"{f} is not package data"


def test_the_venv_bootstrap_announces_each_phase_and_shows_pips_progress() -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not installed")
    proc = subprocess.run(
        [make, "-n", "-W", "pyproject.toml", ".venv/.installed"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    installs = [ln for ln in lines if re.search(r"pip install .*-e \"?\.\[dev,local,bench\]", ln)]
    assert len(installs) == 1, lines
    assert " -q" not in installs[0], "the long install must show its progress"
    before = lines[: lines.index(installs[0])]
    assert before and before[-1].startswith("echo") and "minutes" in before[-1], before
