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
from .preprocess import COMFY_AREAS, VAE_RESIZE, VAE_RULES, UnknownRule, prompt_size, to_request, vae_size
from .engines import comfyui
from .engines.comfyui import conditioning
from .engines.comfyui.sampling import sample_x0
from .forms import (CFG_V, CFG_X0, CROP_KONTEXT, CROP_NONE, CROP_TOTAL_PIXELS, LORA_MERGED_FP8, LORA_MERGED_FP32,
                    NOISE_DIFFUSERS, PIXELS_ROUND, REFERENCES_COMFY, REFERENCES_DIFFUSERS, SIGMAS_DIFFUSERS, VISION_COMFY,
                    VISION_DIFFUSERS)
from .recipe import Recipe


@dataclass
class RenderCapture:
    """Intermediate values of a render, for tests and diagnosis."""

    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    timesteps: list[float] | None = None


def open_control(path: str, comfy: bool = False):
    """A control image as a side reads it: a PIL RGB image, or with `comfy` ComfyUI's LoadImage tensor; a CaseError
    naming the file when it cannot be read."""
    try:
        if comfy:
            return conditioning.load_image(path)
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
    tensors = [_prompt_tensor(img, rule, loaded, dtype) for img in images]

    def compute():
        embeds, mask = models.pipeline_rules(loaded.pipeline).encode_prompt(loaded.pipe, prompt, tensors,
                                                                             loaded.device)
        if mask is None:  # both sides replace Diffusers' None (all valid) with an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.int64, device=embeds.device)
        return embeds, mask

    return cached_prompt(loaded, prompt, tensors, context, compute)


