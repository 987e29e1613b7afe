"""The harness at the real Qwen-Image-Edit-2509's size on a GPU: peak memory and seconds per preview per offload mode.

    scripts/gpu-check --real-size [--modes none model group sequential] [--steps 25] [--size 1024]
    python scripts/real_size.py --tiny        (the same code on this CPU at the demo model's size: a dry run)

Nothing is downloaded: the real configurations of the three networks (the 20.4B-parameter transformer, the 8.3B
Qwen2.5-VL text encoder with its vision tower, the VAE) are written out below and built with random bf16 weights,
directly on the GPU (or, for an offload mode, moved to CPU memory first, as offloading keeps them). The tokenizer,
processor and scheduler come from the bundled demo checkpoint. Random weights render noise, but every layer runs
at its real size, so the memory and the time are the real ones.

The recipes come from a bundled case's config (`demo_qwen_image_edit_plus_lora_v1`, its second sample: two
control images), set to the request of this check (1024x1024, 25 steps by default) and given a random rank-16
LoRA on every transformer Linear in ai-toolkit's key format. Each mode renders, through the harness's renderer
on the one pipeline:
- the reference recipe (the server's request: PEFT adapter, CFG norm rescale),
- the training recipe (ai-toolkit's: fp32 run-time LoRA, no rescale),
- the bare stock QwenImageEditPlusPipeline.__call__ for the same request (the adapter set by Diffusers),
and prints per mode the peak GPU memory (torch.cuda.max_memory_allocated) and the seconds of each, then which GPU
sizes the mode fits (peak plus 1.5 GiB for the CUDA context and the allocator's slack). A person with a GPU
machine runs it as is, online or offline; the device tool's machines get diffusers as a carried wheel (README).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEMO = ROOT / "cases" / "workspace" / "aitk" / "demo-qwen-image-edit-2509"
CASE = "demo_qwen_image_edit_plus_lora_v1"
GIB = 1 << 30
GPU_SIZES = (24, 32, 48, 80)
CONTEXT_GIB = 1.5  # CUDA context, cuBLAS workspaces and allocator slack above max_memory_allocated

# Qwen-Image's transformer (Qwen/Qwen-Image-Edit-2509 transformer/config.json): 60 blocks, 24 heads of 128.
TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                   axes_dims_rope=(16, 56, 56))
# Qwen2.5-VL-7B-Instruct, the text encoder: 28 layers of 3584, and its 32-block vision tower.
TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
            num_key_value_heads=4, rms_norm_eps=1e-6, vocab_size=152064, max_position_embeddings=128000,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
              tokens_per_second=2)
# AutoencoderKLQwenImage as Qwen-Image ships it: base 96, four levels, two residual blocks each.
VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
           temperal_downsample=[False, True, True], dropout=0.0)


def configs(tiny: bool) -> tuple[dict, dict, dict, dict]:
    """(transformer, text, vision, vae) kwargs: the real ones, or the demo model's own (--tiny)."""
    import json

    if not tiny:
        return TRANSFORMER, TEXT, VISION, VAE
    read = lambda part: json.loads((DEMO / part / "config.json").read_text())  # noqa: E731
    keep = lambda d, keys: {k: d[k] for k in keys if k in d}  # noqa: E731
    te = read("text_encoder")
    return (keep(read("transformer"), TRANSFORMER), keep(te["text_config"], TEXT), keep(te["vision_config"], VISION),
            keep(read("vae"), VAE))


