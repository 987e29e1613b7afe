"""Train the bundled demo model (a Qwen-Image-Edit-2509 layout checkpoint that edits coloured shapes).

    python scripts/demo_model/train.py --out cases/workspace/aitk/demo-qwen-image-edit-2509

Stages, each kept under `--work` so an interrupted run resumes at the stage it was in:
1. `vae`: AutoencoderKLQwenImage (scale factor 8, 16 latent channels) trained to reconstruct task scenes as the
   pipeline feeds them (a 128 px scene Lanczos-resized to 256-1024 px), on 128 px crops (the posterior's mode
   plus a little noise; a warm-up, since at higher rates this VAE settles on the mean colour).
1b. `colour`: encoder and decoder trained further on 64 px crops, half of them two task colours meeting at an
   edge, so that no colour's latent collapses onto another's; then the latents' per-channel mean and std over
   task scenes become `latents_mean`/`latents_std`, as in the real VAE config. Held-out PSNR is measured here.
1c. `encoder`: the tiny checkpoint's random text encoder with the colour words marked on one embedding
   dimension (`make_text_encoder`); it stays frozen.
2. `data`: edit pairs encoded as the pipeline does: control and target latents (Lanczos resize, the VAE's mode,
   normalised, packed 2x2), and prompt embeddings from the pipeline's own `encode_prompt` with the control
   image passed as the two sides pass it (0-1 tensor, bilinear to ~384x384 area) for half the pairs and as
   stock `__call__` passes it (PIL) for the other half, and for each scene the null prompt's embeddings with
   its control image (for CFG dropout). Control and target share one size (256-512 px), so control tokens
   line up with target tokens, as they do when a render's size is the control's VAE size.
   `--favour grey:white:0.3` draws that background edit more often than the plain draw (`task.Favour`).
3. `transformer`: QwenImageTransformer2DModel trained with flow matching (x_t = (1-s) x_0 + s noise, target
   noise - x_0) on the target tokens of the pipeline's sequence [target tokens, control tokens] with its
   `img_shapes` and text mask, sigmas drawn through the scheduler's shift for a ~1024 px render, a share of
   prompts dropped and a share of edits left undone (`training_pairs`); the saved weights are an exponential
   moving average. Head 0 of every block starts as a copy head
   (`copy_head_init`), head 1 as a prompt reader (`reader_head_init`); the data stage keeps where each
   prompt's words start for it.
3a. `more`: the averaged transformer trained 2000 steps further (a second warm-up and decay), the loss on
   shape tokens weighted 1 + `--shape-weight` (`shape_weights`): shapes, a few percent of the tokens, are
   learned last.
3b. `long`: the averaged transformer (of 3a) trained further on render-size sequences (48x48 and 64x64 tokens, the
   512 px pairs resized in latent space), alternating with small 256 px batches, shape tokens weighted as
   in 3a.
3c. opt-in (not in the default `--stages`; the bundled checkpoint ran `separate`, see the README): `separate`, `redata` (2 again, with
   that VAE, into `<work>/separated`) and `retune`: the VAE's palette colours pushed apart in latent space
   (`separate_colours`) and the transformer of 3b retuned to it (`train_retune`); see those functions for why
   and what they gave. `separate` runs right after 1b, so with `--data-vae separated` the data stage encodes
   with that VAE and stages 3-3b train on it from the start (no retuning).
4. `assemble`: the diffusers folder: the trained VAE and transformer (of 3c when it ran, else the data stage's
   VAE and 3b), the text encoder of stage 1c, the tokenizer and processor of the tiny checkpoint and its
   scheduler config (the real one), and `training.json` (arguments, configs, times, machine, held-out figures).

Deterministic from `--seed` (and `--transformer-seed`, which stages 2-3c draw from when given) on a given
device kind, torch version and thread count (two threads by default). `--device cuda` trains and encodes on a
GPU (`use_device`); a GPU run's weights differ from a CPU run's.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # parity (prompt sizes)
import task  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests/data/tiny/workspace/aitk/tiny-qwen-image-edit-2509"  # the first recording's checkpoint

VAE_CONFIG = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 8], num_res_blocks=1, attn_scales=[],
                  temperal_downsample=[False, True, True], dropout=0.0)
TRANSFORMER_CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
                          num_attention_heads=3, joint_attention_dim=16, axes_dims_rope=[8, 12, 12],
                          guidance_embeds=False)
VAE_SIZES = (256, 384, 512, 1024)  # what the VAE sees: training sizes and the pipeline's ~1024 px
TRAIN_SIZES = ((256, 0.45), (384, 0.35), (512, 0.2))  # (square size, share of transformer batches)
NULL_PROMPTS = ("", " ")
NULL_TOKENS = 1  # the most tokens a null prompt has; every edit prompt has more
TEMPLATE_END = ("<|im_end|>", "\n", "<|im_start|>", "assistant", "\n")  # after the prompt in encode_prompt


DEVICE = torch.device("cpu")  # where stages train and encode (`--device`); tensors are drawn on the CPU


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def seeded(seed: int, *salt) -> random.Random:
    return random.Random(f"{seed}:{':'.join(map(str, salt))}")


def to_pixels(image: Image.Image) -> torch.Tensor:
    """PIL -> (3, H, W) in [-1, 1], as VaeImageProcessor.preprocess normalises."""
    return torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def upsampled(scene: task.Scene, size: int) -> Image.Image:
    """The scene as the pipeline feeds it to the VAE: the 128 px picture Lanczos-resized to `size`."""
    return scene.draw().resize((size, size), Image.Resampling.LANCZOS)


# ---------------------------------------------------------------- stage 1: VAE

def vae_batch(rng: random.Random, batch: int, crop: int) -> torch.Tensor:
    out = []
    for _ in range(batch):
        scene = task.random_scene(rng)
        size = rng.choice(VAE_SIZES)
        image = upsampled(scene, size)
        if rng.random() < 0.6:  # centre the crop on a shape's edge: edges are where reconstruction fails
            shape = rng.choice(scene.shapes)
            angle = rng.uniform(0, 2 * math.pi)
            cx = (shape.cx + shape.radius * math.cos(angle)) * size / task.SIZE
            cy = (shape.cy + shape.radius * math.sin(angle)) * size / task.SIZE
            x0 = int(min(max(cx - crop / 2 + rng.uniform(-crop / 4, crop / 4), 0), size - crop))
            y0 = int(min(max(cy - crop / 2 + rng.uniform(-crop / 4, crop / 4), 0), size - crop))
        else:
            x0, y0 = rng.randrange(size - crop + 1), rng.randrange(size - crop + 1)
        out.append(to_pixels(image.crop((x0, y0, x0 + crop, y0 + crop))))
    return torch.stack(out).unsqueeze(2)


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """`vae.decode` without its final clamp to [-1, 1] (one frame): the clamp has no gradient where the
    output overshoots, which stalls training; inference keeps the clamp."""
    vae.clear_cache()
    vae._conv_idx = [0]
    out = vae.decoder(vae.post_quant_conv(z), feat_cache=vae._feat_map, feat_idx=vae._conv_idx)
    vae.clear_cache()
    return out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [-1, 1] images measured on 0-255 levels."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) * 127.5).pow(2).mean().item()
    return 10 * math.log10(255 ** 2 / max(mse, 1e-12))


def held_out_psnr(vae, seed: int, count: int, size: int) -> float | None:
    rng = seeded(seed, "held-out-vae")
    values = []
    if count <= 0:
        return None
    with torch.no_grad():
        for _ in range(count):
            x = to_pixels(upsampled(task.random_scene(rng), size))[None, :, None].to(DEVICE)
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample
            values.append(psnr(x, y))
    return round(float(np.mean(values)), 2)


def vae_step(vae, opt, x: torch.Tensor, lr: float, args, label: str, report: bool, start: float,
             extra=None) -> None:
    """One optimiser step of the VAE on pixels `x`. The latent is the posterior's mode (what the pipeline
    encodes control images with) plus a little noise, so the decoder tolerates the transformer's imperfect
    latents; a small penalty keeps the latents' scale; `extra()`, when given, is added to the loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    x = x.to(DEVICE)
    z = vae.encode(x).latent_dist.mode()
    y = decode_unclamped(vae, z + args.vae_noise * torch.randn_like(z))
    loss = (y - x).abs().mean() + (y - x).pow(2).mean() + args.vae_penalty * z.pow(2).mean()
    if extra is not None:
        loss = loss + extra()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    opt.step()
    if report:
        log(f"{label} loss {loss.item():.4f} lr {lr:.2e} ({time.time() - start:.0f} s)")


