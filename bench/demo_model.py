"""Does the demo model (scripts/demo_model/train.py) make pictures and listen to its prompt? Four figures.

    python bench/demo_model.py [--model DIR] [--count N] [--steps 25] [--dtype float32] [--sheet PNG]

Held-out scenes and edits are drawn from a seed the training never used (scripts/demo_model/task.py). Every
render goes through the harness's renderer with a reference recipe (stock QwenImageEditPlusPipeline behaviour:
true CFG with its norm rescale, negative prompt " "), at the control image's VAE size (1024x1024 for the
128 px scenes), so control tokens and target tokens share one grid as in the model's training. Printed:

- edit accuracy: the share of guidance-4 renders whose named edit is right, judged from pixels
  (`task.edit_is_right`: the edited region's median colour is nearest the asked-for colour); target >= 0.8;
- resemblance: mean SSIM between render and control over the region the edit does not touch; target >= 0.6;
- guidance effect: mean absolute difference (0-255) between renders at guidance 4 and guidance 1 (same seed);
  target >= 8;
- CFG norm effect over the noise floor: mean absolute difference between the rescale on and off (same seed,
  guidance 4) divided by that between PyTorch's math and fused attention kernels (same recipe), both over the
  first `--pairs` samples; target >= 10.

The last line reads `demo model: edit_accuracy A resemblance R guidance_effect G cfg_norm_over_floor F`.

`--screen M` judges a candidate model quickly instead: the guidance-4 render of each held-out edit only (rows
named by `--first` first, then the rest in order), stopping at the M-th miss, since with `--count 12` a third
miss already puts edit accuracy under its target. Its last line reads `screen: R right of N, missed rows [...]`
(with `--json`, the same as `{"screen": {...}}`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts/demo_model"))

import task  # noqa: E402  (scripts/demo_model/task.py)

from parity import pipeline, render  # noqa: E402
from parity.models import rendered  # noqa: E402
from parity.preprocess import PROMPT_RESIZE, VAE_RESIZE, vae_size  # noqa: E402
from parity.forms import LORA_NONE  # noqa: E402
from parity.recipe import Recipe, scheduler_json  # noqa: E402

DEMO = REPO / "cases/workspace/aitk/demo-qwen-image-edit-2509"  # where train.py's checkpoint is meant to go
TARGETS = {"edit_accuracy": 0.8, "resemblance": 0.6, "guidance_effect": 8.0, "cfg_norm_over_floor": 10.0}
HELD_OUT_SEED = "bench-held-out"  # training draws from "<seed>:data" and "<seed>:vae"


def held_out(count: int) -> list[tuple[task.Scene, task.Edit]]:
    """`count` scenes with one edit each, the two edit kinds in turn."""
    rng = random.Random(HELD_OUT_SEED)
    kinds = ("shapes", "background")
    out = []
    for i in range(count):
        scene = task.random_scene(rng)
        out.append((scene, task.random_edit(scene, rng, kinds=(kinds[i % 2],), weights=(1.0,))))
    return out


def recipe_for(control: str, prompt: str, seed: int, steps: int, dtype: str, scheduler: dict,
               device: str = "cpu") -> Recipe:
    width, height = vae_size(*Image.open(control).size)
    return Recipe(width=width, height=height, steps=steps, scheduler=scheduler_json(scheduler), guidance=4.0,
                  cfg_norm=True, negative_prompt=" ", seed=seed, generator_device="cpu", prompt=prompt,
                  control_images_prompt=(control,), control_images_vae=(control,),
                  control_prompt_resize=PROMPT_RESIZE, control_vae_resize=VAE_RESIZE, lora=None, multiplier=1.0,
                  lora_application=LORA_NONE, precision="none", text_encoder_rope="float32", vae_tiling=False,
                  device=device, dtype=dtype, output_format="png", model=rendered()["qwen_image_edit_plus"].name)


def held_out_recipe(tmp: str, i: int, scene: task.Scene, edit: task.Edit, args, scheduler: dict
                    ) -> tuple[Image.Image, Recipe]:
    """Held-out row i's control image (saved under tmp) and its guidance-4 recipe with the bench's seed."""
    control = scene.draw()
    path = str(Path(tmp) / f"control_{i:02d}.png")
    control.save(path)
    return control, recipe_for(path, edit.prompt, 1000 + i, args.steps, args.dtype, dict(scheduler), args.device)


def mean_abs(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEMO))
    p.add_argument("--count", type=int, default=12, help="held-out edits (default 12: six of each kind)")
    p.add_argument("--pairs", type=int, default=3, help="samples for the CFG-norm and noise-floor renders")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="render on this device (the figures in the README are the CPU's; "
                   "the noise is drawn on the CPU either way)")
    p.add_argument("--sheet", default=None, help="write a contact sheet of the renders here (PNG)")
    p.add_argument("--json", default=None, help="write the per-sample figures here")
    p.add_argument("--screen", type=int, default=None, metavar="M",
                   help="guidance-4 renders only, stopping at the M-th missed edit (no other figures)")
    p.add_argument("--first", default="", help="with --screen: comma-separated rows to render first")
    args = p.parse_args(argv)
    first_rows(args.first, args.count)  # a bad --first fails before the model loads
    torch.set_num_threads(args.threads)
    if not (Path(args.model) / "model_index.json").exists():
        print(f"no demo model at {args.model}: train one with\n"
              f"  python scripts/demo_model/train.py --out {args.model}\n(about 95 minutes on 2 CPU cores)")
        return 2
    loaded = pipeline.load(args.model, args.device, args.dtype)
    scheduler = dict(loaded.pipe.scheduler.config)
    if args.screen is not None:
        return screen(loaded, scheduler, args)
    rows, sheet = [], []
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for i, (scene, edit) in enumerate(held_out(args.count)):
            control, base = held_out_recipe(tmp, i, scene, edit, args, scheduler)
            main_render = render.render(loaded, base)
            plain = render.render(loaded, base.with_fields(guidance=1.0))
            row = {"prompt": edit.prompt, "kind": edit.kind, "right": task.edit_is_right(main_render, scene, edit),
                   "resemblance": task.resemblance(main_render, control, scene, edit),
                   "guidance_effect": mean_abs(main_render, plain)}
            images = [control.resize(main_render.size), main_render, plain]
            if i < args.pairs:
                off = render.render(loaded, base.with_fields(cfg_norm=False))
                math_kernel = render.render(loaded, base, math_attention=True)
                row["cfg_norm_effect"] = mean_abs(main_render, off)
                row["floor"] = mean_abs(main_render, math_kernel)
                images.append(off)
            rows.append(row)
            sheet.append(images)
            print(f"{i:2d} {edit.kind:10s} {edit.prompt!r:36s} right {row['right']!s:5s} "
                  f"resemblance {row['resemblance']:.3f} guidance_effect {row['guidance_effect']:6.2f}"
                  + (f" cfg_norm {row['cfg_norm_effect']:.3f} floor {row['floor']:.4f}" if "floor" in row else "")
                  + f" ({time.time() - start:.0f} s)", flush=True)
    paired = [r for r in rows if "floor" in r]
    figures = {
        "edit_accuracy": float(np.mean([r["right"] for r in rows])),
        "resemblance": float(np.mean([r["resemblance"] for r in rows])),
        "guidance_effect": float(np.mean([r["guidance_effect"] for r in rows])),
        "cfg_norm_over_floor": float(np.mean([r["cfg_norm_effect"] for r in paired])
                                     / max(np.mean([r["floor"] for r in paired]), 1e-9)),
    }
    if args.sheet:
        write_sheet(sheet, args.sheet)
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "rows": rows, "args": vars(args)}, indent=1))
    for name, value in figures.items():
        print(f"{name:20s} {value:8.3f}  target {TARGETS[name]:g}  {'met' if value >= TARGETS[name] else 'MISSED'}")
    print(f"{len(rows)} held-out edits, {args.steps} steps, {args.dtype}, {time.time() - start:.0f} s")
    print("demo model: " + " ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    return 0


def first_rows(first: str, count: int) -> list[int]:
    """`--first`'s rows, each checked against the bench's `--count`."""
    error = f"--first {first}: rows run from 0 to {count - 1} (--count {count})"
    try:
        rows = [int(r) for r in first.split(",") if r.strip()]
    except ValueError:
        raise SystemExit(error) from None
    if any(not 0 <= r < count for r in rows):
        raise SystemExit(error)
    return rows


def screen(loaded, scheduler: dict, args) -> int:
    """`--screen`: each held-out edit's guidance-4 render, `--first` rows first, until `args.screen` misses."""
    edits = held_out(args.count)
    order = list(dict.fromkeys(first_rows(args.first, args.count) + list(range(len(edits)))))
    right, missed, start = 0, [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for i in order:
            scene, edit = edits[i]
            image = render.render(loaded, held_out_recipe(tmp, i, scene, edit, args, scheduler)[1])
            ok = task.edit_is_right(image, scene, edit)
            right += ok
            missed += [] if ok else [i]
            print(f"{i:2d} {edit.kind:10s} {edit.prompt!r:36s} right {ok!s:5s} ({time.time() - start:.0f} s)",
                  flush=True)
            if len(missed) >= args.screen:
                break
    print(f"screen: {right} right of {right + len(missed)}, missed rows {missed}")
    if args.json:  # what seed_search.py ranks runs by; `complete`: every row judged, fewer than M missed
        result = {"right": right, "judged": right + len(missed), "missed": missed, "count": len(edits),
                  "stop_at": args.screen, "complete": len(missed) < args.screen}
        Path(args.json).write_text(json.dumps({"screen": result}, indent=1))
    return 0


def write_sheet(sheet: list[list[Image.Image]], path: str, cell: int = 160) -> None:
    """One row per held-out edit: control, render (guidance 4), guidance 1, [CFG norm off]."""
    width = max(len(r) for r in sheet)
    out = Image.new("RGB", (cell * width, cell * len(sheet)), (255, 255, 255))
    for y, row in enumerate(sheet):
        for x, im in enumerate(row):
            out.paste(im.resize((cell, cell), Image.Resampling.LANCZOS), (x * cell, y * cell))
    out.save(path)


if __name__ == "__main__":
    sys.exit(main())
