"""Perceptual distances, spatial maps, JPEG-aware comparison of a preview, and the noise floor.

Metrics are small objects with explicit settings and a version in their id (as `lpips.LPIPS(net=..., version=...)`):

- `lpips_alex`: LPIPS v0.1, AlexNet trunk (the `lpips` package). Its linear layers ship with `lpips`; the AlexNet
  trunk is torchvision's ImageNet checkpoint, read only from a file: `weights=PATH` (`--parity-lpips-weights`) or
  torchvision's download cache (`$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth`). It never downloads:
  without the file the metric is *unavailable*, with the reason, never a number and never replaced.
- `stlpips_alex`: shift-tolerant LPIPS (`stlpips-pytorch`, Ghildyal & Liu 2022), AlexNet `shift_tolerant`
  variant. Its wheel ships every weight (trunk and linear layers), so it works offline.

Both see the images scaled to [-1, 1], after a named resize (`pil-lanczos/long<size>`) that keeps them fast on a
CPU; `size=None` measures at full resolution. A distance comes with its spatial map (per-layer maps of the same
forward pass, upsampled and summed as `spatial=True` does), so value and map always agree.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, JpegImagePlugin

from . import compare as cmp
from .hints import Hints, hints

DEFAULT_JPEG_QUALITY = 75  # ai-toolkit saves previews with PIL's default quality
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision AlexNet_Weights.IMAGENET1K_V1, as its cache names it
ALEXNET_FEATURES = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3),
                    10: (256, 256, 3, 3)}  # torchvision alexnet.features index -> conv weight shape


class MetricUnavailable(Exception):
    """The metric cannot be computed on this machine; the message says why and how to fix it."""


@dataclass(frozen=True)
class Distance:
    """One perceptual distance: a value and its map, or the reason it is unavailable."""

    metric: str  # the metric's versioned id
    value: float | None
    map: np.ndarray | None = field(default=None, repr=False, compare=False)  # HxW at the evaluated size
    unavailable: str | None = None


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB 0-255 -> 1x3xHxW float32 in [-1, 1], the range LPIPS expects (its `normalize=False`)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1.0


def resized(image: Image.Image, size: int | None) -> Image.Image:
    """The named resize `pil-lanczos/long<size>`: long side to `size`, aspect kept; never upscales."""
    image = image.convert("RGB")
    if size is None or max(image.size) <= size:
        return image
    scale = size / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)


class PerceptualDistance:
    """Base of the LPIPS-style metrics: lazy model, per-layer maps captured from the library's own forward.

    A metric is named `<family>_<net>` (`lpips_alex`) and versioned by its id,
    `<family>-<net>-<weights>/<resize>`; a subclass gives its family, its weights' tag, the network (`load`) and
    the library module whose `upsample` turns a layer's map to the input size (`library`)."""

    family: str = ""  # lpips, stlpips

    def __init__(self, size: int | None, device: str = "cpu", net: str = "alex", weights_tag: str = ""):
        self.size, self.net, self.weights_tag = size, net, weights_tag
        self.name = f"{self.family}_{net}"
        self.device = device or "cpu"  # where the network runs (the render device: a GPU makes it ~free)
        self._model: torch.nn.Module | None = None
        self._reason: str | None = None
        self.source: str | None = None  # where the weights came from

    @property
    def id(self) -> str:
        return f"{self.family}-{self.net}-{self.weights_tag}/pil-lanczos/long{self.size or 'full'}"

    def load(self) -> torch.nn.Module:
        raise NotImplementedError

    @staticmethod
    def library():
        raise NotImplementedError

    def upsample(self, t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return self.library().upsample(t, out_HW=hw)

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None and self._reason is None:
            try:
                self._model = self.load().to(self.device)
            except MetricUnavailable as exc:
                self._reason = str(exc)
        if self._model is None:
            raise MetricUnavailable(self._reason)
        return self._model

    @property
    def available(self) -> bool:
        try:
            self.model
        except MetricUnavailable:
            return False
        return True

    @property
    def reason(self) -> str | None:
        return None if self.available else self._reason

    def __call__(self, a: Image.Image, b: Image.Image) -> Distance:
        try:
            model = self.model
        except MetricUnavailable as exc:
            return Distance(self.id, None, None, str(exc))
        if a.size != b.size:
            return Distance(self.id, None, None, f"size mismatch: {a.size} vs {b.size}")
        x, y = (to_tensor(resized(im, self.size)).to(self.device) for im in (a, b))
        layers: list[torch.Tensor] = []
        hooks = [lin.register_forward_hook(lambda m, i, o: layers.append(o)) for lin in model.lins]
        try:
            with torch.no_grad():
                value = float(model(x, y).flatten()[0])
        finally:
            for h in hooks:
                h.remove()
        # the maps `spatial=True` would return: each layer's map upsampled to the input size, summed
        spatial = sum(self.upsample(t, tuple(x.shape[2:])) for t in layers)
        return Distance(self.id, value, spatial[0, 0].cpu().numpy().astype(np.float64))


def alexnet_checkpoint(weights: str | Path | None) -> Path:
    """The AlexNet ImageNet checkpoint file: the given path, else torchvision's cache; never the network."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise MetricUnavailable(f"lpips weights {path}: no such file (--parity-lpips-weights)")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
    if not path.is_file():
        raise MetricUnavailable(
            f"torchvision's AlexNet ImageNet weights are not in the download cache ({path}) and are never "
            f"downloaded here: copy {ALEXNET_FILE} there (TORCH_HOME picks the cache) or pass "
            f"--parity-lpips-weights PATH")
    return path


class LPIPS(PerceptualDistance):
    """LPIPS (Zhang et al. 2018) from the `lpips` package; `net='alex'`, `version='0.1'`."""

    family = "lpips"

    def __init__(self, net: str = "alex", version: str = "0.1", size: int | None = 256,
                 weights: str | Path | None = None, device: str = "cpu"):
        if net != "alex":
            raise ValueError(f"LPIPS net {net!r}: only 'alex' is supported (its trunk is read from a file)")
        super().__init__(size, device, net, f"v{version}")
        self.version, self.weights = version, weights

    @staticmethod
    def library():
        import lpips

        return lpips

    def load(self) -> torch.nn.Module:
        try:
            import lpips
        except ImportError:
            raise MetricUnavailable("the lpips package is not installed: pip install lpips==0.1.4")
        path = alexnet_checkpoint(self.weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation notes for `pretrained=`
            # pnet_rand: the trunk is built without weights (lpips would otherwise download them); loaded below
            model = lpips.LPIPS(net=self.net, version=self.version, pretrained=False, pnet_rand=True, verbose=False)
        lins = Path(lpips.__file__).parent / "weights" / f"v{self.version}" / f"{self.net}.pth"
        state = torch.load(lins, map_location="cpu", weights_only=True)
        missing = model.load_state_dict(state, strict=False).missing_keys
        if any(k.startswith("lin") and not k.startswith("lins.") for k in missing):
            raise MetricUnavailable(f"{lins}: linear layers missing ({missing})")
        try:
            trunk = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: say which
            raise MetricUnavailable(f"{path}: not a readable torch checkpoint ({exc.__class__.__name__}: {exc})")
        own = model.net.state_dict()  # keys slice<k>.<features index>.<weight|bias>
        mapped = {}
        for key, tensor in own.items():
            _, idx, kind = key.split(".")
            src = trunk.get(f"features.{idx}.{kind}") if isinstance(trunk, dict) else None
            if src is None or tuple(src.shape) != tuple(tensor.shape):
                raise MetricUnavailable(f"{path} is not torchvision's AlexNet checkpoint: features.{idx}.{kind} "
                                        f"missing or of another shape")
            mapped[key] = src
        model.net.load_state_dict(mapped, strict=True)
        self.source = str(path)
        return model.eval()


@contextlib.contextmanager
def undeclared_imports(*modules: tuple[str, str]):
    """stlpips-pytorch 0.0.2 imports `IPython.embed` and `torchsummary.summary` at module level without declaring
    either; neither is called by the metric (only under `__main__`). Where one is not installed, a stand-in
    module holding that one name is present during the import only."""
    added = []
    for name, attr in modules:
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            stub = types.ModuleType(name)
            setattr(stub, attr, None)
            sys.modules[name] = stub
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


class STLPIPS(PerceptualDistance):
    """Shift-tolerant LPIPS (`stlpips-pytorch`), AlexNet `shift_tolerant` variant, weights version ST0.0."""

    family = "stlpips"

    def __init__(self, net: str = "alex", variant: str = "shift_tolerant", size: int | None = 256,
                 device: str = "cpu"):
        if (net, variant) != ("alex", "shift_tolerant"):
            raise ValueError("STLPIPS: only net='alex', variant='shift_tolerant' is supported")
        super().__init__(size, device, net, f"{variant}-vST0.0")
        self.variant = variant

    @staticmethod
    def library():
        from stlpips_pytorch import stlpips

        return stlpips

    def load(self) -> torch.nn.Module:
        if importlib.util.find_spec("stlpips_pytorch") is None:
            raise MetricUnavailable("stlpips-pytorch is not installed: pip install 'preview-parity[stlpips]'")
        with undeclared_imports(("IPython", "embed"), ("torchsummary", "summary")):
            from stlpips_pytorch import stlpips
        # pretrained=False and the load below: the package loads with strict=False, which would hide a gap
        model = stlpips.LPIPS(net=self.net, variant=self.variant, pretrained=False, verbose=False)
        path = Path(stlpips.__file__).parent / "weights" / "vST0.0" / f"{self.net}_{self.variant}.pth"
        if not path.is_file():
            raise MetricUnavailable(f"stlpips-pytorch ships no {path.name}")
        result = model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=False)
        gaps = [k for k in result.missing_keys if not k.startswith("lins.")]  # lins.N aliases linN
        if gaps or result.unexpected_keys:
            raise MetricUnavailable(f"{path}: does not cover the network (missing {gaps}, "
                                    f"unexpected {result.unexpected_keys})")
        self.source = str(path)
        return model.eval()


# The registry: config names -> factories; every factory takes the same keyword options.
REGISTRY: dict[str, Callable[..., PerceptualDistance]] = {
    "lpips_alex": lambda size=256, lpips_weights=None, device="cpu": LPIPS("alex", "0.1", size=size,
                                                                          weights=lpips_weights, device=device),
    "stlpips_alex": lambda size=256, lpips_weights=None, device="cpu": STLPIPS("alex", "shift_tolerant", size=size,
                                                                              device=device),
}
DEFAULT_METRICS = ("lpips_alex", "stlpips_alex")


def build(names: Iterable[str] = DEFAULT_METRICS, **options) -> list[PerceptualDistance]:
    """The metrics named in config, in order; an unknown name is an error that lists the known ones."""
    out = []
    for name in names:
        if name not in REGISTRY:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(sorted(REGISTRY))}")
        out.append(REGISTRY[name](**options))
    return out


@dataclass(frozen=True)
class Measurement:
    """Everything measured between two images."""

    comparison: cmp.Comparison
    distances: dict[str, Distance]  # by metric name
    hints: Hints | None  # measured on the raw pair only: causes read on what the pipeline made

    def as_row(self, suffix: str = "") -> dict[str, object]:
        row = self.comparison.as_row(suffix)
        for name, d in self.distances.items():
            row[f"{name}{suffix}"] = d.value
        return row


def measure(a: Image.Image, b: Image.Image, metrics: Sequence[PerceptualDistance],
            with_hints: bool = True, device: str | None = None) -> Measurement:
    """`device`: where SSIM runs (the perceptual distances run where they were built)."""
    return Measurement(cmp.compare(a, b, device=device), {m.name: m(a, b) for m in metrics},
                       hints(a, b) if with_hints else None)


def heat(values: np.ndarray, size: tuple[int, int], top: float | None = None) -> Image.Image:
    """A map as a black-to-red-to-yellow image (the colours of `compare.diff_heatmap`), resized to `size`."""
    t = np.clip(values / (top or max(float(values.max()), 1e-12)), 0, 1)
    rgb = np.stack([np.clip(t * 2, 0, 1), np.clip(t * 2 - 1, 0, 1), np.zeros_like(t)], axis=2)
    return Image.fromarray((rgb * 255).round().astype(np.uint8)).resize(size, Image.BILINEAR)


def maps(a: Image.Image, b: Image.Image, measurement: Measurement | None = None) -> dict[str, Image.Image]:
    """Spatial maps for the report: `diff`, `ssim` (compare.py's), and one per available perceptual distance."""
    full = measurement.comparison.ssim_full if measurement else None
    out = {"diff": cmp.diff_heatmap(a, b), "ssim": cmp.ssim_heatmap(a, b, full)} if a.size == b.size else {}
    for name, d in (measurement.distances.items() if measurement else ()):
        if d.map is not None:
            out[name] = heat(d.map, a.size)
    return out


# JPEG-aware comparison ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JpegSettings:
    quality: int
    subsampling: int  # PIL's code: 0 4:4:4, 1 4:2:2, 2 4:2:0
    source: str  # "quantization tables" (an exact match) or why the default was used

    @property
    def name(self) -> str:
        return f"jpeg-q{self.quality}-s{self.subsampling}"


_TABLES: dict[int, dict[tuple, int]] = {}


def pil_tables(subsampling: int) -> dict[tuple, int]:
    """Quantization tables PIL writes for each quality 1-100 at this subsampling -> that quality."""
    if subsampling not in _TABLES:
        probe, table = Image.new("RGB", (16, 16), (128, 64, 32)), {}
        for q in range(1, 101):
            buf = io.BytesIO()
            probe.save(buf, format="JPEG", quality=q, subsampling=subsampling)
            with Image.open(buf) as im:
                table.setdefault(tuple(tuple(t) for _, t in sorted(im.quantization.items())), q)
        _TABLES[subsampling] = table
    return _TABLES[subsampling]


def jpeg_settings(preview: Image.Image) -> JpegSettings:
    """Quality and subsampling a JPEG was saved with, read from its quantization tables; else quality 75."""
    sub = JpegImagePlugin.get_sampling(preview)
    sub = 2 if sub not in (0, 1, 2) else sub
    tables = getattr(preview, "quantization", None) or {}
    key = tuple(tuple(t) for _, t in sorted(tables.items()))
    q = pil_tables(sub).get(key)
    if q is not None:
        return JpegSettings(q, sub, "quantization tables")
    why = "no quantization tables" if not tables else "tables match no PIL quality (another encoder)"
    return JpegSettings(DEFAULT_JPEG_QUALITY, sub, f"default {DEFAULT_JPEG_QUALITY}: {why}")


def encode_jpeg(image: Image.Image, settings: JpegSettings) -> Image.Image:
    """The image saved as the preview was (PIL JPEG, same quality and subsampling), decoded again."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=settings.quality, subsampling=settings.subsampling)
    buf.seek(0)
    with Image.open(buf) as im:
        return im.convert("RGB")


@dataclass(frozen=True)
class PreviewComparison:
    """A preview against a regeneration: raw, and for a JPEG preview also against the regeneration encoded as the
    preview was (`_jpeg`). `judge_on` names the fair one: a JPEG preview carries compression error that no
    pipeline reproduces raw, so it is judged on `jpeg`; anything else on `raw`."""

    raw: Measurement
    jpeg: Measurement | None
    jpeg_settings: JpegSettings | None
    jpeg_explained: float | None  # share of the raw squared error that the JPEG encoding accounts for

    @property
    def judge_on(self) -> str:
        return "jpeg" if self.jpeg is not None else "raw"

    @property
    def judged(self) -> Measurement:
        return self.jpeg if self.jpeg is not None else self.raw

    def as_row(self) -> dict[str, object]:
        row: dict[str, object] = {}
        for name, d in self.raw.distances.items():
            row[name] = self.judged.distances[name].value
            row[f"{name}_raw"] = d.value
            row[f"{name}_jpeg"] = self.jpeg.distances[name].value if self.jpeg else None
            row[f"{name}_id"] = d.metric
            row[f"{name}_unavailable"] = d.unavailable or ""
        row.update(self.raw.hints.as_row())
        row["hint_jpeg_explained"] = self.jpeg_explained
        row["judge_on"] = self.judge_on
        row["jpeg_settings"] = self.jpeg_settings.name if self.jpeg_settings else ""
        row["jpeg_settings_source"] = self.jpeg_settings.source if self.jpeg_settings else ""
        return row


def preview_jpeg(path: str | Path) -> JpegSettings | None:
    """How a preview file was JPEG-encoded, or None when it is not a JPEG (read from the file: the tables are
    lost once the image is converted)."""
    with Image.open(path) as im:
        return jpeg_settings(im) if im.format == "JPEG" else None


def compare_preview(preview: Image.Image, render: Image.Image, metrics: Sequence[PerceptualDistance],
                    jpeg: JpegSettings | None = None, device: str | None = None) -> PreviewComparison:
    """`preview` against the regeneration `render`; `jpeg`: how the preview was encoded (`preview_jpeg`), or
    None for a lossless preview. A preview opened from a JPEG file and not converted is detected by itself."""
    if jpeg is None and preview.format == "JPEG":
        jpeg = jpeg_settings(preview)
    raw = measure(preview, render, metrics, device=device)
    if jpeg is None or preview.size != render.size:
        return PreviewComparison(raw, None, jpeg, None)
    encoded = encode_jpeg(render, jpeg)
    judged = measure(preview, encoded, metrics, with_hints=False, device=device)
    mse_raw, mse_jpeg = raw.comparison.mse, judged.comparison.mse
    explained = None if mse_raw == 0 else 1.0 - mse_jpeg / mse_raw
    return PreviewComparison(raw, judged, jpeg, explained)


# Noise floor --------------------------------------------------------------------------------------------------

HIGHER_IS_CLOSER = {"ssim", "psnr"}


def scalars(m: Measurement) -> dict[str, float]:
    c = m.comparison
    out = {"ssim": c.ssim, "psnr": c.psnr, "mean_abs": c.mean_abs, "max_abs": c.max_abs}
    out.update({name: d.value for name, d in m.distances.items()})
    return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class NoiseFloor:
    """Per metric, the worst value seen between renders that should be the same image: the floor a verdict
    tolerance is measured against (a tolerance tighter than it fails on noise alone)."""

    values: dict[str, float]
    pairs: list[str]

    def within(self, metric: str, value: float) -> bool:
        floor = self.values[metric]
        return value >= floor if metric in HIGHER_IS_CLOSER else value <= floor


def noise_floor(render: Image.Image, again: Image.Image, metrics: Sequence[PerceptualDistance],
                others: dict[str, Image.Image] | None = None) -> NoiseFloor:
    """`render` and `again`: the same recipe rendered twice; `others`: the same recipe on another device or
    dtype, by label (e.g. {"cuda/bfloat16": img}). Each is measured against `render`; per metric the worst wins
    (lowest SSIM/PSNR, highest distance)."""
    pairs = {"repeat": again, **(others or {})}
    values: dict[str, float] = {}
    for label, other in pairs.items():
        for k, v in scalars(measure(render, other, metrics, with_hints=False)).items():
            worst = min if k in HIGHER_IS_CLOSER else max
            values[k] = worst(values[k], v) if k in values else v
    return NoiseFloor(values, list(pairs))
