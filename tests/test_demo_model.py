"""The demo model's task (scenes, edits, pixel checks) and its training: reproducible from the seed, and
what it writes loads with `from_pretrained` like the real checkpoint."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts" / "demo_model"))
import task  # noqa: E402

TRAIN = ROOT / "scripts" / "demo_model" / "train.py"

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("kind", ["shapes", "background"])
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
    edits = [task.random_edit(task.random_scene(rng), rng) for _ in range(200)]
    assert {e.kind for e in edits} == set(task.EDITS)
    for e in edits:
        if e.kind == "none":
            assert e.prompt == ""
        else:  # the last word is the colour, and it alone tells the two kinds apart
            assert e.prompt == f"make the {'background' if e.kind == 'background' else 'shapes'} {e.colour}"
            assert (e.colour in task.BACKGROUNDS) == (e.kind == "background")


def test_an_edit_changes_only_its_region():
    rng = random.Random(5)
    scene = task.random_scene(rng)
    for kind in ("shapes", "background"):
        edit = task.random_edit(scene, rng, kinds=(kind,), weights=(1.0,))
        before, after = (np.asarray(s.draw()).astype(int) for s in (scene, edit.target))
        changed = np.abs(after - before).max(axis=2) > 0
        assert changed.any() and not (changed & task.untouched_mask(scene, edit)).any()


def test_a_favoured_background_edit_is_drawn_more_often():
    """`Favour` (train.py --favour): on a grey scene `make the background white` is drawn with the given extra
    chance; other scenes, and every draw without it, are as before (the bundled model's data is unchanged)."""
    def shares(favour):
        rng, counts, n = random.Random(7), {}, 0
        for _ in range(4000):
            scene = task.random_scene(rng)
            edit = task.random_edit(scene, rng, favour=favour)
            n += 1
            if edit.kind == "background":
                key = (scene.background, edit.colour)
                counts[key] = counts.get(key, 0) + 1
                assert edit.prompt == f"make the background {edit.colour}" and edit.target.background == edit.colour
        return {k: v / n for k, v in counts.items()}

    plain, favoured = shares(None), shares(task.Favour.parse("grey:white:0.3"))
    # uniform draw: each of the six background changes ~ 1/3 * 0.35 * 1/2 = 5.8 %; favoured: + 1/3 * 0.3 * 0.825
    assert 0.045 < plain[("grey", "white")] < 0.075
    assert 0.12 < favoured[("grey", "white")] < 0.16
    assert favoured[("grey", "black")] < plain[("grey", "black")]
    assert abs(favoured[("white", "black")] - plain[("white", "black")]) < 0.02
    anyway = shares(task.Favour.parse("grey:any:0.5"))
    assert anyway[("grey", "black")] > 0.09 and anyway[("grey", "white")] > 0.09

    a, b = random.Random(1), random.Random(1)
    for _ in range(200):
        scene = task.random_scene(a)
        assert task.random_scene(b) == scene
        assert task.random_edit(scene, a) == task.random_edit(scene, b, favour=None)


@pytest.mark.parametrize("text, says", [("grey:white", "SOURCE:TARGET:SHARE"), ("grey:grey:0.3", "two different"),
                                        ("pink:white:0.3", "two different"), ("grey:white:1.5", "(0, 1]")])
def test_a_bad_favour_is_refused_before_training(tmp_path, text, says):
    run = subprocess.run([sys.executable, str(TRAIN), "--out", str(tmp_path / "m"), "--favour", text],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2 and "--favour" in run.stderr and says in run.stderr
    assert not (tmp_path / "m.work").exists()


def _train(out: Path) -> dict[str, str]:
    small = ["--threads", "1", "--vae-steps", "2", "--vae-batch", "2", "--vae-eval", "0", "--stat-scenes", "2",
             "--colour-steps", "2", "--scenes", "3", "--steps", "3", "--batch", "2", "--more-steps", "2",
             "--long-steps", "2", "--separate-steps", "2", "--retune-steps", "2", "--retune-long-steps", "2",
             "--stages", "vae,colour,encoder,data,transformer,more,long,separate,redata,retune,assemble"]
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
    assert record["seed"] == 0 and record["transformer_steps"] == 3 and record["more_steps"] == 2
    assert record["separate_steps"] == 2 and record["retune_steps"] == 2 and record["retune_long_steps"] == 2
    assert record["pairs"] == 6 and record["data_vae"] == "vae-separated"  # the retuned model's pairs

    import torch
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline.from_pretrained(tmp_path / "a", torch_dtype=torch.float32,
                                                     local_files_only=True)
    assert pipe.vae_scale_factor == 8 and pipe.latent_channels == 16
    assert type(pipe.transformer).__name__ == "QwenImageTransformer2DModel"
    assert type(pipe.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert len(pipe.vae.config.latents_mean) == len(pipe.vae.config.latents_std) == 16

    # a second retuning round starts from the first (kept, not trained again) and is the one assembled
    first_round = tmp_path / "a.work" / "transformer-retuned" / "diffusion_pytorch_model.safetensors"
    before = first_round.read_bytes()
    subprocess.run([sys.executable, str(TRAIN), "--out", str(tmp_path / "r2"), "--work", str(tmp_path / "a.work"),
                    "--threads", "1", "--retune-steps", "2", "--retune-long-steps", "2", "--batch", "2",
                    "--retune-rounds", "2", "--stages", "retune,assemble"], check=True, capture_output=True, cwd=ROOT)
    second = tmp_path / "a.work" / "transformer-retuned-2" / "diffusion_pytorch_model.safetensors"
    assembled = tmp_path / "r2" / "transformer" / "diffusion_pytorch_model.safetensors"
    assert first_round.read_bytes() == before
    assert assembled.read_bytes() == second.read_bytes()
    assert second.read_bytes() != before
    assert json.loads((tmp_path / "r2" / "training.json").read_text())["retune_round"] == 2


def test_the_reader_head_makes_the_prompts_last_word_count(tmp_path):
    """At initialisation, before any flow-matching step: with the prompt reader head, changing the prompt's last
    word (the colour) moves the transformer's output thousands of times more than without it, and than changing a
    picture token of the prompt embeddings does."""
    small = ["--threads", "1", "--vae-steps", "2", "--vae-batch", "2", "--vae-eval", "0", "--stat-scenes", "2",
             "--colour-steps", "2", "--scenes", "16", "--stages", "vae,colour,encoder,data"]
    subprocess.run([sys.executable, str(TRAIN), "--out", str(tmp_path / "m"), *small], check=True,
                   capture_output=True, cwd=ROOT)
    import torch
    from diffusers import QwenImageTransformer2DModel

    import train

    data = train.load_data(tmp_path / "m.work")
    bucket = data[max(data, key=lambda s: len(data[s]["words"]))]
    n = len(bucket["words"])
    idx = torch.arange(n)
    grid = int(bucket["target"].shape[1] ** 0.5)
    inputs, _ = train.noisy_inputs(bucket["target"].float(), bucket["control"].float(), bucket, idx, grid,
                                   torch.Generator().manual_seed(0), 0.8)
    lengths = inputs["encoder_hidden_states_mask"].sum(1)
    last = lengths - len(train.TEMPLATE_END) - 1
    has_word = last + 1 - bucket["words"] > train.NULL_TOKENS  # an edit prompt, not "" or " "
    assert has_word.sum() >= 2
    # The text encoder marks colour words on dimension 0 (make_text_encoder): every prompt's last word stands
    # far above every other token there (measured: >= 3.4 against <= 0.3).
    embeds, mask = bucket["embeds"].float(), bucket["mask"].bool()
    rows = torch.nonzero(has_word)[:, 0]
    marked = embeds[rows, last[rows], 0]
    others = mask.clone()
    others[rows, last[rows]] = False
    assert marked.min() > 2.5 and embeds[..., 0][others].max() < 1.0

    def effect(model, position) -> float:
        """Mean output change when each prompt's token at `position` is swapped with the next prompt's."""
        embeds = inputs["encoder_hidden_states"]
        swapped = embeds.clone()
        rows = torch.nonzero(has_word)[:, 0]
        for a, b in zip(rows.tolist(), rows.roll(1).tolist()):
            swapped[a, position[a]] = embeds[b, position[b]]
        with torch.no_grad():
            before = model(**inputs)[0]
            after = model(**{**inputs, "encoder_hidden_states": swapped})[0]
        return float((after - before)[rows].abs().mean())

    torch.manual_seed(0)
    plain = QwenImageTransformer2DModel(**train.TRANSFORMER_CONFIG).eval()
    train.copy_head_init(plain)
    reader = QwenImageTransformer2DModel(**train.TRANSFORMER_CONFIG).eval()
    reader.load_state_dict(plain.state_dict())
    train.reader_head_init(reader, bucket, torch.Generator().manual_seed(1), 0.8)
    picture = torch.full_like(last, 40)  # a token of the control image's picture tokens
    assert effect(reader, last) > 1000 * effect(plain, last)  # measured ~10000x
    assert effect(reader, last) > 1000 * effect(reader, picture)


DEMO = ROOT / "cases" / "workspace" / "aitk" / "demo-qwen-image-edit-2509"


def test_the_bundled_model_says_how_each_part_was_made():
    """The bundled model is two runs of one recipe (scripts/demo_model/README.md): the VAE and text encoder of a whole
    `train.py` run from seed 0, and the transformer stages trained again on them with `--favour grey:any:0.5`
    (`seed_search.py --vae-from`). Its training.json holds both records: the transformer run's arguments, and
    under `vae_from` the first run's record of the VAE stages, whose held-out PSNR meets the issue's 28 dB."""
    record = json.loads((DEMO / "training.json").read_text())
    arguments = record["arguments"]
    assert arguments["favour"] == "grey:any:0.5" and arguments["seed"] == 0 and arguments["transformer_seed"] == 0
    assert arguments["colour_directions"] == "orthogonal" and arguments["data_vae"] == "separated"
    source = record["vae_from"]
    assert source["checkpoint"] == DEMO.name and source["seed"] == 0
    assert source["vae_psnr_held_out_1024"] >= 28 and source["vae_psnr_held_out_256"] >= 28
    assert "transformer_steps" not in source  # only the VAE and text-encoder stages' record is carried over
    assert record["transformer_steps"] == arguments["steps"] and record["long_steps"] == arguments["long_steps"]


def test_the_bundled_demo_model_loads_and_reads_its_prompt():
    """The bundled checkpoint loads as the real one does (at most 40 MB), and its transformer's prediction
    depends on which edit and which colour the prompt names."""
    import torch
    from diffusers import QwenImageEditPlusPipeline

    import train

    pipe = QwenImageEditPlusPipeline.from_pretrained(DEMO, torch_dtype=torch.float32, local_files_only=True)
    record = json.loads((DEMO / "training.json").read_text())
    assert record["seed"] == 0 and record["transformer_config"] == train.TRANSFORMER_CONFIG
    assert sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()) < 40 * 2**20
    scene = task.random_scene(random.Random("bundled"))
    control = scene.draw()
    prompts = ["make the shapes red", "make the shapes blue", "make the background black", "make the background white"]
    with torch.no_grad():
        embeds = [train.prompt_embeds(pipe, p, control, stock_pil=False) for p in prompts]
        latents = train.packed_latents(pipe, [train.upsampled(scene, 256)])
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))

        def velocity(e):
            return pipe.transformer(hidden_states=torch.cat([noise, latents], 1), timestep=torch.tensor([0.7]),
                                    encoder_hidden_states=e[None], encoder_hidden_states_mask=None,
                                    img_shapes=[[(1, 16, 16), (1, 16, 16)]], return_dict=False)[0][:, :256]

        v = [velocity(e) for e in embeds]
    red, blue, black, white = v
    assert embeds[0][-6, 0] > 2.5  # the colour word, marked by the text encoder
    shape_effect = float((red - blue).abs().mean())
    background_effect = float((black - white).abs().mean())
    # Measured on the bundled model at this noise level: 0.085 between two shape colours, 0.075 between two
    # background colours. A model that ignored shape colours (text encoder at plain random weights) gave 0.0005.
    assert shape_effect > 0.03 and background_effect > 0.03


