"""Compare two images: SSIM (Wang et al.), PSNR, mean and max absolute difference, spatial maps.

SSIM follows Wang et al. 2004 through scikit-image: Gaussian weights with sigma 1.5, no sample-covariance
correction, K1 0.01, K2 0.03 and an explicit data range of 255. Colour: SSIM is computed per RGB channel on
0-255 values and averaged over channels (scikit-image `channel_axis`), the map likewise.

On a GPU (`device` other than cpu) the same definition runs in torch (`ssim_map_torch`), since scikit-image runs on
the CPU only: the filter is written as shifted float32 sums (no convolution kernel that could pick TF32), with
scikit-image's symmetric padding and border crop; it agrees with scikit-image and with a float64 Wang et al.
implementation within 1e-6 (tested on the CPU; `bench/render_share.py` prints the agreement on the GPU).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from skimage.metrics import structural_similarity

SSIM_SETTINGS = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255.0,
                     K1=0.01, K2=0.03)


@dataclass(frozen=True)
class Comparison:
    ssim: float | None
    psnr: float | None
    mean_abs: float | None
    max_abs: int | None
    size_a: tuple[int, int]
    size_b: tuple[int, int]
    ssim_full: np.ndarray | None = field(default=None, repr=False, compare=False)  # the SSIM map, for reuse
    mse: float | None = field(default=None, repr=False)  # mean squared difference, 0-255 levels

    @property
    def same_size(self) -> bool:
        return self.size_a == self.size_b

    def as_row(self, suffix: str = "") -> dict[str, object]:
        return {f"ssim{suffix}": self.ssim, f"psnr{suffix}": self.psnr, f"mean_abs{suffix}": self.mean_abs,
                f"max_abs{suffix}": self.max_abs}


def as_array(image: Image.Image) -> np.ndarray:
    # float32 holds 0-255 integers and their differences exactly; scikit-image then filters in float32, which
    # halves SSIM's time and agrees with a float64 Wang et al. implementation within 1e-6 (tested).
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def ssim_map(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
    """SSIM of two HxWx3 arrays (mean over channels) and its per-pixel map (mean over channels). The channels go
    to contiguous planes first: scikit-image filters each channel, and a strided one filters ~10 % slower."""
    planes = lambda x: np.ascontiguousarray(np.moveaxis(x, 2, 0))  # noqa: E731
    score, full = structural_similarity(planes(a), planes(b), channel_axis=0, full=True, **SSIM_SETTINGS)
    return float(score), full.mean(axis=0)


def gaussian_taps(sigma: float = SSIM_SETTINGS["sigma"], truncate: float = 3.5) -> np.ndarray:
    """scikit-image's (scipy's) Gaussian: radius int(truncate * sigma + 0.5), normalised to sum 1."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def ssim_map_torch(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor,
                   device: str | None = None) -> tuple[float, np.ndarray]:
    """`ssim_map` in torch: HxWx3 arrays (moved to `device`) or 3xHxW float32 tensors already on a device; the
    same window, constants, symmetric padding and border crop, in float32."""
    if isinstance(a, np.ndarray):
        a, b = (torch.from_numpy(np.ascontiguousarray(np.moveaxis(z, 2, 0))).to(device, torch.float32)
                for z in (a, b))
    x, y, dev = a, b, a.device
    taps = gaussian_taps()
    r = len(taps) // 2
    h, w = x.shape[1:]
    # symmetric padding ("d c b a | a b c d"), scipy's 'reflect', as index lists
    rows = torch.tensor([*range(r - 1, -1, -1), *range(h), *range(h - 1, h - r - 1, -1)], device=dev)
    cols = torch.tensor([*range(r - 1, -1, -1), *range(w), *range(w - 1, w - r - 1, -1)], device=dev)
    k = [float(t) for t in taps]

    def blur(z: torch.Tensor) -> torch.Tensor:
        p = z[:, rows][:, :, cols]
        across = sum(k[i] * p[:, :, i:i + w] for i in range(len(k)))
        return sum(k[i] * across[:, i:i + h, :] for i in range(len(k)))

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1 = (SSIM_SETTINGS["K1"] * SSIM_SETTINGS["data_range"]) ** 2
    c2 = (SSIM_SETTINGS["K2"] * SSIM_SETTINGS["data_range"]) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    score = s[:, r:h - r, r:w - r].mean(dim=(1, 2), dtype=torch.float64).mean()
    return float(score), s.mean(dim=0).cpu().numpy()


