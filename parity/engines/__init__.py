"""Reference engines (DESIGN section 12): each module builds the reference recipe one engine follows for a preview.

Everything after the recipe (render, compare, findings, attribution, report) is shared and engine-blind. The
runcomfy server's builder is still `parity.recipe.reference_recipe` (issue 46 point 5 moves it here);
`comfyui` holds what ComfyUI's native graphs do.
"""

from __future__ import annotations

ENGINES = ("server", "comfyui")  # --parity-reference


def reference_recipe(engine: str, job, item, lora, resolve, *, scheduler: dict, device: str, dtype: str):
    """The reference recipe of `engine` for the preview of `item`."""
    if engine == "comfyui":
        from . import comfyui

        return comfyui.reference_recipe(job, item, lora, resolve, device=device, dtype=dtype, scheduler=scheduler)
    if engine == "server":
        from ..recipe import reference_recipe as server_recipe

        return server_recipe(job, item, lora, resolve, scheduler=scheduler, device=device, dtype=dtype)
    raise ValueError(f"unknown reference engine {engine!r} (known: {', '.join(ENGINES)})")
