"""Where a check puts a preview's images for the report: `<report_dir>/images/<case>/`, named and encoded by
images.py (the preview, the renders, the heat maps, one image per counterfactual cause)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from . import metrics
from .images import check_mode, save, save_preview

MAP_NAMES = {"diff": "diff", "ssim": "ssim_map"}  # image suffixes the report reads


class ReportImages:
    """The report's image folder and encoding (`report_images`: compact or lossless)."""

    def __init__(self, report_dir: Path | str, mode: str):
        self.report_dir, self.mode = Path(report_dir), check_mode(mode)

    def save(self, task, kind: str, image: Image.Image) -> Path:
        """One image of a preview (`kind`: preview, reference, training, local, cause-<fields>, a heat map)."""
        folder = self.report_dir / "images" / task.case
        if kind == "preview":
            return save_preview(task.preview, image, folder, task.preview.stem, self.mode)
        return save(image, folder, task.preview.stem, kind, self.mode)

    def save_maps(self, task, preview: Image.Image, render: Image.Image, measured) -> None:
        """The heat maps of a render against the preview (`measured`: the raw metrics.Measurement)."""
        for name, image in metrics.maps(preview, render, measured).items():
            self.save(task, MAP_NAMES.get(name, name + "_map"), image)
