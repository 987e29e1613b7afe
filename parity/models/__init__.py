"""The Qwen models both sides support, one module per ai-toolkit model class: what each side does per model.

A training run is identified as ai-toolkit and the reference server tell the five apart (notes:
shared/research/qwen-family.md): `model.arch` names the ai-toolkit class, and within a class the variant comes from
the `:tag` the UI writes into `arch` (`qwen_image_edit_plus:2511`), else from the checkpoint's `name_or_path`
(`Qwen/Qwen-Image-Edit-2511`). Each variant is a `Model` with the reference server's id for it; a model module
exports its variants and the recipe builders ask the identified one for everything that differs per model.
Adding an ai-toolkit arch is one module here plus its cases.
"""

from __future__ import annotations

import re

from ..errors import CaseError

from .model import FAMILY, ComfyTemplate, Model  # noqa: F401 (the package's public names)


def _modules():
    from . import qwen_image, qwen_image_edit, qwen_image_edit_plus

    return (qwen_image_edit_plus, qwen_image, qwen_image_edit)


def by_name(name: str) -> Model:
    """The model a recipe's `model` field names."""
    for model in rendered().values():
        if model.name == name:
            return model
    raise ValueError(f"unknown model {name!r} (rendered: {', '.join(m.name for m in rendered().values())})")


def rendered() -> dict[str, Model]:
    """The models the harness renders, by reference id."""
    return {m.id: m for module in _modules() for m in module.MODELS}


def rules(model: Model):
    """The module of `model`: its per-side rules (control images, CFG norm, resizes) and its pipeline's calls
    (encode_prompt, prepare_latents)."""
    return next(module for module in _modules() if model in module.MODELS)


def pipeline_rules(pipeline: str):
    """The module whose models render with the Diffusers class `pipeline`."""
    return next(module for module in _modules() if any(m.pipeline == pipeline for m in module.MODELS))


def of_job(job) -> Model:
    """The model a parsed training job (aitk_config.TrainingJob) trained."""
    return identify(job.arch, job.arch_tag, job.model_name_or_path, job.path)


def identify(arch: str, arch_tag: str | None, name_or_path: str, config) -> Model:
    """The model a run trained, from its config's `model.arch` (its tag, if any) and `model.name_or_path`.
    CaseError naming the config: an arch outside the family, or a tag that names no checkpoint of the arch."""
    arch = arch or "qwen_image_edit_plus"  # configs without `arch` predate it; the bundled ones are 2509 runs
    archs = sorted({a for a, _ in FAMILY.values()})
    if arch not in archs:
        raise CaseError(config, f"model.arch is {arch!r}, which is not a Qwen-Image model this harness checks "
                                f"(supported: {', '.join(archs)}, as the reference server's ids "
                                f"{', '.join(FAMILY)})", "use the config of a Qwen-Image training run")
    variants = {m.variant: m for m in rendered().values() if m.arch == arch}
    if arch_tag:
        variant = arch_tag  # an explicit tag must name a known checkpoint
    else:  # else the checkpoint's name: a variant of this arch that it holds (Qwen/Qwen-Image-Edit-2511)
        variant = next((v for v in variants if v and re.search(rf"(?<!\d){v}(?!\d)", name_or_path)), None)
    if arch == "qwen_image_edit_plus" and variant is None:
        variant = "2509"  # the plain arch is 2509 in ai-toolkit's UI
    if variant in variants:
        return variants[variant]
    known = ", ".join(m.name for m in variants.values())
    tags = ", ".join(v for v in variants if v) or "none"
    raise CaseError(config, f"model.arch {arch!r}{' tagged ' + repr(arch_tag) if arch_tag else ''} with "
                            f"name_or_path {name_or_path!r} is none of the checkpoints of that arch this harness "
                            f"renders ({known})", f"tag the arch with one of: {tags}")
