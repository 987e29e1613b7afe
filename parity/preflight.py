"""Checks of a case's inputs before anything is rendered, each problem naming the file and the fix.

Every check here is cheap (file headers, image headers, safetensors headers, the local model cache) and
never loads a model or allocates an image's pixels before its size is known, so a run with a hundred broken
inputs reports all of them in seconds. Nothing here writes.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import CaseError

# The largest image side the harness renders. The real Qwen-Image models are trained up to ~1.6 MP; a side
# above 4096 px is a typo (it would need tens of GB for the latents alone), refused before anything is allocated.
MAX_SIDE = 4096
# The reference pipeline snaps sizes down to a multiple of 32 (the server's `width // 32 * 32`).
MIN_REFERENCE_SIDE = 32
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
HUB_PROBE_SECONDS = 5.0  # one request, no retries: a hub that does not answer in this is unreachable


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

def size_problems(config: Path, where: str, width: int, height: int, requested: tuple[int, int]) -> list[CaseError]:
    """A sample's size on both sides: ai-toolkit's (floored to 8, min 64, then 32) and the reference's (32)."""
    problems = []
    for name, side, req in (("width", width, requested[0]), ("height", height, requested[1])):
        if side > MAX_SIDE or req > MAX_SIDE:
            problems.append(CaseError(config, f"{where} {name} is {req} px, larger than the {MAX_SIDE} px the "
                                      f"harness renders (no GPU renders this; refused before allocating anything)",
                                      f"correct the {name} in the config to the size the preview was rendered at"))
        elif req // 32 * 32 < MIN_REFERENCE_SIDE:
            problems.append(CaseError(config, f"{where} {name} is {req} px: the reference pipeline snaps it to "
                                      f"{req // 32 * 32} ({name} // 32 * 32) and cannot render it (ai-toolkit "
                                      f"rendered it at its minimum, 64)",
                                      f"write the {name} the preview has (at least 32) in the config"))
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


# -- LoRA checkpoints ------------------------------------------------------------------------------------------

LORA_PREFIX = "diffusion_model."


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
