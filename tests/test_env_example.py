""".env.example lists exactly the Settings fields, loads as a valid dev configuration, and holds no secret.

When a field is added to Settings, this fails until .env.example documents it (and the other way round).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import SecretStr

from consumer.settings import Settings, load_settings

EXAMPLE = Path(__file__).resolve().parent.parent / ".env.example"
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
COMMENTED_ASSIGNMENT = re.compile(r"^#\s*([A-Z][A-Z0-9_]*)=")
PLACEHOLDERS = ("", "change-me")
DEV_OVERRIDES = {"METRICS_PORT"}  # values that deliberately differ from the Settings default


def _assignments() -> list[tuple[str, str]]:
    out = []
    for number, raw in enumerate(EXAMPLE.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = ASSIGNMENT.match(line)
        # The file doubles as a systemd EnvironmentFile=: plain KEY=value lines only.
        assert match, f".env.example:{number}: not a plain KEY=value line: {raw!r}"
        out.append((match[1], match[2]))
    return out


def _fields() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


def test_every_settings_field_is_documented() -> None:
    names = {name for name, _ in _assignments()}
    missing = _fields() - names
    assert not missing, f"add to .env.example: {sorted(missing)}"


def test_every_variable_is_a_settings_field() -> None:
    names = [name for name, _ in _assignments()]
    unknown = set(names) - _fields()
    assert not unknown, f"not Settings fields (remove or rename): {sorted(unknown)}"
    assert len(names) == len(set(names)), "a variable is set twice"
    assert all(name == name.upper() for name in names)


def test_commented_examples_name_real_fields() -> None:
    mentioned = {m for line in EXAMPLE.read_text().splitlines() for m in COMMENTED_ASSIGNMENT.findall(line)}
    assert mentioned <= _fields(), mentioned - _fields()


def test_secrets_are_empty_or_placeholders() -> None:
    secret = {
        name.upper()
        for name, info in Settings.model_fields.items()
        if SecretStr in getattr(info.annotation, "__args__", (info.annotation,))
    }
    for name, value in _assignments():
        if name in secret:
            assert value.strip("'\"") in PLACEHOLDERS, f"{name} must be empty or change-me in .env.example"


def test_example_is_a_valid_dev_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _fields():
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    settings = load_settings(env_file=EXAMPLE)
    assert settings.environment == "dev"
    assert settings.problems() == []
    assert settings.metrics_port == 9003  # dev's port; prod keeps the default 9002
    # Every other value shown is the default, so the example documents the defaults.
    for name, value in _assignments():
        field = name.lower()
        if value and name not in DEV_OVERRIDES:
            default = Settings.model_fields[field].get_default(call_default_factory=True)
            assert getattr(settings, field) == default, f"{name}={value} in .env.example, default {default!r}"
