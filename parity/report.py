"""Reports from records: `parity.csv` for scripts, `parity.json` for tools, HTML pages for people.

The HTML (`index.html`, one `cases/<case>.html` per case) is rendered by Jinja2 templates kept as files in the
package, from the same records as the CSV, never from live objects; Jinja's autoescape escapes every string.
Images are files next to the pages, never inlined: the runner's full-size images (images.py: WebP, or PNG in
lossless mode), and small WebP thumbnails made here from them. The pages open from disk and load nothing from the
network; a Content-Security-Policy lets only the report's own script run (by hash), so an injected `<script>`
could not run even if it got through.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
from pathlib import Path
from urllib.parse import quote

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from . import images
from .columns import NAMES, in_order, ordered
from .expectations import EXPECTED
from .recipe import FIELD_NAMES
from .store import write_atomic

COLUMNS = list(NAMES)  # every column, in the CSV's fixed order (columns.py: each with its meaning)

# The runner's images of a preview (images.py): images/<case>/<stem>.<kind>.<ext>. The strip on the case page
# shows these kinds in this order, then any other heat maps (one per perceptual distance).
KINDS = ("preview", "reference", "training", "diff", "ssim_map")
KIND_LABELS = {"preview": "preview (training)", "reference": "reference render", "training": "training render",
               "diff": "difference", "ssim_map": "SSIM map", "lpips_alex_map": "LPIPS (alex) map",
               "stlpips_alex_map": "ST-LPIPS (alex) map", "local": "local render of the remote engine's request"}
# Metrics charted across training steps, if any record has them: (key, label, higher is closer).
CHART_METRICS = (("ssim", "SSIM", True), ("lpips_alex", "LPIPS (alex)", False),
                 ("stlpips_alex", "ST-LPIPS (alex)", False), ("mean_abs", "mean abs", False))


def to_frame(records: list[dict]) -> pd.DataFrame:
    """The CSV's table: every column of columns.py in its order (empty where no record has it), then any other
    key a record carries, sorted by name."""
    frame = pd.DataFrame.from_records(records)
    return frame.reindex(columns=ordered(COLUMNS + list(frame.columns)))  # one step: no fragmented frame


def write_reports(records: list[dict], folder: Path, env: dict) -> dict[str, Path]:
    """Write parity.csv, parity.json, index.html, cases/<case>.html and thumbnails; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frame = to_frame(records)
    paths = {"csv": folder / "parity.csv", "json": folder / "parity.json", "html": folder / "index.html"}
    write_atomic(paths["csv"], frame.to_csv(index=False, lineterminator="\n"))
    write_atomic(paths["json"], json.dumps({"environment": env, "records": [in_order(r) for r in records]},
                                           indent=1, default=str))
    for name, html in render_pages(records, env, folder).items():
        path = folder / name
        write_atomic(path, html)
        if name != "index.html":
            paths[f"case:{name}"] = path
    return paths


# ---- images ---------------------------------------------------------------------------------------------


