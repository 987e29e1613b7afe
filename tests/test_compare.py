"""Metrics: SSIM equals an independent float64 Wang et al. implementation; PSNR, abs diffs, sizes, encodings."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

from parity.compare import (as_array, compare, compare_torch, diff_heatmap, encode_like, ssim_heatmap, ssim_map,
                            ssim_map_torch)


def wang_ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5, L: float = 255.0) -> float:
    """Wang et al. 2004, written out: 11x11 Gaussian window (sigma 1.5), C1=(0.01L)^2, C2=(0.03L)^2,
    population (not sample) covariance, symmetric padding, 5-pixel border cropped, mean over channels."""
    radius = int(3.5 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-(x ** 2) / (2 * sigma ** 2))
    k /= k.sum()

    def blur(img):
        p = np.pad(img, radius, mode="symmetric")
        rows = sum(k[i] * p[:, i:i + img.shape[1]] for i in range(len(k)))
        return sum(k[i] * rows[i:i + img.shape[0], :] for i in range(len(k)))

    scores = []
    for c in range(a.shape[2]):
        x1, y1 = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        mx, my = blur(x1), blur(y1)
        vx, vy, cxy = blur(x1 * x1) - mx * mx, blur(y1 * y1) - my * my, blur(x1 * y1) - mx * my
        c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
        scores.append(s[radius:-radius, radius:-radius].mean())
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut()).resize((128, 128))


def noisy(img: Image.Image, sigma: float, seed: int = 0) -> Image.Image:
    arr = np.asarray(img, dtype=np.float64) + np.random.default_rng(seed).normal(0, sigma, (*img.size[::-1], 3))
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))


@pytest.mark.parametrize("sigma", [2, 10, 40])
def test_ssim_equals_independent_wang_implementation(astronaut, sigma):
    other = noisy(astronaut, sigma)
    ours = compare(astronaut, other).ssim
    ref = wang_ssim(np.asarray(astronaut), np.asarray(other))
    assert abs(ours - ref) < 1e-6


@pytest.mark.parametrize("sigma", [2, 40])
def test_torch_ssim_for_gpus_equals_scikit_image_and_wang(astronaut, sigma):
    """The GPU path (`device` not cpu) is the same definition: checked here on the CPU device, odd sizes too."""
    a = astronaut.crop((0, 0, 101, 77))
    b = noisy(a, sigma)
    ours, ours_map = ssim_map_torch(as_array(a), as_array(b), "cpu")
    ski, ski_map = ssim_map(as_array(a), as_array(b))
    assert abs(ours - wang_ssim(np.asarray(a), np.asarray(b))) < 1e-6 and abs(ours - ski) < 1e-6
    assert ours_map.shape == ski_map.shape == (77, 101) and np.abs(ours_map - ski_map).max() < 1e-3
    gpu_path, cpu_path = compare_torch(a, b, "cpu"), compare(a, b)
    assert abs(gpu_path.ssim - cpu_path.ssim) < 1e-6
    assert (gpu_path.psnr, gpu_path.mean_abs, gpu_path.max_abs) == pytest.approx(
        (cpu_path.psnr, cpu_path.mean_abs, cpu_path.max_abs), rel=1e-12)


def test_differences_only_skip_ssim(astronaut):
    other = noisy(astronaut, 5)
    quick, full = compare(astronaut, other, ssim=False), compare(astronaut, other)
    assert quick.ssim is None and quick.ssim_full is None and full.ssim is not None
    assert (quick.psnr, quick.mean_abs, quick.max_abs) == (full.psnr, full.mean_abs, full.max_abs)


def test_identical_images(astronaut):
    c = compare(astronaut, astronaut.copy())
    assert (c.ssim, c.psnr, c.mean_abs, c.max_abs) == (1.0, float("inf"), 0.0, 0)


def test_psnr_and_abs(astronaut):
    arr = np.asarray(astronaut).astype(np.int16)
    shifted = Image.fromarray(np.clip(arr + 3, 0, 255).astype(np.uint8))
    c = compare(astronaut, shifted)
    assert c.max_abs == 3 and 2.5 < c.mean_abs <= 3
    assert c.psnr == pytest.approx(10 * np.log10(255 ** 2 / np.mean((np.asarray(shifted, float) - arr) ** 2)))


def test_ssim_falls_with_noise(astronaut):
    scores = [compare(astronaut, noisy(astronaut, s)).ssim for s in (1, 5, 20, 60)]
    assert scores == sorted(scores, reverse=True)


def test_size_mismatch_is_not_a_crash(astronaut):
    c = compare(astronaut, astronaut.resize((64, 128)))
    assert not c.same_size and c.ssim is None and (c.size_a, c.size_b) == ((128, 128), (64, 128))


def test_encode_like_matches_pil_default_jpeg(astronaut):
    buf = io.BytesIO()
    astronaut.save(buf, format="JPEG")  # ai-toolkit: PIL's default quality, 75
    assert np.array_equal(np.asarray(encode_like(astronaut, "jpeg-q75")), np.asarray(Image.open(buf).convert("RGB")))
    assert encode_like(astronaut, "png") .tobytes() == astronaut.tobytes()


def test_heatmaps(astronaut):
    other = noisy(astronaut, 10)
    assert diff_heatmap(astronaut, other).size == astronaut.size
    smap = ssim_heatmap(astronaut, astronaut)
    assert smap.mode == "L" and np.asarray(smap).min() == 255
