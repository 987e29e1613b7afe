"""Reference engines (DESIGN section 12): each module builds the reference recipe one engine follows for a preview.

Everything after the recipe (render, compare, findings, attribution, report) is shared and engine-blind. One place
per engine: `aitk` (the training side: what ai-toolkit did), `server` (runcomfy's reference server: its recipe, its
requests, its client), `comfyui` (what ComfyUI's native graphs do). A new engine is one new module here.
"""

from __future__ import annotations

ENGINES = ("server", "comfyui")  # --parity-reference


def reference_recipe(engine: str, job, item, lora, resolve, *, scheduler: dict, device: str, dtype: str):
    """The reference recipe of `engine` for the preview of `item`."""
    if engine == "comfyui":
        from . import comfyui

        return comfyui.reference_recipe(job, item, lora, resolve, device=device, dtype=dtype, scheduler=scheduler)
    if engine == "server":
        from . import server

        return server.reference_recipe(job, item, lora, resolve, scheduler=scheduler, device=device, dtype=dtype)
    raise ValueError(f"unknown reference engine {engine!r} (known: {', '.join(ENGINES)})")
