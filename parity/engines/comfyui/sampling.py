"""ComfyUI's sampling as the renderer follows it: the sigma table and the `simple` scheduler, the initial noise,
KSampler's CFG on the denoised prediction with the CFGNorm node, k-diffusion's Euler step, and SaveImage's
8-bit conversion (written from what ComfyUI a125cd84 does: comfy/model_sampling.py, comfy/samplers.py,
comfy/sample.py, comfy_extras/nodes_cfg.py, comfy/k_diffusion/sampling.py).
"""

from __future__ import annotations

import math
import re

import torch

from ...errors import NotRenderable

NOISE = "ComfyUI prepare_noise: torch.manual_seed, fp32 CPU, [B,16,1,H/8,W/8]"
PIXELS = "truncate (ComfyUI SaveImage: uint8(clip(255*(x+1)/2)))"
TABLE = 1000  # ModelSamplingDiscreteFlow's timesteps
LATENT_DIVISOR = 16  # EmptySD3LatentImage's width/height step (8 px a latent, 2x2 patches in the model)

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
    return pick_simple(shifted_table(shift, size), steps)


FLUX_TABLE = 10000  # ModelSamplingFlux's timesteps


def flux_table(mu: float, size: int = FLUX_TABLE) -> torch.Tensor:
    """ModelSamplingFlux's table (the ModelSamplingFlux node, and Qwen's default sampling at mu 1.15):
    exp(mu) / (exp(mu) + (1/t - 1)) for t = 1/size .. 1, fp32."""
    t = torch.arange(1, size + 1, 1) / size
    e = math.exp(mu)
    return e / (e + (1 / t - 1) ** 1.0)


def pick_simple(table: torch.Tensor, steps: int) -> torch.Tensor:
    """The `simple` scheduler: `steps` entries evenly from the top of the table, then 0, fp32."""
    stride = len(table) / steps
    picked = [float(table[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.tensor(picked + [0.0], dtype=torch.float32)


def flux_mu(max_shift: float, base_shift: float, width: int, height: int) -> float:
    """The ModelSamplingFlux node's mu for an image size: linear in the latent tokens from base_shift at 256 to
    max_shift at 4096 (comfy_extras/nodes_model_advanced.py)."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return (width * height / (8 * 8 * 2 * 2)) * slope + (base_shift - slope * 256)


def flux_text(mu: float, scheduler: str = "simple") -> str:
    return f"flux shift mu {mu:.6g}, {scheduler}"


def sigmas(schedule: str, steps: int) -> torch.Tensor:
    """The N+1 sigmas a `sigma_schedule` value names; NotRenderable for a form this renderer does not know."""
    text = schedule.strip()
    found = re.fullmatch(r"static shift ([0-9.]+), simple", text)
    if found:
        return simple_sigmas(float(found.group(1)), steps)
    found = re.fullmatch(r"flux shift mu (-?[0-9.e+-]+), simple", text)
    if found:
        return pick_simple(flux_table(float(found.group(1))), steps)
    raise NotRenderable(f"unknown sigma schedule {schedule!r}")


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


def cfg_norm(cond_denoised: torch.Tensor, denoised: torch.Tensor, channels: int, strength: float = 1.0):
    """The CFGNorm node's post-CFG function on packed latents [B, tokens, channels*4]: per latent pixel, the CFG
    result is scaled by |cond| / (|result| + 1e-8) over the latent channels, clamped to [0, 1], times strength."""
    shape = denoised.shape
    cond = cond_denoised.reshape(*shape[:-1], channels, shape[-1] // channels)
    result = denoised.reshape(*shape[:-1], channels, shape[-1] // channels)
    scale = (torch.norm(cond, dim=-2, keepdim=True) / (torch.norm(result, dim=-2, keepdim=True) + 1e-8)).clamp(
        min=0.0, max=1.0)
    return (result * scale * strength).reshape(shape)


def sample_x0(latents, image_latents, predict, sigmas, steps: int, guidance: float, norm: bool, channels: int,
              model_dtype) -> torch.Tensor:
    """KSampler (euler) with CFG on the denoised prediction: an fp32 state x, the model's velocity v at sigma (its
    timestep), denoised = x - v*sigma, CFG uncond + (cond - uncond)*cfg (skipped at cfg 1), then the CFGNorm node
    when `norm`, then x + (x - denoised)/sigma * (next sigma - sigma). `predict(input, timestep, cond)` gives the
    velocity of the image tokens; `image_latents` (reference tokens) are appended to the model's input."""
    do_cfg = not math.isclose(guidance, 1.0)
    x = latents.float()
    for i in range(steps):
        sigma = sigmas[i]
        model_input = x.to(model_dtype)  # ComfyUI casts the model's input to the model's dtype
        if image_latents is not None:
            model_input = torch.cat([model_input, image_latents], dim=1)
        timestep = sigma.expand(x.shape[0])  # ModelSamplingAuraFlow: timestep = sigma * multiplier 1, fp32
        cond = x - predict(model_input, timestep, True).float() * sigma
        denoised = cond
        if do_cfg:
            uncond = x - predict(model_input, timestep, False).float() * sigma
            denoised = uncond + (cond - uncond) * guidance
        if norm:
            denoised = cfg_norm(cond, denoised, channels)
        x = x + (x - denoised) / sigma * (sigmas[i + 1] - sigma)
    return x
