"""Several LoRAs on one model, as ComfyUI applies them: each file read through ComfyUI's key map for the Qwen model
(parity.lora_keys: `diffusion_model.`, `transformer.`, `lora_unet_`, `lycoris_` names; lora_up/lora_down with
`.alpha`, lora_A/lora_B, ...), scaled by alpha/rank and its strength, and summed onto the same weights.

The renderer applies one LoRA file per render (`Recipe.lora` with `lora_application`); a recipe with
`extra_loras` (a ComfyUI graph's Lightning LoRA beside the trained one) renders on one stacked file: the factors
of every LoRA concatenated along the rank, each up-matrix scaled by its strength and alpha/rank, so that
W + sum_i s_i * B_i @ A_i is one B @ A (the same sum in exact arithmetic). Written in ai-toolkit's key form
(`diffusion_model.<module>.lora_A/lora_B.weight`, alpha = rank) to a content-keyed file, once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .lora_keys import COMFY_FORMS, comfyui_key_map

PREFIX = "diffusion_model."


def comfy_layers(path: str, params: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (down, up * alpha/rank) of a LoRA file as ComfyUI binds it to a model with `params`
    (keys that bind nothing are left out, as ComfyUI leaves them)."""
    with safe_open(path, framework="pt") as fh:
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    out = {}
    for name, target in comfyui_key_map(params).items():
        for up_suffix, down_suffix, _ in COMFY_FORMS:
            if name + up_suffix in state and name + down_suffix in state:
                down, up = state[name + down_suffix].float(), state[name + up_suffix].float()
                alpha = state.get(name + ".alpha")
                scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
                module = target.removeprefix(PREFIX).removesuffix(".weight")
                out[module] = (down, up * scale)
                break
    return out


def stack(loras: list[tuple[str, float]], params: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B) with every LoRA's factors concatenated along the rank, strengths folded into B."""
    parts: dict[str, list] = {}
    for path, strength in loras:
        for module, (down, up) in comfy_layers(path, params).items():
            parts.setdefault(module, []).append((down, up * strength))
    return {module: (torch.cat([d for d, _ in pairs], dim=0), torch.cat([u for _, u in pairs], dim=1))
            for module, pairs in parts.items()}


def stacked_file(loras: list[tuple[str, float]], params: list[str], folder: Path) -> str:
    """One ai-toolkit-form LoRA file holding the stack of `loras` (path, strength), made once per content."""
    from .recipe import file_digest

    name = hashlib.sha256(repr([(file_digest(p), s) for p, s in loras]).encode()).hexdigest()[:20]
    path = Path(folder) / f"lora-stack-{name}.safetensors"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for module, (down, up) in stack(loras, params).items():
            tensors[f"{PREFIX}{module}.lora_A.weight"] = down.contiguous()
            tensors[f"{PREFIX}{module}.lora_B.weight"] = up.contiguous()
        partial = path.with_suffix(".partial")
        save_file(tensors, str(partial))
        partial.replace(path)
    return str(path)