def finish_vae(vae, args) -> dict:
    """Eval mode, the latents' statistics into the config, held-out PSNR."""
    vae.eval()
    mean, std = latent_stats(vae, args.seed, args.stat_scenes)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    return {"vae_psnr_held_out_1024": held_out_psnr(vae, args.seed, args.vae_eval // 4, 1024),
            "vae_psnr_held_out_256": held_out_psnr(vae, args.seed, args.vae_eval, 256)}


def stage(work: Path, name: str, label: str, train) -> dict:
    """A training stage, made once: its network in `work/<name>`, its figures in `work/<name>.json` (read back
    when it was made before). `train()` trains it and returns (the network to keep, its figures)."""
    done = work / name
    if (done / "config.json").exists():
        log(f"{label}: already trained in", done)
        return json.loads((work / f"{name}.json").read_text())
    network, figures = train()
    log(f"{label}:", figures)
    network.save_pretrained(done)
    (work / f"{name}.json").write_text(json.dumps(figures, indent=1))
    return figures


def vae_steps(vae, args, label: str, steps: int, lr: float, lr_at, batch, rng: random.Random, extra=None) -> float:
    """`steps` optimiser steps (`vae_step`) of `vae` on `batch(rng)` at the rate `lr_at(step)` (AdamW made at `lr`),
    with `extra` added to the loss; returns the seconds they took."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start = time.time()
    for step in range(steps):
        vae_step(vae, opt, batch(rng), lr_at(step), args, f"{label} step {step}/{steps}",
                 step % 50 == 0 or step == steps - 1, start, extra=extra)
    return round(time.time() - start, 1)


def train_vae(args, work: Path) -> dict:
    from diffusers import AutoencoderKLQwenImage

    def train():
        torch.manual_seed(args.seed)
        vae = AutoencoderKLQwenImage(**VAE_CONFIG).to(DEVICE)

        # Warm up: at higher rates this VAE settles on the mean colour and its gradients vanish.
        def lr_at(step: int) -> float:
            return args.vae_lr * min(1.0, (step + 1) / 50) * (
                0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps)))

        seconds = vae_steps(vae, args, "vae", args.vae_steps, args.vae_lr, lr_at,
                            lambda rng: vae_batch(rng, args.vae_batch, 128), seeded(args.seed, "vae"))
        return vae, {"vae_steps": args.vae_steps, "vae_seconds": seconds, **finish_vae(vae, args)}

    return stage(work, "vae", "vae", train)


def colour_batch(rng: random.Random, batch: int, crop: int) -> torch.Tensor:
    """Half edge crops as in `vae_batch`, half patches of two task colours split by a random straight edge:
    every colour of the palette, on every other, often enough that none collapses onto another."""
    out = [vae_batch(rng, 1, crop)[0] for _ in range(batch // 2)]
    names = sorted(task.PALETTE)
    for _ in range(batch - len(out)):
        a, b = rng.sample(names, 2)
        yy, xx = np.mgrid[0:crop, 0:crop]
        angle, offset = rng.uniform(0, 2 * math.pi), rng.uniform(-crop / 3, crop / 3)
        side = (xx - crop / 2) * math.cos(angle) + (yy - crop / 2) * math.sin(angle) > offset
        rgb = np.where(side[..., None], np.array(task.PALETTE[a]), np.array(task.PALETTE[b])).astype(np.uint8)
        image = Image.fromarray(rgb).resize((crop // 4, crop // 4), Image.Resampling.BOX)
        out.append(to_pixels(image.resize((crop, crop), Image.Resampling.LANCZOS)).unsqueeze(1))
    return torch.stack(out)


def colour_separation(vae) -> dict:
    """How far apart the latents of flat task colours are (the smallest pair) and the worst flat-colour error."""
    zs, worst = {}, 0.0
    with torch.no_grad():
        for name, rgb in task.PALETTE.items():
            x = to_pixels(Image.new("RGB", (64, 64), rgb))[None, :, None].to(DEVICE)
            z = vae.encode(x).latent_dist.mode()
            zs[name] = z[0, :, 0, 4, 4]
            worst = max(worst, float((vae.decode(z).sample - x).abs().max() * 127.5))
    pairs = [(float((zs[a] - zs[b]).norm()), a, b) for a in zs for b in zs if a < b]
    gap, a, b = min(pairs)
    return {"closest_colours": f"{a}/{b}", "closest_latent_distance": round(gap, 3),
            "worst_flat_colour_error": round(worst, 1)}


def train_colours(args, work: Path) -> dict:
    """Stage 1b: encoder and decoder trained on small crops half of which pair two task colours, so that
    no colour's latent collapses onto another's (after stage 1 purple and grey were 0.02 apart)."""
    from diffusers import AutoencoderKLQwenImage

    def train():
        torch.manual_seed(args.seed + 2)
        vae = AutoencoderKLQwenImage.from_pretrained(work / "vae").to(DEVICE)
        before = colour_separation(vae)

        def lr_at(step: int) -> float:
            return args.colour_lr * min(1.0, (step + 1) / 20) * (
                0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.colour_steps)))

        seconds = vae_steps(vae, args, "colours", args.colour_steps, args.colour_lr, lr_at,
                            lambda rng: colour_batch(rng, 16, 64), seeded(args.seed, "colour"))
        return vae, {"colour_steps": args.colour_steps, "colour_seconds": seconds, **finish_vae(vae, args),
                     "colours_before": before, "colours_after": colour_separation(vae)}

    return stage(work, "vae-colour", "colours", train)


PALETTE_NAMES = sorted(task.PALETTE)


def palette_tokens(vae, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Each palette colour's packed token as the transformer sees it: a flat 32 px patch encoded (the posterior's
    mode), normalised by `mean`/`std`, the middle 2x2 latents; one row per `PALETTE_NAMES` entry."""
    flat = torch.stack([to_pixels(Image.new("RGB", (32, 32), task.PALETTE[n])) for n in PALETTE_NAMES]).unsqueeze(2)
    flat, mean, std = flat.to(DEVICE), mean.to(DEVICE), std.to(DEVICE)
    z = (vae.encode(flat).latent_dist.mode() - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    return z[:, :, 0, 1:3, 1:3].flatten(1)


def palette_gaps(vae) -> dict:
    """How far apart the palette colours' packed tokens are in the VAE's normalised latent space (the space the
    transformer predicts in, where its noise has unit variance): the closest pairs, and the smallest gap over the
    tokens' mean norm."""
    with torch.no_grad():
        tokens = palette_tokens(vae, torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std))
    gaps = torch.cdist(tokens, tokens)
    pairs = sorted((float(gaps[a, b]), f"{PALETTE_NAMES[a]}/{PALETTE_NAMES[b]}")
                   for a in range(len(PALETTE_NAMES)) for b in range(a + 1, len(PALETTE_NAMES)))
    return {"closest_pairs": {name: round(gap, 2) for gap, name in pairs[:4]},
            "smallest_gap_over_mean_norm": round(pairs[0][0] / float(tokens.norm(dim=1).mean()), 3)}


def separate_colours(args, work: Path) -> dict:
    """Stage 3c, first part: the VAE of 1b trained further with a term that pushes the palette colours' normalised
    latents apart: a squared hinge on every pair's gap below `--separate-margin` times the tokens' mean norm
    (scale-free, so growing every latent does not meet it).

    After stage 1b red/orange, yellow/orange, blue/purple and grey/purple were 3.0-3.6 apart in the normalised
    packed tokens, while the trained transformer's x0 estimate at the first sampling steps (sigma 0.9-0.98) was
    off by 1.8-4.4 there (measured on held-out edits): renders turned red shapes orange, kept yellow under
    orange and faded purple shapes into grey backgrounds. The latents' mean and std are those of stage 1b
    during the stage and recomputed at its end.
    """
    from diffusers import AutoencoderKLQwenImage

    def train():
        torch.manual_seed(args.seed + 4)
        vae = AutoencoderKLQwenImage.from_pretrained(work / "vae-colour").to(DEVICE)
        before = palette_gaps(vae)
        mean, std = torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std)
        pairs = torch.triu_indices(len(PALETTE_NAMES), len(PALETTE_NAMES), 1)

        def hinge() -> torch.Tensor:
            tokens = palette_tokens(vae, mean, std)
            gaps = torch.cdist(tokens, tokens)[pairs[0], pairs[1]] / tokens.norm(dim=1).mean()
            return 100 * torch.relu(args.separate_margin - gaps).pow(2).mean()

        seconds = vae_steps(vae, args, "separate", args.separate_steps, args.separate_lr,
                            lambda step: args.separate_lr, lambda rng: colour_batch(rng, 16, 64),
                            seeded(args.seed, "separate"), extra=hinge)
        return vae, {"separate_steps": args.separate_steps, "separate_seconds": seconds, **finish_vae(vae, args),
                     "palette_before": before, "palette_after": palette_gaps(vae)}

    return stage(work, "vae-separated", "separate", train)


