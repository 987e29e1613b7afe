"""The report's image files: encodings per mode, the preview copied as written, one file per image, thumbnails."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from parity import images
from parity.store import write_atomic


@pytest.fixture
def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:96, 0:128]
    base = np.stack([x * 2, y * 2, (x + y)], -1) + rng.normal(0, 3, (96, 128, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def test_compact_is_webp_and_lossless_is_exact_png(tmp_path, picture):
    compact = images.save(picture, tmp_path, "s", "reference")
    assert compact.name == "s.reference.webp"
    with Image.open(compact) as im:
        assert im.format == "WEBP" and im.size == picture.size
        error = np.abs(np.asarray(im.convert("RGB"), int) - np.asarray(picture, int)).mean()
    assert 0 < error < 4  # lossy, within a few levels: for eyes, never for metrics
    exact = images.save(picture, tmp_path, "s", "reference", "lossless")
    assert exact.name == "s.reference.png" and not compact.exists()  # one file per image
    with Image.open(exact) as im:
        assert np.array_equal(np.asarray(im), np.asarray(picture))


def test_heat_maps_compress_harder_than_renders(tmp_path, picture):
    render = images.save(picture, tmp_path, "s", "training")
    heat = images.save(picture, tmp_path, "s", "lpips_alex_map")
    assert images.is_map("diff") and images.is_map("ssim_map") and not images.is_map("training")
    assert heat.stat().st_size < render.stat().st_size


def test_jpeg_preview_is_copied_byte_for_byte_png_preview_follows_the_mode(tmp_path, picture):
    jpg, png = tmp_path / "a.jpg", tmp_path / "b.png"
    picture.save(jpg, quality=75)
    picture.save(png)
    out = tmp_path / "report"
    copied = images.save_preview(jpg, picture, out, "a")
    assert copied.name == "a.preview.jpg" and copied.read_bytes() == jpg.read_bytes()
    assert images.save_preview(png, picture, out, "b").name == "b.preview.webp"
    kept = images.save_preview(png, picture, out, "b", "lossless")
    assert kept.name == "b.preview.png" and kept.read_bytes() == png.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["a.preview.jpg", "b.preview.png"]
    assert jpg.read_bytes() and png.is_file()  # the sources are untouched


def test_find_reads_kinds_back_and_the_newest_encoding_wins(tmp_path, picture):
    for kind in ("preview", "diff", "cause-cfg_norm", "stlpips_alex_map"):
        images.save(picture, tmp_path, "1__000000003_0", kind)
    stale = tmp_path / "1__000000003_0.diff.png"
    picture.save(stale)
    os.utime(stale, (1, 1))
    (tmp_path / "1__000000003_0.notes.txt").write_text("not an image")
    (tmp_path / "1__000000003_01.preview.webp").write_bytes(b"another preview's")
    found = images.find(tmp_path, "1__000000003_0")
    assert set(found) == {"preview", "diff", "cause-cfg_norm", "stlpips_alex_map"}
    assert found["diff"].suffix == ".webp"
    assert images.find(tmp_path / "absent", "x") == {}


def test_unknown_mode_is_refused(tmp_path, picture):
    with pytest.raises(ValueError, match="unknown encoding 'tiny'; use one of compact, lossless"):
        images.save(picture, tmp_path, "s", "reference", "tiny")


def test_thumbnail_is_small_webp_and_unreadable_source_gives_none(tmp_path, picture):
    source = images.save(picture.resize((1024, 768)), tmp_path, "s", "reference")
    thumb = images.thumb_path(source)
    assert images.thumbnail(source, thumb)
    with Image.open(thumb) as im:
        assert im.format == "WEBP" and im.size == (256, 192)
    broken = tmp_path / "s.training.webp"
    broken.write_bytes(b"not an image")
    assert not images.thumbnail(broken, images.thumb_path(broken))


def test_written_files_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "page.html"
        write_atomic(path, "<p>x</p>")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644 and not list(tmp_path.glob(".*.tmp"))
