"""Qwen-Image-Edit (one control image): ai-toolkit's `qwen_image_edit` (QwenImageEditModel), the server's
`qwen_image_edit` (notes: shared/research/qwen-family.md).

Both sides render with stock Diffusers' QwenImageEditPipeline, which always rescales the CFG result. The prompt
encoder sees the control image at ~1 megapixel (ai-toolkit keeps its aspect; the server's formula turns a
non-square one). For the VAE the control image is first resized to the requested size (ai-toolkit: bilinear, and
only when the sizes differ; the server: Lanczos), then by the pipeline to ~1 megapixel at that aspect.
Which image: ai-toolkit's prompt path takes the first of ctrl_img, ctrl_img_1..3, its VAE path reads `ctrl_img`
only; the server takes ctrl_img_1 first, `ctrl_img` as fallback, and refuses two or more.
"""

from __future__ import annotations

from ..aitk_config import SampleItem, TrainingJob
from ..errors import CaseError
from ..forms import CROP_TOTAL_PIXELS, LORA_PEFT
from ..preprocess import (PROMPT_RESIZE_1024, PROMPT_RESIZE_1024_TRANSPOSED, PROMPT_RESIZE_COMFY_1024,
                          VAE_RESIZE_COMFY_1024, VAE_RESIZE_REQUEST_BILINEAR, VAE_RESIZE_REQUEST_LANCZOS)
from .model import ComfyTemplate, Model

MODELS = (
    Model(id="qwen_image_edit", arch="qwen_image_edit", variant=None, hub_id="Qwen/Qwen-Image-Edit",
          pipeline="QwenImageEditPipeline", reference_divisor=32, training_divisor=32, reference_lora=LORA_PEFT),
)


def training_cfg_norm(job: TrainingJob) -> bool:
    return True  # stock QwenImageEditPipeline rescales unconditionally


REFERENCE_CFG_NORM = True
TRAINING_PROMPT_RESIZE = PROMPT_RESIZE_1024
REFERENCE_PROMPT_RESIZE = PROMPT_RESIZE_1024_TRANSPOSED
TRAINING_VAE_RESIZE = VAE_RESIZE_REQUEST_BILINEAR
REFERENCE_VAE_RESIZE = VAE_RESIZE_REQUEST_LANCZOS


def training_control_images(item: SampleItem) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(prompt path, VAE path). A sample with `ctrl_img_1` but no `ctrl_img` makes ai-toolkit 0.12.26 crash
    (its VAE path reads only ctrl_img), so no preview of it can exist."""
    first = next((p for p in (item.ctrl_img, item.ctrl_img_1, item.ctrl_img_2, item.ctrl_img_3) if p), None)
    if first and not item.ctrl_img:
        raise CaseError(None, f"sample item {item.index} names ctrl_img_1 but no ctrl_img: ai-toolkit's "
                              f"qwen_image_edit cannot render it (its VAE path reads ctrl_img only, so the stock "
                              f"pipeline gets no image and raises AttributeError, which stops the training run); "
                              f"no preview of this item comes from this config",
                        "use `ctrl_img:` for Qwen-Image-Edit samples, or the config of the run that wrote it")
    return ((first,) if first else ()), ((item.ctrl_img,) if item.ctrl_img else ())


def reference_control_images(item: SampleItem) -> tuple[str, ...]:
    numbered = tuple(p for p in (item.ctrl_img_1, item.ctrl_img_2, item.ctrl_img_3) if p)
    if len(numbered) > 1:
        raise CaseError(None, f"sample item {item.index} has {len(numbered)} control images: the server's "
                              f"qwen_image_edit takes one (two or more: ValueError)",
                        "give Qwen-Image-Edit samples one control image")
    return numbered or ((item.ctrl_img,) if item.ctrl_img else ())


def encode_prompt(pipe, prompt: str, tensors: list, device):
    """QwenImageEditPipeline.encode_prompt with the one control image, as the tensor both sides pass."""
    return pipe.encode_prompt(prompt, image=tensors[0] if tensors else None, device=device, num_images_per_prompt=1)


def prepare_latents(pipe, encoded: list, channels: int, height: int, width: int, dtype, device, generator):
    """Noise and the one control image's packed latents (already encoded: passed through)."""
    return pipe.prepare_latents(encoded[0] if encoded else None, 1, channels, height, width, dtype, device,
                                generator, None)


def prompt_text(pipe, prompt: str, images: int) -> tuple[str, int]:
    """The pipeline's template (one image's vision tokens before the prompt) and its cut; ComfyUI's
    TextEncodeQwenImageEdit uses the same text (QwenImageTokenizer.llama_template_images)."""
    return pipe.prompt_template_encode.format(prompt), pipe.prompt_template_encode_start_idx


# ComfyUI's official template (Comfy-Org/workflow_templates; it ships with the Lightning LoRA on at 4 steps and
# cfg 1: the recipe keeps the preview's steps and cfg and leaves the extra LoRA out, as for the other models).
COMFYUI = {
    "qwen_image_edit": ComfyTemplate(
        template="templates/image_qwen_image_edit.json@b64c9448", shift=3.0, cfg_norm=True,
        encode="TextEncodeQwenImageEdit", image_scale=CROP_TOTAL_PIXELS, prompt_resize=PROMPT_RESIZE_COMFY_1024,
        vae_resize=VAE_RESIZE_COMFY_1024, reference="index"),
}


def request_control_images(paths: tuple[str, ...]) -> dict[str, str]:
    """The control image of a server request, by key: ctrl_img_1 (ai-toolkit's VAE path has at most one; the
    server's qwen_image_edit reads ctrl_img_1 first and refuses two or more)."""
    return {f"ctrl_img_{i}": path for i, path in enumerate(paths, start=1)}
