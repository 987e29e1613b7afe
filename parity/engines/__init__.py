"""Reference engines (DESIGN section 12): each module builds the reference recipe one engine follows for a preview.

Everything after the recipe (render, compare, findings, attribution, report) is shared and engine-blind. One place
per engine: `aitk` (the training side: what ai-toolkit did), `server` (runcomfy's reference server: its recipe, its
requests, its client), `comfyui` (what ComfyUI's native graphs do). A new engine is one new module here.
"""

from __future__ import annotations

ENGINES = ("server", "comfyui")  # --parity-reference


def reference_recipe(engine: str, job, item, lora, resolve, *, scheduler: dict, device: str, dtype: str,
                     workflow=None):
    """The reference recipe of `engine` for the preview of `item`; `workflow`: a user's ComfyUI graph file (its
    sampler path sets the recipe, parity/engines/comfyui/workflow.py)."""
    if engine == "comfyui":
        from . import comfyui

        base = comfyui.reference_recipe(job, item, lora, resolve, device=device, dtype=dtype, scheduler=scheduler)
        if workflow is None:
            return base
        from .comfyui import workflow as graphs

        def resolve_lora(name: str):
            beside = workflow.parent / name
            return beside if beside.is_file() else resolve(name, f"LoRA {name!r} (named by {workflow.name})")

        return graphs.recipe(graphs.read_file(workflow), base, job.name, resolve_lora)
    if engine == "server":
        from . import server

        return server.reference_recipe(job, item, lora, resolve, scheduler=scheduler, device=device, dtype=dtype)
    raise ValueError(f"unknown reference engine {engine!r} (known: {', '.join(ENGINES)})")
