"""The report's image files: how each image of a preview is named, encoded, found again, and thumbnailed.

Every image of a preview lives at `images/<case>/<stem>.<kind>.<ext>`; kinds are `preview`, `reference`,
`training`, `diff`, `ssim_map`, one `<metric>_map` per perceptual distance and `cause-<fields>` per
counterfactual render. Two encodings (`report_images`):

- `compact` (default): full-size WebP, quality 90 for images and 80 for heat maps; a JPEG preview is copied byte
  for byte. About 1.3 MB a preview at 1024x1024 (`bench/report_size.py`). The pictures are for eyes: WebP q90
  is within ~2 levels on average of the render; every metric is computed from the lossless images in memory,
  never from these files.
- `lossless`: full-size PNG for everything (the preview still copied as it is), about 13 MB a preview.

Thumbnails (WebP, 256 px) go to `images/<case>/thumbs/`.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from .store import write_atomic

MODES = ("compact", "lossless")
EXTENSIONS = (".webp", ".png", ".jpg", ".jpeg")  # what `find` picks up, most preferred first
IMAGE_QUALITY = 90  # compact: renders, cause renders and non-JPEG previews
MAP_QUALITY = 80  # compact: heat maps, read for where, not for exact colour
THUMB_SIDE = 256  # longest side of a thumbnail, in pixels (shown at 96-200 CSS px, sharp on hi-dpi screens)
THUMB_QUALITY = 72


def is_map(kind: str) -> bool:
    return kind == "diff" or kind.endswith("_map")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"report images: unknown encoding {mode!r}; use one of {', '.join(MODES)}")
    return mode


def _remove_others(folder: Path, stem: str, kind: str, keep: Path) -> None:
    """An image written in one encoding replaces the same image written earlier in another."""
    for ext in EXTENSIONS:
        other = folder / f"{stem}.{kind}{ext}"
        if other != keep and other.is_file():
            other.unlink()


def save(image: Image.Image, folder: Path, stem: str, kind: str, mode: str = "compact") -> Path:
    """Write one image of a preview in the report's encoding; returns its path."""
    buf = io.BytesIO()
    if check_mode(mode) == "lossless":
        path = Path(folder) / f"{stem}.{kind}.png"
        image.save(buf, format="PNG")
    else:
        path = Path(folder) / f"{stem}.{kind}.webp"
        image.save(buf, format="WEBP", quality=MAP_QUALITY if is_map(kind) else IMAGE_QUALITY, method=4)
    write_atomic(path, buf.getvalue())
    _remove_others(Path(folder), stem, kind, path)
    return path


def save_preview(source: Path, image: Image.Image, folder: Path, stem: str, mode: str = "compact") -> Path:
    """The preview as the report shows it: the file itself when it is a JPEG or WebP (small, and exactly what
    ai-toolkit wrote) or in lossless mode; otherwise (a PNG in compact mode) encoded like the other images."""
    with Image.open(source) as im:
        fmt = im.format
    ext = {"JPEG": ".jpg", "WEBP": ".webp", "PNG": ".png"}.get(fmt or "")
    if ext and (fmt != "PNG" or check_mode(mode) == "lossless"):
        path = Path(folder) / f"{stem}.preview{ext}"
        write_atomic(path, Path(source).read_bytes())
        _remove_others(Path(folder), stem, "preview", path)
        return path
    return save(image, folder, stem, "preview", mode)


def index(folder: Path) -> dict[str, dict[str, Path]]:
    """Every image in `folder`, {stem: {kind: path}}, from one read of the folder (a report of hundreds of
    previews reads each case folder once, not once per preview). When a kind exists in several encodings (a
    run stopped halfway), the newest file wins."""
    out: dict[str, dict[str, Path]] = {}
    if not Path(folder).is_dir():
        return out
    for path in Path(folder).iterdir():
        parts = path.name.rsplit(".", 2)  # <stem>.<kind>.<ext>; kinds hold no dot
        if len(parts) != 3 or not all(parts) or f".{parts[2].lower()}" not in EXTENSIONS or not path.is_file():
            continue
        stem, kind = parts[0], parts[1]
        kinds = out.setdefault(stem, {})
        if kind not in kinds or path.stat().st_mtime > kinds[kind].stat().st_mtime:
            kinds[kind] = path
    return out


def find(folder: Path, stem: str) -> dict[str, Path]:
    """Every image of one preview in `folder`: {kind: path}."""
    return index(folder).get(stem, {})


def thumbnail(source: Path, thumb: Path) -> bool:
    """A small WebP of an image, made once (remade when the image is newer); False when it cannot be read."""
    try:
        if thumb.is_file() and thumb.stat().st_mtime >= source.stat().st_mtime:
            return True
        with Image.open(source) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BICUBIC, reducing_gap=2.0)
            buf = io.BytesIO()
            im.save(buf, format="WEBP", quality=THUMB_QUALITY, method=4)
        write_atomic(thumb, buf.getvalue())
        return True
    except OSError:
        return False


def thumb_path(source: Path) -> Path:
    return source.parent / "thumbs" / f"{source.name}.webp"