def psnr_of(mse: float) -> float:
    """PSNR in dB of a mean squared difference in 0-255 levels (inf for identical images)."""
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def compare_torch(a: Image.Image, b: Image.Image, device: str) -> Comparison:
    """`compare` with every number computed on `device`: the images travel as uint8, nothing else is copied."""
    x, y = (torch.from_numpy(np.array(im.convert("RGB"))).to(device).permute(2, 0, 1).float() for im in (a, b))
    diff = (x - y).abs()
    mse = float(diff.square().sum(dtype=torch.float64)) / diff.numel()
    score, full = ssim_map_torch(x, y)
    return Comparison(score, psnr_of(mse), float(diff.sum(dtype=torch.float64)) / diff.numel(), int(diff.max()), a.size,
                      b.size, full, mse)


def on_gpu(device: str | None) -> bool:
    return device is not None and str(device) != "cpu"


def compare(a: Image.Image, b: Image.Image, ssim: bool = True, device: str | None = None) -> Comparison:
    """Metrics between two images; different sizes give a Comparison with only the sizes set. `ssim=False`
    skips SSIM (the costly part) for callers that read only the differences; `device`: where SSIM runs."""
    if a.size != b.size:
        return Comparison(None, None, None, None, a.size, b.size)
    if ssim and on_gpu(device):
        return compare_torch(a, b, device)
    x, y = as_array(a), as_array(b)
    diff = np.abs(x - y)
    mse = float(np.square(diff).sum(dtype=np.float64) / diff.size)  # squares of 0-255 are exact in float32
    score, full = ssim_map(x, y) if ssim else (None, None)
    return Comparison(score, psnr_of(mse), float(diff.mean(dtype=np.float64)), int(diff.max()), a.size, b.size,
                      full, mse)


def encode_like(image: Image.Image, fmt: str) -> Image.Image:
    """The image after saving it the way a preview of `fmt` was saved (PIL JPEG default quality is 75)."""
    if fmt.startswith("jpeg"):
        quality = int(fmt.partition("-q")[2] or 75)
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        return Image.open(buf).convert("RGB")
    return image.convert("RGB")


def diff_heatmap(a: Image.Image, b: Image.Image, scale: float | None = None) -> Image.Image:
    """Per-pixel max-over-channels absolute difference, as a black-to-red-to-yellow image."""
    x, y = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))
    e = np.maximum(x, y) - np.minimum(x, y)  # exact in uint8, no float copies
    d = np.maximum(np.maximum(e[..., 0], e[..., 1]), e[..., 2])  # max over channels (much faster than .max(2))
    top = scale or max(float(d.max()), 1.0)
    t = np.clip(np.arange(256) / top, 0, 1)  # the colour of each possible difference, looked up per pixel
    lut = np.stack([np.clip(t * 2, 0, 1), np.clip(t * 2 - 1, 0, 1), np.zeros_like(t)], axis=1)
    return Image.fromarray((lut * 255).round().astype(np.uint8)[d])


def ssim_heatmap(a: Image.Image, b: Image.Image, full: np.ndarray | None = None) -> Image.Image:
    """The SSIM map: white where structure agrees, dark where it does not (`full`: a map already computed)."""
    if full is None:
        _, full = ssim_map(as_array(a), as_array(b))
    return Image.fromarray((np.clip(full, 0, 1) * 255).round().astype(np.uint8), mode="L")