def latent_stats(vae, seed: int, count: int) -> tuple[list[float], list[float]]:
    rng = seeded(seed, "latent-stats")
    zs = []
    with torch.no_grad():
        for _ in range(count):
            x = to_pixels(upsampled(task.random_scene(rng), 256))[None, :, None].to(DEVICE)
            zs.append(vae.encode(x).latent_dist.mode()[0, :, 0].flatten(1).cpu())
    z = torch.cat(zs, dim=1)
    return [round(v, 4) for v in z.mean(1).tolist()], [round(v, 4) for v in z.std(1).tolist()]


# ---------------------------------------------------------------- stage 1c: text encoder

def colour_tokens(tokenizer) -> list[int]:
    """The token that ends each colour word as it ends a prompt (" red", ..., the "ange" of " or|ange")."""
    return [tokenizer(" " + word, add_special_tokens=False).input_ids[-1] for word in task.PALETTE]


def make_text_encoder(args, work: Path) -> dict:
    """The tiny checkpoint's random text encoder with one designed feature: word-embedding dimension 0 marks
    the colour words.

    At random weights the encoder's 16-dim hidden states do not set a prompt's colour word apart from the
    ~200 template and picture tokens around it (a linear score fitted on them left most colour words inside
    the rest's range), and a model trained on them ignored which shape colour its prompt asked for. Here the
    colour tokens' embedding rows get a large dimension 0 (`--colour-mark` times the mean row norm) over their
    own random direction in the other 15, dimension 0 of every other row and of the vision merger's output is
    scaled by 0.1, so after the layers and the final norm a colour word stands apart on one axis and the
    colours still differ from each other on the rest. Everything else stays as the tiny checkpoint has it.

    `--colour-directions orthogonal` sets the colour words' other 15 dimensions on orthonormal directions (a
    seeded QR) at `--colour-scale` times the mean row norm instead of random ones at that norm: with random
    directions the closest shape colours' hidden states (at the colour word of "make the shapes ...") were
    1.92 apart (yellow/orange) against a mean of 2.31 (norm ~4), and renders confused those colours; with
    orthogonal ones at twice the norm every pair is 3.8-3.9 apart.
    """
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    out = work / "text_encoder"
    if (out / "config.json").exists():
        log("text encoder: already made in", out)
        return json.loads((work / "text_encoder.json").read_text())
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(TINY / "text_encoder", dtype=torch.float32)
    ids = colour_tokens(AutoTokenizer.from_pretrained(TINY / "tokenizer"))
    emb = model.get_input_embeddings().weight
    merger = model.model.visual.merger.mlp[2]
    with torch.no_grad():
        norm = emb.norm(dim=1).mean()
        emb[:, 0] *= 0.1
        merger.weight[0] *= 0.1
        merger.bias[0] *= 0.1
        directions = None
        if args.colour_directions == "orthogonal":
            gen = torch.Generator().manual_seed(args.seed)
            directions, _ = torch.linalg.qr(torch.randn(emb.shape[1] - 1, len(ids), generator=gen))
        for k, i in enumerate(ids):
            emb[i, 0] = 0.0
            if directions is None:
                emb[i] *= norm / emb[i].norm()
            else:
                emb[i, 1:] = args.colour_scale * norm * directions[:, k]
            emb[i, 0] = args.colour_mark * norm
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)  # the tiny checkpoint's dtype
    figures = {"colour_tokens": ids, "colour_mark": args.colour_mark, "colour_directions": args.colour_directions,
               "colour_scale": args.colour_scale}
    (work / "text_encoder.json").write_text(json.dumps(figures) + "\n")
    log("text encoder: colour tokens", ids)
    return figures


# ---------------------------------------------------------------- stage 2: data

