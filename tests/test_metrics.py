"""Perceptual distances (LPIPS, shift-tolerant LPIPS), maps, JPEG-aware comparison, registry, noise floor."""

from __future__ import annotations

import io
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data, filters

from parity import metrics as M
from parity.compare import compare, encode_like

SIZE = 128  # small pictures keep the suite fast; the metrics' own resize (long side 256) leaves them as they are


def picture(name: str) -> Image.Image:
    return Image.fromarray(getattr(data, name)()).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return picture("astronaut")


@pytest.fixture(scope="module")
def st() -> M.STLPIPS:
    return M.STLPIPS()


def noisy(img: Image.Image, sigma: float, seed: int = 0) -> Image.Image:
    arr = np.asarray(img, dtype=np.float64) + np.random.default_rng(seed).normal(0, sigma, (*img.size[::-1], 3))
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))


def blurred(img: Image.Image, sigma: float) -> Image.Image:
    out = filters.gaussian(np.asarray(img), sigma=sigma, channel_axis=2, preserve_range=True)
    return Image.fromarray(out.round().astype(np.uint8))


def shifted(img: Image.Image, dx: int) -> Image.Image:
    return Image.fromarray(np.roll(np.asarray(img), dx, axis=1))


def jpeg(img: Image.Image, quality: int, subsampling: int = 2) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    buf.seek(0)
    return Image.open(buf)


def test_stlpips_ships_all_its_weights_and_loads_offline(st):
    assert st.available, st.reason
    assert st.source.endswith("alex_shift_tolerant.pth")
    assert st.id == "stlpips-alex-shift_tolerant-vST0.0/pil-lanczos/long256"


@pytest.mark.parametrize("name", ["astronaut", "chelsea"])
def test_stlpips_is_zero_on_identical_and_grows_with_noise_and_blur(st, name):
    img = picture(name)
    assert st(img, img.copy()).value == 0.0
    by_noise = [st(img, noisy(img, s)).value for s in (2, 8, 24, 64)]
    by_blur = [st(img, blurred(img, s)).value for s in (0.5, 1, 2, 4)]
    assert by_noise == sorted(by_noise) and by_noise[0] > 0 and len(set(by_noise)) == 4
    assert by_blur == sorted(by_blur) and by_blur[0] > 0 and len(set(by_blur)) == 4


# stlpips_alex on astronaut (128x128, LANCZOS from scikit-image's 512x512) for fixed perturbations. A change here
# means the metric, its weights or its preprocessing changed: bump the metric's version, then this table.
# Note how little a 3 px shift costs next to noise or blur: the metric is shift tolerant by design.
TABLE = {  # perturbation: (kind, amount, stlpips_alex)
    "noise sigma 5": ("noise", 5, 0.00279),
    "noise sigma 20": ("noise", 20, 0.1615),
    "blur sigma 1": ("blur", 1, 0.17392),
    "blur sigma 3": ("blur", 3, 0.74709),
    "jpeg q30": ("jpeg", 30, 0.00894),
    "shift 3 px": ("shift", 3, 0.02837),
    "brightness +20": ("bright", 20, 0.00269),
}