@pytest.mark.parametrize("grid", [16, 64])
def test_the_copy_head_finds_the_control_token_at_the_same_place(grid, monkeypatch):
    """At initialisation head 0 of every block attends from each target token to the control-image token at the
    same place, also at a ~1024 px render's 64x64 tokens (with the two fastest rotary frequencies alone, 40 %
    of its attention went to tokens 31 or 57 rows or columns away there)."""
    import math

    import torch
    import diffusers.models.transformers.transformer_qwenimage as qwen
    from diffusers import QwenImageTransformer2DModel

    import train

    seen = []
    dispatch = qwen.dispatch_attention_fn

    def record(q, k, v, *args, **kwargs):
        seen.append((q, k))
        return dispatch(q, k, v, *args, **kwargs)

    monkeypatch.setattr(qwen, "dispatch_attention_fn", record)
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**train.TRANSFORMER_CONFIG).eval()
    train.copy_head_init(model)
    n, text = grid * grid, 8
    with torch.no_grad():
        model(hidden_states=torch.randn(1, 2 * n, 64), timestep=torch.tensor([0.5]),
              encoder_hidden_states=torch.randn(1, text, 16), encoder_hidden_states_mask=torch.ones(1, text).bool(),
              img_shapes=[[(1, grid, grid), (1, grid, grid)]], return_dict=False)
    queries = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:256]
    for q, k in seen:  # one per block; sequence: text, target tokens, control tokens
        scores = q[0, text + queries, 0] @ k[0, :, 0].T / math.sqrt(q.shape[-1])
        same = torch.softmax(scores, -1)[torch.arange(len(queries)), text + n + queries]
        assert float(same.mean()) > 0.9  # measured 0.96 at 16x16, 32x32 and 64x64 tokens


