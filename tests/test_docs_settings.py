"""docs/configuration.md and the code agree, in both directions.

Every field of ``Settings`` has a row in the settings table with the right
flag, environment name and default; every row names a field; every flag the
docs mention exists on the parser and every flag of the parser is in the
docs.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from oracle.config import (
    add_arguments,
    env_name,
    flag_name,
    format_default,
    setting_fields,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def _table_rows() -> dict[str, list[str]]:
    """Setting name -> cells of its row in the "Settings" table."""
    text = DOC.read_text()
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = cells[0].strip("`")
        assert name not in rows, f"{name} documented twice"
        rows[name] = cells
    return rows


def _parser_flags() -> set[str]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return {
        opt
        for action in parser._actions
        for opt in action.option_strings
        if opt.startswith("--")
    }


def test_every_setting_is_documented_and_every_documented_setting_exists() -> None:
    documented = set(_table_rows())
    fields = {f.name for f in setting_fields()}
    assert documented - fields == set(), "documented but not in Settings"
    assert fields - documented == set(), "in Settings but not documented"


def test_each_row_has_the_flag_env_name_and_default_of_its_field() -> None:
    rows = _table_rows()
    for field in setting_fields():
        cells = rows[field.name]
        assert len(cells) == 5, f"{field.name}: want 5 cells, got {cells}"
        assert cells[1] == f"`{flag_name(field.name)}`", field.name
        assert cells[2] == f"`{env_name(field.name)}`", field.name
        assert cells[3] == f"`{format_default(field)}`", field.name
        assert cells[4], f"{field.name}: no meaning given"


def test_every_flag_in_the_docs_exists_and_every_flag_is_documented() -> None:
    text = DOC.read_text()
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    flags = _parser_flags()
    # --no-NAME is mentioned generically for booleans, not per flag
    assert mentioned - flags - {"--name", "--no-name"} == set()
    assert flags - mentioned == set()


def test_every_environment_name_in_the_docs_is_a_setting() -> None:
    text = DOC.read_text()
    mentioned = set(re.findall(r"\bFIATPRINT_[A-Z0-9_]+\b", text))
    names = {env_name(f.name) for f in setting_fields()}
    assert mentioned - names - {"FIATPRINT_CONFIG", "FIATPRINT_"} == set()
