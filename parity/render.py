"""One renderer for every recipe: the Qwen-Image-Edit-Plus denoising loop run with the pipeline's components.

With a reference recipe it computes what stock `QwenImageEditPlusPipeline.__call__` computes (tested bit for
bit); every recipe field is honoured, so switches the stock `__call__` lacks (no CFG norm rescale, fp32
run-time or merged LoRA, VAE tiling, the transposed prompt-encoder resize) are real. An engine's own sampling
(`sigma_schedule`, `cfg_form`, `noise`, `pixels`: ComfyUI's, parity/engines/comfyui.py) runs through the same
transformer and VAE, each field switchable on its own; at their defaults the loop is the Diffusers one, unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError

from . import models, precision
from .cache import digest
from .errors import CaseError, NotRenderable
from .kernels import cpu_bf16_convolutions
from .pipeline import DTYPES, LoadedModel
from .preprocess import VAE_RESIZE, VAE_RULES, UnknownRule, prompt_size, to_request, vae_size
from .engines import comfyui
from .forms import CFG_V, CFG_X0, NOISE_DIFFUSERS, PIXELS_ROUND, SIGMAS_DIFFUSERS
from .recipe import Recipe


@dataclass
class RenderCapture:
    """Intermediate values of a render, for tests and diagnosis."""

    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    timesteps: list[float] | None = None


def open_control(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise CaseError(path, f"control image cannot be read ({exc.__class__.__name__})",
                        "replace it with the PNG/JPEG the training used") from None


def encode_prompt(loaded: LoadedModel, prompt: str, images: list[Image.Image], rule: str, dtype: torch.dtype,
                  context: tuple = ()):
    """Prompt embeddings as both sides compute them: 0-1 tensors resized by `rule`, then Diffusers' encoder.

    The Qwen2-VL processor rescales by 1/255 again, so the encoder sees a near-black image: shared behaviour
    that both sides have, reproduced here on purpose.

    Computed once per (prompt, the exact image tensors, the text encoder's buffer dtypes (its rotary frequencies),
    `context`: what else decides the bits, such as the attention kernels) on this model, and kept in memory and in
    the disk cache: the previews of every step of a run, and both recipes of a preview, share them.
    """
    device = loaded.device
    tensors = []
    for img in images:
        t = TF.to_tensor(img).unsqueeze(0).to(device, dtype=dtype)
        try:
            w, h = prompt_size(t.shape[3], t.shape[2], rule)
        except UnknownRule as exc:
            raise NotRenderable(str(exc)) from None
        tensors.append(F.interpolate(t, size=(h, w), mode="bilinear"))
    rope = sorted({str(b.dtype) for b in loaded.pipe.text_encoder.buffers() if b.is_floating_point()})
    name = "prompt-" + digest(prompt, [tensor_digest(t) for t in tensors], list(context), rope, loaded.pipeline,
                              loaded.identity(), loaded.precision.key if loaded.precision else None)
    if name in loaded.prompt_cache:
        return loaded.prompt_cache[name]
    stored = [loaded.disk_cache.get_tensor(f"{name}-{part}") for part in ("embeds", "mask")] \
        if loaded.disk_cache is not None else [None, None]
    if all(t is not None for t in stored):
        embeds, mask = stored[0].to(device), stored[1].to(device)
    else:
        embeds, mask = models.pipeline_rules(loaded.pipeline).encode_prompt(loaded.pipe, prompt, tensors, device)
        if mask is None:  # both sides replace Diffusers' None (all valid) with an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.int64, device=embeds.device)
        if loaded.disk_cache is not None:
            loaded.disk_cache.put_tensor(f"{name}-embeds", embeds)
            loaded.disk_cache.put_tensor(f"{name}-mask", mask)
    loaded.prompt_cache[name] = embeds, mask
    return embeds, mask


def tensor_digest(tensor: torch.Tensor) -> str:
    """The exact bits of a tensor (and its shape and dtype), for cache keys."""
    data = tensor.detach().to("cpu").contiguous()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest() + str(list(data.shape)) + \
        str(data.dtype)


@contextlib.contextmanager
def vae_tiling(vae, on: bool):
    if on:
        vae.enable_tiling()
    try:
        yield
    finally:
        if on:
            vae.disable_tiling()


@contextlib.contextmanager
def text_encoder_buffers(text_encoder, dtype_name: str):
    """Cast the text encoder's floating buffers (rotary inv_freq) to `dtype_name`, restore them afterwards."""
    saved = {}
    target = DTYPES[dtype_name]
    for module in text_encoder.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point() and buf.dtype != target:
                saved[(module, name)] = buf
                setattr(module, name, buf.to(target))
    try:
        yield
    finally:
        for (module, name), buf in saved.items():
            setattr(module, name, buf)


