"""Each hint recovers a planted cause: a shift, a colour cast, a brightness change, a down-up resize, a JPEG,
a size difference; and says nothing on identical images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

from parity import metrics as M
from parity.hints import hints

SIZE = 256


@pytest.fixture(scope="module")
def img() -> Image.Image:
    return Image.fromarray(data.astronaut()).resize((SIZE, SIZE), Image.LANCZOS)


def add(img: Image.Image, rgb) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(img).astype(int) + np.asarray(rgb), 0, 255).astype(np.uint8))


def test_identical_images_have_neutral_hints(img):
    h = hints(img, img.copy())
    assert (h.size_dw, h.size_dh, h.shift_x, h.shift_y) == (0, 0, 0.0, 0.0)
    assert h.delta_e_mean == 0 and h.colour_cast_delta_e == 0 and h.lab_offset_l == 0
    assert h.error_low_freq_share == 0 and h.hf_energy_ratio == pytest.approx(1)


@pytest.mark.parametrize("dx,dy", [(3, 0), (0, -3), (-3, 3)])
def test_translation_recovers_a_3px_shift(img, dx, dy):
    moved = Image.fromarray(np.roll(np.asarray(img), (dy, dx), axis=(0, 1)))
    h = hints(img, moved)
    assert (h.shift_x, h.shift_y) == pytest.approx((dx, dy), abs=0.1)
    assert h.colour_cast_delta_e < 0.5 and h.hf_energy_ratio == pytest.approx(1, abs=0.02)


def test_colour_cast(img):
    h = hints(img, add(img, [18, 0, -18]))  # warmer: more red, less blue
    assert h.colour_cast_delta_e > 4 and h.lab_offset_a > 2 and h.lab_offset_b > 5
    assert h.error_low_freq_share > 0.9  # a cast is a low-frequency error
    assert (h.shift_x, h.shift_y) == (0, 0)


def test_brightness_shift(img):
    h = hints(img, add(img, [-15, -15, -15]))
    assert h.lab_offset_l < -4 and abs(h.lab_offset_a) < 1 and abs(h.lab_offset_b) < 1
    assert h.error_low_freq_share > 0.9


def test_noise_is_high_frequency_and_no_cast(img):
    rng = np.random.default_rng(0)
    h = hints(img, add(img, rng.normal(0, 8, (SIZE, SIZE, 3)).round().astype(int)))
    assert h.error_low_freq_share < 0.05 and h.colour_cast_delta_e < 1
    assert h.delta_e_mean > 2 * h.colour_cast_delta_e


def test_down_up_resize_is_a_resolution_mismatch(img):
    soft = img.resize((SIZE // 2, SIZE // 2), Image.BICUBIC).resize((SIZE, SIZE), Image.BICUBIC)
    assert hints(img, soft).hf_energy_ratio < 0.3  # the regeneration lost what a 2x resize removes
    assert hints(soft, img).hf_energy_ratio > 3  # the preview did
    assert hints(img, soft).colour_cast_delta_e < 0.5


def test_jpeg_is_recognised(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=50)
    preview = Image.open(io.BytesIO(buf.getvalue()))
    result = M.compare_preview(preview, img, [])
    assert result.jpeg_settings.quality == 50 and result.jpeg_explained == 1.0
    assert result.raw.hints.error_low_freq_share < 0.2 and result.raw.hints.colour_cast_delta_e < 0.5
    # a cast on top: JPEG explains only its own part of the error, the cast stays
    cast = M.compare_preview(preview, add(img, [20, 0, 0]), [])
    assert 0.1 < cast.jpeg_explained < 0.5 and cast.raw.hints.colour_cast_delta_e > 3 and cast.jpeg.hints is None


def test_size_difference(img):
    h = hints(img, img.resize((SIZE - 32, SIZE + 16)))
    assert (h.size_dw, h.size_dh) == (-32, 16) and h.shift_x is None and h.hf_energy_ratio is None
    assert set(h.as_row()) >= {"hint_size_dw", "hint_shift_x", "hint_colour_cast_delta_e", "hint_hf_energy_ratio"}
