"""What a Qwen model is to the harness: the family's ids and the `Model` record each model module exports."""

from __future__ import annotations

from dataclasses import dataclass

# The reference server's ids (runcomfy-com/ai-toolkit-inference ModelType) of the whole family, and the ai-toolkit
# arch that trains each: the harness knows them all, and says which it renders.
FAMILY = {
    "qwen_image": ("qwen_image", "Qwen/Qwen-Image"),
    "qwen_image_2512": ("qwen_image", "Qwen/Qwen-Image-2512"),
    "qwen_image_edit": ("qwen_image_edit", "Qwen/Qwen-Image-Edit"),
    "qwen_image_edit_plus": ("qwen_image_edit_plus", "Qwen/Qwen-Image-Edit-2509"),
    "qwen_image_edit_plus_2511": ("qwen_image_edit_plus", "Qwen/Qwen-Image-Edit-2511"),
}


@dataclass(frozen=True)
class Model:
    """One reference-server model id and what differs per model on both sides."""

    id: str  # the reference server's id (its ModelType)
    arch: str  # ai-toolkit's model.arch, without the tag
    variant: str | None  # the tag that tells it from the other checkpoints of its arch (2509, 2511, 2512)
    hub_id: str  # the reference server's base_model
    pipeline: str  # the stock Diffusers pipeline class both sides render with
    reference_divisor: int  # the server floors width and height to this
    training_divisor: int  # ai-toolkit's get_bucket_divisibility
    reference_lora: str  # forms.LORA_PEFT (set_adapters) or forms.LORA_FUSED (fuse_lora)

    @property
    def name(self) -> str:
        """As the recipe, the CSV and the report show it: `qwen_image_edit_plus:2511 (qwen_image_edit_plus_2511)`."""
        return f"{self.arch}{':' + self.variant if self.variant else ''} ({self.id})"


@dataclass(frozen=True)
class ComfyTemplate:
    """What ComfyUI's official workflow template for a model sets up (Comfy-Org/workflow_templates), as the
    ComfyUI recipe (parity/engines/comfyui) reads it: the values a user gets by loading the template unchanged."""

    template: str  # path@commit in Comfy-Org/workflow_templates
    shift: float  # ModelSamplingAuraFlow
    cfg_norm: bool  # a CFGNorm node (strength 1) before the sampler
    encode: str  # the text-encode node: CLIPTextEncode, TextEncodeQwenImageEdit, TextEncodeQwenImageEditPlus
    image_scale: str  # forms.CROP_*: the node that scales the (first) control image before encoding
    prompt_resize: str  # preprocess.*: the vision image the encode node makes
    vae_resize: str  # preprocess.*: the reference image the encode node VAE-encodes
    reference: str  # the reference-latent method: "index", "index_timestep_zero" (2511: refs at timestep 0)
    sampler: str = "euler"
    scheduler: str = "simple"
