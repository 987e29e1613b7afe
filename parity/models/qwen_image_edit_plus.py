"""Qwen-Image-Edit-2509 and -2511: ai-toolkit's `qwen_image_edit_plus` (QwenImageEditPlusModel), the server's
`qwen_image_edit_plus` and `qwen_image_edit_plus_2511` (notes: shared/research/qwen-family.md).

The two checkpoints share every line of ai-toolkit's code (its own copy of the stock pipeline, with the CFG norm
rescale off unless `sample.do_cfg_norm`) and of the server's (stock QwenImageEditPlusPipeline: always rescales);
2511's `zero_cond_t` lives in its transformer config. They differ on the server only in how the LoRA goes on:
2509 as a PEFT adapter (set_adapters), 2511 fused into the bf16 weights (fuse_lora).
"""

from __future__ import annotations

from ..aitk_config import SampleItem, TrainingJob
from ..forms import CROP_KONTEXT, LORA_FUSED, LORA_PEFT
from ..preprocess import (PROMPT_RESIZE, PROMPT_RESIZE_COMFY, PROMPT_RESIZE_TRANSPOSED, VAE_RESIZE,
                          VAE_RESIZE_COMFY)
from .model import ComfyTemplate, Model

COMMON = dict(arch="qwen_image_edit_plus", pipeline="QwenImageEditPlusPipeline", reference_divisor=32,
              training_divisor=32)
MODELS = (
    Model(id="qwen_image_edit_plus", variant="2509", hub_id="Qwen/Qwen-Image-Edit-2509", reference_lora=LORA_PEFT,
          **COMMON),
    Model(id="qwen_image_edit_plus_2511", variant="2511", hub_id="Qwen/Qwen-Image-Edit-2511",
          reference_lora=LORA_FUSED, **COMMON),
)


def training_cfg_norm(job: TrainingJob) -> bool:
    """QwenImageEditPlusCustomPipeline rescales only with `sample.do_cfg_norm: true` (default off)."""
    return bool(job.sample.get("do_cfg_norm", False))


REFERENCE_CFG_NORM = True  # stock QwenImageEditPlusPipeline always rescales the CFG result to the cond norm
TRAINING_PROMPT_RESIZE = PROMPT_RESIZE  # ~384x384, aspect kept (PR #707)
REFERENCE_PROMPT_RESIZE = PROMPT_RESIZE_TRANSPOSED  # the server's formula turns non-square images
TRAINING_VAE_RESIZE = REFERENCE_VAE_RESIZE = VAE_RESIZE  # each control image at ~1 megapixel, its own aspect


def training_control_images(item: SampleItem) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(prompt path, VAE path) as ai-toolkit 0.12.26 builds them.

    Prompt path (BaseModel.generate_images): ctrl_img, then ctrl_img_1..3, each if set; since ctrl_img_1
    defaults to ctrl_img for a `samples:` item, such an item puts its image in the prompt twice.
    VAE path (QwenImageEditPlusModel.generate_single_image): ctrl_img wins over ctrl_img_1, then ctrl_img_2..3.
    """
    prompt = tuple(p for p in (item.ctrl_img, item.ctrl_img_1, item.ctrl_img_2, item.ctrl_img_3) if p)
    first = item.ctrl_img or item.ctrl_img_1
    vae = tuple(p for p in (first, item.ctrl_img_2, item.ctrl_img_3) if p)
    return prompt, vae


def reference_control_images(item: SampleItem) -> tuple[str, ...]:
    """ai-toolkit-inference PromptItem.get_control_images: ctrl_img_1..3 in order, ctrl_img only as fallback."""
    numbered = tuple(p for p in (item.ctrl_img_1, item.ctrl_img_2, item.ctrl_img_3) if p)
    return numbered or ((item.ctrl_img,) if item.ctrl_img else ())


def encode_prompt(pipe, prompt: str, tensors: list, device):
    """QwenImageEditPlusPipeline.encode_prompt with every control image's tensor (or none)."""
    return pipe.encode_prompt(prompt, image=tensors or None, device=device, num_images_per_prompt=1)


def prepare_latents(pipe, encoded: list, channels: int, height: int, width: int, dtype, device, generator):
    """Noise and the control images' packed latents; already-encoded latents pass through untouched."""
    return pipe.prepare_latents(encoded or None, 1, channels, height, width, dtype, device, generator, None)


def prompt_text(pipe, prompt: str, images: int) -> tuple[str, int]:
    """The text the encoder reads (the template, "Picture N: ..." per image, the prompt) and how many leading
    tokens are cut: the pipeline's own template and cut, which ComfyUI's TextEncodeQwenImageEditPlus shares."""
    pictures = "".join(f"Picture {i + 1}: <|vision_start|><|image_pad|><|vision_end|>" for i in range(images))
    return pipe.prompt_template_encode.format(pictures + prompt), pipe.prompt_template_encode_start_idx


# ComfyUI's official templates (Comfy-Org/workflow_templates); parity/engines/comfyui builds its recipe from these.
COMFYUI = {
    "qwen_image_edit_plus": ComfyTemplate(
        template="templates/image_qwen_image_edit_2509.json@13c76ca6", shift=3.0, cfg_norm=True,
        encode="TextEncodeQwenImageEditPlus", image_scale=CROP_KONTEXT, prompt_resize=PROMPT_RESIZE_COMFY,
        vae_resize=VAE_RESIZE_COMFY, reference="index"),
    # index_timestep_zero (FluxKontextMultiReferenceLatentMethod in the template): the references at timestep 0,
    # which the 2511 checkpoint's own `zero_cond_t` does in Diffusers
    "qwen_image_edit_plus_2511": ComfyTemplate(
        template="templates/image_qwen_image_edit_2511.json@293fb904", shift=3.1, cfg_norm=True,
        encode="TextEncodeQwenImageEditPlus", image_scale=CROP_KONTEXT, prompt_resize=PROMPT_RESIZE_COMFY,
        vae_resize=VAE_RESIZE_COMFY, reference="index_timestep_zero"),
}


def request_control_images(paths: tuple[str, ...]) -> dict[str, str]:
    """The control images of a server request, by key: ctrl_img_1..3 in ai-toolkit's VAE order (the server's
    PromptItem.get_control_images reads ctrl_img_1..3 in order)."""
    return {f"ctrl_img_{i}": path for i, path in enumerate(paths, start=1)}
