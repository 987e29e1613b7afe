"""Time of the full metric set for one 1024x1024 pair on this CPU, next to one real render of the tiny model.

    python bench/metrics.py

One torch thread (as the harness runs). Prints each part, the full set for a PNG preview (one pair) and for a
JPEG preview (two pairs: raw and `_jpeg`), and their share of the tiny render's time.
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

TINY = ROOT / "tests" / "data" / "tiny" / "workspace" / "aitk" / "tiny-qwen-image-edit-2509"


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
    from parity.engines.server import reference_recipe

    case = next(c for c in discover([ROOT / "tests" / "data" / "tiny"]) if c.name == "tiny_qwen_image_edit_plus_lora_v1")
    job = case.job()
    pv = index_previews(case.folder)[0][0]
    ck = lora_for_step(case.folder, job.name, pv.step, index_checkpoints(case.folder, job.name))
    sched = json.loads((TINY / "scheduler" / "scheduler_config.json").read_text())
    recipe = reference_recipe(job, job.items[pv.index], str(ck.path) if ck else None, case.resolve,
                              scheduler=sched, device="cpu", dtype="bfloat16")
    loaded = pipeline.load(str(TINY.resolve()), "cpu", "bfloat16")
    seconds, image = timed(lambda: render.render(loaded, recipe), repeat=1)
    return seconds, f"{image.width}x{image.height}, {recipe.steps} steps"


def pair() -> tuple[Image.Image, Image.Image, Image.Image]:
    """A 1024x1024 photo, the same with noise (the regeneration), and the photo as a quality-75 JPEG preview."""
    a = Image.fromarray(data.astronaut()).resize((1024, 1024), Image.LANCZOS)
    noise = np.random.default_rng(0).normal(0, 6, (1024, 1024, 3))
    b = Image.fromarray(np.clip(np.asarray(a) + noise, 0, 255).round().astype(np.uint8))
    buf = io.BytesIO()
    a.save(buf, format="JPEG", quality=75)
    return a, b, Image.open(io.BytesIO(buf.getvalue()))


def full_set(metrics, device: str = "cpu") -> dict[str, float]:
    """Seconds (best of 3) of everything the runner measures for one preview: PNG preview (one pair) and JPEG
    preview (the raw pair and the pair with the regeneration JPEG-encoded like the preview: two pairs).
    `device`: where SSIM and the perceptual distances run (`metrics` built for it), as the runner does."""
    a, b, preview_jpg = pair()
    jpeg = M.jpeg_settings(preview_jpg)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def one(preview, settings):
        out = M.maps(preview, b, M.compare_preview(preview, b, metrics, jpeg=settings, device=device).raw)
        sync()
        return out

    png_set, _ = timed(lambda: one(a, None))
    jpg_set, _ = timed(lambda: one(preview_jpg, jpeg))
    return {"png": png_set, "jpeg": jpg_set}


def main():
    torch.set_num_threads(1)
    a, b, preview_jpg = pair()
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
    sets = full_set(metrics)
    print(f"  {'full set, PNG preview':28s} {sets['png']:6.3f} s   (one pair: metrics, hints, maps)")
    print(f"  {'full set, JPEG preview':28s} {sets['jpeg']:6.3f} s   (two pairs: raw and _jpeg metrics; hints, maps)")
    render_s, what = one_render()
    print(f"\none render of the tiny model ({what}): {render_s:.2f} s")
    print(f"share of a render: PNG preview {sets['png'] / render_s:.0%}, JPEG preview {sets['jpeg'] / render_s:.0%}")
    print(f"target: full set for one pair under 1 s on CPU -> {'met' if sets['png'] < 1 else 'NOT met'} "
          f"({sets['png']:.2f} s); a JPEG preview is two pairs: {sets['jpeg']:.2f} s, "
          f"{sets['jpeg'] / 2:.2f} s a pair ({'met' if sets['jpeg'] < 1 else 'NOT met'} for the whole preview)")
    print("GPU share of a real-size render: python bench/render_share.py on a CUDA machine")

if __name__ == "__main__":
    main()
