"""Hints: named numbers that point at the cause of a difference between two images.

Each hint is one number with a fixed definition, computed by scikit-image / numpy, so a person can read it next
to the metrics: a translation (phase correlation), a colour or brightness shift (CIEDE2000, CIELAB offsets), how
much of the error is low frequency (a cast, a tone change) versus high frequency (noise, detail, JPEG), a
resolution-mismatch signal (high-frequency energy of one image over the other's) and the size difference.
Convention: `a` is the preview (reference of the comparison), `b` the regeneration; offsets are b minus a.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np
import scipy.fft
from PIL import Image
from skimage.color import deltaE_ciede2000, rgb2gray, rgb2lab
from skimage.registration import phase_cross_correlation

HINTS_VERSION = "hints v1"
COLOUR_SIZE = 256  # colour hints on a box-downscaled copy: a cast is low frequency, and CIEDE2000 costs ~1 s/Mpx
LOW_FREQ_CUTOFF = 0.05  # cycles/pixel: periods longer than 20 px count as "low frequency" error
HIGH_FREQ_CUTOFF = 0.25  # cycles/pixel: above half the Nyquist frequency, what a 2x down-up resize removes
SHIFT_UPSAMPLE = 10  # phase correlation to 0.1 px
SHIFT_HALVE_FROM = 256  # px, short side: correlate larger images at half size


@dataclass(frozen=True)
class Hints:
    size_dw: int  # width of b minus width of a, pixels
    size_dh: int
    shift_x: float | None  # b's content is displaced this many pixels right of a's (phase correlation)
    shift_y: float | None  # ... and this many pixels down
    delta_e_mean: float | None  # mean per-pixel CIEDE2000 (on COLOUR_SIZE copies)
    colour_cast_delta_e: float | None  # CIEDE2000 between the two mean colours: a global colour/brightness shift
    lab_offset_l: float | None  # mean L* of b minus a: brightness
    lab_offset_a: float | None  # mean a* of b minus a: + redder / - greener
    lab_offset_b: float | None  # mean b* of b minus a: + yellower / - bluer
    error_low_freq_share: float | None  # share of the error energy below LOW_FREQ_CUTOFF (0..1)
    hf_energy_ratio: float | None  # energy above HIGH_FREQ_CUTOFF of b over that of a; << 1: b is softer

    def as_row(self, prefix: str = "hint_") -> dict[str, object]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def gray(image: Image.Image) -> np.ndarray:
    """Luminance in 0..1 (float32: the FFTs below run in single precision, ample for these hints)."""
    return rgb2gray(np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0))


def halved(g: np.ndarray) -> np.ndarray:
    """2x2 box average (an odd last row or column dropped)."""
    h, w = g.shape[0] // 2 * 2, g.shape[1] // 2 * 2
    return (g[0:h:2, 0:w:2] + g[1:h:2, 0:w:2] + g[0:h:2, 1:w:2] + g[1:h:2, 1:w:2]) * np.float32(0.25)


def translation(a: Image.Image, b: Image.Image, grays: tuple[np.ndarray, np.ndarray] | None = None
                ) -> tuple[float, float]:
    """(x, y) pixels by which b's content sits right/down of a's, to 1/SHIFT_UPSAMPLE px. Images of
    SHIFT_HALVE_FROM px and more are correlated at half size with twice the upsampling (a shift survives a 2x2
    box average; a quarter of the FFT work); `grays`: both luminances, if made."""
    ga, gb = grays if grays is not None else (gray(a), gray(b))
    factor = 2 if min(ga.shape) >= SHIFT_HALVE_FROM else 1
    if factor == 2:
        ga, gb = halved(ga), halved(gb)
    shift, _, _ = phase_cross_correlation(scipy.fft.fft2(ga), scipy.fft.fft2(gb), space="fourier",
                                          upsample_factor=SHIFT_UPSAMPLE * factor, normalization=None)
    # skimage returns the shift that registers b onto a
    return -float(shift[1]) * factor + 0.0, -float(shift[0]) * factor + 0.0


def downscaled(image: Image.Image, size: int = COLOUR_SIZE) -> Image.Image:
    image = image.convert("RGB")
    scale = size / max(image.size)
    if scale >= 1:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BOX)


def colour(a: Image.Image, b: Image.Image) -> dict[str, float]:
    la = rgb2lab(np.asarray(downscaled(a), dtype=np.float64) / 255.0)
    lb = rgb2lab(np.asarray(downscaled(b), dtype=np.float64) / 255.0)
    ma, mb = la.reshape(-1, 3).mean(axis=0), lb.reshape(-1, 3).mean(axis=0)
    off = mb - ma
    return dict(delta_e_mean=float(deltaE_ciede2000(la, lb).mean()),
                colour_cast_delta_e=float(deltaE_ciede2000(ma, mb)),
                lab_offset_l=float(off[0]), lab_offset_a=float(off[1]), lab_offset_b=float(off[2]))


@functools.lru_cache(maxsize=8)
def radial_frequency(shape: tuple[int, int], real: bool = True) -> np.ndarray:
    """|f| in cycles/pixel for each bin of an rfft2 (`real`) or fft2 of an image of `shape` (cached: previews of a
    run share a size; read-only)."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = (np.fft.rfftfreq if real else np.fft.fftfreq)(shape[1])[None, :]
    out = np.sqrt(fx ** 2 + fy ** 2)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=8)
