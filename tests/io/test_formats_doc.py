"""docs/formats.md names every registered format and every option each one declares."""

from __future__ import annotations

from pathlib import Path

from masqclip_cli.io.writers import WRITERS

DOC = (Path(__file__).resolve().parents[2] / "docs" / "formats.md").read_text()


def test_every_format_and_option_is_documented():
    writers_table = DOC.split("\n## ", 1)[0]  # the formats table, before the dataset sections
    rows = {line.split("|")[1].strip().strip("`"): line for line in writers_table.splitlines()
            if line.startswith("| `")}
    assert set(rows) == set(WRITERS)
    for name, cls in WRITERS.items():
        for option in cls.option_defaults:
            assert f"`{option}`" in rows[name], (name, option)