def cached_prompt(loaded: LoadedModel, prompt: str, tensors: list, context: tuple, compute):
    """`compute()`'s (embeds, mask) for this prompt, these exact image tensors and `context` on this model, kept
    in memory and in the disk cache (the text encoder's buffer dtypes and its quantization count too)."""
    rope = sorted({str(b.dtype) for b in loaded.pipe.text_encoder.buffers() if b.is_floating_point()})
    name = "prompt-" + digest(prompt, [tensor_digest(t) for t in tensors], list(context), rope, loaded.pipeline,
                              loaded.identity(), loaded.precision.key if loaded.precision else None)
    if name in loaded.prompt_cache:
        return loaded.prompt_cache[name]
    stored = [loaded.disk_cache.get_tensor(f"{name}-{part}") for part in ("embeds", "mask")] \
        if loaded.disk_cache is not None else [None, None]
    if all(t is not None for t in stored):
        embeds, mask = stored[0].to(loaded.device), stored[1].to(loaded.device)
    else:
        embeds, mask = compute()
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
    check_renderable(loaded, recipe)
    pipe = loaded.pipe
    sources = control_sources(recipe)
    with loaded.lora(*lora_to_apply(loaded, recipe)), \
            vae_tiling(pipe.vae, recipe.vae_tiling), reference_positions(pipe.transformer, recipe.reference_method):
        with text_encoder_buffers(pipe.text_encoder, recipe.text_encoder_rope):
            embeds, mask = prompt_embeds(loaded, recipe, recipe.prompt, sources, kernels)
            neg_embeds, neg_mask = prompt_embeds(loaded, recipe, recipe.negative_prompt, sources, kernels)
        if capture is not None:
            capture.prompt_embeds, capture.negative_prompt_embeds = embeds, neg_embeds
        multiple = pipe.vae_scale_factor * 2
        width, height = recipe.width // multiple * multiple, recipe.height // multiple * multiple
        generator = torch.Generator(recipe.generator_device).manual_seed(recipe.seed)
        encoded, vae_sizes = reference_latents(loaded, recipe, sources, generator, kernels)
        channels = pipe.transformer.config.in_channels // 4
        latents, image_latents = models.pipeline_rules(loaded.pipeline).prepare_latents(
            pipe, encoded, channels, height, width, embeds.dtype, device=loaded.device, generator=generator)
        if recipe.noise != NOISE_DIFFUSERS:
            # an engine's noise is drawn in fp32; ComfyUI's loop keeps it so (the x0 form), Diffusers' casts it
            latents = engine_noise(pipe, recipe, channels, height, width).to(
                device=loaded.device, dtype=torch.float32 if recipe.cfg_form == CFG_X0 else latents.dtype)
        scale = pipe.vae_scale_factor * 2
        img_shapes = [[(1, height // scale, width // scale), *[(1, h // scale, w // scale) for w, h in vae_sizes]]]
        # The pipeline drops an all-valid mask (encode_prompt: mask.all() -> None); do the same.
        predict = predictor(pipe, (embeds, None if mask.all() else mask), (neg_embeds, None if neg_mask.all()
                                                                           else neg_mask), img_shapes, latents.size(1))
        latents = sample(loaded, recipe, latents, image_latents, predict, capture, channels)
        return _decode(pipe, recipe, latents, height, width, engine_form=recipe.cfg_form == CFG_X0)


def lora_to_apply(loaded: LoadedModel, recipe: Recipe) -> tuple[str | None, float, str]:
    """(file, multiplier, how) of the render's LoRA: the recipe's, or with `extra_loras` one stacked file of all of
    them (lora_stack.py), applied the recipe's way (merged, as ComfyUI merges)."""
    if not recipe.extra_loras:
        return recipe.lora, recipe.multiplier, recipe.lora_application
    import tempfile
    from pathlib import Path

    from .lora_stack import stacked_file

    loras = ([(recipe.lora, recipe.multiplier)] if recipe.lora else []) + list(recipe.extra_loras)
    folder = loaded.disk_cache.folder if loaded.disk_cache is not None else Path(tempfile.gettempdir()) / "parity"
    params = [name for name, _ in loaded.pipe.transformer.named_parameters()]
    fp8 = "transformer:fp8_e4m3fn" in recipe.precision  # ComfyUI merges into fp8 weights, rounding stochastically
    how = recipe.lora_application if recipe.lora else LORA_MERGED_FP8 if fp8 else LORA_MERGED_FP32
    return stacked_file(loras, params, Path(folder) / "lora-stacks"), 1.0, how


def control_sources(recipe: Recipe) -> dict:
    """The control images as the recipe's side loads them: PIL images for the Diffusers rules, LoadImage tensors
    [1, H, W, 3] for ComfyUI's; the recipe's scaling node (`control_crop`) applied to the first image."""
    crop = recipe.control_crop
    if crop not in (CROP_NONE, CROP_KONTEXT, CROP_TOTAL_PIXELS):
        raise NotRenderable(f"unknown control crop {recipe.control_crop!r}")
    out = {}
    for path in dict.fromkeys(recipe.control_images_prompt + recipe.control_images_vae):
        out[path] = open_control(path, comfy=crop != CROP_NONE)
    first = (recipe.control_images_vae or recipe.control_images_prompt or (None,))[0]
    if first is not None and crop != CROP_NONE:
        scale = conditioning.kontext_scale if crop == CROP_KONTEXT else conditioning.total_pixels_scale
        out[first] = scale(out[first])
    return out


def as_pil(source) -> Image.Image:
    """A control source as the Diffusers rules take it (a LoadImage tensor holds k/255: it converts exactly)."""
    if isinstance(source, Image.Image):
        return source
    return Image.fromarray(np.round(source[0].numpy() * 255.0).clip(0, 255).astype(np.uint8))


def as_tensor(source) -> torch.Tensor:
    """A control source as ComfyUI's nodes take it: [1, H, W, 3] floats k/255."""
    if isinstance(source, Image.Image):
        return torch.from_numpy(np.array(source).astype(np.float32) / 255.0)[None]
    return source


def prompt_embeds(loaded: LoadedModel, recipe: Recipe, prompt: str, sources: dict, kernels: str):
    """The prompt's embeddings and mask as the recipe's side computes them: Diffusers' encode_prompt, or ComfyUI's
    encode (its vision image, token order and positions) when the recipe names any of those."""
    images = [sources[p] for p in recipe.control_images_prompt]
    rule = recipe.control_prompt_resize
    comfy_pixels = rule in COMFY_AREAS
    if recipe.vision_tokens not in (VISION_DIFFUSERS, VISION_COMFY):
        raise NotRenderable(f"unknown vision tokens {recipe.vision_tokens!r}")
    if not comfy_pixels and recipe.vision_tokens == VISION_DIFFUSERS:
        return encode_prompt(loaded, prompt, [as_pil(i) for i in images], rule, loaded.dtype, (kernels,))
    if comfy_pixels:
        pixels = [conditioning.vision_pixels(conditioning.area_resize(as_tensor(i), rule)) for i in images]
    else:
        pixels = [_prompt_tensor(as_pil(i), rule, loaded) for i in images]
    comfy_tokens = recipe.vision_tokens == VISION_COMFY

    def compute():
        text, drop = models.pipeline_rules(loaded.pipeline).prompt_text(loaded.pipe, prompt, len(pixels))
        return conditioning.encode(loaded.pipe, text, drop, [p.to(loaded.device, loaded.dtype) for p in pixels],
                                   loaded.device, prepared=comfy_pixels, comfy_tokens=comfy_tokens)

    return cached_prompt(loaded, prompt, pixels, (kernels, rule, recipe.vision_tokens), compute)


def _prompt_tensor(image: Image.Image, rule: str, loaded: LoadedModel, dtype=None) -> torch.Tensor:
    """A Diffusers rule's prompt-encoder tensor (0-1, bilinear without antialiasing to the rule's size)."""
    t = TF.to_tensor(image).unsqueeze(0).to(loaded.device, dtype=dtype or loaded.dtype)
    try:
        w, h = prompt_size(t.shape[3], t.shape[2], rule)
    except UnknownRule as exc:
        raise NotRenderable(str(exc)) from None
    return F.interpolate(t, size=(h, w), mode="bilinear")


def reference_latents(loaded: LoadedModel, recipe: Recipe, sources: dict, generator, kernels: str):
    """The control images' VAE latents and their (width, height) in pixels, as the recipe's rule makes them."""
    rule = recipe.control_vae_resize
    encoded, sizes = [], []
    for path in recipe.control_images_vae:
        if rule in COMFY_AREAS:
            pixels = conditioning.vae_pixels(as_tensor(sources[path]), rule).to(loaded.device, loaded.dtype)
            latents = conditioning.pad_to_patches(encode_vae(loaded, pixels, generator, recipe.vae_tiling, kernels))
            sizes.append((latents.shape[-1] * loaded.pipe.vae_scale_factor,
                          latents.shape[-2] * loaded.pipe.vae_scale_factor))
            encoded.append(latents)
            continue
        image = to_request(as_pil(sources[path]), rule, recipe.width, recipe.height)
        size = vae_size(*image.size)
        sizes.append(size)
        encoded.append(control_latents(loaded, path, image, size, recipe.vae_tiling, generator, kernels, rule))
    return encoded, sizes


@contextlib.contextmanager
def reference_positions(transformer, method: str):
    if method == REFERENCES_DIFFUSERS:
        yield
    elif method == REFERENCES_COMFY:
        with conditioning.comfy_positions(transformer):
            yield
    else:
        raise NotRenderable(f"unknown reference method {method!r}")


def predictor(pipe, cond: tuple, uncond: tuple, img_shapes: list, tokens: int):
    """The transformer's velocity for the image tokens, conditional or not: predict(input, timestep, cond)."""
    def predict(model_input, timestep, conditional: bool):
        embeds, mask = cond if conditional else uncond
        with pipe.transformer.cache_context("cond" if conditional else "uncond"):
            out = pipe.transformer(hidden_states=model_input, timestep=timestep, guidance=None,
                                   encoder_hidden_states_mask=mask, encoder_hidden_states=embeds,
                                   img_shapes=img_shapes, attention_kwargs={}, return_dict=False)[0]
        return out[:, :tokens]

    return predict


def sample(loaded: LoadedModel, recipe: Recipe, latents, image_latents, predict, capture, channels: int):
    """The denoising loop the recipe names: Diffusers' (CFG on the velocity) or ComfyUI's (on x0)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift, retrieve_timesteps

    if recipe.cfg_form not in (CFG_V, CFG_X0):
        raise NotRenderable(f"unknown CFG form {recipe.cfg_form!r}")
    device = loaded.device
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
        if capture is not None:
            capture.timesteps = [float(s) * 1000 for s in sigmas[:-1]]
        return sample_x0(latents, image_latents, predict, sigmas, recipe.steps, recipe.guidance, recipe.cfg_norm,
                         channels, loaded.pipe.transformer.dtype)
    if timesteps is None:  # the Diffusers scheduler's timesteps for an engine's sigmas
        timesteps = sigmas[:-1] * 1000
    if capture is not None:
        capture.timesteps = [float(t) for t in timesteps]
    return _sample_v(recipe, latents, image_latents, predict, scheduler, timesteps, sigmas)


def _sample_v(recipe: Recipe, latents, image_latents, predict, scheduler, timesteps, sigmas):
    """The Diffusers pipeline's loop: CFG on the velocity, `cfg_norm` rescaling it to the conditional norm."""
    for i, t in enumerate(timesteps):
        model_input = latents if image_latents is None else torch.cat([latents, image_latents], dim=1)
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        noise_pred = predict(model_input, timestep / 1000, True)
        if recipe.guidance > 1:
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
    return latents


def engine_noise(pipe, recipe: Recipe, channels: int, height: int, width: int) -> torch.Tensor:
    """An engine's own initial noise (recipe.noise), packed as the Diffusers transformer takes latents."""
    if recipe.noise != comfyui.NOISE:
        raise NotRenderable(f"unknown noise {recipe.noise!r}")
    noise = comfyui.initial_noise(recipe.seed, channels, height, width)  # [1, C, 1, H/8, W/8], fp32
    return pipe._pack_latents(noise, 1, channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)


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
