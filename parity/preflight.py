"""Checks of a case's inputs before anything is rendered, each problem naming the file and the fix.

Every check here is cheap (file headers, image headers, safetensors headers, the local model cache) and
never loads a model or allocates an image's pixels before its size is known, so a run with a hundred broken
inputs reports all of them in seconds. Nothing here writes.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from . import models
from .errors import CaseError
from .preprocess import VAE_RESIZE_REQUEST_BILINEAR, VAE_RESIZE_REQUEST_LANCZOS, image_size, prompt_size, vae_size

# The largest image side the harness renders. The real Qwen-Image models are trained up to ~1.6 MP; a side
# above 4096 px is a typo (it would need tens of GB for the latents alone), refused before anything is allocated.
MAX_SIDE = 4096
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
HUB_PROBE_SECONDS = 5.0  # one request, no retries: a hub that does not answer in this is unreachable
LORA_NETWORKS = ("lora", "locon")  # ai-toolkit's networks saved as lora_A/lora_B pairs on linear layers
ZERO_COND_T = {"qwen_image_edit_plus_2511"}  # the checkpoints whose transformer config sets zero_cond_t: true


# -- images ----------------------------------------------------------------------------------------------------

def check_image(path: Path | str, what: str, fix: str) -> tuple[int, int]:
    """(width, height) of an image file that is really there, whole and of sane size; else a CaseError."""
    st = _stat(path, what, fix)
    return _check_image(str(path), st.st_size, st.st_mtime_ns, what, fix)


def _stat(path, what: str, fix: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except OSError:
        raise CaseError(path, f"{what} does not exist", fix) from None
    if st.st_size == 0:
        raise CaseError(path, f"{what} is empty (0 bytes)", fix)
    return st


@functools.lru_cache(maxsize=1024)
def _check_image(path: str, size: int, mtime: int, what: str, fix: str) -> tuple[int, int]:
    bomb = f"(a decompression bomb, or far larger than any model input; the limit is " \
           f"{Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP)"
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > Image.MAX_IMAGE_PIXELS:  # checked from the header, before any pixel is decoded
                raise CaseError(path, f"{what} claims {w}x{h} = {w * h / 1e6:.0f} MP {bomb}", fix)
            im.load()
            return w, h
    except CaseError:
        raise
    except Image.DecompressionBombError:  # PIL's own refusal at open, past twice its limit
        raise CaseError(path, f"{what} claims more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP {bomb}",
                        fix) from None
    except UnidentifiedImageError:
        raise CaseError(path, f"{what} is not an image file PIL can read", fix) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise CaseError(path, f"{what} is truncated or damaged ({exc})", fix) from None


# -- sizes -----------------------------------------------------------------------------------------------------

def size_problems(config: Path, where: str, width: int, height: int, requested: tuple[int, int],
                  divisor: int = 32) -> list[CaseError]:
    """A sample's size on both sides: ai-toolkit's (floored to 8, min 64, then 32) and the reference's (floored to
    the model's `reference_divisor`: `width // divisor * divisor`, nothing left below one divisor)."""
    problems = []
    for name, side, req in (("width", width, requested[0]), ("height", height, requested[1])):
        if side > MAX_SIDE or req > MAX_SIDE:
            problems.append(CaseError(config, f"{where} {name} is {req} px, larger than the {MAX_SIDE} px the "
                                      f"harness renders (no GPU renders this; refused before allocating anything)",
                                      f"correct the {name} in the config to the size the preview was rendered at"))
        elif req // divisor * divisor < divisor:
            problems.append(CaseError(config, f"{where} {name} is {req} px: the reference pipeline snaps it to "
                                      f"{req // divisor * divisor} ({name} // {divisor} * {divisor}) and cannot "
                                      f"render it (ai-toolkit rendered it at its minimum, 64)",
                                      f"write the {name} the preview has (at least {divisor}) in the config"))
    return problems


# -- the model -------------------------------------------------------------------------------------------------

def is_hub_id(model: str) -> bool:
    return bool(HUB_ID.match(model)) and not Path(model).exists()


