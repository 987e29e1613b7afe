"""The demo model's task (scenes, edits, pixel checks) and its training: reproducible from the seed, and
what it writes loads with `from_pretrained` like the real checkpoint."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts" / "demo_model"))
import task  # noqa: E402

TRAIN = ROOT / "scripts" / "demo_model" / "train.py"

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("kind", ["recolour", "remove", "background"])
def test_an_edit_is_judged_from_pixels(kind):
    rng = random.Random(f"test-{kind}")
    scene = task.random_scene(rng)
    edit = task.random_edit(scene, rng, kinds=(kind,), weights=(1.0,))
    done, untouched = edit.target.draw(), scene.draw()
    assert task.edit_is_right(done, scene, edit)
    assert not task.edit_is_right(untouched, scene, edit)  # doing nothing is not the edit
    assert task.resemblance(done, untouched, scene, edit) > 0.99  # the rest of the picture is as it was
    other = task.random_scene(random.Random(f"other-{kind}")).draw()
    assert task.resemblance(other, untouched, scene, edit) < task.resemblance(done, untouched, scene, edit)


def test_prompts_name_the_edit():
    rng = random.Random(3)
    prompts = {task.random_edit(task.random_scene(rng), rng).prompt for _ in range(200)}
    assert "" in prompts
    assert any(p.startswith("remove the ") for p in prompts)
    assert any(p.startswith("make the background ") for p in prompts)
    recolour = [p for p in prompts if p.startswith("make the ") and "background" not in p]
    assert recolour and all(p.split()[2] in task.SHAPE_COLOURS and p.split()[-1] in task.SHAPE_COLOURS
                            for p in recolour)


def _train(out: Path) -> dict[str, str]:
    small = ["--threads", "1", "--vae-steps", "2", "--vae-batch", "2", "--vae-eval", "0", "--stat-scenes", "2",
             "--colour-steps", "2", "--scenes", "3", "--steps", "3", "--batch", "2", "--long-steps", "2"]
    subprocess.run([sys.executable, str(TRAIN), "--out", str(out), *small], check=True, capture_output=True,
                   cwd=ROOT)
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*.safetensors"))}


def test_training_is_reproducible_from_its_seed(tmp_path):
    first, second = _train(tmp_path / "a"), _train(tmp_path / "b")
    assert set(first) >= {"vae/diffusion_pytorch_model.safetensors",
                          "transformer/diffusion_pytorch_model.safetensors"}
    assert first == second
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert record["seed"] == 0 and record["transformer_steps"] == 3 and record["pairs"] == 6

    import torch
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline.from_pretrained(tmp_path / "a", torch_dtype=torch.float32,
                                                     local_files_only=True)
    assert pipe.vae_scale_factor == 8 and pipe.latent_channels == 16
    assert type(pipe.transformer).__name__ == "QwenImageTransformer2DModel"
    assert type(pipe.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert len(pipe.vae.config.latents_mean) == len(pipe.vae.config.latents_std) == 16
