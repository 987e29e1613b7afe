"""Time of the full metric set for one 1024x1024 pair on this CPU, next to one real render of the tiny model.

    python bench/metrics.py

One torch thread (as the harness runs). Prints each part, the full set for a PNG preview (raw only) and for a
JPEG preview (raw + `_jpeg`), and their share of the render's time.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parity import compare as cmp  # noqa: E402
from parity import metrics as M  # noqa: E402
from parity.hints import hints  # noqa: E402

TINY = ROOT / "cases" / "workspace" / "aitk" / "tiny-qwen-image-edit-2509"


def timed(fn, repeat: int = 3):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def one_render() -> tuple[float, str]:
    from parity import pipeline, render
    from parity.case import discover
    from parity.previews import index_checkpoints, index_previews, lora_for_step
    from parity.recipe import reference_recipe

    case = next(c for c in discover([ROOT / "cases"]) if c.name == "tiny_qwen_image_edit_plus_lora_v1")
    job = case.job()
    pv = index_previews(case.folder)[0][0]
    ck = lora_for_step(case.folder, job.name, pv.step, index_checkpoints(case.folder, job.name))
    sched = json.loads((TINY / "scheduler" / "scheduler_config.json").read_text())
    recipe = reference_recipe(job, job.items[pv.index], str(ck.path) if ck else None, case.resolve,
                              scheduler=sched, device="cpu", dtype="bfloat16")
    loaded = pipeline.load(str(TINY.resolve()), "cpu", "bfloat16")
    seconds, image = timed(lambda: render.render(loaded, recipe), repeat=1)
    return seconds, f"{image.width}x{image.height}, {recipe.steps} steps"


def main():
    torch.set_num_threads(1)
    a = Image.fromarray(data.astronaut()).resize((1024, 1024), Image.LANCZOS)
    noise = np.random.default_rng(0).normal(0, 6, (1024, 1024, 3))
    b = Image.fromarray(np.clip(np.asarray(a) + noise, 0, 255).round().astype(np.uint8))
    buf = io.BytesIO()
    a.save(buf, format="JPEG", quality=75)
    preview_jpg = Image.open(io.BytesIO(buf.getvalue()))
    metrics = M.build()
    for m in metrics:
        m.available  # load once, outside the timings
        print(f"{m.name:14s} {m.id}: " + ("available, " + m.source if m.available else "unavailable: " + m.reason))
    parts = {
        "compare (ssim, psnr, abs)": lambda: cmp.compare(a, b),
        "diff heat map": lambda: cmp.diff_heatmap(a, b),
        "ssim heat map": lambda: cmp.ssim_heatmap(a, b),
        **{f"{m.name} + map": (lambda m=m: m(a, b)) for m in metrics if m.available},
        "hints": lambda: hints(a, b),
        "jpeg settings + encode": lambda: M.encode_jpeg(b, M.jpeg_settings(preview_jpg)),
    }
    print(f"\n1024x1024 pair, torch threads {torch.get_num_threads()}, best of 3:")
    for name, fn in parts.items():
        print(f"  {name:28s} {timed(fn)[0]:6.3f} s")
    png_set, _ = timed(lambda: M.maps(a, b, M.compare_preview(a, b, metrics).raw))
    jpg_set, _ = timed(lambda: M.maps(preview_jpg, b, M.compare_preview(preview_jpg, b, metrics).judged))
    print(f"  {'full set, PNG preview':28s} {png_set:6.3f} s   (metrics, hints, maps)")
    print(f"  {'full set, JPEG preview':28s} {jpg_set:6.3f} s   (raw + _jpeg metrics, hints, maps)")
    render_s, what = one_render()
    print(f"\none render of the tiny model ({what}): {render_s:.2f} s")
    print(f"share of a render: PNG preview {png_set / render_s:.0%}, JPEG preview {jpg_set / render_s:.0%}")
    print("target: full set under 1 s on CPU ->", "met" if png_set < 1 else "NOT met", "(PNG),",
          "met" if jpg_set < 1 else "NOT met", "(JPEG)")


if __name__ == "__main__":
    main()