def build_pipeline(tiny: bool, device: str):
    """The stock QwenImageEditPlusPipeline of real-size networks with random bf16 weights, built on `device`
    (--tiny: the demo model's sizes in fp32, which every CPU runs at full speed)."""
    import json

    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline
    from diffusers import QwenImageTransformer2DModel
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer,
                              Qwen2VLProcessor)

    transformer_kw, text_kw, vision_kw, vae_kw = configs(tiny)
    demo_te = json.loads((DEMO / "text_encoder" / "config.json").read_text())
    special = {k: v for k, v in demo_te.items() if k.endswith("_token_id")}  # the bundled tokenizer's ids
    te_config = Qwen2_5_VLConfig(text_config={**demo_te["text_config"], **text_kw},
                                 vision_config={**demo_te["vision_config"], **vision_kw}, **special)
    vae_extra = {k: v for k, v in json.loads((DEMO / "vae" / "config.json").read_text()).items()
                 if k in ("latents_mean", "latents_std")}
    dtype = dtype_of(tiny)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = QwenImageTransformer2DModel(**transformer_kw)
            text_encoder = Qwen2_5_VLForConditionalGeneration(te_config)
            vae = AutoencoderKLQwenImage(**vae_kw, **vae_extra)
    finally:
        torch.set_default_dtype(before)
    for module in (transformer, text_encoder, vae):
        module.to(dtype).eval()
    pipe = QwenImageEditPlusPipeline(
        transformer=transformer, text_encoder=text_encoder, vae=vae,
        tokenizer=Qwen2Tokenizer.from_pretrained(DEMO / "tokenizer"),
        processor=Qwen2VLProcessor.from_pretrained(DEMO / "processor"),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(DEMO / "scheduler"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dtype_of(tiny: bool) -> torch.dtype:
    return torch.float32 if tiny else torch.bfloat16


def parameters(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e9


def random_lora(transformer, path: Path, rank: int = 16) -> Path:
    """A rank-`rank` LoRA on every Linear of the transformer blocks, in ai-toolkit's key format."""
    from safetensors.torch import save_file

    generator = torch.Generator("cpu").manual_seed(0)
    state = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks."):
            a = torch.randn(rank, module.in_features, generator=generator) * 0.01
            b = torch.randn(module.out_features, rank, generator=generator) * 0.01
            state[f"diffusion_model.{name}.lora_A.weight"] = a.to(module.weight.dtype)
            state[f"diffusion_model.{name}.lora_B.weight"] = b.to(module.weight.dtype)
    save_file(state, str(path))
    return path


def recipes(lora: Path, size: int, steps: int, dtype: str):
    """The bundled case's two-control-image sample, as each side's recipe, at this check's request."""
    from parity.runner import Options, plan

    task = next(t for t in plan(Options(cases=(ROOT / "cases",), dtype="bfloat16", device="cpu"))
                if t.case == CASE and t.step > 0 and len(t.reference.control_images_vae) == 2)
    change = dict(width=size, height=size, steps=steps, lora=str(lora), dtype=dtype)
    return task.training.with_fields(**change), task.reference.with_fields(**change)


class Clock:
    def __init__(self, device: str):
        self.device = device

    def __call__(self, fn):
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / GIB if cuda else float("nan")
        return out, time.perf_counter() - start, peak


def bare(pipe, recipe):
    from PIL import Image

    pipe.set_adapters(["check"], [recipe.multiplier])
    images = [Image.open(p).convert("RGB") for p in recipe.control_images_vae]
    generator = torch.Generator(recipe.generator_device).manual_seed(recipe.seed)
    return pipe(image=images, prompt=recipe.prompt, negative_prompt=recipe.negative_prompt,
                true_cfg_scale=recipe.guidance, num_inference_steps=recipe.steps, height=recipe.height,
                width=recipe.width, generator=generator).images[0]


def measure(mode: str, pipe, training, reference, device: str, lora: Path) -> dict:
    """One offload mode: the harness's two recipes and the bare call, on the one pipeline."""
    from parity import pipeline, render

    if mode == "none":
        pipe.to(device)
    else:
        pipe.to("cpu")
        pipeline.enable_offload(pipe, mode, device)
    loaded = pipeline.LoadedModel.wrap(pipe, "real-size (random weights)", device, reference.dtype, offload=mode)
    clock, row = Clock(device), {"mode": mode}
    for side, recipe in (("reference", reference), ("training", training)):
        try:
            _, row[f"{side}_s"], row[f"{side}_gib"] = clock(lambda: render.render(loaded, recipe))
        except Exception as exc:  # noqa: BLE001 -- a mode that cannot render a LoRA path says so and goes on
            row[f"{side}_error"] = f"{type(exc).__name__}: {exc}"
    loaded.pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="check")
    try:
        _, row["bare_s"], row["bare_gib"] = clock(lambda: bare(pipe, reference))
    except Exception as exc:  # noqa: BLE001
        row["bare_error"] = f"{type(exc).__name__}: {exc}"
    return row


def fits(peaks: list[float]) -> str:
    top = max(p for p in peaks if p == p) if any(p == p for p in peaks) else float("nan")
    if top != top:
        return "n/a (no GPU)"
    sizes = [f"{g} GB" for g in GPU_SIZES if top + CONTEXT_GIB <= g * 1e9 / GIB]
    return ", ".join(sizes) if sizes else f"none of {', '.join(map(str, GPU_SIZES))} GB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", nargs="+", default=["none", "model", "group", "sequential"],
                   choices=["none", "model", "group", "sequential"])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--tiny", action="store_true", help="the demo model's size on this CPU: a dry run of this script")
    args = p.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU (or --tiny for a dry run on the CPU)")
    modes = ["none"] if args.tiny else args.modes
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (--tiny)"
    start = time.perf_counter()
    pipe = build_pipeline(args.tiny, device)
    print(f"device: {gpu}; built in {time.perf_counter() - start:.0f} s: "
          f"transformer {parameters(pipe.transformer):.2f}B, text encoder {parameters(pipe.text_encoder):.2f}B, VAE {parameters(pipe.vae):.3f}B parameters "
          f"({str(dtype_of(args.tiny)).removeprefix('torch.')})")
    with tempfile.TemporaryDirectory() as tmp:
        lora = random_lora(pipe.transformer, Path(tmp) / "lora.safetensors")
        training, reference = recipes(lora, args.size, args.steps, str(dtype_of(args.tiny)).removeprefix("torch."))
        print(f"request: {args.size}x{args.size}, {args.steps} steps, guidance {reference.guidance}, two control "
              f"images; rank-16 LoRA on every block Linear")
        print("| offload | reference s | reference peak GiB | training s | training peak GiB | bare s | bare peak GiB "
              "| fits |")
        print("|---|---|---|---|---|---|---|---|")
        for i, mode in enumerate(modes):
            if i:  # each mode on a freshly built pipeline: no hook or adapter of the one before is left
                del pipe
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                pipe = build_pipeline(args.tiny, device)
            row = measure(mode, pipe, training, reference, device, lora)
            cells = []
            for side in ("reference", "training", "bare"):
                if f"{side}_error" in row:
                    cells += [row[f"{side}_error"][:60], "-"]
                else:
                    cells += [f"{row[f'{side}_s']:.1f}", f"{row[f'{side}_gib']:.1f}"]
            peaks = [row.get(f"{side}_gib", float("nan")) for side in ("reference", "training", "bare")]
            print(f"| {mode} | {' | '.join(cells)} | {fits(peaks)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