def rfft_weights(shape: tuple[int, int]) -> np.ndarray:
    """How many bins of the full spectrum each rfft2 bin stands for: 2, except the columns with no mirror."""
    w = np.full((1, shape[1] // 2 + 1), 2.0, dtype=np.float32)
    w[0, 0] = 1.0
    if shape[1] % 2 == 0:
        w[0, -1] = 1.0
    w.flags.writeable = False
    return w


def error_low_freq_share(a: Image.Image, b: Image.Image) -> float:
    """Share of the squared error (Parseval) at frequencies below LOW_FREQ_CUTOFF, DC included."""
    err = np.asarray(b.convert("RGB"), np.float32) - np.asarray(a.convert("RGB"), np.float32)
    p = np.abs(scipy.fft.rfft2(err, axes=(0, 1))) ** 2 * rfft_weights(err.shape[:2])[..., None]
    low = radial_frequency(err.shape[:2]) < LOW_FREQ_CUTOFF
    total = float(p.sum(dtype=np.float64))
    return 0.0 if total == 0 else float(p[low].sum(dtype=np.float64) / total)


def hf_energy_ratio(a: Image.Image, b: Image.Image, grays: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> float:
    """Energy above HIGH_FREQ_CUTOFF of b's luminance over a's: ~1 for the same resolution; a render made at a
    lower resolution and upscaled (or a blurrier pipeline) gives well below 1, the reverse well above."""
    ga, gb = grays if grays is not None else (gray(a), gray(b))
    weight = rfft_weights(ga.shape) * (radial_frequency(ga.shape) > HIGH_FREQ_CUTOFF)
    ea, eb = (float((np.abs(scipy.fft.rfft2(g)) ** 2 * weight).sum(dtype=np.float64)) for g in (ga, gb))
    if ea == 0:
        return 1.0 if eb == 0 else float("inf")
    return eb / ea


def hints(a: Image.Image, b: Image.Image) -> Hints:
    dw, dh = b.width - a.width, b.height - a.height
    if (dw, dh) != (0, 0):
        return Hints(dw, dh, *([None] * 9))
    grays = gray(a), gray(b)  # shared by the shift and the resolution hint
    sx, sy = translation(a, b, grays)
    return Hints(dw, dh, sx, sy, **colour(a, b), error_low_freq_share=error_low_freq_share(a, b),
                 hf_energy_ratio=hf_energy_ratio(a, b, grays))