def control_latents(loaded: LoadedModel, path: str, image: Image.Image, size: tuple[int, int], tiling: bool,
                    generator, kernels: str, rule: str = VAE_RESIZE) -> torch.Tensor:
    """A control image's VAE latents (Lanczos to ~1024x1024, encoded with the mode, normalised), computed
    once per file, size, tiling and kernel choice (the VAE has an attention block): the two sides and every
    counterfactual share them. No RNG is used."""
    from .recipe import file_digest

    key = (file_digest(path), size, tiling, kernels, rule, image.size)
    if key not in loaded.latent_cache:
        w, h = size
        pixels = loaded.pipe.image_processor.preprocess(image, h, w).unsqueeze(2)
        pixels = pixels.to(device=loaded.device, dtype=loaded.dtype)
        loaded.latent_cache[key] = encode_vae(loaded, pixels, generator, tiling, kernels)
    return loaded.latent_cache[key]


def encode_vae(loaded: LoadedModel, pixels: torch.Tensor, generator, tiling: bool, kernels: str) -> torch.Tensor:
    """`pipe._encode_vae_image(pixels)`, remembered on disk by the exact pixels encoded: a ~1024x1024 encode is
    the costliest step of a small render, and later processes and runs need the same latents. The key holds the
    pixels' bytes, tiling and kernels, and the model, device, dtype, convolution mode and library versions, since
    all of them decide the bits."""
    encode = loaded.pipe._encode_vae_image
    if loaded.disk_cache is None:
        return encode(image=pixels, generator=generator)
    name = "vae-" + digest(tensor_digest(pixels), tiling, kernels, loaded.identity())
    cached = loaded.disk_cache.get_tensor(name)
    if cached is not None:
        return cached.to(device=loaded.device, dtype=loaded.dtype)
    latents = encode(image=pixels, generator=generator)
    loaded.disk_cache.put_tensor(name, latents)
    return latents


