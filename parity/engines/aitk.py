"""ai-toolkit, the training side: the recipe of what ai-toolkit 0.12.26 did for a preview (notes:
shared/research/aitk-sampling.md). What differs per model comes from parity/models/.
"""

from __future__ import annotations

from .. import models
from ..aitk_config import SampleItem, TrainingJob, snap
from ..forms import LORA_MERGED_FP32, LORA_NONE, LORA_RUNTIME_FP32
from ..preprocess import effective_vae_resize
from ..recipe import Recipe, device_kind, preview_values, replace_trigger, scheduler_json

# ai-toolkit's fixed sampling scheduler (qwen_image.py `scheduler_config`, used by get_train_scheduler).
AITK_SCHEDULER = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
    "max_shift": 0.9, "base_image_seq_len": 256, "max_image_seq_len": 8192, "invert_sigmas": False,
    "shift_terminal": 0.02, "use_karras_sigmas": False, "use_exponential_sigmas": False,
    "use_beta_sigmas": False, "time_shift_type": "exponential", "stochastic_sampling": False,
}


def _quantization(job: TrainingJob, ara: str | None) -> str:
    parts = []
    if job.quantize:
        parts.append(f"transformer:{job.qtype}" + (f"+ara:{ara}" if ara else ""))
    if job.quantize_te:
        parts.append(f"text_encoder:{job.qtype_te}")
    return " ".join(parts) or "none"


def _dtype_name(train_dtype: str) -> str:
    return {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
            "fp32": "float32", "float32": "float32"}.get(train_dtype.lower(), train_dtype)


def training_recipe(job: TrainingJob, item: SampleItem, lora: str | None, resolve, *, lora_merged: bool = False,
                    scheduler: dict | None = None, ara: str | None = None, ara_file: str | None = None) -> Recipe:
    """What ai-toolkit did for the preview of `item` (resolve maps a config path to a local file; `ara`: the
    accuracy recovery adapter's content hash, or "not found"). What differs per model comes from models/."""
    model = models.of_job(job)
    rules = models.rules(model)
    prompt_imgs, vae_imgs = rules.training_control_images(item)
    vae_files = tuple(str(resolve(p, "control image")) for p in vae_imgs)
    fmt = str(job.sample.get("format", "jpg")).lower()
    # GenerateImageConfig floors to 8 (min 64); the Qwen pipeline then floors to vae_scale_factor*2 = 16,
    # and ai-toolkit's qwen model snaps to its bucket divisibility (32) before calling it.
    width, height = snap(item.width, model.training_divisor), snap(item.height, model.training_divisor)
    return Recipe(
        **preview_values(item, lora),
        width=width,
        height=height,
        scheduler=scheduler_json(scheduler or AITK_SCHEDULER),
        cfg_norm=rules.training_cfg_norm(job),
        prompt=replace_trigger(item.prompt, job.trigger_word),
        control_images_prompt=tuple(str(resolve(p, "control image")) for p in prompt_imgs),
        control_images_vae=vae_files,
        control_prompt_resize=rules.TRAINING_PROMPT_RESIZE,
        control_vae_resize=effective_vae_resize(rules.TRAINING_VAE_RESIZE, vae_files, width, height),
        lora_application=LORA_NONE if lora is None else LORA_MERGED_FP32 if lora_merged else LORA_RUNTIME_FP32,
        precision=_quantization(job, ara),
        # load_model: text_encoder.to(device, dtype=dtype) also casts the float32 rotary inv_freq buffers.
        text_encoder_rope=_dtype_name(job.train_dtype),
        vae_tiling=job.low_vram,
        device=device_kind(job.device),
        dtype=_dtype_name(job.train_dtype),
        output_format="png" if fmt == "png" else ("jpeg-q75" if fmt in ("jpg", "jpeg") else fmt),
        model=model.name,
        ara_file=ara_file,
    )
