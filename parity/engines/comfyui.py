"""ComfyUI as the reference engine: the recipe its native graph follows for a preview, and the sampling math the
renderer needs to follow it (written here from what ComfyUI a125cd84 does; docs/comfyui-recording.md).

The graph is the one the official template sets up, with the preview's values in it. For Qwen-Image and
Qwen-Image-2512 (Comfy-Org/workflow_templates `templates/image_qwen_image.json` at 86b41b83 and
`templates/image_qwen_Image_2512.json` at 7c70b6ec): UNETLoader (weight_dtype default) -> LoraLoaderModelOnly (the
preview's step LoRA at its multiplier; none at step 0) -> ModelSamplingAuraFlow shift 3.1 -> KSampler (euler,
simple, the preview's seed, steps and cfg, denoise 1) on an EmptySD3LatentImage of the preview's size ->
VAEDecode -> SaveImage. What that does, as recipe fields:

- `sigma_schedule` "static shift 3.1, simple": ModelSamplingAuraFlow builds a 1000-entry table
  sigma(t) = s*t / (1 + (s-1)*t) for t = 1/1000 .. 1 (multiplier 1), and the `simple` scheduler takes every
  (1000/N)-th entry from the top, then 0. No dependence on the image size (Diffusers' dynamic shift has one).
- `cfg_form` x0: KSampler's CFG combines the denoised predictions x - sigma*v (uncond + (cond - uncond)*cfg,
  skipped when cfg is 1), and k-diffusion's Euler steps an fp32 state, x + (x - denoised)/sigma * (next - sigma);
  the model sees sigma itself as its timestep; the latent is un-normalised as latent*std + mean (Wan21 format).
- `noise`: `comfy/sample.py` prepare_noise, torch.manual_seed(seed) then an fp32 randn on the CPU in the empty
  latent's shape [B, 16, 1, H/8, W/8] (the same numbers as a CPU torch.Generator with that seed, drawn in fp32).
- `pixels` truncated: VAEDecode clamps (x+1)/2 to [0, 1], SaveImage writes uint8(clip(255*x)).
- the LoRA is merged into the weights in fp32 (`model_patcher`), no CFG norm (the t2i templates have no CFGNorm).

Edit models (TextEncodeQwenImageEditPlus, FluxKontextImageScale, CFGNorm) are not modelled yet: their recipe
is a CaseError that says so.
"""

from __future__ import annotations

import re

import torch

from .. import models
from ..aitk_config import SampleItem, TrainingJob, snap
from ..errors import CaseError, NotRenderable
from ..preprocess import PROMPT_RESIZE, VAE_RESIZE
from ..forms import CFG_X0, LORA_MERGED_FP32, LORA_NONE
from ..recipe import Recipe, device_kind, replace_trigger, scheduler_json

NOISE = "ComfyUI prepare_noise: torch.manual_seed, fp32 CPU, [B,16,1,H/8,W/8]"
PIXELS = "truncate (ComfyUI SaveImage: uint8(clip(255*(x+1)/2)))"
TABLE = 1000  # ModelSamplingDiscreteFlow's timesteps
LATENT_DIVISOR = 16  # EmptySD3LatentImage's width/height step (8 px a latent, 2x2 patches in the model)

# The official template of each text-to-image model: ModelSamplingAuraFlow's shift, KSampler's sampler/scheduler.
TEMPLATES = {
    "qwen_image": {"template": "templates/image_qwen_image.json@86b41b83", "shift": 3.1, "sampler": "euler",
                   "scheduler": "simple"},
    "qwen_image_2512": {"template": "templates/image_qwen_Image_2512.json@7c70b6ec", "shift": 3.1,
                        "sampler": "euler", "scheduler": "simple"},
}


def schedule_text(shift: float, scheduler: str = "simple") -> str:
    return f"static shift {shift:g}, {scheduler}"


