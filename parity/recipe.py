"""The recipe: every input that decides a rendered image, and the two builders.

`training_recipe` models what ai-toolkit 0.12.26 did for a preview; `reference_recipe` models what the
reference pipeline (runcomfy-com/ai-toolkit-inference, `qwen_image_edit_plus`, on stock Diffusers) does for
the equivalent request (the ComfyUI reference's builder is parity/engines/comfyui.py). The renderer reads only a
Recipe, so both sides and any mix render through one path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .forms import (CFG_V, CROP_NONE, NOISE_DIFFUSERS, PIXELS_ROUND, REFERENCES_DIFFUSERS, SIGMAS_DIFFUSERS,
                    VISION_DIFFUSERS)

# The FlowMatchEulerDiscreteScheduler settings sampling reads (the `scheduler` field keeps these, sorted).
SCHEDULER_KEYS = ("base_image_seq_len", "base_shift", "invert_sigmas", "max_image_seq_len", "max_shift",
                  "num_train_timesteps", "shift", "shift_terminal", "stochastic_sampling", "time_shift_type",
                  "use_beta_sigmas", "use_dynamic_shifting", "use_exponential_sigmas", "use_karras_sigmas")


# the defaults of the fields above, left out of Recipe.key() at these values (old caches stay valid)
KEY_DEFAULTS = {"sigma_schedule": SIGMAS_DIFFUSERS, "cfg_form": CFG_V, "noise": NOISE_DIFFUSERS,
                "pixels": PIXELS_ROUND, "control_crop": CROP_NONE, "vision_tokens": VISION_DIFFUSERS,
                "reference_method": REFERENCES_DIFFUSERS, "extra_loras": ()}



@dataclass(frozen=True)
class Recipe:
    """Every field that decides an image. Field names are the public names (CSV, findings, report)."""

    width: int
    height: int
    steps: int
    scheduler: str  # JSON of the scheduler config that sampling reads
    guidance: float  # true_cfg_scale; CFG runs only above 1
    cfg_norm: bool  # rescale the CFG result to the conditional prediction's norm
    negative_prompt: str
    seed: int
    generator_device: str
    prompt: str
    control_images_prompt: tuple[str, ...]  # files fed to the prompt encoder, in order
    control_images_vae: tuple[str, ...]  # files VAE-encoded as conditioning latents, in order
    control_prompt_resize: str
    control_vae_resize: str
    lora: str | None  # LoRA checkpoint file, None for none
    multiplier: float
    lora_application: str
    precision: str  # quantization of the base as recorded ("none", "transformer:qfloat8 text_encoder:qfloat8")
    text_encoder_rope: str  # dtype of the text encoder's rotary buffers (inv_freq)
    vae_tiling: bool
    device: str
    dtype: str  # "bfloat16" | "float32" | "float16"
    output_format: str  # "png" | "jpeg-q75" | ...
    model: str  # models.Model.name: ai-toolkit's arch with its variant, and the reference server's id
    ara_file: str | None = None  # the ARA's local file (part of `precision`, which names it by content hash)
    sigma_schedule: str = SIGMAS_DIFFUSERS  # or an engine's own form (engines/comfyui.py: "static shift 3.1, simple")
    cfg_form: str = CFG_V  # CFG_V | CFG_X0
    noise: str = NOISE_DIFFUSERS  # or engines/comfyui.NOISE
    pixels: str = PIXELS_ROUND  # how the decoded image becomes 8-bit (engines/comfyui.PIXELS: truncated)
    control_crop: str = CROP_NONE  # a scaling node before the edit encode (forms.CROP_*)
    vision_tokens: str = VISION_DIFFUSERS  # the order and positions of the vision tokens in the prompt encoder
    reference_method: str = REFERENCES_DIFFUSERS  # the reference latents' rotary positions
    extra_loras: tuple[tuple[str, float], ...] = ()  # other LoRA files and strengths (a ComfyUI graph's Lightning)

    def key(self) -> str:
        """A stable hash of the fields that change pixels (for render caches); files count by content."""
        data = {k: v for k, v in asdict(self).items() if k not in ("output_format", "device", "ara_file")
                and not (k in KEY_DEFAULTS and v == KEY_DEFAULTS[k])}
        data["control_images_prompt"] = [file_digest(p) for p in self.control_images_prompt]
        data["control_images_vae"] = [file_digest(p) for p in self.control_images_vae]
        data["lora"] = file_digest(self.lora) if self.lora else None
        if self.extra_loras:
            data["extra_loras"] = [[file_digest(path), strength] for path, strength in self.extra_loras]
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def with_fields(self, **values) -> "Recipe":
        return replace(self, **values)

    def as_row(self) -> dict[str, object]:
        """Public field -> value, as strings a person can read (booleans as true/false)."""
        out: dict[str, object] = {}
        for name, value in public_fields(self).items():
            out[name] = _text(value)
        return out


@functools.lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime: float) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:16]


def file_digest(path: str) -> str:
    st = os.stat(path)
    return _digest(path, st.st_size, st.st_mtime)


# Public field names (issue #3): two recipe attributes form `control_images`.
FIELD_NAMES = (
    "model", "width", "height", "steps", "scheduler", "sigma_schedule", "guidance", "cfg_norm", "cfg_form",
    "negative_prompt", "seed", "noise", "prompt", "control_images", "control_crop", "control_prompt_resize",
    "control_vae_resize", "vision_tokens", "reference_method",
    "lora", "multiplier", "extra_loras", "lora_application", "precision", "text_encoder_rope", "vae_tiling", "device",
    "dtype",
    "pixels", "output_format",
)
# The recipe attributes behind each public field.
FIELD_ATTRS = {name: (name,) for name in FIELD_NAMES}
FIELD_ATTRS["control_images"] = ("control_images_prompt", "control_images_vae")
FIELD_ATTRS["seed"] = ("seed", "generator_device")
FIELD_ATTRS["precision"] = ("precision", "ara_file")


def public_fields(recipe: Recipe) -> dict[str, object]:
    out: dict[str, object] = {}
    for name in FIELD_NAMES:
        attrs = FIELD_ATTRS[name]
        if name == "control_images":
            out[name] = {"prompt": [Path(p).name for p in recipe.control_images_prompt],
                         "vae": [Path(p).name for p in recipe.control_images_vae]}
        elif name == "seed":
            out[name] = f"{recipe.seed} ({recipe.generator_device} generator)"
        elif name == "lora":
            out[name] = Path(recipe.lora).name if recipe.lora else None
        elif name == "extra_loras":
            out[name] = ", ".join(f"{Path(path).name} @ {strength:g}" for path, strength in recipe.extra_loras) \
                or "none"
        elif name == "precision":
            out[name] = precision_text(recipe.precision, recipe.dtype)
        elif name == "sigma_schedule" and recipe.sigma_schedule == SIGMAS_DIFFUSERS:
            out[name] = diffusers_schedule_text(recipe.scheduler)
        else:
            out[name] = getattr(recipe, attrs[0])
    return out


def diffusers_schedule_text(scheduler: str) -> str:
    """What the Diffusers scheduler config makes of linspace(1, 1/N, N), in words: `flowmatch-dynamic (mu from
    tokens, shift 0.5-0.9), shift_terminal 0.02`."""
    try:
        config = json.loads(scheduler)
    except ValueError:
        return SIGMAS_DIFFUSERS
    if config.get("use_dynamic_shifting"):
        text = (f"flowmatch-dynamic (mu from tokens, shift {config.get('base_shift')}-{config.get('max_shift')}, "
                f"{config.get('time_shift_type', 'exponential')})")
    else:
        text = f"flowmatch static shift {config.get('shift')}"
    if config.get("shift_terminal"):
        text += f", shift_terminal {config['shift_terminal']}"
    return text


def quantization_parts(precision: str) -> dict[str, str]:
    """`transformer:<qtype>[+ara:<hash or 'not found'>] text_encoder:<qtype>` -> component -> its value."""
    import re

    found = re.findall(r"(\w+):(.+?)(?=\s+\w+:|$)", precision.strip())
    return dict(found)


def precision_text(precision: str, dtype: str) -> str:
    """`transformer:uint3+ara:sha256:<hex> text_encoder:qfloat8` -> `transformer uint3+ARA (sha256:<12 hex>),
    text_encoder qfloat8`; `none` -> `none (bfloat16 weights)`."""
    if precision == "none":
        return f"none ({dtype} weights)"
    parts = []
    for component, qtype in quantization_parts(precision).items():
        qtype, _, ara = qtype.partition("+ara:")
        parts.append(f"{component} {qtype}" + (f"+ARA ({ara[:19]})" if ara else ""))
    return ", ".join(parts)


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def switch(base: Recipe, other: Recipe, field_names: tuple[str, ...]) -> Recipe:
    """`base` with the named public fields taken from `other` (a counterfactual recipe)."""
    values = {attr: getattr(other, attr) for name in field_names for attr in FIELD_ATTRS[name]}
    return replace(base, **values)


def differing_fields(a: Recipe, b: Recipe) -> tuple[str, ...]:
    """Public fields whose values differ (the ARA by its content hash in `precision`, not by where it lies)."""
    return tuple(n for n in FIELD_NAMES
                 if any(getattr(a, x) != getattr(b, x) for x in FIELD_ATTRS[n] if x != "ara_file"))


def scheduler_json(config: dict) -> str:
    return json.dumps({k: config.get(k) for k in SCHEDULER_KEYS}, sort_keys=True)


def device_kind(device: str) -> str:
    """`cuda:0` -> `cuda`: the index picks a card, not the kernels, so cuda, cuda:0 and cuda:1 are one device kind."""
    return device.partition(":")[0]


def preview_values(item, lora: str | None) -> dict:
    """The values every engine takes from the preview's sample as they are: steps, guidance, negative prompt, seed
    (a CPU generator on every side), the LoRA of the preview's step and its multiplier."""
    return dict(steps=item.sample_steps, guidance=float(item.guidance_scale), negative_prompt=item.neg,
                seed=item.seed, generator_device="cpu", lora=lora, multiplier=float(item.network_multiplier))


def replace_trigger(prompt: str, trigger: str | None) -> str:
    # ai-toolkit inject_trigger_into_prompt(add_if_not_present=False): no trigger word -> "[trigger]" stays.
    return prompt.replace("[trigger]", trigger) if trigger else prompt
