"""columns: every CSV and JSON column listed once, in one fixed order, each with its meaning; docs/columns.md is
generated from that list (scripts/gen-columns)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from parity import columns, lora_keys, metrics
from parity.hints import Hints
from parity.recipe import FIELD_NAMES

ROOT = Path(__file__).resolve().parents[1]


def test_each_column_is_listed_once_with_a_one_line_meaning():
    assert len(columns.NAMES) == len(set(columns.NAMES))
    for column in columns.COLUMNS:
        assert column.meaning.strip() and "\n" not in column.meaning and "|" not in column.meaning, column.name
    assert columns.NAMES[:5] == ("case", "preview", "step", "sample_index", "verdict")


def test_the_list_covers_the_columns_the_code_makes():
    """The families the records are made of: recipe fields on both sides, each perceptual distance with its
    suffixes, every hint, every engine's LoRA keys."""
    names = set(columns.NAMES)
    assert {f"{side}.{f}" for side in ("training", "reference") for f in FIELD_NAMES} <= names
    for name in metrics.REGISTRY:
        assert {name, f"{name}_raw", f"{name}_jpeg", f"{name}_id", f"{name}_unavailable"} <= names
    assert {f"hint_{f.name}" for f in dataclasses.fields(Hints)} | {"hint_jpeg_explained"} == \
        {n for n in names if n.startswith("hint_")}
    assert set(lora_keys.COLUMNS.values()) <= names


def test_records_keys_and_csv_columns_follow_the_list():
    assert columns.ordered(["zeta", "verdict", "hint_size_dw", "case", "alpha"]) == \
        ["case", "verdict", "hint_size_dw", "alpha", "zeta"]
    record = {"verdict": "match", "zeta": 1, "case": "c"}
    assert list(columns.in_order(record)) == ["case", "verdict", "zeta"] and columns.in_order(record) == record


def test_docs_columns_md_is_what_the_code_generates():
    assert (ROOT / "docs" / "columns.md").read_text(encoding="utf-8") == columns.page(), \
        "docs/columns.md is stale: run scripts/gen-columns"
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-columns"), "--check"], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout


def test_the_table_lists_every_column_but_the_per_field_ones_once():
    table = columns.markdown_table().splitlines()
    shown = [line.split("|")[1].strip().strip("`") for line in table[2:]]
    per_field = {c.name for c in columns.COLUMNS if c.group}
    assert shown == [n for n in dict.fromkeys(c.group or c.name for c in columns.COLUMNS)]
    assert not per_field & set(shown) and {"training.<field>", "reference.<field>"} <= set(shown)