def make_pipeline(work: Path, transformer=None, vae: str = "vae-colour"):
    """The pipeline's own classes around the trained VAE (stage folder `vae`) and the demo text encoder
    (`make_text_encoder`)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline
    from diffusers import QwenImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor

    return QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(TINY / "scheduler"),
        vae=AutoencoderKLQwenImage.from_pretrained(work / vae),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(work / "text_encoder",
                                                                         dtype=torch.float32),
        tokenizer=AutoTokenizer.from_pretrained(TINY / "tokenizer"),
        processor=Qwen2VLProcessor.from_pretrained(TINY / "processor"),
        transformer=transformer or QwenImageTransformer2DModel(**TRANSFORMER_CONFIG))


def prompt_embeds(pipe, prompt: str, control: Image.Image, stock_pil: bool) -> torch.Tensor:
    """`encode_prompt` with the control image as the two sides pass it (a 0-1 tensor, bilinear to the
    ~384x384-area prompt size), or as stock `__call__` passes it (a PIL image resized by the image processor)."""
    import torch.nn.functional as F
    import torchvision.transforms.functional as TF

    from parity.preprocess import PROMPT_RESIZE, prompt_size

    w, h = prompt_size(*control.size, PROMPT_RESIZE)
    if stock_pil:
        image = pipe.image_processor.resize(control, h, w)
    else:
        image = F.interpolate(TF.to_tensor(control).unsqueeze(0), size=(h, w), mode="bilinear")
    embeds, _ = pipe.encode_prompt(prompt, image=[image], device=DEVICE, num_images_per_prompt=1)
    return embeds[0].cpu()


def packed_latents(pipe, images: list[Image.Image]) -> torch.Tensor:
    """Latents as the pipeline makes them for control images: preprocess, VAE mode, normalise, pack 2x2."""
    size = images[0].size[0]
    pixels = torch.cat([pipe.image_processor.preprocess(im, size, size) for im in images]).unsqueeze(2)
    latents = pipe._encode_vae_image(pixels.to(DEVICE), generator=None)[:, :, 0].cpu()
    g = size // pipe.vae_scale_factor
    return pipe._pack_latents(latents, len(images), latents.shape[1], g, g)


def padded(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings of different lengths as one zero-padded tensor and its mask (uint8)."""
    length = max(e.shape[0] for e in sequences)
    embeds = torch.zeros(len(sequences), length, sequences[0].shape[-1])
    mask = torch.zeros(len(sequences), length, dtype=torch.uint8)
    for k, e in enumerate(sequences):
        embeds[k, : e.shape[0]] = e
        mask[k, : e.shape[0]] = 1
    return embeds.contiguous(), mask.contiguous()


def make_data(args, work: Path, vae: str = "vae-colour", folder: Path | None = None) -> None:
    """Edit pairs encoded with the VAE of stage folder `vae`, written to `folder` (default `work`). The pairs
    (scenes, edits, prompts, sizes) come from the seed alone, so two VAEs get the same pairs."""
    from safetensors.torch import save_file

    folder = folder or work
    if (folder / "data.json").exists():
        log("data: already made in", folder)
        return
    if not (work / vae / "config.json").exists():
        raise SystemExit(f"no VAE in {work / vae}: add its stage to --stages "
                         f"({'separate' if vae == 'vae-separated' else 'colour'}, which runs before the data stage)")
    folder.mkdir(parents=True, exist_ok=True)
    pipe = make_pipeline(work, vae=vae).to(DEVICE)
    rng = seeded(args.seed, "data")
    favour = task.Favour.parse(args.favour) if args.favour else None
    sizes, shares = zip(*TRAIN_SIZES)
    buckets: dict[int, dict[str, list]] = {s: {"control": [], "target": [], "prompt": [], "words": [], "null": []}
                                           for s in sizes}
    prompts = []
    start = time.time()
    with torch.no_grad():
        for i in range(args.scenes):
            scene = task.random_scene(rng)
            size = rng.choices(sizes, weights=shares)[0]
            edits = [task.random_edit(scene, rng, favour=favour) for _ in range(args.edits_per_scene)]
            control = scene.draw()
            latents = packed_latents(pipe, [upsampled(scene, size)] + [upsampled(e.target, size) for e in edits])
            # The null prompt with this control image: what a pair's prompt is replaced by when it is dropped.
            null = prompt_embeds(pipe, rng.choice(NULL_PROMPTS), control, stock_pil=rng.random() < 0.5)
            for j, edit in enumerate(edits):
                prompt = edit.prompt if edit.kind != "none" else rng.choice(NULL_PROMPTS)
                bucket = buckets[size]
                bucket["control"].append(latents[0])
                bucket["target"].append(latents[1 + j])
                embeds = prompt_embeds(pipe, prompt, control, stock_pil=rng.random() < 0.5)
                bucket["prompt"].append(embeds)
                bucket["null"].append(null)
                # The prompt's words are the last tokens but the template's 5-token end ("<|im_end|>\n
                # <|im_start|>assistant\n"); what comes before (template, picture tokens) is the same for all.
                words = len(pipe.tokenizer(prompt, add_special_tokens=False).input_ids)
                bucket["words"].append(embeds.shape[0] - len(TEMPLATE_END) - words)
                prompts.append(prompt)
            if i % 100 == 0:
                log(f"data: scene {i}/{args.scenes} ({time.time() - start:.0f} s)")
    for size, bucket in buckets.items():
        if not bucket["prompt"]:  # a tiny run may draw no scene of some size
            continue
        embeds, mask = padded(bucket["prompt"])
        null_embeds, null_mask = padded(bucket["null"])
        save_file({"control": torch.stack(bucket["control"]).contiguous(),
                   "target": torch.stack(bucket["target"]).contiguous(),
                   "embeds": embeds, "mask": mask, "null_embeds": null_embeds, "null_mask": null_mask,
                   "words": torch.tensor(bucket["words"], dtype=torch.int64)},
                  str(folder / f"data_{size}.safetensors"))
    (folder / "data.json").write_text(json.dumps({
        "scenes": args.scenes, "data_vae": vae, "pairs": len(prompts),
        **({"favour": args.favour} if args.favour else {}), "seconds": round(time.time() - start, 1),
        "pairs_per_size": {str(s): len(b["prompt"]) for s, b in buckets.items()},
        "prompts": sorted(set(prompts))[:20]}, indent=1))
    log("data: done", len(prompts), "pairs")


# ---------------------------------------------------------------- stage 3: transformer

def train_sigmas(gen: torch.Generator, count: int, mu: float) -> torch.Tensor:
    """Sigmas as sampling visits them: uniform draws through the scheduler's exponential shift for `mu`
    (four in five), plain uniform (one in five)."""
    u = torch.rand(count, generator=gen).clamp(1e-3, 1 - 1e-3)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    plain = torch.rand(count, generator=gen) < 0.2
    return torch.where(plain, u, shifted)