def case_slug(case: str) -> str:
    """A file name for a case page: safe characters only, plus a hash when anything had to be replaced."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", case or "case").strip("._") or "case"
    return slug if slug == case else f"{slug}-{hashlib.sha256(case.encode()).hexdigest()[:8]}"


def _url(path: Path, page_dir: Path) -> str:
    return quote(os.path.relpath(path, page_dir).replace(os.sep, "/"))


def kind_label(kind: str) -> str:
    if kind in KIND_LABELS:
        return KIND_LABELS[kind]
    if kind.startswith("cause-"):
        return f"with training {kind[len('cause-'):]}"
    if kind.endswith("_map"):
        return f"{kind[:-len('_map')]} map"
    return kind


def preview_images(folder: Path, case: str, preview: str,
                   listings: dict[Path, dict] | None = None) -> dict[str, dict]:
    """Every image of one preview that exists: {kind: {label, file, thumb}} as paths under `folder`.
    `listings`: case folders already read (images.index), filled as folders are read."""
    if not preview:
        return {}
    base = folder / "images" / case
    listings = {} if listings is None else listings
    if base not in listings:
        listings[base] = images.index(base)
    found: dict[str, dict] = {}
    for kind, path in listings[base].get(Path(preview).stem, {}).items():
        item = {"label": kind_label(kind), "file": path}
        if kind.startswith("cause-"):
            item["cause"] = kind[len("cause-"):]
        thumb = images.thumb_path(path)
        item["thumb"] = thumb if images.thumbnail(path, thumb) else None
        found[kind] = item
    return found


# ---- values ---------------------------------------------------------------------------------------------


def _num(value) -> float | None:
    """A finite float, or None (missing, empty, NaN from pandas, text)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _json(text, default):
    if not text or not isinstance(text, str):
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def _causes(record: dict) -> dict | None:
    data = _json(record.get("causes"), None)
    if not isinstance(data, dict):
        return None
    if data.get("unavailable"):
        return {"unavailable": str(data["unavailable"])}
    causes = []
    for c in data.get("causes") or []:
        if not isinstance(c, dict):
            continue
        fields = c.get("fields") or []
        share = _num(c.get("share"))
        causes.append({"name": "+".join(str(f) for f in fields), "fields": fields, "share": share,
                       "distance": _num(c.get("distance")), "reverse_distance": _num(c.get("reverse_distance")),
                       "testable": c.get("testable", True), "reason": c.get("reason") or "",
                       # Bar width in percent of the gap; a share can exceed 1 or go negative (interactions).
                       "bar": None if share is None else max(0.0, min(1.0, abs(share))) * 100,
                       "negative": share is not None and share < 0})
    steps = [{"cause": str(st.get("cause", "")), "share": _num(st.get("share")), "marginal": _num(st.get("marginal")),
              "distance": _num(st.get("distance")),
              "bar": max(0.0, min(1.0, _num(st.get("share")) or 0.0)) * 100}  # cumulative, in percent of the gap
             for st in data.get("closing_set") or [] if isinstance(st, dict)]
    return {"metric": data.get("metric", ""), "gap": _num(data.get("gap")), "floor": _num(data.get("floor")),
            "reference_distance": _num(data.get("reference_distance")),
            "training_distance": _num(data.get("training_distance")), "causes": causes,
            "closing": steps, "closed": data.get("closed"), "closing_set": _text(record.get("closing_set")),
            "interactions": _text(record.get("interactions")), "closing_renders": data.get("closing_renders")}


def shown_verdict(record: dict) -> str:
    """The verdict as the pages show it: with a gap declared in parity.yaml (`expect:`), `<verdict> (expected)`
    when it is the declared one, else `<verdict> (unexpected)`."""
    verdict, outcome = _text(record.get("verdict")), _text(record.get("expected_outcome"))
    if not outcome:
        return verdict
    return f"{verdict} ({'expected' if outcome == EXPECTED else 'unexpected'})"


def verdict_class(verdict: str) -> str:
    for label in ("expected", "unexpected"):  # a declared gap: its own colour, whatever the verdict
        if (verdict or "").endswith(f" ({label})"):
            return f"v-{label}"
    return "v-" + (re.sub(r"[^a-z0-9]+", "-", (verdict or "none").lower()).strip("-") or "none")


def _row(record: dict, folder: Path, page_dir: Path, listings: dict[Path, dict] | None = None) -> dict:
    # Every column present (None when missing; NaN, as pandas reads an empty cell, is None too).
    record = {**{c: None for c in COLUMNS},
              **{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}}
    case = str(record.get("case") or "")
    found = preview_images(folder, case, str(record.get("preview") or ""), listings)
    for item in found.values():
        item["url"] = _url(item["file"], page_dir)
        item["thumb_url"] = _url(item["thumb"], page_dir) if item["thumb"] else item["url"]
    findings = [f for f in _json(record.get("findings_detail"), []) if isinstance(f, dict)]
    differing = {f.get("field") for f in findings}
    recipe = [{"field": name, "training": _text(record.get(f"training.{name}")),
               "reference": _text(record.get(f"reference.{name}"))} for name in FIELD_NAMES]
    for item in recipe:
        item["differs"] = item["field"] in differing or item["training"] != item["reference"]
    hints = {k[len("hint_"):]: v for k, v in record.items() if k.startswith("hint_") and _text(v) != ""}
    stem = Path(str(record.get("preview") or record.get("id") or "")).stem
    # The strip: the fixed kinds (a gap where one is missing), then the perceptual distances' heat maps.
    strip = [(k, found.get(k)) for k in KINDS] + sorted((k, v) for k, v in found.items()
                                                          if k.endswith("_map") and k not in KINDS)
    if "local" in found:  # server mode: the harness' own render of the request, beside the server's
        strip.insert(2, ("local", found["local"]))
    # What the slider and flicker view can show: the images, then the counterfactual renders (no heat maps).
    comparable = [(k, found[k]) for k in ("preview", "reference", "local", "training") if k in found]
    comparable += [(k, v) for k, v in found.items() if "cause" in v]
    names = [k for k, _ in comparable]
    a = "preview" if "preview" in names else (names[0] if names else None)
    b = next((k for k in ["reference", *names] if k in names and k != a), None)
    return {"r": record, "case": case, "slug": case_slug(case), "anchor": "p-" + re.sub(r"[^A-Za-z0-9_-]", "_", stem),
            "verdict": shown_verdict(record), "vclass": verdict_class(shown_verdict(record)),
            "ssim": _num(record.get("ssim")), "lpips": _num(record.get("lpips_alex")),
            "stlpips": _num(record.get("stlpips_alex")), "top_cause": _text(record.get("top_cause")),
            "top_share": _num(record.get("top_cause_share")), "step": _num(record.get("step")),
            "closing_set": _text(record.get("closing_set")),
            "index": _num(record.get("sample_index")), "images": found, "findings": findings,
            "recipe": recipe, "causes": _causes(record), "hints": hints,
            "comparable": comparable, "pair": (a, b), "strip": strip}


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _sig(value, digits: int = 4) -> str:
    """A number to `digits` significant digits (hints span 1e-4 to 1e2); text as it is."""
    x = _num(value)
    return _text(value) if x is None else f"{x:.{digits}g}"