def locate_model(model: str) -> str:
    """The local folder of a model: the folder itself, or a hub id's snapshot in the local Hugging Face cache.

    A hub id that is not cached is looked up on the hub with one short request: unreachable (or HF_HUB_OFFLINE)
    fails in seconds instead of after a minute of retries; reachable returns the id, and loading downloads it
    with progress bars."""
    return _locate_model(model, os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_HOME", ""))


@functools.lru_cache(maxsize=64)
def _locate_model(model: str, offline_env: str, hf_home: str) -> str:
    fix_local = ("set `model:` in the case's parity.yaml (or --parity-model) to a local diffusers folder, or map "
                 "the training machine's folder with `paths:`")
    if not is_hub_id(model):
        folder = Path(model)
        if not folder.exists():
            raise CaseError(model, "model folder does not exist", fix_local)
        if not (folder / "model_index.json").is_file():
            raise CaseError(model, "is not a diffusers model folder (no model_index.json)",
                            "point `model:` at the folder holding model_index.json, transformer/, vae/, ...")
        return str(folder)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(model, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    fix_hub = (f"download it once where the hub is reachable (`hf download {model}`, then copy HF_HOME), or set "
               f"`model:` in parity.yaml (or --parity-model) to a local diffusers folder")
    if constants.HF_HUB_OFFLINE:
        raise CaseError(model, "hub model is not in the local Hugging Face cache and HF_HUB_OFFLINE is set", fix_hub)
    reachable, why = _hub_reachable(model)
    if not reachable:
        raise CaseError(model, f"hub model is not in the local Hugging Face cache and the hub is unreachable "
                        f"({why})", fix_hub)
    return model


def model_variant(model: str, folder: str | None) -> tuple[models.Model, str] | None:
    """The Qwen family member a model folder (or hub id) positively is, and the evidence; None where nothing says.

    The folder's pipeline class (model_index.json) names the arch, its transformer's `zero_cond_t` tells 2511 from
    2509, and a name (hub id, cache folder `models--Qwen--<name>`, or folder name) equal to a checkpoint's or
    holding its tag (2509, 2511, 2512) decides what is left."""
    candidates, evidence = list(models.rendered().values()), []
    if folder is not None:
        pipeline = _json(Path(folder) / "model_index.json").get("_class_name")
        if pipeline in {m.pipeline for m in candidates}:
            candidates = [m for m in candidates if m.pipeline == pipeline]
            evidence.append(f"model_index.json: {pipeline}")
        zero = _json(Path(folder) / "transformer" / "config.json").get("zero_cond_t")
        if zero is not None and any(m.id in ZERO_COND_T for m in candidates):
            candidates = [m for m in candidates if (m.id in ZERO_COND_T) == bool(zero)]
            evidence.append(f"transformer zero_cond_t: {str(bool(zero)).lower()}")
    name = _repository_name(model, folder)
    named = [m for m in candidates if m.hub_id.split("/")[-1].lower() == name.lower()] or \
            [m for m in candidates if m.variant and re.search(rf"(?<!\d){m.variant}(?!\d)", name)]
    if len(candidates) > 1 and len(named) == 1:
        candidates = named
        evidence.append(f"named {name!r}")
    return (candidates[0], ", ".join(evidence)) if len(candidates) == 1 else None


def _repository_name(model: str, folder: str | None) -> str:
    """A hub id's name, a Hugging Face cache snapshot's (`models--Qwen--<name>/snapshots/<hash>`), else the folder's."""
    cached = [part for part in Path(folder or model).parts if part.startswith("models--")]
    return cached[-1].split("--")[-1] if cached else Path(model).name


def variant_problem(model: str, folder: str | None, trained: models.Model, config: Path) -> CaseError | None:
    """The model given for a run is another member of the family than the one its config trained."""
    found = model_variant(model, folder)
    if found is None or found[0] == trained:
        return None
    other, evidence = found
    return CaseError(model, f"is a checkpoint of {other.name}, but {config} trained {trained.name} (the model "
                     f"says: {evidence})",
                     f"point --parity-model (or `model:` in parity.yaml) at a {trained.hub_id} checkpoint, or check "
                     f"the config's model.arch and name_or_path")


def _json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # nothing said: the folder's own check (locate_model) or its load names the problem
    return doc if isinstance(doc, dict) else {}


def _hub_reachable(model: str) -> tuple[bool, str]:
    import httpx
    from huggingface_hub import constants

    url = f"{constants.ENDPOINT}/api/models/{model}"
    try:
        answer = httpx.head(url, timeout=HUB_PROBE_SECONDS, follow_redirects=True)
    except httpx.HTTPError as exc:
        return False, f"{exc.__class__.__name__} within {HUB_PROBE_SECONDS:g} s"
    if answer.status_code in (401, 403, 404):
        return False, f"the hub answered {answer.status_code} for {model}: check the id, or log in"
    return True, ""


# -- prompts ---------------------------------------------------------------------------------------------------

def prompt_length_problems(config: Path, where: str, model_folder: str | None, recipes) -> list[CaseError]:
    """A prompt (or negative prompt) taking more text positions than the transformer's rotary embedding has left
    at the sample's size: the Qwen-Image-Edit pipelines do not truncate, so its render would stop on a shape error
    (Qwen-Image's truncates to 512 tokens, on both sides alike)."""
    if model_folder is None:
        return []  # not here: nothing to count with (its problem is reported)
    problems = []
    for recipe in recipes:
        for what, text in (("prompt", recipe.prompt), ("negative prompt", recipe.negative_prompt)):
            used, limit = text_positions(model_folder, recipe, text)
            if used > limit:
                problems.append(CaseError(
                    config, f"{where}: the {what} takes {used} text positions (its tokens, counted with the "
                    f"model's tokenizer, with the pipeline's template and control-image tokens) but the "
                    f"transformer's rotary embedding has {limit} left for text at this size",
                    f"shorten the {what} in the config by at least {used - limit} tokens"))
    return problems


def text_positions(model_folder: str, recipe, text: str) -> tuple[int, int]:
    """(text positions `text` takes, positions the rotary embedding has left for text) on the side `recipe`
    renders, laid out as the renderer does: the target and each VAE control image take the first positions."""
    from .engines.comfyui.conditioning import scaled_size
    from .forms import REFERENCES_COMFY

    pipe, rope = _prompt_encoder(model_folder, models.by_name(recipe.model).pipeline)
    first = (recipe.control_images_vae or recipe.control_images_prompt or (None,))[0]

    def size(path):  # after the recipe's scaling node on the first image, if any
        return scaled_size(*image_size(path), recipe.control_crop) if path == first else image_size(path)

    sizes = tuple(prompt_size(*size(p), recipe.control_prompt_resize) for p in recipe.control_images_prompt)
    to_request = recipe.control_vae_resize in (VAE_RESIZE_REQUEST_BILINEAR, VAE_RESIZE_REQUEST_LANCZOS)
    vae = [vae_size(*((recipe.width, recipe.height) if to_request else size(p)), recipe.control_vae_resize)
           for p in recipe.control_images_vae]
    multiple = pipe.vae_scale_factor * 2
    shapes = [(recipe.width // multiple, recipe.height // multiple), *((w // multiple, h // multiple) for w, h in vae)]
    if recipe.reference_method == REFERENCES_COMFY:
        shapes = shapes[:1]  # ComfyUI's text positions start after the target latent alone
    taken = max(max(w // 2, h // 2) if rope.scale_rope else max(w, h) for w, h in shapes)
    return _text_length(model_folder, recipe.model, text, sizes), rope.pos_freqs.shape[0] - taken


SMALL = 56  # px: a stand-in image's side (any size works; small keeps the processor's pixel work to milliseconds)


@functools.lru_cache(maxsize=1024)
def _text_length(model_folder: str, model: str, text: str, sizes: tuple[tuple[int, int], ...]) -> int:
    import torch

    pipe, _ = _prompt_encoder(model_folder, models.by_name(model).pipeline)
    # The pipeline lays the prompt out around small stand-ins (an image's pixel work is seconds at full size);
    # each image's own token count, from the processor's patch grid for its size, then replaces the stand-in's.
    small = [torch.zeros(1, 3, SMALL, SMALL) for _ in sizes]
    embeds, _ = models.rules(models.by_name(model)).encode_prompt(pipe, text, small, "cpu")
    return embeds.shape[1] + sum(_image_tokens(pipe, w, h) - _image_tokens(pipe, SMALL, SMALL) for w, h in sizes)


def _image_tokens(pipe, width: int, height: int) -> int:
    processor = pipe.processor.image_processor
    return processor.get_number_of_image_patches(height, width, {}) // processor.merge_size ** 2


@functools.lru_cache(maxsize=4)
def _prompt_encoder(model_folder: str, pipeline: str):
    """The stock pipeline with the model's own tokenizer (and processor) and a text encoder that returns only the
    sequence length, so its encode_prompt lays a prompt out as it renders; and the model's rotary embedding, from
    its transformer built on the meta device (no weights read)."""
    import diffusers
    import torch
    import transformers

    class SequenceLength(torch.nn.Module):
        dtype = torch.float32

        def forward(self, input_ids, **_):
            return transformers.modeling_outputs.BaseModelOutput(hidden_states=(torch.zeros(*input_ids.shape, 1),))

    index = _json(Path(model_folder) / "model_index.json")
    try:
        parts = {name: getattr(transformers, index[name][1]).from_pretrained(Path(model_folder) / name)
                 for name in ("tokenizer", "processor") if name in index}
        pipe = getattr(diffusers, pipeline)(scheduler=None, vae=None, transformer=None,
                                            text_encoder=SequenceLength(), **parts)
        transformer = getattr(diffusers, index["transformer"][1])
        config = transformer.load_config(model_folder, subfolder="transformer")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CaseError(model_folder, f"cannot read the model's tokenizer or transformer config for its "
                        f"{pipeline} ({exc.__class__.__name__}: {exc})",
                        "point `model:` at a complete diffusers folder (model_index.json, tokenizer/, processor/ "
                        "for the edit models, transformer/config.json)") from None
    with torch.device("meta"):
        rope = transformer.from_config(config).pos_embed
    return pipe, rope


# -- LoRA checkpoints ------------------------------------------------------------------------------------------

LORA_PREFIX = "diffusion_model."


def check_network(job) -> None:
    """A run whose network is not a LoRA (LoKr, LoHa: other factors than lora_A/lora_B) cannot be rendered."""
    if job.network_type.lower() not in LORA_NETWORKS:
        raise CaseError(job.path, f"network.type is {job.network_type!r}, which is not supported: the harness "
                        f"renders LoRA networks only ({', '.join(LORA_NETWORKS)})",
                        "check a run trained with `network: {type: lora}`")


@functools.lru_cache(maxsize=8)
def linear_shapes(model_folder: str) -> dict[str, tuple[int, int]] | None:
    """Module name -> (out, in) of every 2-D weight of the transformer, read from safetensors headers only."""
    from safetensors import safe_open

    files = sorted((Path(model_folder) / "transformer").glob("*.safetensors"))
    if not files:
        return None
    shapes = {}
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                if key.endswith(".weight"):
                    shape = fh.get_slice(key).get_shape()
                    if len(shape) == 2:
                        shapes[key.removesuffix(".weight")] = (int(shape[0]), int(shape[1]))
    return shapes


def lora_problems(path: str, model_folder: str | None) -> list[CaseError]:
    """A LoRA checkpoint that is a readable safetensors file of ai-toolkit keys fitting the model's transformer
    (`model_folder` None: keys checked for form only). Cached per file version and model."""
    try:
        st = os.stat(path)
    except OSError:
        return [CaseError(path, "LoRA checkpoint does not exist", "copy it from the training machine")]
    return list(_lora_problems(path, st.st_size, st.st_mtime_ns, model_folder))


@functools.lru_cache(maxsize=256)
def _lora_problems(path: str, size: int, mtime: int, model_folder: str | None) -> tuple[CaseError, ...]:
    return tuple(check_lora(path, linear_shapes(model_folder) if model_folder else None))


def check_lora(path: str, shapes: dict[str, tuple[int, int]] | None) -> list[CaseError]:
    from safetensors import safe_open

    fix = "use the LoRA ai-toolkit saved for this run (keys diffusion_model.transformer_blocks.N.<linear>." \
          "lora_A/lora_B.weight), trained on this base model"
    try:
        with safe_open(path, framework="pt") as fh:
            found = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own types for a file that is not safetensors
        return [CaseError(path, f"LoRA checkpoint is not a readable .safetensors file ({exc})",
                          "copy the checkpoint again from the training machine (only .safetensors are read)")]
    if not found:
        return [CaseError(path, "LoRA checkpoint holds no tensors", "copy the LoRA checkpoint again")]
    bad_keys, bad_shapes = [], []
    pairs: dict[str, dict[str, tuple]] = {}
    for key, shape in found.items():
        name = key.removeprefix(LORA_PREFIX)
        base, _, kind = name.rpartition(".lora_")
        if not key.startswith(LORA_PREFIX) or kind not in ("A.weight", "B.weight") or \
                (shapes is not None and base not in shapes):
            bad_keys.append(key)
            continue
        pairs.setdefault(base, {})[kind[0]] = shape
    if shapes is not None:
        for base, ab in sorted(pairs.items()):
            out, inp = shapes[base]
            a, b = ab.get("A"), ab.get("B")
            if a is None or b is None:
                bad_shapes.append(f"{base}: lora_{'A' if a is None else 'B'} missing")
            elif len(a) != 2 or len(b) != 2 or a[1] != inp or b[0] != out or a[0] != b[1]:
                bad_shapes.append(f"{base}: A {list(a)}, B {list(b)} for a {inp}->{out} layer")
    problems = []
    if bad_keys:
        problems.append(CaseError(path, f"{len(bad_keys)} of {len(found)} LoRA keys match no linear layer of "
                                  f"this transformer (first: {bad_keys[0]!r})", fix))
    if bad_shapes:
        problems.append(CaseError(path, f"{len(bad_shapes)} LoRA layers do not fit this transformer's shapes "
                                  f"(first: {bad_shapes[0]}); a LoRA of another model or rank layout", fix))
    return problems


def joined(problems: list[CaseError]) -> str:
    """Every problem of a preview in one message."""
    texts = list(dict.fromkeys(str(p) for p in problems))
    if len(texts) == 1:
        return texts[0]
    return f"{len(texts)} problems:" + "".join(f"\n({i}) {t}" for i, t in enumerate(texts, 1))
