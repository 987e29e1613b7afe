"""A preview file as the checks read it: its pixels, and how it was JPEG-encoded (so that a render can be
saved and reloaded the same way before it is compared with the preview)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from . import metrics
from .errors import CaseError


def open_preview(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise CaseError(path, f"preview image cannot be read ({exc.__class__.__name__})",
                        "copy the preview again from the training machine, or delete it") from None


def preview_jpeg(path: Path):
    """How a preview file was JPEG-encoded (None for lossless), read once per file version."""
    st = os.stat(path)
    return _preview_jpeg(str(path), st.st_size, st.st_mtime)


@functools.lru_cache(maxsize=256)
def _preview_jpeg(path: str, size: int, mtime: float):
    return metrics.preview_jpeg(path)


def preview_encoder(preview: Path):
    """Save-and-reload as the preview file was saved (JPEG quality and subsampling read from the file)."""
    jpeg = preview_jpeg(preview)
    return (lambda image: metrics.encode_jpeg(image, jpeg)) if jpeg else (lambda image: image)
