"""Qwen-Image and Qwen-Image-2512 (text to image): ai-toolkit's `qwen_image` (QwenImageModel), the server's
`qwen_image` and `qwen_image_2512` (notes: shared/research/qwen-family.md).

Both sides render with stock Diffusers' QwenImagePipeline, which always rescales the CFG result to the
conditional prediction's norm (`sample.do_cfg_norm` has no effect here), encodes the prompt from text alone and
truncates its embeddings to 512 tokens. They differ in the size divisor (ai-toolkit floors to 32, the server to
16) and, for 2512, in the server fusing the LoRA into the bf16 weights. Control images: ai-toolkit raises on a
sample that names one (so such a preview cannot exist), the server ignores them.
"""

from __future__ import annotations

from ..aitk_config import SampleItem, TrainingJob
from ..forms import CROP_NONE, LORA_FUSED, LORA_PEFT
from ..preprocess import PROMPT_RESIZE, VAE_RESIZE
from .model import ComfyTemplate, Model

COMMON = dict(arch="qwen_image", pipeline="QwenImagePipeline", reference_divisor=16, training_divisor=32)
MODELS = (
    Model(id="qwen_image", variant=None, hub_id="Qwen/Qwen-Image", reference_lora=LORA_PEFT, **COMMON),
    Model(id="qwen_image_2512", variant="2512", hub_id="Qwen/Qwen-Image-2512", reference_lora=LORA_FUSED, **COMMON),
)


def training_cfg_norm(job: TrainingJob) -> bool:
    return True  # stock QwenImagePipeline rescales unconditionally


REFERENCE_CFG_NORM = True
# no control images: the resize fields keep the edit models' values, so they never differ
TRAINING_PROMPT_RESIZE = REFERENCE_PROMPT_RESIZE = PROMPT_RESIZE
TRAINING_VAE_RESIZE = REFERENCE_VAE_RESIZE = VAE_RESIZE


def training_control_images(item: SampleItem) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (), ()  # QwenImageModel.generate_single_image raises NotImplementedError for any ctrl_img


def reference_control_images(item: SampleItem) -> tuple[str, ...]:
    return ()  # the server warns and ignores them for the text-to-image ids


def encode_prompt(pipe, prompt: str, tensors: list, device):
    """QwenImagePipeline.encode_prompt: text only; its __call__ keeps the first 512 tokens (both sides)."""
    return pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1, max_sequence_length=512)


def prepare_latents(pipe, encoded: list, channels: int, height: int, width: int, dtype, device, generator):
    """Noise only (no image latents)."""
    return pipe.prepare_latents(1, channels, height, width, dtype, device, generator, None), None


def prompt_text(pipe, prompt: str, images: int) -> tuple[str, int]:
    """The text-to-image template and its cut (no images)."""
    return pipe.prompt_template_encode.format(prompt), pipe.prompt_template_encode_start_idx


# ComfyUI's official templates (Comfy-Org/workflow_templates): no edit node, no CFGNorm.
COMFYUI = {
    "qwen_image": ComfyTemplate(
        template="templates/image_qwen_image.json@86b41b83", shift=3.1, cfg_norm=False, encode="CLIPTextEncode",
        image_scale=CROP_NONE, prompt_resize=PROMPT_RESIZE, vae_resize=VAE_RESIZE, reference="index"),
    "qwen_image_2512": ComfyTemplate(
        template="templates/image_qwen_Image_2512.json@7c70b6ec", shift=3.1, cfg_norm=False,
        encode="CLIPTextEncode", image_scale=CROP_NONE, prompt_resize=PROMPT_RESIZE, vae_resize=VAE_RESIZE,
        reference="index"),
}


def request_control_images(paths: tuple[str, ...]) -> dict[str, str]:
    """The control images of a server request, by key, numbered as for the edit models; none reach it in practice:
    ai-toolkit renders no control image for this arch (training_control_images), and the server ignores them."""
    return {f"ctrl_img_{i}": path for i, path in enumerate(paths, start=1)}
