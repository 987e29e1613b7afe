"""The on-disk caches a run reuses across processes and runs: rendered images and control-image latents.

Entries are keyed by everything that decides their value (recipe or inputs, model, device, library versions,
the renderer's own code) and written atomically, so an interrupted run leaves only whole entries behind and the
next run (or an xdist worker, or the harness' tests) renders nothing twice. `''` as the cache folder turns it off.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from PIL import Image

from .store import save_png, write_atomic


def digest(*parts) -> str:
    """A short stable hash of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class DiskCache:
    """A folder of cache entries: images as PNG, tensors as safetensors (never pickle)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def image_path(self, name: str) -> Path:
        return self.folder / f"{name}.png"

    def get_image(self, name: str) -> Image.Image | None:
        path = self.image_path(name)
        if not path.is_file():
            return None
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except OSError:  # a damaged entry (disk full at the time): render again
            return None

    def put_image(self, name: str, image: Image.Image) -> None:
        save_png(image, self.image_path(name))

    def get_tensor(self, name: str):
        from safetensors.torch import load

        path = self.folder / "latents" / f"{name}.safetensors"
        if not path.is_file():
            return None
        try:
            return load(path.read_bytes())["value"]
        except Exception:  # a damaged entry: compute it again
            return None

    def put_tensor(self, name: str, tensor) -> None:
        from safetensors.torch import save

        write_atomic(self.folder / "latents" / f"{name}.safetensors",
                     save({"value": tensor.detach().to("cpu").contiguous()}))

    def tensors_path(self, name: str) -> Path:
        return self.folder / "quantized" / f"{name}.safetensors"

    def open_tensors(self, name: str):
        """A stored set of tensors to read one at a time (`keys()`, `get_tensor(key)`: safetensors' lazy reader, so
        a model's quantized layers are never all in memory beside the model), or None when absent or damaged. A
        damaged entry is said once on stderr and quantized again."""
        from safetensors import safe_open

        path = self.tensors_path(name)
        if not path.is_file():
            return None
        try:
            return safe_open(str(path), framework="pt")
        except Exception as exc:  # noqa: BLE001 -- a damaged entry: quantize again, and say so
            import sys

            print(f"preview-parity: {path} is damaged ({exc.__class__.__name__}): quantizing again",
                  file=sys.stderr)
            return None

    def put_tensors(self, name: str, tensors: dict) -> None:
        """Written to a temporary file first and renamed (large: never held twice in memory as bytes)."""
        import os

        from safetensors.torch import save_file

        path = self.tensors_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)

    def __repr__(self) -> str:
        return f"DiskCache({str(self.folder)!r})"


def open_cache(folder: Path | str | None) -> DiskCache | None:
    return DiskCache(Path(folder)) if folder else None

