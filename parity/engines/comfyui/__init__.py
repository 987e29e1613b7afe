"""ComfyUI as the reference engine: the recipe its native graph follows for a preview (here), its sampling
(`sampling.py`) and its edit conditioning (`conditioning.py`), written from what ComfyUI a125cd84 does
(docs/comfyui.md, docs/comfyui-recording.md).

The graph is the one the model's official template sets up (the template's values live with each model:
`parity/models/*.py` COMFYUI), with the preview's values in it: UNETLoader (weight_dtype default) ->
LoraLoaderModelOnly (the preview's step LoRA at its multiplier; none at step 0) -> ModelSamplingAuraFlow (the
template's shift) -> [CFGNorm 1, edit templates] -> KSampler (euler, simple, the preview's seed, steps and cfg,
denoise 1) on an EmptySD3LatentImage of the preview's size -> VAEDecode -> SaveImage; for an edit model the
preview's control images through LoadImage -> [the template's scaling node on image 1] -> the edit-encode node
(positive: the prompt; negative: the preview's negative), each with the VAE. What that does, as recipe fields:

- `sigma_schedule` "static shift S, simple": ModelSamplingAuraFlow's 1000-entry table s*t / (1 + (s-1)*t), every
  (1000/N)-th entry from the top, then 0; no dependence on the image size (Diffusers' dynamic shift has one).
- `cfg_form` x0: CFG on the denoised predictions x - sigma*v (skipped at cfg 1), Euler on an fp32 state, the model
  given sigma as its timestep; with `cfg_norm` the CFGNorm node (per latent pixel over the 16 channels, on x0,
  only scaling down), not Diffusers' rescale of the velocity.
- `noise`: prepare_noise, torch.manual_seed(seed) then an fp32 randn on the CPU, [B, 16, 1, H/8, W/8].
- `pixels` truncated: VAEDecode clamps (x+1)/2 to [0, 1], SaveImage writes uint8(clip(255*x)).
- edit models: `control_crop` (FluxKontextImageScale / ImageScaleToTotalPixels), `control_prompt_resize` and
  `control_vae_resize` (the encode node's area resizes, normalised once), `vision_tokens` (window order, 3-D
  positions), `reference_method` (ComfyUI's "index" positions).
- the LoRA merged into the weights in fp32 and cast back (`model_patcher`).
"""

from __future__ import annotations

from ... import models
from ...aitk_config import SampleItem, TrainingJob, snap
from ...forms import (CFG_X0, CROP_NONE, LORA_MERGED_FP32, LORA_NONE, REFERENCES_COMFY, REFERENCES_DIFFUSERS,
                      VISION_COMFY, VISION_DIFFUSERS)
from ...preprocess import PROMPT_RESIZE, VAE_RESIZE
from ...recipe import Recipe, device_kind, preview_values, replace_trigger, scheduler_json
from .sampling import (LATENT_DIVISOR, NOISE, PIXELS, TABLE, initial_noise, schedule_text, shifted_table,  # noqa: F401
                       sigmas, simple_sigmas, to_8bit)


def template(model) -> models.ComfyTemplate:
    """The official template's values for `model` (its models/ module's COMFYUI)."""
    return models.rules(model).COMFYUI[model.id]


def reference_recipe(job: TrainingJob, item: SampleItem, lora: str | None, resolve, *, device: str, dtype: str,
                     scheduler: dict | None = None) -> Recipe:
    """What ComfyUI's official graph for the run's model does with this preview's settings. `scheduler`: the
    checkpoint's scheduler config, kept in the recipe as the model folder holds it (ComfyUI does not read it: its
    sigmas are `sigma_schedule`'s)."""
    model = models.of_job(job)
    graph = template(model)
    images = tuple(str(resolve(p, "control image")) for p in models.rules(model).reference_control_images(item))
    edit = bool(images)  # without control images the edit fields keep the Diffusers values: nothing differs there
    width, height = snap(item.width, LATENT_DIVISOR), snap(item.height, LATENT_DIVISOR)
    return Recipe(
        **preview_values(item, lora),
        width=width,
        height=height,
        scheduler=scheduler_json(scheduler or {}),
        cfg_norm=graph.cfg_norm,
        prompt=replace_trigger(item.prompt, job.trigger_word),
        control_images_prompt=images,
        control_images_vae=images,
        control_prompt_resize=graph.prompt_resize if edit else PROMPT_RESIZE,
        control_vae_resize=graph.vae_resize if edit else VAE_RESIZE,
        lora_application=LORA_NONE if lora is None else LORA_MERGED_FP32,  # model_patcher: fp32, cast back
        precision="none",
        text_encoder_rope="float32",
        vae_tiling=False,  # VAEDecode tiles only after running out of memory
        device=device_kind(device),
        dtype=dtype,
        output_format="png",
        model=model.name,
        sigma_schedule=schedule_text(graph.shift, graph.scheduler),
        cfg_form=CFG_X0,
        noise=NOISE,
        pixels=PIXELS,
        control_crop=graph.image_scale if edit else CROP_NONE,
        vision_tokens=VISION_COMFY if edit else VISION_DIFFUSERS,
        reference_method=REFERENCES_COMFY if edit else REFERENCES_DIFFUSERS,
    )
