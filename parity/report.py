"""Reports from records: `parity.csv` for scripts, `parity.json` for tools, `index.html` for people.

The HTML is rendered by Jinja2 templates kept as files in the package, from the same records as the CSV;
Jinja's autoescape escapes every string. Images are files next to the page, never inlined.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from .recipe import FIELD_NAMES
from .store import write_atomic

# Stable column order: documented in the README; new columns are only ever appended.
COLUMNS = [
    "case", "preview", "step", "sample_index", "verdict", "reason", "ssim", "psnr", "mean_abs", "max_abs",
    "width", "height", "seed", "steps", "guidance", "multiplier", "prompt", "lora", "model", "device", "dtype",
    "render_seconds", "fidelity_verdict", "fidelity_max_abs", "fidelity_mean_abs", "findings",
    "ssim_raw", "psnr_raw", "mean_abs_raw", "max_abs_raw", "id", "notes", "torch", "diffusers",
    *[f"training.{f}" for f in FIELD_NAMES], *[f"reference.{f}" for f in FIELD_NAMES], "findings_detail",
]


def to_frame(records: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records)
    for col in COLUMNS:
        if col not in frame:
            frame[col] = None
    extra = [c for c in frame.columns if c not in COLUMNS]
    return frame[COLUMNS + extra]


def write_reports(records: list[dict], folder: Path, env: dict) -> dict[str, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frame = to_frame(records)
    paths = {"csv": folder / "parity.csv", "json": folder / "parity.json", "html": folder / "index.html"}
    write_atomic(paths["csv"], frame.to_csv(index=False, lineterminator="\n"))
    write_atomic(paths["json"], json.dumps({"environment": env, "records": records}, indent=1, default=str))
    write_atomic(paths["html"], render_index(records, env, folder))
    return paths


def _rel(folder: Path, case: str, preview: str, kind: str) -> str | None:
    if not preview:
        return None
    stem = Path(preview).stem
    path = folder / "images" / case / f"{stem}.{kind}.png"
    return os.path.relpath(path, folder) if path.is_file() else None


def render_index(records: list[dict], env: dict, folder: Path) -> str:
    jinja = Environment(loader=PackageLoader("parity", "templates"), autoescape=select_autoescape(["html"]))
    rows = []
    for r in records:
        rows.append({**r, "img": {k: _rel(folder, r["case"], r.get("preview") or "", k)
                                  for k in ("preview", "reference", "training", "diff", "ssim_map")},
                     "findings_list": json.loads(r.get("findings_detail") or "[]")})
    counts: dict[str, int] = {}
    for r in records:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    return jinja.get_template("index.html").render(rows=rows, env=env, counts=counts)
