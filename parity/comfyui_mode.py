"""ComfyUI mode (`--parity-comfyui URL`): each preview's reference image comes from a running ComfyUI, which runs
the preview's ComfyUI recipe written as a graph of stock nodes (engines/comfyui/live.py sends it); with
`--parity-comfyui-local` the harness also renders that recipe itself, and the record says how far the two are
apart: how closely the harness models that ComfyUI (docs/comfyui-live.md)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from . import compare as cmp


class ComfyUIMode:
    """The reference side of a check in ComfyUI mode (the runner's `server` slot, as ServerMode)."""

    def __init__(self, options, render, images):
        from .engines.comfyui.live import ComfyUISide

        self.side = ComfyUISide(options.comfyui, options.comfyui_timeout, options.workflow)
        self.local = options.comfyui_local  # also render the recipe here and compare
        self.render, self.images = render, images  # Checker.render, report_images.ReportImages
        self.graphs = Path(options.report_dir) / "comfyui"  # the graph sent for each preview

    def task(self, task):
        """The task as planned: its reference recipe is the ComfyUI recipe the graph is written from."""
        return task

    def reference(self, task, row: dict) -> Image.Image:
        """ComfyUI's image of the preview's graph; the row gets which run it was (`comfyui_*`) and where the graph
        sent is saved."""
        image, fields, graph = self.side.image(task)
        row.update(fields)
        path = self.graphs / task.case / f"{task.preview.stem}.api.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(graph, indent=1) + "\n")
        row["comfyui_graph"] = str(path)
        if self.local:
            self.vs_local(task, image, row)
        return image

    def vs_local(self, task, served: Image.Image, row: dict) -> None:
        """ComfyUI's image against the harness' render of the same recipe (both PNG: compared as they are)."""
        local, seconds = self.render(task.reference, task.model)
        row["render_seconds"] = round(seconds, 3)
        self.images.save(task, "local", local)
        same = cmp.compare(served, local, ssim=False)
        row["comfyui_vs_local_mean_abs"], row["comfyui_vs_local_max_abs"] = same.mean_abs, same.max_abs
