"""Where a demo model's edits go wrong: its x0 estimate on held-out edits at a few noise levels.

    python scripts/demo_model/diagnose.py [--model DIR] [--size 512] [--count 8] [--sheet PNG]

For each held-out edit of `bench/demo_model.py` (the same scenes, prompts and order), the transformer gets the
edit's true target latents noised to sigma (x_t = (1 - s) x_0 + s noise), the control image's latents and the
prompt, as in training; its estimate x0 = x_t - s v is decoded and judged with `task.edit_is_right`. A model
whose estimate is right from sigma 0.7 down but wrong at 0.9-0.98 decides its renders in the first sampling
steps, where a render at the pipeline's shift spends about a fifth of its 25 steps, and carries those errors
on (measured on the bundled model: see scripts/demo_model/README.md).

Printed: one line per edit (right or not at each sigma), then the share right per sigma. `--sheet` writes the
control image and the decoded estimates, one row per edit.

`--backgrounds N` prints instead, for N scenes each given every background and every background edit, how far
the x0 estimate goes from the control image's latents toward the edit's (0: kept, 1: the edit), over the tokens
the edit changes, with the edit's prompt and with the null prompt: at sigma 1 (pure noise, what a render's first
step sees) and at 0.9 and 0.7 (the true target noised, as above).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "bench"))

import task  # noqa: E402
import train  # noqa: E402
from demo_model import DEMO, held_out  # noqa: E402  (bench/demo_model.py)

SIGMAS = (0.98, 0.9, 0.7, 0.4)
COMMIT_SIGMAS = (1.0, 0.9, 0.7)


def estimates(pipe, scene: task.Scene, edit: task.Edit, size: int, seed: int) -> list[Image.Image]:
    """The decoded x0 estimates of one edit at each of SIGMAS (one noise draw, seeded)."""
    grid = size // 16
    control = train.packed_latents(pipe, [train.upsampled(scene, size)])
    x0 = train.packed_latents(pipe, [train.upsampled(edit.target, size)])
    embeds = train.prompt_embeds(pipe, edit.prompt, scene.draw(), stock_pil=True)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, 16, 1, 1, 1)
    out = []
    for s in SIGMAS:
        xt = (1 - s) * x0 + s * noise
        latents = pipe._unpack_latents(x0_estimate(pipe, xt, control, embeds, s, grid), size, size,
                                       pipe.vae_scale_factor)
        image = pipe.vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
        out.append(pipe.image_processor.postprocess(image, output_type="pil")[0])
    return out


def x0_estimate(pipe, xt, control, embeds, s: float, grid: int) -> torch.Tensor:
    """The transformer's estimate of the target tokens, x_t - s v, given x_t at sigma `s`, the control tokens and
    one prompt's embeddings (both token images grid x grid)."""
    v = pipe.transformer(hidden_states=torch.cat([xt, control], 1), timestep=torch.tensor([s]),
                         encoder_hidden_states=embeds[None], encoder_hidden_states_mask=None,
                         img_shapes=[[(1, grid, grid), (1, grid, grid)]], return_dict=False)[0][:, : grid * grid]
    return xt - s * v


def background_commitment(pipe, count: int, size: int) -> None:
    """For `--backgrounds`: the share of the way to each background edit that the x0 estimate goes (see above)."""
    from dataclasses import replace

    grid = size // 16
    rng = random.Random("diagnose-backgrounds")
    for trial in range(count):
        first = task.random_scene(rng)
        for start in sorted(task.BACKGROUNDS):
            scene = replace(first, background=start)
            control = train.packed_latents(pipe, [train.upsampled(scene, size)])
            noise = torch.randn(control.shape, generator=torch.Generator().manual_seed(trial))
            null = train.prompt_embeds(pipe, "", scene.draw(), stock_pil=True)
            for colour in sorted(set(task.BACKGROUNDS) - {start}):
                target = train.packed_latents(pipe, [train.upsampled(replace(scene, background=colour), size)])
                step = target - control
                changed = step.norm(dim=-1) > train.CHANGED_DISTANCE
                embeds = train.prompt_embeds(pipe, f"make the background {colour}", scene.draw(), stock_pil=True)
                cells = []
                for s in COMMIT_SIGMAS:
                    xt = noise if s == 1.0 else (1 - s) * target + s * noise
                    shares = [float((((x0_estimate(pipe, xt, control, e, s, grid) - control) * step).sum(-1)
                                      / step.pow(2).sum(-1))[changed].mean()) for e in (embeds, null)]
                    cells.append(f"sigma {s}: prompt {shares[0]:.2f} null {shares[1]:.2f}")
                print(f"{trial} {start:>5s} -> {colour:5s} " + " | ".join(cells), flush=True)


def main(argv=None) -> int:
    from diffusers import QwenImageEditPlusPipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEMO))
    p.add_argument("--size", type=int, default=512, help="square render size in pixels (a multiple of 16)")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sheet", default=None)
    p.add_argument("--backgrounds", type=int, default=0, help="scenes for the background-edit commitment figures")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = QwenImageEditPlusPipeline.from_pretrained(args.model, torch_dtype=torch.float32, local_files_only=True)
    if args.backgrounds:
        with torch.no_grad():
            background_commitment(pipe, args.backgrounds, args.size)
        return 0
    right = {s: [] for s in SIGMAS}
    rows = []
    with torch.no_grad():
        for i, (scene, edit) in enumerate(held_out(args.count)):
            images = estimates(pipe, scene, edit, args.size, i)
            for s, image in zip(SIGMAS, images):
                right[s].append(task.edit_is_right(image, scene, edit))
            rows.append([scene.draw(), *images])
            print(f"{i:2d} {edit.prompt!r:30s} " + " ".join(f"{s}:{'right' if right[s][-1] else 'WRONG'}"
                                                            for s in SIGMAS), flush=True)
    print("x0 estimate right: " + " ".join(f"sigma {s} {np.mean(right[s]):.2f}" for s in SIGMAS))
    if args.sheet:
        cell = 128
        sheet = Image.new("RGB", (cell * len(rows[0]), cell * len(rows)))
        for y, row in enumerate(rows):
            for x, image in enumerate(row):
                sheet.paste(image.resize((cell, cell), Image.Resampling.LANCZOS), (x * cell, y * cell))
        sheet.save(args.sheet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