def _fmt(value, digits: int = 4) -> str:
    x = _num(value)
    if x is None:
        return "" if value is None or _text(value) == "" else _text(value)
    return str(int(x)) if x == int(x) and abs(x) < 1e15 and digits == 0 else f"{x:.{digits}f}"


# ---- charts ---------------------------------------------------------------------------------------------


PASSING = ("match", "explained")  # the verdicts a preview passes with (the plugin's and the CLI's)


def step_trend(pts: list[tuple], higher_better: bool, digits: int) -> str:
    """First to last step in the verdicts' terms: a change of verdict is the trend; a move of the metric while a
    preview passes at both ends is no worse or better, however small (the thresholds decide, not the metric)."""
    (s0, first, row0), (s1, last, row1) = pts[0], pts[-1]
    change = f"{last - first:+.{digits}f}"
    if float(change) == 0:  # a change below the labels' precision is no trend (rounding-level differences)
        return f"unchanged (within {0.5 * 10 ** -digits:g})"
    v0, v1 = row0["verdict"] or "no verdict", row1["verdict"] or "no verdict"
    pass0, pass1 = v0 in PASSING, v1 in PASSING
    if pass0 and not pass1:
        return f"worse: {v0} at step {int(s0)}, {v1} at step {int(s1)} ({change})"
    if pass1 and not pass0:
        return f"better: {v0} at step {int(s0)}, {v1} at step {int(s1)} ({change})"
    if pass0 and pass1:
        return f"passes at both ends: {v0}, then {v1} ({change})" if v0 != v1 else f"{v0} at both ends ({change})"
    worse = (last < first) if higher_better else (last > first)
    ends = f"{v0} at both ends" if v0 == v1 else f"{v0}, then {v1}"
    return ("worse" if worse else "better") + f" ({change}), {ends}"


def step_chart(rows: list[dict], key: str, higher_better: bool, width: int = 300, height: int = 120) -> dict | None:
    """Points of one sample's metric across training steps, in SVG coordinates (None: fewer than 1 value)."""
    pts = [(row["step"], _num(row["r"].get(key)), row) for row in rows]
    pts = sorted(((s, v, row) for s, v, row in pts if s is not None and v is not None), key=lambda p: p[0])
    if not pts:
        return None
    right, top, bottom = 10, 10, 24
    steps = [p[0] for p in pts]
    values = [p[1] for p in pts]
    s0, s1 = min(steps), max(steps)
    v0, v1 = min(values), max(values)
    if v1 - v0 < 1e-12:
        v0, v1 = v0 - 0.5 * (abs(v0) or 1) * 0.01, v1 + 0.5 * (abs(v1) or 1) * 0.01
    pad = (v1 - v0) * 0.08
    v0, v1 = v0 - pad, v1 + pad
    digits = 3  # enough decimals that the two axis labels differ (SSIM near 1 moves in the 4th-5th place)
    while digits < 6 and f"{v0 + pad:.{digits}f}" == f"{v1 - pad:.{digits}f}":
        digits += 1
    labels = [_fmt(v, digits) for v in (v0 + pad, v1 - pad)]
    left = max(46, 6 * max(map(len, labels)) + 10)  # room for the longer axis label (10 px type: ~6 px a digit)
    sx = lambda s: left + (0.5 if s1 == s0 else (s - s0) / (s1 - s0)) * (width - left - right)  # noqa: E731
    sy = lambda v: top + (v1 - v) / (v1 - v0) * (height - top - bottom)  # noqa: E731
    points = [{"x": round(sx(s), 1), "y": round(sy(v), 1), "step": int(s), "value": v, "anchor": row["anchor"],
               "vclass": row["vclass"], "verdict": row["verdict"]} for s, v, row in pts]
    trend = step_trend(pts, higher_better, digits)
    return {"width": width, "height": height, "points": points,
            "path": " ".join(f"{'M' if i == 0 else 'L'}{p['x']},{p['y']}" for i, p in enumerate(points)),
            "ymin": v0 + pad, "ymax": v1 - pad, "y_top": round(sy(v1 - pad), 1), "y_bottom": round(sy(v0 + pad), 1),
            "x_left": left, "x_right": width - right, "baseline": height - bottom,
            "smin": int(s0), "smax": int(s1), "digits": digits,
            "trend": trend if len(pts) > 1 else ""}