def perturb(img: Image.Image, kind: str, amount: float) -> Image.Image:
    if kind == "noise":
        return noisy(img, amount)
    if kind == "blur":
        return blurred(img, amount)
    if kind == "jpeg":
        return jpeg(img, int(amount)).convert("RGB")
    if kind == "shift":
        return shifted(img, int(amount))
    return Image.fromarray(np.clip(np.asarray(img).astype(int) + int(amount), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("perturbation", list(TABLE))
def test_stlpips_table_of_values(st, astronaut, perturbation):
    kind, amount, expected = TABLE[perturbation]
    assert st(astronaut, perturb(astronaut, kind, amount)).value == pytest.approx(expected, abs=1e-5)


def test_value_and_map_are_the_librarys_own(st, astronaut):
    other = noisy(astronaut, 20)
    d = st(astronaut, other)
    x, y = M.to_tensor(astronaut), M.to_tensor(other)
    assert x.min() >= -1 and x.max() <= 1  # LPIPS' input range
    model = st.model
    with torch.no_grad():
        assert d.value == pytest.approx(float(model(x, y)), abs=1e-7)
        model.spatial = True
        try:
            expected_map = model(x, y)[0, 0].numpy()
        finally:
            model.spatial = False
    assert d.map.shape == (SIZE, SIZE)
    np.testing.assert_allclose(d.map, expected_map, atol=1e-6)
    # where the noise is, the map is high: noise on the left half only
    half = np.asarray(astronaut).copy()
    half[:, : SIZE // 2] = np.asarray(other)[:, : SIZE // 2]
    m = st(astronaut, Image.fromarray(half)).map
    assert m[:, : SIZE // 4].mean() > 5 * m[:, -SIZE // 4:].mean()


def test_large_images_are_measured_after_the_named_resize(st):
    big = Image.fromarray(data.astronaut())  # 512x512 -> long side 256
    d = st(big, noisy(big, 10))
    assert d.map.shape == (256, 256) and "long256" in d.metric
    assert M.resized(big.resize((512, 300)), 256).size == (256, 150)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torchvision cache, and any attempt to download fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise AssertionError("the network was tried")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return tmp_path


def alexnet_features_checkpoint(path, seed=0):
    """A file laid out as torchvision's AlexNet checkpoint (its `features.*` tensors), random but fixed."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for idx, shape in M.ALEXNET_FEATURES.items():
        fan_in = shape[1] * shape[2] * shape[3]
        state[f"features.{idx}.weight"] = torch.randn(shape, generator=g) * (2 / fan_in) ** 0.5
        state[f"features.{idx}.bias"] = torch.zeros(shape[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def test_lpips_without_its_trunk_is_unavailable_with_the_reason(offline, astronaut):
    metric = M.LPIPS(net="alex", version="0.1")
    d = metric(astronaut, noisy(astronaut, 10))
    assert d.value is None and d.map is None
    assert M.ALEXNET_FILE in d.unavailable and str(offline / "torch") in d.unavailable
    assert "--parity-lpips-weights" in d.unavailable
    assert not metric.available and metric.reason == d.unavailable


def test_lpips_with_a_missing_or_foreign_weights_file(offline, astronaut, tmp_path):
    assert "no such file" in M.LPIPS(weights=tmp_path / "nope.pth")(astronaut, astronaut).unavailable
    foreign = tmp_path / "foreign.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, foreign)
    assert "not torchvision's AlexNet" in M.LPIPS(weights=foreign)(astronaut, astronaut).unavailable


@pytest.mark.parametrize("where", ["weights option", "TORCH_HOME cache"])
def test_lpips_loads_its_trunk_from_a_file(offline, astronaut, where):
    if where == "weights option":
        path = alexnet_features_checkpoint(offline / "mine.pth")
        metric = M.build(["lpips_alex"], lpips_weights=str(path))[0]
    else:
        path = alexnet_features_checkpoint(offline / "torch" / "hub" / "checkpoints" / M.ALEXNET_FILE)
        metric = M.LPIPS()
    assert metric.available, metric.reason
    assert metric.source == str(path)
    trunk = torch.load(path, weights_only=True)
    assert torch.equal(getattr(metric.model.net.slice1, "0").weight, trunk["features.0.weight"])
    assert torch.equal(getattr(metric.model.net.slice5, "10").weight, trunk["features.10.weight"])
    assert metric(astronaut, astronaut.copy()).value == 0.0
    d = metric(astronaut, noisy(astronaut, 20))
    assert d.value > 0 and d.map.shape == (SIZE, SIZE) and d.metric.startswith("lpips-alex-v0.1")


def test_registry_builds_metrics_by_name():
    built = M.build(["stlpips_alex", "lpips_alex"], size=512)
    assert [m.name for m in built] == ["stlpips_alex", "lpips_alex"]
    assert all("long512" in m.id for m in built)
    assert [m.name for m in M.build()] == list(M.DEFAULT_METRICS)
    with pytest.raises(ValueError, match="known: lpips_alex, stlpips_alex"):
        M.build(["dists"])


@pytest.mark.parametrize("quality,subsampling", [(30, 2), (75, 2), (90, 0), (60, 1), (100, 2)])
def test_jpeg_quality_is_read_from_the_quantization_tables(astronaut, quality, subsampling):
    s = M.jpeg_settings(jpeg(astronaut, quality, subsampling))
    assert (s.quality, s.subsampling, s.source) == (quality, subsampling, "quantization tables")


def test_jpeg_from_another_encoder_falls_back_to_75(astronaut):
    buf = io.BytesIO()
    astronaut.save(buf, format="JPEG", qtables=[[7] * 64, [9] * 64])
    s = M.jpeg_settings(Image.open(io.BytesIO(buf.getvalue())))
    assert s.quality == 75 and s.source.startswith("default 75") and "another encoder" in s.source


def test_encode_jpeg_is_the_harness_encoding_at_pil_defaults(astronaut):
    s = M.JpegSettings(75, 2, "test")
    assert M.encode_jpeg(astronaut, s).tobytes() == encode_like(astronaut, "jpeg-q75").tobytes()


def test_jpeg_preview_is_judged_against_the_render_encoded_the_same_way(st, astronaut, tmp_path):
    path = tmp_path / "preview.jpg"
    astronaut.save(path, quality=40)  # the preview is exactly the render, saved as JPEG q40
    jpg = M.preview_jpeg(path)
    assert jpg.name == "jpeg-q40-s2"
    preview = Image.open(path).convert("RGB")
    result = M.compare_preview(preview, astronaut, [st], jpeg=jpg)
    assert result.judge_on == "jpeg"
    assert result.jpeg.comparison.max_abs == 0 and result.jpeg.distances["stlpips_alex"].value == 0.0
    assert result.raw.comparison.max_abs > 0 and result.raw.distances["stlpips_alex"].value > 0
    assert result.jpeg_explained == 1.0
    row = result.as_row()
    assert row["stlpips_alex"] == row["stlpips_alex_jpeg"] == 0.0 and row["stlpips_alex_raw"] > 0
    assert row["judge_on"] == "jpeg" and row["jpeg_settings_source"] == "quantization tables"


def test_png_preview_is_judged_raw(st, astronaut, tmp_path):
    path = tmp_path / "preview.png"
    astronaut.save(path)
    assert M.preview_jpeg(path) is None
    result = M.compare_preview(Image.open(path), noisy(astronaut, 5), [st, M.LPIPS(weights=tmp_path / "none")])
    row = result.as_row()
    assert result.judge_on == "raw" and row["stlpips_alex"] == row["stlpips_alex_raw"] > 0
    assert row["stlpips_alex_jpeg"] is None and row["hint_jpeg_explained"] is None
    assert row["lpips_alex"] is None and "no such file" in row["lpips_alex_unavailable"]


def test_maps_for_the_report(st, astronaut):
    other = noisy(astronaut, 10)
    out = M.maps(astronaut, other, M.measure(astronaut, other, [st]))
    assert set(out) == {"diff", "ssim", "stlpips_alex"}
    assert all(im.size == astronaut.size for im in out.values())
    assert out["ssim"].mode == "L" and out["stlpips_alex"].mode == "RGB"


def test_noise_floor_is_the_worst_pair_per_metric(st, astronaut):
    same = M.noise_floor(astronaut, astronaut.copy(), [st])
    assert same.values["ssim"] == 1.0 and same.values["stlpips_alex"] == 0.0 and same.values["max_abs"] == 0
    slight, more = noisy(astronaut, 1, seed=1), noisy(astronaut, 3, seed=2)
    floor = M.noise_floor(astronaut, slight, [st], others={"cuda/bfloat16": more})
    assert floor.pairs == ["repeat", "cuda/bfloat16"]
    assert floor.values["ssim"] == compare(astronaut, more).ssim < compare(astronaut, slight).ssim
    assert floor.values["stlpips_alex"] == pytest.approx(st(astronaut, more).value)
    assert floor.within("ssim", 0.999) and not floor.within("ssim", floor.values["ssim"] - 0.01)
    assert floor.within("stlpips_alex", 0.0) and not floor.within("stlpips_alex", 1.0)
