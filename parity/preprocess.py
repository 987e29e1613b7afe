"""Control-image preprocessing as named values (clean-fid style): which resize is data, not a code path."""

from __future__ import annotations

import math

from PIL import Image

CONDITION_AREA = 384 * 384  # diffusers CONDITION_IMAGE_SIZE
VAE_AREA = 1024 * 1024  # diffusers VAE_IMAGE_SIZE

PROMPT_RESIZE = "torch-bilinear-noaa/area384/r32"  # ai-toolkit 0.12.26 and Diffusers: aspect kept
PROMPT_RESIZE_TRANSPOSED = "torch-bilinear-noaa/area384/r32/transposed"  # inference server (pre-#707 formula)
VAE_RESIZE = "pil-lanczos/area1024/r32"  # Diffusers' VaeImageProcessor.preprocess, both sides


class UnknownRule(ValueError):
    pass


def prompt_size(width: int, height: int, rule: str) -> tuple[int, int]:
    """(width, height) the prompt encoder sees a control image at, for a named resize rule."""
    ratio = height / width
    if rule == PROMPT_RESIZE:
        # ai-toolkit QwenImageEditPlusModel.get_prompt_embeds: height from the area and H/W, width = height/ratio.
        h = math.sqrt(CONDITION_AREA * ratio)
        w = h / ratio
    elif rule == PROMPT_RESIZE_TRANSPOSED:
        # ai-toolkit-inference _preprocess_ctrl_for_encode: the same H/W ratio fed to the width formula
        # (ai-toolkit's pre-#707 code), so a landscape control image reaches the encoder as portrait.
        w = math.sqrt(CONDITION_AREA * ratio)
        h = w / ratio
    else:
        raise UnknownRule(f"unknown prompt-encoder resize {rule!r}")
    return round(w / 32) * 32, round(h / 32) * 32


def vae_size(width: int, height: int) -> tuple[int, int]:
    """Diffusers calculate_dimensions(1024*1024, W/H), rounded to 32."""
    ratio = width / height
    w = math.sqrt(VAE_AREA * ratio)
    h = w / ratio
    return round(w / 32) * 32, round(h / 32) * 32


def image_size(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def effective_prompt_resize(rule: str, paths: tuple[str, ...]) -> str:
    """The rule that actually applies: the transposed formula is the plain one for these images' shapes."""
    if rule == PROMPT_RESIZE_TRANSPOSED and all(
            prompt_size(*image_size(p), PROMPT_RESIZE_TRANSPOSED) == prompt_size(*image_size(p), PROMPT_RESIZE)
            for p in paths):
        return PROMPT_RESIZE
    return rule