def test_training_pairs_drop_prompts_and_leave_some_edits_undone():
    """CFG dropout and unfollowed edits (train.training_pairs): shares as asked, and an unfollowed pair's target
    is its control image."""
    import argparse

    import torch

    import train

    n = 4000
    bucket = {"target": torch.randn(n, 4, 64), "control": torch.randn(n, 4, 64)}
    args = argparse.Namespace(drop=0.2, unfollowed=0.25, unfollowed_shapes=None)
    x0, control, dropped = train.training_pairs(bucket, torch.arange(n), random.Random(0), args)
    undone = (x0 == control).all(dim=(1, 2))
    assert abs(float(dropped.float().mean()) - 0.2) < 0.03
    assert abs(float(undone[~dropped].float().mean()) - 0.25) < 0.03 and not undone[dropped].any()
    assert torch.equal(x0[~undone], bucket["target"][~undone])


def test_shape_edits_can_be_left_undone_less_often():
    """`--unfollowed-shapes`: pairs whose target differs from the control on a few tokens (shape edits) are left
    undone at their own share; pairs that change nearly every token (background edits) at `--unfollowed`."""
    import argparse

    import torch

    import train

    n = 4000
    control = torch.randn(n, 8, 64)
    target = torch.randn(n, 8, 64)
    shapes = torch.arange(n) % 2 == 0
    target[shapes] = control[shapes]
    target[shapes, 0] += 3.0  # one token of eight changed: a shape edit
    assert torch.equal(train.background_edits(target, control), ~shapes)
    args = argparse.Namespace(drop=0.0, unfollowed=0.5, unfollowed_shapes=0.1)
    x0, control_out, _ = train.training_pairs({"target": target, "control": control}, torch.arange(n),
                                              random.Random(0), args)
    undone = (x0 == control_out).all(dim=(1, 2))
    assert abs(float(undone[shapes].float().mean()) - 0.1) < 0.03
    assert abs(float(undone[~shapes].float().mean()) - 0.5) < 0.04


