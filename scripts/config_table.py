"""Print the README's configuration table from consumer.settings.Settings (tests keep the two in sync)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic_core import PydanticUndefined

from consumer.settings import Settings

SECRET_NOTE = "secret; never logged"


def table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        if field.default_factory is not None:
            default = field.default_factory()  # type: ignore[call-arg]
        unset = default is PydanticUndefined or default is None or default == []
        shown = "—" if unset else f"`{default}`"
        meaning = field.description or ""
        if "SecretStr" in str(field.annotation):
            meaning = f"{meaning} ({SECRET_NOTE})" if meaning else SECRET_NOTE.capitalize()
        rows.append(f"| `{name.upper()}` | {shown} | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