def shifted_table(shift: float, size: int = TABLE) -> torch.Tensor:
    """The sigma of each of `size` timesteps, as ModelSamplingAuraFlow's table holds them (fp32)."""
    t = torch.arange(1, size + 1, 1) / size  # multiplier 1: the timestep is t itself
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def simple_sigmas(shift: float, steps: int, size: int = TABLE) -> torch.Tensor:
    """`steps` sigmas picked evenly from the top of the table, then 0 (the `simple` scheduler), fp32."""
    table = shifted_table(shift, size)
    stride = len(table) / steps
    picked = [float(table[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.tensor(picked + [0.0], dtype=torch.float32)


def sigmas(schedule: str, steps: int) -> torch.Tensor:
    """The N+1 sigmas a `sigma_schedule` value names; NotRenderable for a form this renderer does not know."""
    found = re.fullmatch(r"static shift ([0-9.]+), simple", schedule.strip())
    if not found:
        raise NotRenderable(f"unknown sigma schedule {schedule!r}")
    return simple_sigmas(float(found.group(1)), steps)


def initial_noise(seed: int, channels: int, height: int, width: int) -> torch.Tensor:
    """prepare_noise's draw for an empty latent of `height` x `width` pixels: fp32, CPU, [1, C, 1, H/8, W/8]."""
    generator = torch.Generator("cpu").manual_seed(seed)  # the stream torch.manual_seed(seed) sets up
    return torch.randn([1, channels, 1, height // 8, width // 8], dtype=torch.float32, generator=generator,
                       device="cpu")


def to_8bit(image: torch.Tensor):
    """VAEDecode's output conversion and SaveImage's: [1, 3, H, W] in [-1, 1] -> H x W x 3 uint8, truncated."""
    import numpy as np

    pixels = torch.clamp((image.float() + 1.0) / 2.0, min=0.0, max=1.0)[0].permute(1, 2, 0).cpu().numpy()
    return np.clip(255.0 * pixels, 0, 255).astype(np.uint8)


def reference_recipe(job: TrainingJob, item: SampleItem, lora: str | None, resolve, *, device: str, dtype: str,
                     scheduler: dict | None = None) -> Recipe:
    """What ComfyUI's official graph for the run's model does with this preview's settings. `scheduler`: the
    checkpoint's scheduler config, kept in the recipe as the model folder holds it (ComfyUI does not read it: its
    sigmas are `sigma_schedule`'s)."""
    model = models.of_job(job)
    template = TEMPLATES.get(model.id)
    if template is None:
        raise CaseError(job.path, f"the ComfyUI reference of {model.name} is not modelled yet (text-to-image "
                                  f"models only: {', '.join(TEMPLATES)})", "use --reference server for this case")
    width, height = snap(item.width, LATENT_DIVISOR), snap(item.height, LATENT_DIVISOR)
    return Recipe(
        width=width,
        height=height,
        steps=item.sample_steps,
        scheduler=scheduler_json(scheduler or {}),
        guidance=float(item.guidance_scale),
        cfg_norm=False,  # no CFGNorm node in the text-to-image templates
        negative_prompt=item.neg,
        seed=item.seed,
        generator_device="cpu",
        prompt=replace_trigger(item.prompt, job.trigger_word),
        control_images_prompt=(),
        control_images_vae=(),
        control_prompt_resize=PROMPT_RESIZE,  # no control images: the values both Diffusers sides hold
        control_vae_resize=VAE_RESIZE,
        lora=lora,
        multiplier=float(item.network_multiplier),
        lora_application=LORA_NONE if lora is None else LORA_MERGED_FP32,  # model_patcher: fp32, cast back
        precision="none",
        text_encoder_rope="float32",
        vae_tiling=False,  # VAEDecode tiles only after running out of memory
        device=device_kind(device),
        dtype=dtype,
        output_format="png",
        model=model.name,
        sigma_schedule=schedule_text(template["shift"], template["scheduler"]),
        cfg_form=CFG_X0,
        noise=NOISE,
        pixels=PIXELS,
    )