def make_scheduler(loaded: LoadedModel, config_json: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(json.loads(config_json))


def check_renderable(loaded: LoadedModel, recipe: Recipe) -> None:
    wanted = precision.parse(recipe.precision, recipe.ara_file)
    if (wanted.key if wanted else None) != (loaded.precision.key if loaded.precision else None):
        raise ValueError(f"recipe precision {recipe.precision} rendered on a pipeline quantized as "
                         f"{loaded.precision.describe() if loaded.precision else 'none'}")
    if recipe.control_vae_resize not in VAE_RULES:
        raise NotRenderable(f"unknown VAE resize {recipe.control_vae_resize!r}")
    if DTYPES[recipe.dtype] != loaded.dtype:
        raise ValueError(f"recipe dtype {recipe.dtype} rendered on a {loaded.dtype} pipeline")
    if models.by_name(recipe.model).pipeline != loaded.pipeline:
        raise ValueError(f"a {recipe.model} recipe rendered on a {loaded.pipeline}")


def render(loaded: LoadedModel, recipe: Recipe, capture: RenderCapture | None = None, *,
           math_attention: bool = False) -> Image.Image:
    """Render one recipe on `loaded` (which must hold the recipe's dtype).

    `math_attention` runs attention through PyTorch's reference (math) SDPA kernel instead of the fused one:
    the same recipe through other kernels, which is how the noise floor is measured.
    """
    with cpu_bf16_convolutions(loaded.conv_mode):
        if not math_attention:
            return _render(loaded, recipe, capture, kernels="default")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            return _render(loaded, recipe, capture, kernels="math-attention")


@torch.no_grad()
def _render(loaded: LoadedModel, recipe: Recipe, capture: RenderCapture | None, kernels: str) -> Image.Image:
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift, retrieve_timesteps

    check_renderable(loaded, recipe)
    pipe = loaded.pipe
    device = loaded.device
    dtype = loaded.dtype
    prompt_images = [open_control(p) for p in recipe.control_images_prompt]
    vae_pil = [to_request(open_control(p), recipe.control_vae_resize, recipe.width, recipe.height)
               for p in recipe.control_images_vae]

    with loaded.lora(recipe.lora, recipe.multiplier, recipe.lora_application), vae_tiling(pipe.vae, recipe.vae_tiling):
        with text_encoder_buffers(pipe.text_encoder, recipe.text_encoder_rope):
            embeds, mask = encode_prompt(loaded, recipe.prompt, prompt_images, recipe.control_prompt_resize, dtype,
                                         (kernels,))
            neg_embeds, neg_mask = encode_prompt(loaded, recipe.negative_prompt, prompt_images,
                                                 recipe.control_prompt_resize, dtype, (kernels,))
        if capture is not None:
            capture.prompt_embeds, capture.negative_prompt_embeds = embeds, neg_embeds
        # The pipeline drops an all-valid mask (encode_prompt: mask.all() -> None); do the same.
        mask = None if mask.all() else mask
        neg_mask = None if neg_mask.all() else neg_mask
        do_cfg = recipe.guidance > 1

        multiple = pipe.vae_scale_factor * 2
        width = recipe.width // multiple * multiple
        height = recipe.height // multiple * multiple
        vae_sizes = [vae_size(*img.size) for img in vae_pil]
        generator = torch.Generator(recipe.generator_device).manual_seed(recipe.seed)
        encoded = [control_latents(loaded, path, img, size, recipe.vae_tiling, generator, kernels,
                                   recipe.control_vae_resize)
                   for path, img, size in zip(recipe.control_images_vae, vae_pil, vae_sizes)]
        channels = pipe.transformer.config.in_channels // 4
        latents, image_latents = models.pipeline_rules(loaded.pipeline).prepare_latents(
            pipe, encoded, channels, height, width, embeds.dtype, device, generator)
        if recipe.noise != NOISE_DIFFUSERS:
            # an engine's noise is drawn in fp32; ComfyUI's loop keeps it so (the x0 form), Diffusers' casts it
            latents = engine_noise(pipe, recipe, channels, height, width).to(
                device=device, dtype=torch.float32 if recipe.cfg_form == CFG_X0 else latents.dtype)
        img_shapes = [[(1, height // pipe.vae_scale_factor // 2, width // pipe.vae_scale_factor // 2),
                       *[(1, h // pipe.vae_scale_factor // 2, w // pipe.vae_scale_factor // 2) for w, h in vae_sizes]]]

        def predict(model_input, timestep, cond: bool):
            """The transformer's velocity for the image tokens, conditional or not."""
            with pipe.transformer.cache_context("cond" if cond else "uncond"):
                out = pipe.transformer(hidden_states=model_input, timestep=timestep, guidance=None,
                                       encoder_hidden_states_mask=mask if cond else neg_mask,
                                       encoder_hidden_states=embeds if cond else neg_embeds, img_shapes=img_shapes,
                                       attention_kwargs={}, return_dict=False)[0]
            return out[:, : latents.size(1)]

        if recipe.cfg_form not in (CFG_V, CFG_X0):
            raise NotRenderable(f"unknown CFG form {recipe.cfg_form!r}")
        scheduler, timesteps, sigmas = None, None, None
        if recipe.sigma_schedule == SIGMAS_DIFFUSERS:
            scheduler = make_scheduler(loaded, recipe.scheduler)
            mu = calculate_shift(latents.shape[1], scheduler.config.get("base_image_seq_len", 256),
                                 scheduler.config.get("max_image_seq_len", 4096),
                                 scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15))
            timesteps, _ = retrieve_timesteps(scheduler, recipe.steps, device,
                                              sigmas=np.linspace(1.0, 1 / recipe.steps, recipe.steps), mu=mu)
            scheduler.set_begin_index(0)
        else:  # an engine's sigmas (N+1, ending at 0)
            sigmas = comfyui.sigmas(recipe.sigma_schedule, recipe.steps).to(device)

        if recipe.cfg_form == CFG_X0:
            if sigmas is None:
                sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32)
            latents = _sample_x0(recipe, latents, image_latents, predict, capture, sigmas, embeds.dtype)
            return _decode(pipe, recipe, latents, height, width, engine_form=True)

        if timesteps is None:  # the Diffusers scheduler's timesteps for an engine's sigmas
            timesteps = sigmas[:-1] * 1000
        if capture is not None:
            capture.timesteps = [float(t) for t in timesteps]
        for i, t in enumerate(timesteps):
            model_input = latents if image_latents is None else torch.cat([latents, image_latents], dim=1)
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            noise_pred = predict(model_input, timestep / 1000, True)
            if do_cfg:
                neg_pred = predict(model_input, timestep / 1000, False)
                combined = neg_pred + recipe.guidance * (noise_pred - neg_pred)
                if recipe.cfg_norm:
                    cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
                    noise_norm = torch.norm(combined, dim=-1, keepdim=True)
                    noise_pred = combined * (cond_norm / noise_norm)
                else:
                    noise_pred = combined
            if scheduler is not None:
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            else:  # FlowMatchEulerDiscreteScheduler.step's update on the given sigmas (0-dim fp32 dt)
                latents = (latents.float() + (sigmas[i + 1] - sigmas[i]) * noise_pred).to(noise_pred.dtype)
        return _decode(pipe, recipe, latents, height, width, engine_form=False)


def engine_noise(pipe, recipe: Recipe, channels: int, height: int, width: int) -> torch.Tensor:
    """An engine's own initial noise (recipe.noise), packed as the Diffusers transformer takes latents."""
    if recipe.noise != comfyui.NOISE:
        raise NotRenderable(f"unknown noise {recipe.noise!r}")
    noise = comfyui.initial_noise(recipe.seed, channels, height, width)  # [1, C, 1, H/8, W/8], fp32
    return pipe._pack_latents(noise, 1, channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)


def _sample_x0(recipe: Recipe, latents, image_latents, predict, capture, sigmas, model_dtype) -> torch.Tensor:
    """ComfyUI's KSampler (euler) with CFG on the denoised prediction: an fp32 state x, the model's velocity v at
    sigma (its timestep), denoised = x - v*sigma, CFG uncond + (cond - uncond)*cfg (skipped at cfg 1), then
    x + (x - denoised)/sigma * (next sigma - sigma). `cfg_norm` (a counterfactual here) rescales the combined
    velocity to the conditional one's norm, as Diffusers does."""
    if capture is not None:
        capture.timesteps = [float(s) * 1000 for s in sigmas[:-1]]
    do_cfg = not math.isclose(recipe.guidance, 1.0)
    x = latents.float()
    for i in range(recipe.steps):
        sigma = sigmas[i]
        model_input = x.to(model_dtype)  # ComfyUI casts the model's input to the model's dtype
        if image_latents is not None:
            model_input = torch.cat([model_input, image_latents], dim=1)
        timestep = sigma.expand(x.shape[0])  # ModelSamplingAuraFlow: timestep = sigma * multiplier 1, fp32
        v_cond = predict(model_input, timestep, True).float()
        denoised = x - v_cond * sigma
        if do_cfg:
            v_uncond = predict(model_input, timestep, False).float()
            if recipe.cfg_norm:
                combined = v_uncond + recipe.guidance * (v_cond - v_uncond)
                combined = combined * (torch.norm(v_cond, dim=-1, keepdim=True) /
                                       torch.norm(combined, dim=-1, keepdim=True))
                denoised = x - combined * sigma
            else:
                uncond = x - v_uncond * sigma
                denoised = uncond + (denoised - uncond) * recipe.guidance
        d = (x - denoised) / sigma
        x = x + d * (sigmas[i + 1] - sigma)
    return x


def _decode(pipe, recipe: Recipe, latents, height: int, width: int, engine_form: bool) -> Image.Image:
    """Un-normalise the latent, decode it, and make 8-bit pixels as the recipe's side does. `engine_form`: the
    latent is un-normalised in its own (fp32) dtype as latent*std + mean (ComfyUI's Wan21 process_out) before the
    cast to the VAE's dtype; else as the Diffusers pipeline does."""
    z = pipe.vae.config.z_dim
    latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    if engine_form:
        mean = torch.tensor(pipe.vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(pipe.vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        latents = (latents * std / 1.0 + mean).to(pipe.vae.dtype)
    else:
        latents = latents.to(pipe.vae.dtype)
        mean = torch.tensor(pipe.vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device,
                                                                                          latents.dtype)
        latents = latents / inv_std + mean
    image = pipe.vae.decode(latents, return_dict=False)[0][:, :, 0]
    if recipe.pixels == PIXELS_ROUND:
        return pipe.image_processor.postprocess(image, output_type="pil")[0]
    if recipe.pixels == comfyui.PIXELS:
        return Image.fromarray(comfyui.to_8bit(image))
    raise NotRenderable(f"unknown pixel conversion {recipe.pixels!r}")
