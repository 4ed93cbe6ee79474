"""The configuration table (docs/configuration.md) is the settings model, variable for variable."""

from __future__ import annotations

import re
from pathlib import Path

from tasks.settings import Settings

README = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_every_setting_is_documented_with_its_default() -> None:
    text = README.read_text()
    table = text.split("<!-- settings-table")[1].split("<!-- /settings-table -->")[0]
    documented = dict(re.findall(r"^\| `([A-Z0-9_]+)` \| `([^`]*)` \|", table, re.MULTILINE))
    expected = {name.upper(): str(f.default) for name, f in Settings.model_fields.items()}
    assert documented == expected