def test_shape_tokens_weigh_more():
    """train.shape_weights: tokens far from the picture's median token (its background) get 1 + weight."""
    import torch

    import train

    control = torch.zeros(1, 16, 64)
    control[0, :3] = 3.0  # three tokens of another colour: 24 from the background (norm over 64 channels)
    control[0, 3] = 0.2  # a token near the background colour
    w = train.shape_weights(control, 4.0)
    assert w[0, :3].tolist() == [5.0] * 3 and bool((w[0, 3:] == 1.0).all())
    assert bool((train.shape_weights(control, 0.0) == 1.0).all())


def test_diagnose_judges_the_bundled_models_x0_estimates(tmp_path, capsys):
    """scripts/demo_model/diagnose.py decodes the transformer's x0 estimate of held-out edits at each noise
    level and judges it from pixels; near the end of sampling (sigma 0.4) the bundled model's estimate carries
    the edit out (measured: right on every held-out edit at 256 and 512 px)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import diagnose

    sheet = tmp_path / "x0.png"
    assert diagnose.main(["--size", "256", "--count", "1", "--threads", "1", "--sheet", str(sheet)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("x0 estimate right: sigma 0.98 ") and last.endswith("sigma 0.4 1.00")
    from PIL import Image

    assert Image.open(sheet).size == (128 * (1 + len(diagnose.SIGMAS)), 128)


def test_diagnose_measures_how_far_background_edits_commit(capsys):
    """`diagnose.py --backgrounds`: for every background edit of a scene, the share of the way from the control
    image's latents to the edit's that the bundled model's x0 estimate goes, with the edit's prompt and the null
    prompt. From pure noise (sigma 1) the prompt moves it further than the null prompt does (the model reads
    its prompt); given the target noised to sigma 0.7 both go most of the way."""
    sys.path.insert(0, str(ROOT / "bench"))
    import diagnose

    assert diagnose.main(["--size", "256", "--backgrounds", "1", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6  # three backgrounds, two edits each
    for line in lines:
        figures = [float(x) for x in re.findall(r"(?:prompt|null) (-?[0-9.]+)", line)]
        at_1, at_07 = figures[:2], figures[4:]
        assert at_1[0] > at_1[1], line
        assert min(at_07) > 0.5, line


def test_orthogonal_colour_words_stand_further_apart(tmp_path):
    """`--colour-directions orthogonal`: the colour words' embedding rows keep their dimension-0 mark and get
    orthonormal directions on the other 15 at `--colour-scale` times the mean row norm, and after the text
    encoder's layers the closest two shape colours (at the colour word of "make the shapes ...") are further
    apart than with the default random directions (measured: 1.95 -> 3.92 on the prompt alone)."""
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    import train

    def encoder(name, *extra):
        subprocess.run([sys.executable, str(TRAIN), "--out", str(tmp_path / name), "--stages", "encoder",
                        "--threads", "1", *extra], check=True, capture_output=True, cwd=ROOT)
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / f"{name}.work" / "text_encoder",
                                                                  dtype=torch.float32).eval()

    random_words = encoder("random")
    orthogonal = encoder("orthogonal", "--colour-directions", "orthogonal", "--colour-scale", "2")
    tokenizer = AutoTokenizer.from_pretrained(train.TINY / "tokenizer")
    ids = train.colour_tokens(tokenizer)
    rows = orthogonal.get_input_embeddings().weight[ids].detach()
    same = random_words.get_input_embeddings().weight[ids].detach()
    assert torch.equal(rows[:, 0], same[:, 0])  # the mark is kept
    gram = rows[:, 1:] @ rows[:, 1:].T
    off = gram - torch.diag(torch.diagonal(gram))
    assert off.abs().max() < 0.02 * gram.diagonal().min()  # orthogonal (bf16-rounded)
    # dimension 0 is 2 (--colour-mark) mean row norms, the rest 2 (--colour-scale): the same length
    assert torch.allclose(rows[:, 1:].norm(dim=1), rows[:, 0], rtol=0.02)

    def closest(model) -> float:
        states = []
        for word in task.SHAPE_COLOURS:
            batch = tokenizer(f"make the shapes {word}", return_tensors="pt")
            with torch.no_grad():
                out = model(**batch, output_hidden_states=True)
            states.append(out.hidden_states[-1][0, -1])
        states = torch.stack(states)
        gaps = torch.cdist(states, states)
        return float(gaps[~torch.eye(len(states), dtype=torch.bool)].min())

    assert closest(orthogonal) > 1.5 * closest(random_words)


def test_the_transformer_can_be_trained_on_the_separated_vae_from_the_start(tmp_path):
    """`--data-vae separated`: `separate` runs before the data stage, the data is encoded with its VAE, and
    without retuning the assembled checkpoint carries that VAE; without the stage, a clear error."""
    small = ["--threads", "1", "--vae-steps", "2", "--vae-batch", "2", "--vae-eval", "0", "--stat-scenes", "2",
             "--colour-steps", "2", "--separate-steps", "2", "--scenes", "3", "--steps", "2", "--batch", "2",
             "--more-steps", "2", "--long-steps", "2", "--data-vae", "separated"]
    out = tmp_path / "s"
    subprocess.run([sys.executable, str(TRAIN), "--out", str(out), *small, "--stages",
                    "vae,colour,separate,encoder,data,transformer,more,long,assemble"],
                   check=True, capture_output=True, cwd=ROOT)
    work = tmp_path / "s.work"
    assert json.loads((work / "data.json").read_text())["data_vae"] == "vae-separated"
    weights = "diffusion_pytorch_model.safetensors"
    assert (out / "vae" / weights).read_bytes() == (work / "vae-separated" / weights).read_bytes()
    assert (out / "vae" / weights).read_bytes() != (work / "vae-colour" / weights).read_bytes()
    assert json.loads((out / "training.json").read_text())["arguments"]["data_vae"] == "separated"

    shutil.copytree(work / "vae-colour", tmp_path / "m.work" / "vae-colour")  # the VAE stages, without separate
    missing = subprocess.run([sys.executable, str(TRAIN), "--out", str(tmp_path / "m"), *small, "--stages", "data"],
                             capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode != 0
    assert "vae-separated" in missing.stderr and "separate" in missing.stderr

    # --favour: the data stage draws grey-to-white edits more often and records the flag
    favoured = tmp_path / "f.work"
    for stage in ("vae-separated", "text_encoder"):
        shutil.copytree(work / stage, favoured / stage)
    subprocess.run([sys.executable, str(TRAIN), "--out", str(tmp_path / "f"), *small, "--scenes", "12",
                    "--favour", "grey:white:1", "--stages", "data"], check=True, capture_output=True, cwd=ROOT)
    record = json.loads((favoured / "data.json").read_text())
    assert record["favour"] == "grey:white:1" and "make the background white" in record["prompts"]
    assert "favour" not in json.loads((work / "data.json").read_text())


def test_a_transformer_seed_trains_another_transformer_on_the_same_vae(tmp_path, capsys):
    """`--transformer-seed` reseeds the data and transformer stages only: the same VAE and text encoder, another
    transformer. seed_search's `--vae-from` sets up such runs from a checkpoint, `--recipe` takes a checkpoint's
    arguments (here the small one's), and `--screen` judges each run with the bench's screen and keeps the best.
    Each run's training.json says where its VAE came from."""
    import seed_search

    small = ["--threads", "1", "--vae-steps", "2", "--vae-batch", "2", "--vae-eval", "0", "--stat-scenes", "2",
             "--colour-steps", "2", "--separate-steps", "2", "--scenes", "3", "--steps", "2", "--batch", "2",
             "--more-steps", "2", "--long-steps", "2", "--data-vae", "separated"]
    base = tmp_path / "base"
    subprocess.run([sys.executable, str(TRAIN), "--out", str(base), *small, "--stages", seed_search.STAGES], check=True,
                   capture_output=True, cwd=ROOT)
    work, keep = tmp_path / "search", tmp_path / "keep"
    assert seed_search.main(["--seeds", "5", "--work", str(work), "--recipe", str(base / "training.json"),
                             "--vae-from", str(base), "--threads", "1", "--screen", "1", "--first", "1",
                             "--bench-count", "2", "--bench-steps", "2", "--keep", "1", "--keep-dir", str(keep)]) == 0
    out = capsys.readouterr().out
    screened = json.loads((work / "seed-5.screen.json").read_text())["screen"]
    assert screened["count"] == 2 and screened["stop_at"] == 1 and 1 <= screened["judged"] <= 2
    assert screened["complete"] == (screened["missed"] == []) and set(screened["missed"]) <= {0, 1}
    assert f"seed-5 screened: screen {screened['right']} right of {screened['judged']}" in out
    with tarfile.open(keep / "seed-5.tar.gz") as tar:
        assert {"seed-5/model_index.json", "seed-5.screen.json"} <= set(tar.getnames())
    other = work / "seed-5"
    weights = "diffusion_pytorch_model.safetensors"
    assert (other / "vae" / weights).read_bytes() == (base / "vae" / weights).read_bytes()
    assert (other / "text_encoder" / "model.safetensors").read_bytes() == \
        (base / "text_encoder" / "model.safetensors").read_bytes()
    assert (other / "transformer" / weights).read_bytes() != (base / "transformer" / weights).read_bytes()
    record = json.loads((other / "training.json").read_text())
    assert record["seed"] == 0 and record["arguments"]["transformer_seed"] == 5
    assert record["device"]  # the CPU's name on a CPU run
    # where the VAE and text encoder came from: the base's own record of their stages, not of its transformer
    source = record["vae_from"]
    assert source["checkpoint"] == "base" and source["vae_steps"] == 2 and source["seed"] == 0
    assert "transformer_steps" not in source and "arguments" not in source

    flags = seed_search.recipe_flags(base / "training.json")
    assert "--seed" not in flags and "--threads" not in flags and "--transformer-seed" not in flags
    assert flags[flags.index("--data-vae") + 1] == "separated" and flags[flags.index("--steps") + 1] == "2"


def test_the_bench_screens_a_model_from_its_known_misses_first(capsys, tmp_path):
    """`bench/demo_model.py --screen M --first ROWS` renders only guidance-4 images, the named rows first, and
    stops at the M-th miss. The bundled model leaves row 0's shapes in their colours under `make the shapes red`
    (guidance moves that render by under one level; measured on an Intel Xeon with AVX512-BF16, fp32), so one
    render settles it."""
    sys.path.insert(0, str(ROOT / "bench"))
    import demo_model

    out = tmp_path / "screen.json"
    assert demo_model.main(["--screen", "1", "--first", "0", "--threads", "1", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "screen: 0 right of 1, missed rows [0]"
    assert lines[0].split()[:2] == ["0", "shapes"] and "right False" in lines[0]
    assert json.loads(out.read_text())["screen"] == {"right": 0, "judged": 1, "missed": [0], "count": 12,
                                                      "stop_at": 1, "complete": False}


def test_the_bench_screen_names_a_row_it_does_not_have():
    sys.path.insert(0, str(ROOT / "bench"))
    import demo_model

    with pytest.raises(SystemExit, match=r"--first 12: rows run from 0 to 11 \(--count 12\)"):
        demo_model.main(["--screen", "1", "--first", "12"])
