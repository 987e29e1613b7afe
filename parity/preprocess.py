"""Control-image preprocessing as named values (clean-fid style): which resize is data, not a code path."""

from __future__ import annotations

import math

from PIL import Image

CONDITION_AREA = 384 * 384  # diffusers CONDITION_IMAGE_SIZE
VAE_AREA = 1024 * 1024  # diffusers VAE_IMAGE_SIZE

PROMPT_RESIZE = "torch-bilinear-noaa/area384/r32"  # ai-toolkit 0.12.26 and Diffusers: aspect kept
PROMPT_RESIZE_TRANSPOSED = "torch-bilinear-noaa/area384/r32/transposed"  # inference server (pre-#707 formula)
VAE_RESIZE = "pil-lanczos/area1024/r32"  # Diffusers' VaeImageProcessor.preprocess, both sides
# Qwen-Image-Edit (one control image, ~1 megapixel for the prompt encoder too):
PROMPT_RESIZE_1024 = "torch-bilinear-noaa/area1024/r32"  # ai-toolkit QwenImageEditModel.get_prompt_embeds
PROMPT_RESIZE_1024_TRANSPOSED = "torch-bilinear-noaa/area1024/r32/transposed"  # the server's same formula
# The control image first resized to the requested size (ai-toolkit: bilinear, only when the sizes differ; the
# server: Lanczos, always), then the stock pipeline's Lanczos to ~1 megapixel at that aspect.
VAE_RESIZE_REQUEST_BILINEAR = "pil-bilinear-to-request/" + VAE_RESIZE
VAE_RESIZE_REQUEST_LANCZOS = "pil-lanczos-to-request/" + VAE_RESIZE
TRANSPOSED = {PROMPT_RESIZE_TRANSPOSED: PROMPT_RESIZE, PROMPT_RESIZE_1024_TRANSPOSED: PROMPT_RESIZE_1024}

# ComfyUI's edit-encode nodes (nodes_qwen.py), with the vision image normalised once (process_qwen2vl_images):
# the area a rule resizes to, and the multiple each side is rounded to.
PROMPT_RESIZE_COMFY = "torch-area/area384/r1, bilinear/r28, CLIP-normalised once (ComfyUI EditPlus)"
PROMPT_RESIZE_COMFY_1024 = "torch-area/area1024/r1, bilinear/r28, CLIP-normalised once (ComfyUI Edit)"
VAE_RESIZE_COMFY = "torch-area/area1024/r8 (ComfyUI EditPlus)"
VAE_RESIZE_COMFY_1024 = "torch-area/area1024/r1, cropped to 8 (ComfyUI Edit)"
COMFY_AREAS = {PROMPT_RESIZE_COMFY: (384 * 384, 1), PROMPT_RESIZE_COMFY_1024: (1024 * 1024, 1),
               VAE_RESIZE_COMFY: (1024 * 1024, 8), VAE_RESIZE_COMFY_1024: (1024 * 1024, 1)}
VAE_RULES = (VAE_RESIZE, VAE_RESIZE_REQUEST_BILINEAR, VAE_RESIZE_REQUEST_LANCZOS, VAE_RESIZE_COMFY,
             VAE_RESIZE_COMFY_1024)


class UnknownRule(ValueError):
    pass


def comfy_area_size(width: int, height: int, rule: str) -> tuple[int, int]:
    """The size a ComfyUI encode-node rule area-resizes an image to: its area, aspect kept, sides rounded."""
    total, multiple = COMFY_AREAS[rule]
    scale = math.sqrt(total / (width * height))
    if multiple == 1:
        return round(width * scale), round(height * scale)
    return round(width * scale / multiple) * multiple, round(height * scale / multiple) * multiple


def prompt_size(width: int, height: int, rule: str) -> tuple[int, int]:
    """(width, height) the prompt encoder sees a control image at, for a named resize rule."""
    if rule in (PROMPT_RESIZE_COMFY, PROMPT_RESIZE_COMFY_1024):
        w, h = comfy_area_size(width, height, rule)
        return round(w / 28) * 28, round(h / 28) * 28  # process_qwen2vl_images
    ratio = height / width
    area = VAE_AREA if rule in (PROMPT_RESIZE_1024, PROMPT_RESIZE_1024_TRANSPOSED) else CONDITION_AREA
    if rule in (PROMPT_RESIZE, PROMPT_RESIZE_1024):
        # ai-toolkit get_prompt_embeds: height from the area and H/W, width = height/ratio.
        h = math.sqrt(area * ratio)
        w = h / ratio
    elif rule in (PROMPT_RESIZE_TRANSPOSED, PROMPT_RESIZE_1024_TRANSPOSED):
        # ai-toolkit-inference _preprocess_ctrl_for_encode: the same H/W ratio fed to the width formula
        # (ai-toolkit's pre-#707 code), so a landscape control image reaches the encoder as portrait.
        w = math.sqrt(area * ratio)
        h = w / ratio
    else:
        raise UnknownRule(f"unknown prompt-encoder resize {rule!r}")
    return round(w / 32) * 32, round(h / 32) * 32


def vae_size(width: int, height: int, rule: str = VAE_RESIZE) -> tuple[int, int]:
    """Diffusers calculate_dimensions(1024*1024, W/H), rounded to 32; a ComfyUI rule's area size, cropped to
    multiples of 8 as its VAE.encode does."""
    if rule in (VAE_RESIZE_COMFY, VAE_RESIZE_COMFY_1024):
        w, h = comfy_area_size(width, height, rule)
        return w // 8 * 8, h // 8 * 8
    ratio = width / height
    w = math.sqrt(VAE_AREA * ratio)
    h = w / ratio
    return round(w / 32) * 32, round(h / 32) * 32


def image_size(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def effective_prompt_resize(rule: str, paths: tuple[str, ...]) -> str:
    """The rule that actually applies: the transposed formula is the plain one for these images' shapes."""
    plain = TRANSPOSED.get(rule)
    if plain and all(prompt_size(*image_size(p), rule) == prompt_size(*image_size(p), plain) for p in paths):
        return plain
    return rule


def effective_vae_resize(rule: str, paths: tuple[str, ...], width: int, height: int) -> str:
    """The rule that actually applies: a resize to the request is none for images already at that size."""
    if rule in (VAE_RESIZE_REQUEST_BILINEAR, VAE_RESIZE_REQUEST_LANCZOS) and all(
            image_size(p) == (width, height) for p in paths):
        return VAE_RESIZE
    return rule


def to_request(image: Image.Image, rule: str, width: int, height: int) -> Image.Image:
    """The pre-resize a VAE rule starts with, if any (Qwen-Image-Edit): to the requested size."""
    if rule == VAE_RESIZE_REQUEST_BILINEAR and image.size != (width, height):
        return image.resize((width, height), Image.BILINEAR)
    if rule == VAE_RESIZE_REQUEST_LANCZOS:
        return image.resize((width, height), Image.LANCZOS)
    return image