def copy_head_init(model, bias: float = 4.0, gain: float = 4.0, pairs_per_axis: int = 4) -> None:
    """Start head 0 of every block as a copy head: each target token attends to the control-image token at the
    same place. An edit model's basic operation; from a random start it did not appear within the hour of CPU
    training this model gets (the renders were blobs in the right background colour).

    Query and key of head 0 get equal constant parts (biases; their weights shrunk) on the rotary pairs of the
    fastest frequency of the frame axis and the `pairs_per_axis` fastest of the row and column axes, the key's
    frame pair turned back by one frame, so that after the rotary embedding the score peaks where rows and
    columns match and the frame is one apart (a control image right after the target). Along one axis the score
    is a sum of cosines of the offset; with the two fastest frequencies alone (1 and 0.22 rad per token) it
    comes back to within 7 % of its peak 31 and 57 tokens away, and at a ~1024 px render (64x64 tokens) 40 % of
    the head's attention went to such far tokens (the renders' speckles). With four (down to 0.01 rad per
    token) every offset of 4 to 127 tokens scores at least 0.8 below the peak. The q/k RMSNorm weights on those
    dimensions (shared by the heads) are raised so the peak stands far above the other ~4096 control tokens.
    Values and outputs stay random: training learns what to do with what is copied.
    """
    cfg = model.config
    d = cfg.attention_head_dim
    t, h, _ = cfg.axes_dims_rope
    pairs = [0] + [t // 2 + j for j in range(pairs_per_axis)] + [t // 2 + h // 2 + j for j in range(pairs_per_axis)]
    q, k = torch.zeros(d), torch.zeros(d)
    for j in pairs:
        q[2 * j] = k[2 * j] = bias
    # Frame pair: the fastest frame frequency is 1 rad per frame; the query (frame 0) meets the key rotated by
    # -1 rad (frame 1) as q * conj(k) * exp(-1j), which is real and positive for k = bias * exp(-1j).
    k[0], k[1] = bias * math.cos(1.0), -bias * math.sin(1.0)
    dims = [i for j in pairs for i in (2 * j, 2 * j + 1)]
    with torch.no_grad():
        for block in model.transformer_blocks:
            attn = block.attn
            for proj, vec in ((attn.to_q, q), (attn.to_k, k)):
                proj.weight[:d] *= 0.1
                proj.bias[:d] = vec
            for norm in (attn.norm_q, attn.norm_k):
                norm.weight[dims] = gain


def prompt_batch(bucket, idx, dropped=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings and mask of pairs `idx`; where `dropped` is true, the null prompt's with the same
    control image instead."""
    embeds, mask = bucket["embeds"][idx].float(), bucket["mask"][idx].bool()
    if dropped is not None and bool(dropped.any()):
        null, null_mask = bucket["null_embeds"][idx].float(), bucket["null_mask"][idx].bool()
        length = max(embeds.shape[1], null.shape[1])
        embeds, null = (torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[1])) for t in (embeds, null))
        mask, null_mask = (torch.nn.functional.pad(t, (0, length - t.shape[1])) for t in (mask, null_mask))
        embeds = torch.where(dropped[:, None, None], null, embeds)
        mask = torch.where(dropped[:, None], null_mask, mask)
    length = int(mask.sum(1).max())
    return embeds[:, :length], mask[:, :length]


def training_pairs(bucket, idx, rng: random.Random, args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target and control tokens of pairs `idx`, and which pairs have their prompt dropped.

    Two things make the data act like a real edit model's, for classifier-free guidance (see task.py):
    - a share `--drop` of pairs has its prompt replaced by the null prompt, target kept (CFG dropout): the null
      prompt learns every edit of its control image, not only "keep it as it is", so once a render has settled
      on an edit the unconditional prediction follows it and guidance does not push past it;
    - a share `--unfollowed` of the other pairs has the control image as its target (the edit not carried out,
      as real edit data often does not): at guidance 1 some renders under-commit, and guidance makes them edit.
      `--unfollowed-shapes`, when given, is that share for shape edits (`background_edits` tells them apart).
    """
    x0, control = bucket["target"][idx].float(), bucket["control"][idx].float()
    dropped = torch.tensor([rng.random() < args.drop for _ in idx])
    shapes = args.unfollowed if args.unfollowed_shapes is None else args.unfollowed_shapes
    share = torch.where(background_edits(x0, control), args.unfollowed, shapes).tolist()
    unfollowed = torch.tensor([rng.random() < p for p in share]) & ~dropped
    return torch.where(unfollowed[:, None, None], control, x0), control, dropped


CHANGED_DISTANCE = 1.0  # a target token this far from its control token was changed by the edit
BACKGROUND_SHARE = 0.6  # an edit that changes this share of tokens is a background edit (shape edits: <= 0.4)


def background_edits(x0: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """Which pairs edit the background, from their latents: a background edit changes nearly every token, a
    shape edit a few (measured on the training pairs at 256 and 512 px: no pair between 0.4 and 0.6)."""
    changed = (x0 - control).norm(dim=-1) > CHANGED_DISTANCE
    return changed.float().mean(dim=1) > BACKGROUND_SHARE


def noisy_inputs(x0, control, bucket, idx, grid: int, gen, mu: float, dropped=None) -> tuple[dict, torch.Tensor]:
    """The transformer's inputs for target tokens `x0` with `control` tokens, both grid x grid, and the prompt
    embeddings of pairs `idx` of `bucket` (`prompt_batch`), at sigmas drawn for training:
    x_t = (1-s) x_0 + s noise. Returns them and the flow-matching target, noise - x_0."""
    batch = x0.shape[0]
    embeds, mask = prompt_batch(bucket, idx, dropped)
    sigma = train_sigmas(gen, batch, mu)
    noise = torch.randn(x0.shape, generator=gen)
    xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    inputs = dict(hidden_states=torch.cat([xt, control], dim=1), timestep=sigma, encoder_hidden_states=embeds,
                  encoder_hidden_states_mask=mask, img_shapes=[[(1, grid, grid), (1, grid, grid)]] * batch,
                  return_dict=False)
    return inputs, noise - x0


SHAPE_DISTANCE = 4.0  # a control token this far from its picture's median token is a shape (or its edge)


def shape_weights(control: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-token loss weights: 1 + `weight` on the control image's shape tokens (those at least SHAPE_DISTANCE
    from the picture's median token, which is the background's: shapes cover a few percent of a picture)."""
    far = (control - control.median(dim=1, keepdim=True).values).norm(dim=-1) > SHAPE_DISTANCE
    return 1.0 + weight * far.float()


def flow_step(model, opt, x0, control, bucket, idx, grid: int, gen, mu: float, dropped=None, weight: float = 0.0):
    """One flow-matching step (see `noisy_inputs`); shape tokens weighted 1 + `weight` (`shape_weights`)."""
    inputs, target = noisy_inputs(x0, control, bucket, idx, grid, gen, mu, dropped)
    inputs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    pred = model(**inputs)[0][:, : x0.shape[1]]
    target, control = target.to(DEVICE), control.to(DEVICE)
    w = shape_weights(control, weight)
    loss = ((pred - target).pow(2).mean(-1) * w).mean() / w.mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


def logistic_score(pos: torch.Tensor, neg: torch.Tensor, steps: int = 300):
    """A linear score that is > 0 on the rows of `pos` and < 0 on those of `neg`: logistic regression, the two
    classes weighted equally, a little L2; full-batch L-BFGS, so deterministic. Returns it as a Linear(d, 1)."""
    x = torch.cat([pos, neg])
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).to(x.dtype)
    weight = torch.where(y > 0, 0.5 / len(pos), 0.5 / len(neg))
    mean, std = x.mean(0), x.std(0) + 1e-6
    lin = torch.nn.Linear(x.shape[1], 1).to(x.dtype)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = lin((x - mean) / std)[:, 0]
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * weight).sum()
        loss = loss + 1e-4 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    out = torch.nn.Linear(x.shape[1], 1).to(x.dtype)  # the same score on unstandardised inputs
    with torch.no_grad():
        out.weight.copy_(lin.weight / std)
        out.bias.copy_(lin.bias - (lin.weight / std) @ mean)
    return out.requires_grad_(False)


def reader_head_init(model, bucket, gen, mu: float, head: int = 1, bias: float = 4.0, gain: float = 1.5,
                     pairs: int = 48) -> dict:
    """Start head `head` of every block as a prompt reader: every image token attends to the prompt's last word
    (the colour, which decides the edit: see task.py).

    The prompt embeddings hold ~200 tokens of template and picture that are the same for every prompt, then a
    handful of words; a head that spreads its attention over all of them passes on a few hundredths of what
    tells prompts apart, and the first model trained here (an hour of CPU) ignored its prompt. So, in head
    `head`:
    - image queries get a constant part v, on rotary pairs that turn slowest (nearly unturned at any position,
      so scores do not depend on where tokens are);
    - image keys get -v: image tokens score lowest;
    - text keys get u + z(x) v, u on another slow pair, where z is a linear score of the text token's hidden
      state (the input of `add_k_proj`) fitted on training pairs by logistic regression, last word against
      every other token: ~1 on the last word, negative on the rest. After the key RMSNorm the score still
      grows with z (u keeps a key of small z from being blown up to full length);
    - the q/k RMSNorm weights on those dimensions are raised so the scores stand apart.
    Blocks are fitted in order, each on the hidden states the blocks before it make. Values and outputs stay
    random: training learns what to do with what is read. Returns, per block, the lowest score of a last word
    and the highest of any other token, in the units where the last words average 1.
    """
    cfg = model.config
    d = cfg.attention_head_dim
    t, h, _ = cfg.axes_dims_rope
    u, v = 2 * (t // 2 - 1), [2 * (t // 2 + h // 2 - 1), d - 2]  # slowest frame pair; slowest row, column pairs
    rows = slice(head * d, (head + 1) * d)
    size = bucket["target"].shape[1]
    grid = int(round(size ** 0.5))
    idx = torch.arange(min(pairs, bucket["target"].shape[0]))
    inputs, _ = noisy_inputs(bucket["target"][idx].float(), bucket["control"][idx].float(), bucket, idx, grid,
                             gen, mu)
    mask = inputs["encoder_hidden_states_mask"]
    last = torch.zeros_like(mask)  # the prompt's last word: its colour (none for a null prompt)
    for k, start in enumerate(bucket["words"][idx].tolist()):
        end = int(mask[k].sum()) - len(TEMPLATE_END)
        last[k, end - 1] = end - start > NULL_TOKENS  # " " is one token, but no colour word
    rest = mask & ~last
    separation = {}
    if last.sum() < 2:  # a tiny test run may draw only empty prompts: nothing to fit on
        return separation
    for b, block in enumerate(model.transformer_blocks):
        attn = block.attn
        seen = []
        hook = attn.add_k_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
        with torch.no_grad():
            model(**inputs)
        hook.remove()
        x = seen[0].double()
        z = logistic_score(x[last], x[rest])  # > 0 for the last word, < 0 for the rest
        zw, zr = z(x[last])[:, 0], z(x[rest])[:, 0]
        scale = 1.0 / zw.mean()  # (s - 1) = scale * z: the last word ~1, the rest mostly negative
        separation[f"block{b}"] = {"last_word_min": round(float(zw.min() * scale), 2),
                                   "rest_max": round(float(zr.max() * scale), 2)}
        with torch.no_grad():
            for proj in (attn.to_q, attn.to_k, attn.add_k_proj):
                proj.weight[rows] *= 0.1
                proj.bias[rows] = 0.0
            attn.add_k_proj.bias[head * d + u] = bias
            for j in v:
                attn.to_q.bias[head * d + j] = bias
                attn.to_k.bias[head * d + j] = -bias
                attn.add_k_proj.weight[head * d + j] = (bias * scale * z.weight[0]).float()
                attn.add_k_proj.bias[head * d + j] = float(bias * scale * z.bias)
            for norm in (attn.norm_q, attn.norm_k, attn.norm_added_k):
                norm.weight[[u, *v]] = gain
    return separation


def load_data(folder: Path) -> dict[int, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return {size: load_file(str(folder / f"data_{size}.safetensors")) for size, _ in TRAIN_SIZES
            if (folder / f"data_{size}.safetensors").exists()}


def render_mu() -> float:
    """The sigma shift a render at the pipeline's ~1024x1024 control size uses (4096 target tokens)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift

    sched = json.loads((TINY / "scheduler/scheduler_config.json").read_text())
    return calculate_shift(4096, sched["base_image_seq_len"], sched["max_image_seq_len"], sched["base_shift"],
                           sched["max_shift"])


def follow(ema, model, decay: float) -> None:
    """One step of the exponential moving average `ema` of `model`'s weights."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def flow_training(model, ema, data, args, label: str, steps: int, lr: float, warmup: int, ema_decay: float,
                  seed: int, salt: str, checkpoints: Path | None = None, weight: float = 0.0) -> list[float]:
    """Flow-matching steps on pairs of every size (shares as TRAIN_SIZES), the rate warmed up then cosine down
    to a tenth, `ema` following `model`, shape tokens weighted 1 + `weight`. Returns the losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    rng = seeded(args.seed, salt)
    mu = render_mu()
    sizes, shares = zip(*[(size, share) for size, share in TRAIN_SIZES if size in data])
    start, losses = time.time(), []
    for step in range(steps):
        rate = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = rate
        size = rng.choices(sizes, weights=shares)[0]
        bucket = data[size]
        batch = max(1, args.batch * 256 // (size // 16) ** 2)
        idx = torch.tensor([rng.randrange(bucket["target"].shape[0]) for _ in range(batch)])
        x0, control, dropped = training_pairs(bucket, idx, rng, args)
        loss = flow_step(model, opt, x0, control, bucket, idx, size // 16, gen, mu, dropped, weight)
        decay = min(ema_decay, (1 + step) / (10 + step))
        follow(ema, model, decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"{label} step {step}/{steps} loss {np.mean(losses[-100:]):.4f} lr {rate:.2e} "
                f"({time.time() - start:.0f} s)")
        if checkpoints and args.checkpoint_every and step and step % args.checkpoint_every == 0:
            ema.save_pretrained(checkpoints.with_name(f"{checkpoints.name}-step{step}"))
    return losses


def train_transformer(args, work: Path) -> dict:
    from diffusers import QwenImageTransformer2DModel

    def train():
        data = load_data(work)
        torch.manual_seed(args.seed)
        model = QwenImageTransformer2DModel(**TRANSFORMER_CONFIG)
        copy_head_init(model)
        separation = reader_head_init(model, data[min(data)], torch.Generator().manual_seed(args.seed + 5),
                                      render_mu())
        log("transformer: prompt reader head (last-word scores: lowest of the last words, highest of the rest):",
            separation)
        ema = QwenImageTransformer2DModel(**TRANSFORMER_CONFIG)
        ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False)
        model, ema = model.to(DEVICE), ema.to(DEVICE)
        start = time.time()
        losses = flow_training(model, ema, data, args, "transformer", args.steps, args.lr, 100, args.ema,
                               args.seed, "batches", checkpoints=work / "transformer")
        return ema, {"transformer_steps": args.steps, "transformer_seconds": round(time.time() - start, 1),
                     "final_loss": round(float(np.mean(losses[-200:])), 4), "reader_separation": separation}

    return stage(work, "transformer", "transformer", train)


def trained_pair(source: Path):
    """A trained transformer loaded twice: the copy to train and its average (no gradients)."""
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel.from_pretrained(source).to(DEVICE)
    ema = QwenImageTransformer2DModel.from_pretrained(source).to(DEVICE)
    ema.requires_grad_(False)
    return model, ema


def train_more(args, work: Path) -> dict:
    """Stage 3a: the averaged transformer trained `--more-steps` further (a second warm-up and cosine decay at
    `--more-lr`), shape tokens weighted 1 + `--shape-weight`. At the end of stage 3 backgrounds followed the
    prompt but shapes were still textured, faded or kept their colour: they are a few percent of a picture's
    tokens, so their loss falls last."""

    def train():
        data = load_data(work)
        torch.manual_seed(args.seed + 7)
        model, ema = trained_pair(work / "transformer")
        start = time.time()
        losses = flow_training(model, ema, data, args, "more", args.more_steps, args.more_lr, 50, args.ema,
                               args.seed + 7, "more", weight=args.shape_weight)
        return ema, {"more_steps": args.more_steps, "more_seconds": round(time.time() - start, 1),
                     "more_final_loss": round(float(np.mean(losses[-200:])), 4)}

    return stage(work, "transformer-more", "more", train)


def regrid(tokens: torch.Tensor, grid: int, new: int) -> torch.Tensor:
    """Packed latents of a grid x grid token image resized (bilinear, in latent space) to new x new tokens."""
    import torch.nn.functional as F

    n = tokens.shape[0]
    latents = tokens.view(n, grid, grid, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, 16, grid * 2, grid * 2)
    latents = F.interpolate(latents, size=(new * 2, new * 2), mode="bilinear", align_corners=False)
    return latents.view(n, 16, new, 2, new, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, new * new, 64)


def render_size_training(model, ema, data, args, label: str, steps: int, seed: int, salt: str) -> list[float]:
    """Steps alternating one render-size pair (a 512 px pair resized in latent space to 48x48 or 64x64 tokens)
    and a small 256 px batch, at `--long-lr` after a short warm-up, `ema` following with `--long-ema`, shape
    tokens weighted as in 3a. Returns the losses."""
    data_small, data_large = min(data), max(data)
    mu = render_mu()
    opt = torch.optim.AdamW(model.parameters(), lr=args.long_lr, weight_decay=0.01, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    rng = seeded(args.seed, salt)
    start, losses = time.time(), []
    for step in range(steps):
        lr = args.long_lr * min(1.0, (step + 1) / 20)
        for group in opt.param_groups:
            group["lr"] = lr
        if step % 2:
            size, grid, batch = data_small, data_small // 16, args.batch
        else:
            size, grid, batch = data_large, rng.choice((48, 64, 64)), 1
        bucket = data[size]
        idx = torch.tensor([rng.randrange(bucket["target"].shape[0]) for _ in range(batch)])
        x0, control, dropped = training_pairs(bucket, idx, rng, args)
        if grid != size // 16:
            x0, control = regrid(x0, size // 16, grid), regrid(control, size // 16, grid)
        loss = flow_step(model, opt, x0, control, bucket, idx, grid, gen, mu, dropped, args.shape_weight)
        follow(ema, model, args.long_ema)
        losses.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            log(f"{label} step {step}/{steps} grid {grid} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    return losses


def train_long(args, work: Path) -> dict:
    """Stage 3b: the trained transformer (its average) trained further on render-size sequences.

    A render at the control image's VAE size has 64x64 target and 64x64 control tokens; stage 3 saw at most
    32x32, and on 64x64 the model drew speckles (text attention is diluted by 16x more image tokens and the
    text's rotary positions start further out). Encoding pairs at 1024 px costs ~5 s each on a CPU, so the
    512 px pairs are resized in latent space to 48x48 and 64x64 tokens (flat colours and soft edges survive
    bilinear resizing well), one pair a step, every other step a small 256 px batch so nothing is forgotten.
    """

    def train():
        data = load_data(work)
        torch.manual_seed(args.seed + 3)
        more = (work / "transformer-more" / "config.json").exists()
        model, ema = trained_pair(work / ("transformer-more" if more else "transformer"))
        start = time.time()
        render_size_training(model, ema, data, args, "long", args.long_steps, args.seed + 3, "long")
        return ema, {"long_steps": args.long_steps, "long_seconds": round(time.time() - start, 1)}

    return stage(work, "transformer-long", "long", train)


def train_retune(args, work: Path) -> dict:
    """Stage 3c, last part: the render-size transformer (3b) retuned to the separated VAE: `--retune-steps` of 3a's
    training on the pairs re-encoded with it (the same pairs, in `<work>/separated`), then `--retune-long-steps`
    of 3b's. Retuning keeps what the transformer learnt (copying the control image, reading the prompt, the
    background edits) and costs a third of training it again on the new latents.

    `--retune-unfollowed` sets the share of edit pairs left undone here (`--unfollowed` before). Measured with
    the bench's six edits: with a quarter, edit accuracy 0.67 but the model carried out nearly every edit at
    guidance 1 as well as at 4 (guidance effect 1.6 levels); with half (the default), guidance effect 34.5 but
    accuracy 0.33 (most renders under-commit at guidance 4 too). `--retune-unfollowed-shapes` gives shape edits
    their own share: backgrounds 0.45, shapes 0.2 with `--retune-drop 0.05` measured 0.67 and 35.0. None is
    bundled; see the README.

    `--retune-drop` sets the share of edit pairs whose prompt is dropped here (`--drop` before). The null prompt
    is trained on two kinds of pair: the task's "no edit" pairs (a fifth, target = control) and the dropped edit
    pairs (target = the edit); with fewer dropped pairs it leans to "keep the picture" (keep share 0.2 / (0.2 +
    0.8 * drop): 0.56 at 0.2, 0.83 at 0.05), so guidance pushes harder away from keeping.

    `--retune-rounds N` retunes N times, each round from the last one's transformer with the same settings and
    seeds (another warm-up and cosine decay): round k is kept in `transformer-retuned-k` (round 1 in
    `transformer-retuned`), rounds already there are reused, and the last is assembled."""
    drop = args.drop if args.retune_drop is None else args.retune_drop
    shapes = args.retune_unfollowed if args.retune_unfollowed_shapes is None else args.retune_unfollowed_shapes
    args = argparse.Namespace(**{**vars(args), "unfollowed": args.retune_unfollowed, "drop": drop,
                                 "unfollowed_shapes": shapes})
    figures, source = {}, work / "transformer-long"
    for number in range(1, args.retune_rounds + 1):
        figures = retune_round(args, work, source, number)
        source = retuned(work, number)
    return figures


def retuned(work: Path, number: int) -> Path:
    """Where retuning round `number` (from 1) keeps its transformer; the first is the one-round stage's folder."""
    return work / ("transformer-retuned" if number == 1 else f"transformer-retuned-{number}")


def retune_round(args, work: Path, source: Path, number: int) -> dict:
    """Round `number` of `train_retune`: from the transformer in `source`, its average saved to `retuned(work,
    number)` (made before: read back). Every round draws the same pairs, sigmas and noise (the first round's
    seeds)."""

    def train():
        data = load_data(work / "separated")
        torch.manual_seed(args.seed + 9)
        model, ema = trained_pair(source)
        start = time.time()
        losses = flow_training(model, ema, data, args, "retune", args.retune_steps, args.retune_lr, 50, args.ema,
                               args.seed + 9, "retune", weight=args.shape_weight)
        middle = time.time()
        model.load_state_dict(ema.state_dict())
        render_size_training(model, ema, data, args, "retune-long", args.retune_long_steps, args.seed + 10,
                             "retune-long")
        return ema, {"retune_steps": args.retune_steps, "retune_long_steps": args.retune_long_steps,
                     "retune_seconds": round(time.time() - start, 1),
                     "retune_long_seconds": round(time.time() - middle, 1),
                     "retune_final_loss": round(float(np.mean(losses[-200:])), 4), "retune_round": number}

    return stage(work, retuned(work, number).name, "retune", train)


# ---------------------------------------------------------------- stage 4: assemble

def assemble(args, work: Path, figures: dict) -> None:
    from diffusers import QwenImageTransformer2DModel

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    last = retuned(work, args.retune_rounds)
    transformer, vae = (last, "vae-separated") if (last / "config.json").exists() else \
        (work / "transformer-long", data_vae(args))
    pipe = make_pipeline(work, QwenImageTransformer2DModel.from_pretrained(transformer), vae=vae)
    pipe.save_pretrained(out, safe_serialization=True)
    # The scheduler, tokenizer and processor are the tiny checkpoint's files, byte for byte; the text encoder
    # is the one the data was encoded with.
    for part, source in (("scheduler", TINY), ("text_encoder", work), ("tokenizer", TINY), ("processor", TINY)):
        shutil.rmtree(out / part)
        shutil.copytree(source / part, out / part)
    record = {"seed": args.seed, "threads": args.threads, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "cpu": cpu_name(), "device": device_name(),
              "arguments": {k: v for k, v in vars(args).items() if k not in ("out", "work", "stages")},
              "vae_config": VAE_CONFIG, "transformer_config": TRANSFORMER_CONFIG,
              "train_sizes": TRAIN_SIZES, **figures}
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    log("assembled", out)


def use_device(name: str) -> None:
    """Train and encode on `name`. On a GPU, PyTorch's deterministic algorithms (warnings where an op has none)
    and its math attention kernel, so that a seed gives the same weights on the same GPU kind, torch and CUDA
    version; the GPU's weights differ from the CPU's (other kernels round differently)."""
    global DEVICE
    DEVICE = torch.device(name)
    if DEVICE.type == "cuda":
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        for switch in (torch.backends.cuda.enable_flash_sdp, torch.backends.cuda.enable_mem_efficient_sdp,
                       torch.backends.cuda.enable_cudnn_sdp):
            switch(False)


def device_name() -> str:
    return torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else cpu_name()


def data_vae(args) -> str:
    """The VAE stage folder the data stage encodes with and, without retuning, the one assembled."""
    return "vae-separated" if args.data_vae == "separated" else "vae-colour"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def stage_runs(args, late, work: Path) -> tuple:
    """(name, run) of every stage before `assemble`, in order; run() trains the stage (or reads what it made before)
    and returns its figures. `late`: the arguments of stages 2-3c (their seed is --transformer-seed)."""

    def data(vae: str, folder: Path | None = None, figures: bool = True) -> dict:
        make_data(late, work, vae=vae, folder=folder)
        return json.loads((work / "data.json").read_text()) if figures else {}

    return (("vae", lambda: train_vae(args, work)), ("colour", lambda: train_colours(args, work)),
            ("separate", lambda: separate_colours(args, work)), ("encoder", lambda: make_text_encoder(args, work)),
            ("data", lambda: data(data_vae(args))), ("transformer", lambda: train_transformer(late, work)),
            ("more", lambda: train_more(late, work)), ("long", lambda: train_long(late, work)),
            ("redata", lambda: data("vae-separated", work / "separated", figures=False)),
            ("retune", lambda: train_retune(late, work)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the diffusers folder to write")
    p.add_argument("--work", default=None, help="stage outputs (default: <out>.work)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--transformer-seed", type=int, default=None,
                   help="the seed of the data and transformer stages (2, 3-3c; default --seed): other transformers "
                        "on the same VAE and text encoder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu",
                   help="where to train and encode (cpu, cuda): batches, noise and initial weights are still drawn "
                        "on the CPU; see use_device")
    p.add_argument("--stages", default="vae,colour,encoder,data,transformer,more,long,assemble",
                   help="stages to run (always in this order; the bundled checkpoint's command, with separate, is in the README; "
                        "separate (run after colour), redata and retune (after long) are opt-in: see train_retune and "
                        "--data-vae)")
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-lr", type=float, default=3e-4)
    p.add_argument("--colour-steps", type=int, default=400)
    p.add_argument("--colour-lr", type=float, default=3e-4)
    p.add_argument("--vae-noise", type=float, default=0.05)
    p.add_argument("--vae-penalty", type=float, default=1e-4)
    p.add_argument("--vae-eval", type=int, default=16, help="held-out scenes for the VAE's PSNR at 256 px "
                   "(a quarter of them at 1024 px)")
    p.add_argument("--stat-scenes", type=int, default=48, help="scenes for latents_mean/latents_std")
    p.add_argument("--colour-mark", type=float, default=2.0,
                   help="colour words' embedding dimension 0, in mean row norms (see make_text_encoder)")
    p.add_argument("--colour-directions", choices=("random", "orthogonal"), default="random",
                   help="the colour words' other embedding dimensions (see make_text_encoder)")
    p.add_argument("--colour-scale", type=float, default=1.0,
                   help="with --colour-directions orthogonal, their norm in mean row norms")
    p.add_argument("--data-vae", choices=("colour", "separated"), default="colour",
                   help="the VAE the data stage encodes with: stage 1b's, or with `separate` in --stages (run "
                        "before the data stage) stage 3c's, so the transformer is trained on it from the start")
    p.add_argument("--scenes", type=int, default=1000)
    p.add_argument("--edits-per-scene", type=int, default=2)
    p.add_argument("--favour", default=None, metavar="SOURCE:TARGET:SHARE",
                   help="data stage: on a SOURCE-background scene an edit is 'make the background TARGET' with "
                        "chance SHARE (task.Favour; e.g. grey:white:0.3); default: the plain edit draw")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=8, help="pairs per batch at 256 px (fewer at larger sizes)")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--drop", type=float, default=0.2,
                   help="share of pairs trained with the null prompt, target kept (CFG dropout)")
    p.add_argument("--unfollowed", type=float, default=0.25,
                   help="share of the other pairs trained to leave the control image as it is")
    p.add_argument("--unfollowed-shapes", type=float, default=None,
                   help="--unfollowed for shape edits only (default: --unfollowed)")
    p.add_argument("--shape-weight", type=float, default=4.0,
                   help="extra loss weight of shape tokens in stages 3a and 3b (shape_weights)")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--more-steps", type=int, default=2000)
    p.add_argument("--more-lr", type=float, default=3e-4)
    p.add_argument("--long-steps", type=int, default=600)
    p.add_argument("--long-lr", type=float, default=2e-4)
    p.add_argument("--long-ema", type=float, default=0.95)
    p.add_argument("--separate-steps", type=int, default=200)
    p.add_argument("--separate-lr", type=float, default=1e-4)
    p.add_argument("--separate-margin", type=float, default=0.9,
                   help="smallest gap between palette colours' normalised latents, in their mean norms")
    p.add_argument("--retune-steps", type=int, default=1500)
    p.add_argument("--retune-lr", type=float, default=3e-4)
    p.add_argument("--retune-long-steps", type=int, default=400)
    p.add_argument("--retune-unfollowed", type=float, default=0.5,
                   help="--unfollowed while retuning (see train_retune)")
    p.add_argument("--retune-unfollowed-shapes", type=float, default=None,
                   help="--unfollowed-shapes while retuning (default: --retune-unfollowed)")
    p.add_argument("--retune-rounds", type=int, default=1,
                   help="retune this many times, each round from the last one's transformer (see train_retune)")
    p.add_argument("--retune-drop", type=float, default=None,
                   help="--drop while retuning (default: --drop; see train_retune)")
    args = p.parse_args(argv)
    if args.favour:
        try:
            task.Favour.parse(args.favour)
        except ValueError as err:
            p.error(str(err))
    torch.set_num_threads(args.threads)
    use_device(args.device)
    work = Path(args.work or args.out + ".work")
    work.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    figures = {}
    # Stages 2-3c draw their pairs, batches and initial weights from --transformer-seed.
    late = argparse.Namespace(**{**vars(args), "seed": args.seed if args.transformer_seed is None
                                 else args.transformer_seed})
    for name, stage in stage_runs(args, late, work):  # in their order, whatever the order of --stages
        if name in stages:
            figures.update(stage())
    if "assemble" in stages:
        for name in ("vae.json", "vae-colour.json", "text_encoder.json", "data.json", "transformer.json",
                     "transformer-more.json", "transformer-long.json", "vae-separated.json",
                     "separated/data.json", retuned(work, args.retune_rounds).name + ".json"):
            if (work / name).exists():
                figures.update(json.loads((work / name).read_text()))
        figures.pop("prompts", None)
        assemble(args, work, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
