"""The reference server (runcomfy-com/ai-toolkit-inference, `qwen_image_edit_plus` and its siblings, on stock
Diffusers): the recipe it follows for a preview's request (here), the request itself (`requests.py`) and the
client that sends it to a running server (`client.py`). Notes: shared/research/runcomfy-server.md.
"""

from __future__ import annotations

from ... import models
from ...aitk_config import SampleItem, TrainingJob, snap
from ...forms import LORA_NONE
from ...preprocess import effective_prompt_resize, effective_vae_resize
from ...recipe import Recipe, device_kind, preview_values, replace_trigger, scheduler_json

DEFAULT_STEPS = 25  # ai-toolkit-inference PipelineConfig.default_steps
DEFAULT_SEED = 42  # the server's seed is 42 + prompt index when the request has none


def reference_recipe(job: TrainingJob, item: SampleItem, lora: str | None, resolve, *, scheduler: dict,
                     device: str, dtype: str) -> Recipe:
    """What the reference pipeline does for a request carrying this preview's settings."""
    model = models.of_job(job)
    rules = models.rules(model)
    images = tuple(str(resolve(p, "control image")) for p in rules.reference_control_images(item))
    # executor: (width // divisor) * divisor of the request
    width, height = snap(item.requested_width, model.reference_divisor), snap(item.requested_height,
                                                                              model.reference_divisor)
    # steps are sent explicitly: the server's default (25) applies only to a bare request
    return Recipe(
        **preview_values(item, lora),
        width=width,
        height=height,
        scheduler=scheduler_json(scheduler),  # the checkpoint's scheduler_config.json via the stock pipeline
        cfg_norm=rules.REFERENCE_CFG_NORM,
        prompt=replace_trigger(item.raw_prompt, job.trigger_word),
        control_images_prompt=images,
        control_images_vae=images,
        control_prompt_resize=effective_prompt_resize(rules.REFERENCE_PROMPT_RESIZE, images),
        control_vae_resize=effective_vae_resize(rules.REFERENCE_VAE_RESIZE, images, width, height),
        lora_application=LORA_NONE if lora is None else model.reference_lora,
        precision="none",
        text_encoder_rope="float32",  # from_pretrained(torch_dtype=...) keeps the rotary buffers in float32
        vae_tiling=False,
        device=device_kind(device),
        dtype=dtype,
        output_format="png",
        model=model.name,
    )
