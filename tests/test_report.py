"""The reports from synthetic records (no model runs): CSV columns, JSON, index and case pages, thumbnails,
escaping, no network references; and the size of a 100-preview report at 1024x1024."""

from __future__ import annotations

import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from parity.recipe import FIELD_NAMES
from parity.report import COLUMNS, case_slug, to_frame, write_reports

XSS = "<script>alert(1)</script>"
ENV = {"torch": "2.14.1", "diffusers": "0.39.0", "transformers": "5.5.3", "peft": "0.18.1", "device": "cuda",
       "gpu": "NVIDIA H100 80GB HBM3"}
VERDICTS = ("match", "mismatch", "cannot reproduce preview", "error", "size mismatch")


def synthetic_image(side: int, seed: int) -> Image.Image:
    """Smooth shapes and fine noise, compressing about as a render does (not a flat colour, not pure noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    img = np.stack([np.sin(6 * x + seed) * 60 + 120, np.cos(5 * y - seed) * 60 + 110, (x + y) * 70 + 40], -1)
    for _ in range(6):
        cx, cy, r = rng.random(3) * [1, 1, 0.25]
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] += rng.integers(-60, 60, 3)
    img += rng.normal(0, 4, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def synthetic_record(i: int, case: str, step: int, index: int, verdict: str, prompt: str) -> dict:
    stem = f"17957{i:08d}__{step:09d}_{index}"
    training = {f: f"t-{f}" for f in FIELD_NAMES}
    reference = dict(training)
    reference.update({"cfg_norm": "true", "text_encoder_rope": "float32", "output_format": "png"})
    training.update({"cfg_norm": "false", "text_encoder_rope": "bfloat16", "output_format": "jpeg-q75",
                     "prompt": prompt})
    reference["prompt"] = prompt
    findings = [{"field": f, "training": training[f], "reference": reference[f], "effect": f"what {f} does"}
                for f in ("cfg_norm", "text_encoder_rope", "output_format")]
    causes = {"metric": "mean_abs", "gap": 3.0, "floor": 0.2, "reference_distance": 4.0, "training_distance": 1.0,
              "causes": [{"fields": ["cfg_norm"], "distance": 1.6, "share": 0.8, "reverse_distance": 3.7,
                          "testable": True, "reason": ""},
                         {"fields": ["text_encoder_rope"], "distance": 3.7, "share": 0.1, "reverse_distance": 1.1,
                          "testable": True, "reason": ""},
                         {"fields": ["output_format"], "distance": None, "share": None, "reverse_distance": None,
                          "testable": False, "reason": "the preview's encoding"}],
              "closing_set": [{"cause": "cfg_norm", "distance": 1.6, "share": 0.8, "marginal": 0.8},
                              {"cause": "text_encoder_rope", "distance": 1.0, "share": 1.0, "marginal": 0.2}],
              "closed": True, "closing_renders": 1}
    ssim = round(0.995 - 0.00002 * step - 0.01 * (verdict != "match") - 0.001 * index, 4)
    row = {"id": f"{case}/{step}/{index}", "case": case, "preview": f"{stem}.jpg", "step": step,
           "sample_index": index, "verdict": verdict, "reason": "" if verdict == "match" else f"ssim {ssim} not >= 0.98",
           "ssim": ssim, "psnr": 38.5 - step / 100, "mean_abs": 1.5 + step / 200, "max_abs": 20 + step // 50,
           "width": 1024, "height": 1024, "seed": 42 + index, "steps": 20, "guidance": 3.0, "multiplier": 1.0,
           "prompt": prompt, "lora": f"lora_{step:09d}.safetensors", "model": "Qwen/Qwen-Image-Edit-2509",
           "device": "cuda", "dtype": "bfloat16", "render_seconds": 12.3, "fidelity_verdict": "reproduced",
           "fidelity_max_abs": 3, "fidelity_mean_abs": 0.4, "findings": "; ".join(f["field"] for f in findings),
           "ssim_raw": ssim - 0.1, "psnr_raw": 30.0, "mean_abs_raw": 5.0, "max_abs_raw": 60, "notes": "",
           "torch": "2.14.1", "diffusers": "0.39.0", "findings_detail": json.dumps(findings),
           "top_cause": "cfg_norm", "top_cause_share": 0.8, "causes": json.dumps(causes),
           "closing_set": "cfg_norm 0.80 > text_encoder_rope 1.00", "closing_share": 1.0,
           "interactions": "text_encoder_rope alone 0.10, after cfg_norm 0.20",
           "golden_verdict": "same", "golden_max_abs": 0, "golden_fingerprint": "ab12cd34",
           "lpips_alex": round(0.01 + 0.00004 * step, 4), "stlpips_alex": 0.02, "hint_try": "set cfg_norm: false"}
    row.update({f"training.{f}": v for f, v in training.items()})
    row.update({f"reference.{f}": v for f, v in reference.items()})
    return row


KINDS = ("preview", "reference", "training", "diff", "ssim_map", "stlpips_alex_map", "cause-cfg_norm",
         "cause-text_encoder_rope")  # every image the runner writes for a preview with two causes tested


def image_set(pool: Path, k: int, side: int, mode: str) -> dict[str, Path]:
    """One preview's images, made and encoded as the runner makes them (images.py): a JPEG q75 preview, renders a
    few levels off it, the heat maps between them; written once into `pool` and reused."""
    from parity import compare as cmp
    from parity.images import find, save, save_preview
    from parity.metrics import heat

    folder, stem = pool / mode, f"set{k}"
    found = find(folder, stem)
    if set(found) == set(KINDS):
        return found
    rng = np.random.default_rng(k)
    image = synthetic_image(side, k)
    folder.mkdir(parents=True, exist_ok=True)
    jpg = pool / f"{stem}.jpg"
    image.save(jpg, quality=75)
    preview = Image.open(jpg).convert("RGB")
    noisy = lambda: Image.fromarray(np.clip(np.asarray(image) + rng.normal(0, 2, (side, side, 3)), 0, 255)  # noqa
                                    .round().astype(np.uint8))
    reference = noisy()
    save_preview(jpg, preview, folder, stem, mode)
    for kind, im in {"reference": reference, "training": noisy(), "diff": cmp.diff_heatmap(preview, reference),
                     "ssim_map": cmp.ssim_heatmap(preview, reference),
                     "stlpips_alex_map": heat(rng.random((side // 16, side // 16)), (side, side)),
                     "cause-cfg_norm": noisy(), "cause-text_encoder_rope": noisy()}.items():
        save(im, folder, stem, kind, mode)
    return find(folder, stem)


def make_report(folder: Path, n: int = 12, side: int = 64, distinct: int = 6,
                mode: str = "compact") -> tuple[list[dict], dict]:
    """n records over two cases and every verdict, with every image kind the runner writes (hard links to a few
    distinct sets, so that big reports are quick to make); writes the reports and returns (records, paths)."""
    pool = folder.parent / f".pool-{side}"
    sets = [image_set(pool, k, side, mode) for k in range(distinct)]
    prompts = ["make the square red", "a cat in a hat, watercolour", XSS, "turn the photo into line art"]
    records = []
    for i in range(n):
        case = "run_a" if i % 3 else "run b/with spaces"
        index, step = i % 4, (i // 4) * 250
        rec = synthetic_record(i, case, step, index, VERDICTS[i % len(VERDICTS)], prompts[index])
        if i == 1:  # an old record, from before attribution and LPIPS
            for key in ("top_cause", "top_cause_share", "causes", "lpips_alex", "stlpips_alex", "golden_verdict",
                        "golden_max_abs", "golden_fingerprint", "hint_try"):
                rec.pop(key)
        records.append(rec)
        stem = Path(rec["preview"]).stem
        images = folder / "images" / case
        images.mkdir(parents=True, exist_ok=True)
        for kind, source in sets[i % distinct].items():
            target = images / f"{stem}.{kind}{source.suffix}"
            try:  # a hard link: a big report takes little disk, its files still count their full size
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
    paths = write_reports(records, folder, ENV)
    return records, paths


def measure(folder: Path, n: int = 100, side: int = 1024, mode: str = "compact") -> dict:
    """Make an n-preview report at side x side and return its sizes in bytes and the seconds it took."""
    import time

    start = time.perf_counter()
    make_report(folder, n=n, side=side, mode=mode)
    seconds = time.perf_counter() - start
    files = [p for p in folder.rglob("*") if p.is_file()]
    size = lambda ps: sum(p.stat().st_size for p in ps)  # noqa: E731
    thumbs = [p for p in files if p.parent.name == "thumbs"]
    full = [p for p in files if p.parent.name != "thumbs" and p.suffix in (".png", ".webp", ".jpg")]
    pages = [p for p in files if p.suffix == ".html"]
    return {"previews": n, "side": side, "images": mode, "index_bytes": (folder / "index.html").stat().st_size,
            "case_pages_bytes": size(pages) - (folder / "index.html").stat().st_size,
            "thumbnails": len(thumbs), "thumbnail_bytes": size(thumbs), "full_size_images": len(full),
            "full_size_image_bytes": size(full),
            "csv_json_bytes": size(p for p in files if p.suffix in (".csv", ".json")),
            "total_bytes": size(files), "bytes_per_preview": size(files) // n,
            "seconds_with_thumbnails": round(seconds, 1)}


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self._in_script = tag == "script"
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.refs.append(value)

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)

    def handle_endtag(self, tag):
        self._in_script = False


def parse(path: Path) -> Links:
    links = Links()
    links.feed(path.read_text(encoding="utf-8"))
    return links


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report") / "reports"
    records, paths = make_report(folder)
    return folder, records, paths


def test_csv_has_every_column_in_the_fixed_order(report):
    folder, records, _ = report
    frame = pd.read_csv(folder / "parity.csv")
    assert list(frame.columns) == COLUMNS + ["hint_try"]  # a key the column list lacks: after it, by name
    assert COLUMNS[:5] == ["case", "preview", "step", "sample_index", "verdict"]
    assert COLUMNS.index("findings_detail") < COLUMNS.index("top_cause") < COLUMNS.index("stlpips_alex")
    assert len(frame) == len(records)
    assert frame.loc[1, "top_cause"] != frame.loc[1, "top_cause"]  # NaN: the old record has none
    assert json.loads(frame.loc[0, "causes"])["causes"][0]["fields"] == ["cfg_norm"]


def test_the_column_order_does_not_depend_on_which_record_carries_a_column_first():
    """Columns once came in order of first appearance: `server_*` or `golden_*` moved with the records. Now
    every column has its place (columns.py), whatever the records hold and in whatever order."""
    plain = {"case": "c", "verdict": "match"}
    server = {"server_seconds": 1.0, "golden_reason": "drift", "floor_how": "x", "case": "d", "hint_size_dw": 0,
              "lpips_alex_id": "lpips", "zeta": 1, "alpha": 2}
    one, other = to_frame([plain, server]), to_frame([server, plain])
    assert list(one.columns) == list(other.columns) == COLUMNS + ["alpha", "zeta"]
    assert COLUMNS.index("hint_size_dw") < COLUMNS.index("lpips_alex_id") < COLUMNS.index("golden_reason")


def test_json_holds_records_and_environment(report):
    folder, records, _ = report
    data = json.loads((folder / "parity.json").read_text())
    assert data["environment"] == ENV
    assert data["records"] == records
    for record in data["records"]:  # the CSV's names, in the CSV's order
        assert list(record) == [c for c in COLUMNS + ["hint_try"] if c in record]


def test_pages_and_thumbnails_are_files_next_to_the_index(report):
    folder, records, paths = report
    assert paths["html"] == folder / "index.html"
    case_pages = {p for k, p in paths.items() if k.startswith("case:")}
    assert case_pages == {folder / "cases" / f"{case_slug(c)}.html" for c in {r['case'] for r in records}}
    assert case_slug("run b/with spaces").startswith("run_b_with_spaces-")
    for page in [paths["html"], *case_pages]:
        refs = parse(page).refs
        assert refs
        for ref in refs:
            assert not re.match(r"^[a-z]+:", ref) and not ref.startswith("//"), ref  # no scheme: nothing fetched
            target = ref.split("#")[0]
            if target:
                from urllib.parse import unquote

                assert (page.parent / unquote(target)).is_file(), (page, ref)
    thumbs = list((folder / "images").rglob("thumbs/*.webp"))
    assert len(thumbs) == len(records) * len(KINDS)
    with Image.open(thumbs[0]) as im:
        assert im.format == "WEBP" and max(im.size) <= 256
    index = paths["html"].read_text()
    shown = [ref for ref in re.findall(r'<img[^>]* src="([^"]+)"', index.split("<tbody>")[1])]
    assert shown and all("/thumbs/" in ref for ref in shown)  # the index shows thumbnails only


def test_every_string_is_escaped(report):
    folder, _, paths = report
    for page in [paths["html"], *(p for k, p in paths.items() if k.startswith("case:"))]:
        html = page.read_text()
        assert XSS not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert len(parse(page).scripts) == 1  # only the report's own script


def test_content_security_policy_allows_only_the_reports_script(report):
    import base64
    import hashlib

    _, _, paths = report
    html = paths["html"].read_text()
    from html import unescape

    csp = unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html).group(1))
    script = parse(paths["html"]).scripts[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp and "default-src 'none'" in csp


def test_index_shows_counts_environment_and_causes(report):
    _, records, paths = report
    html = paths["html"].read_text()
    for verdict in VERDICTS:
        n = sum(r["verdict"] == verdict for r in records)
        assert f'data-verdict="{verdict}"><b>{n}</b>' in html
    for value in ("NVIDIA H100 80GB HBM3", "bfloat16", "2.14.1", "0.39.0", "5.5.3", "0.18.1", "Qwen/Qwen-Image-Edit-2509"):
        assert value in html
    assert '<span class="cause">cfg_norm</span>' in html and "80%" in html
    assert "closing set: cfg_norm 0.80 &gt; text_encoder_rope 1.00" in html  # a set of more than one field


def test_case_page_has_recipes_findings_attribution_hints_and_charts(report):
    folder, _, _ = report
    html = (folder / "cases" / "run_a.html").read_text()
    assert html.count('class="differs"') == 3 * html.count('<section class="preview"')
    assert "what cfg_norm does" in html
    assert 'class="bar" style="width: 80.0%"' in html and "not tested: the preview&#39;s encoding" in html
    assert "set cfg_norm: false" in html
    assert "<h3>Closing set</h3>" in html and "+ text_encoder_rope" in html and "Closed:" in html
    assert 'class="bar" style="width: 100.0%"' in html and "text_encoder_rope alone 0.10, after cfg_norm" in html
    assert html.count('<svg class="chart"') >= 3
    assert 'class="cmp-slider"' in html and "with training cfg_norm" in html
    assert "../images/run_a/" in html


def test_records_without_images_or_new_fields_still_render(tmp_path):
    records = [{"case": "c", "preview": "", "verdict": "error", "reason": "config unreadable: <bad>", "step": None,
                "sample_index": None}]
    paths = write_reports(records, tmp_path, {})
    assert "config unreadable: &lt;bad&gt;" in paths["html"].read_text()
    assert "No images for this preview." in (tmp_path / "cases" / "c.html").read_text()


def test_size_of_a_100_preview_report_at_1024(tmp_path):
    """Index under 2 MB and the whole report, every full-size image included, under 150 MB (compact images,
    the default); prints every figure."""
    figures = measure(tmp_path / "reports", n=100, side=1024)
    print("\n" + "\n".join(f"{k}: {v}" for k, v in figures.items()))
    assert figures["index_bytes"] < 2_000_000
    assert figures["total_bytes"] < 150_000_000
    assert figures["thumbnails"] == figures["full_size_images"] == 100 * len(KINDS)


def test_step_chart_names_a_trend_only_above_the_labels_precision():
    from parity.report import step_chart

    def rows(values, key="ssim", verdicts=("match",) * 3):
        return [{"step": s, "r": {key: v}, "anchor": f"p{s}", "vclass": "pass", "verdict": verdict}
                for s, v, verdict in zip((0, 10, 20), values, verdicts)]

    same = step_chart(rows([0.9999981, 0.9999990, 0.9999983]), "ssim", higher_better=True)
    assert same["digits"] == 6 and same["trend"].startswith("unchanged")
    assert same["x_left"] >= 6 * len("0.999999") + 10  # the six-decimal axis labels fit left of the plot
    failing = ("mismatch",) * 3
    worse = step_chart(rows([0.95, 0.93, 0.91], verdicts=failing), "ssim", higher_better=True)
    assert worse["trend"] == "worse (-0.040), mismatch at both ends" and worse["x_left"] == 46
    better = step_chart(rows([0.3, 0.2, 0.1], "lpips", verdicts=failing), "lpips", higher_better=False)
    assert better["trend"] == "better (-0.200), mismatch at both ends"


def test_step_chart_judges_a_trend_by_the_verdicts_not_by_a_move_within_them():
    from parity.report import step_chart

    def rows(values, verdicts):
        return [{"step": s, "r": {"ssim": v}, "anchor": f"p{s}", "vclass": "pass", "verdict": verdict}
                for s, v, verdict in zip((0, 500, 1000), values, verdicts)]

    # two matching previews 3e-6 apart (above the labels' six decimals): no "worse", the preview passes throughout
    tiny = step_chart(rows([0.999990, 0.999995, 0.999987], ("match",) * 3), "ssim", higher_better=True)
    assert tiny["trend"] == "match at both ends (-0.000003)"
    crossed = step_chart(rows([0.97, 0.9, 0.8], ("match", "mismatch", "mismatch")), "ssim", higher_better=True)
    assert crossed["trend"] == "worse: match at step 0, mismatch at step 1000 (-0.170)"
    mended = step_chart(rows([0.8, 0.9, 0.97], ("mismatch", "match", "explained")), "ssim", higher_better=True)
    assert mended["trend"] == "better: mismatch at step 0, explained at step 1000 (+0.170)"