# ---- pages ----------------------------------------------------------------------------------------------


def _environment(env: dict, records: list[dict]) -> list[tuple[str, str]]:
    """What the renders ran on: env first (hardware, versions), then the records' dtype and model."""
    def distinct(key):
        return ", ".join(sorted({_text(r.get(key)) for r in records if _text(r.get(key))}))

    env = {k: _text(v) for k, v in (env or {}).items()}
    hardware = env.pop("gpu", "") or ""
    device = env.pop("device", "") or distinct("device")
    rows = [("device", f"{device} ({hardware})" if hardware else (device or "cpu"))]
    rows.append(("dtype", distinct("dtype")))
    for key in ("torch", "diffusers", "transformers", "peft"):
        rows.append((key, env.pop(key, "") or distinct(key)))
    rows.append(("model", distinct("model")))
    rows += sorted(env.items())
    return [(k, v) for k, v in rows if v]


def _script_hash(script: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()


def render_pages(records: list[dict], env: dict, folder: Path) -> dict[str, str]:
    """{relative path: HTML} for the index and every case page, from the records alone (plus image files)."""
    folder = Path(folder)
    jinja = Environment(loader=PackageLoader("parity", "templates"), autoescape=select_autoescape(["html"]),
                        trim_blocks=True, lstrip_blocks=True)
    jinja.filters["fmt"] = _fmt
    jinja.filters["sig"] = _sig
    script = jinja.get_template("report.js.html").render()
    style = jinja.get_template("report.css.html").render()
    csp = (f"default-src 'none'; img-src 'self' file:; style-src 'unsafe-inline'; "
           f"script-src '{_script_hash(script)}'; base-uri 'none'; form-action 'none'")
    common = {"env": _environment(env, records), "script": Markup(script), "style": Markup(style), "csp": csp,
              "total": len(records), "fmt": _fmt, "interrupted": env.get("interrupted", "")}

    counts: dict[str, int] = {}
    for r in records:
        counts[shown_verdict(r) or "(none)"] = counts.get(shown_verdict(r) or "(none)", 0) + 1
    cases: dict[str, list[dict]] = {}
    index_rows = []
    listings: dict[Path, dict] = {}  # each case's image folder, read once for all its previews
    for r in records:
        row = _row(r, folder, folder, listings)
        index_rows.append(row)
        cases.setdefault(row["case"], []).append(r)

    pages = {"index.html": jinja.get_template("index.html").render(
        rows=index_rows, counts=sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])),
        vclass=verdict_class, cases=sorted(cases), **common)}
    for case, recs in cases.items():
        rows = [_row(r, folder, folder / "cases", listings) for r in recs]
        rows.sort(key=lambda row: (row["index"] if row["index"] is not None else -1,
                                   row["step"] if row["step"] is not None else -1))
        samples: dict = {}
        for row in rows:
            samples.setdefault(row["index"], []).append(row)
        metrics = [(key, label, higher) for key, label, higher in CHART_METRICS
                   if any(_num(r.get(key)) is not None for r in recs)]
        charts = [{"index": idx, "prompt": _text(srows[0]["r"].get("prompt")),
                   "charts": [(label, step_chart(srows, key, higher)) for key, label, higher in metrics]}
                  for idx, srows in samples.items()]
        case_counts: dict[str, int] = {}
        for row in rows:
            case_counts[row["verdict"] or "(none)"] = case_counts.get(row["verdict"] or "(none)", 0) + 1
        pages[f"cases/{case_slug(case)}.html"] = jinja.get_template("case.html").render(
            case=case, rows=rows, charts=charts, metrics=metrics, counts=sorted(case_counts.items()),
            vclass=verdict_class, **common)
    return pages


def render_index(records: list[dict], env: dict, folder: Path) -> str:
    """The index page alone (kept for callers of the first version)."""
    return render_pages(records, env, folder)["index.html"]
