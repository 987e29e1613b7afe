"""Write the data that the demo recordings' ai-toolkit configs name, into a folder that stands for /workspace.

    python scripts/demo_workspace.py WORKSPACE [--pairs 24] [--seed demo-recording]

Everything is drawn from the demo task (scripts/demo_model/task.py) with a seed, so the same command writes the
same bytes. Written under WORKSPACE/aitk/data/:

- demo_train/NNNN.png + NNNN.txt: the LoRA's training targets and their captions (the edit's prompt), and
  demo_control/NNNN.png: the control image of each pair (ai-toolkit pairs them by file name);
- sample_ctrl/*.png: the control images the sample prompts name (scene_a, scene_b: square 128 px;
  scene_wide: 160x120 and scene_tall: 128x192, the same kind of scene on a wider or taller canvas, for the
  non-square paths); the same files also under WORKSPACE/aitk-a/data/sample_ctrl for the parity_a run.

The LoRA learns one thing the demo model was never taught, so that its effect is visible in the previews:
with the word "teal", the background becomes teal (a colour outside the demo model's palette).
The checkpoint itself is linked in by scripts/record-fixtures, not copied here.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import replace
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent / "demo_model"))
import task  # noqa: E402  (scripts/demo_model/task.py)

TEAL = (20, 150, 150)
SAMPLE_SCENES = {  # name -> (seed, width, height): the held-out scenes the sample prompts use
    "scene_a": ("sample-a", 128, 128),
    "scene_b": ("sample-b", 128, 128),
    "scene_wide": ("sample-wide", 160, 120),
    "scene_tall": ("sample-tall", 128, 192),
}
SAMPLE_FOLDERS = ("aitk", "aitk-a")  # each run's workspace folder has its own data/sample_ctrl


def teal_background(scene: task.Scene) -> Image.Image:
    """The scene drawn with a teal background: the LoRA's edit."""
    im = scene.draw()
    mask = Image.fromarray(scene.background_mask(task.SIZE).astype("uint8") * 255)
    teal = Image.new("RGB", im.size, TEAL)
    # anti-aliased edges: keep the drawn shape pixels, replace what is background at the scene's resolution
    return Image.composite(teal, im, mask)


def on_canvas(scene: task.Scene, width: int, height: int) -> Image.Image:
    """The 128 px scene centred on a canvas of the scene's background colour (for non-square controls)."""
    canvas = Image.new("RGB", (width, height), task.BACKGROUNDS[scene.background])
    canvas.paste(scene.draw(), ((width - task.SIZE) // 2, (height - task.SIZE) // 2))
    return canvas


def write(workspace: Path, pairs: int, seed: str) -> list[Path]:
    root = workspace / "aitk" / "data"
    for sub in ("demo_train", "demo_control", "sample_ctrl"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}:lora")
    written = []
    for i in range(pairs):
        scene = task.random_scene(rng)
        if i % 2 == 0:  # the new edit, half of the pairs
            target, prompt = teal_background(scene), "make the background teal"
        else:  # an edit the demo model knows, so the LoRA does not forget it
            edit = task.random_edit(scene, rng, kinds=("shapes", "background"), weights=(0.5, 0.5))
            target, prompt = edit.target.draw(), edit.prompt
        stem = f"{i:04d}"
        scene.draw().save(root / "demo_control" / f"{stem}.png")
        target.save(root / "demo_train" / f"{stem}.png")
        (root / "demo_train" / f"{stem}.txt").write_text(prompt)
        written += [root / "demo_control" / f"{stem}.png", root / "demo_train" / f"{stem}.png"]
    for name, (scene_seed, width, height) in SAMPLE_SCENES.items():
        scene = task.random_scene(random.Random(f"{seed}:{scene_seed}"))
        if scene.background == "grey":  # the sample edits recolour a grey background: pick a white one instead
            scene = replace(scene, background="white")
        image = scene.draw() if (width, height) == (task.SIZE, task.SIZE) else on_canvas(scene, width, height)
        for folder in SAMPLE_FOLDERS:
            path = workspace / folder / "data" / "sample_ctrl" / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workspace", type=Path)
    p.add_argument("--pairs", type=int, default=24)
    p.add_argument("--seed", default="demo-recording")
    args = p.parse_args(argv)
    files = write(args.workspace, args.pairs, args.seed)
    print(f"wrote {len(files)} files under {args.workspace / 'aitk' / 'data'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
