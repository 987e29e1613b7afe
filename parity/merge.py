"""Merge the report folders of sharded runs (`--parity-shard I/N`, CI matrix jobs) into one report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .report import write_reports


def record_order(record: dict) -> tuple:
    return (record.get("case") or "", record.get("step") if record.get("step") is not None else -1,
            record.get("sample_index") if record.get("sample_index") is not None else -1, record.get("id") or "")


def merge_reports(folders: list[Path], out: Path) -> dict[str, Path]:
    records, env = [], {}
    out = Path(out)
    for folder in folders:
        data = json.loads((Path(folder) / "parity.json").read_text())
        records += data["records"]
        env = env or data.get("environment", {})
        images = Path(folder) / "images"
        if images.is_dir() and images.resolve() != (out / "images").resolve():
            shutil.copytree(images, out / "images", dirs_exist_ok=True)
    seen = set()
    unique = [r for r in sorted(records, key=record_order) if not (r["id"] in seen or seen.add(r["id"]))]
    return write_reports(unique, out, env)
