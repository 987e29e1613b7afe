"""Every render of a run: served from memory or the on-disk cache when it was made before, else made on the one
pipeline the process holds (pipeline.load keeps at most one base model resident).

Renders of the same pipeline (model, dtype, precision) are made together (`prepare`), so a case whose two sides
need two pipelines (a quantized training base, a bf16 reference) loads each once, not once per preview. A model
that cannot be loaded or does not fit is tried once: its other previews get the same message at once.
"""

from __future__ import annotations

import time
from pathlib import Path

from PIL import Image

from .cache import open_cache
from .errors import CaseError, NotRenderable
from .identity import render_key
from .recipe import Recipe

RECENT = 16  # renders kept in memory: one preview's attribution reuses its reference and training renders
GIB = 1 << 30


class ModelUnavailable(CaseError):
    """The model cannot be loaded or does not fit; said once, then for each of its other previews, unloaded."""


class Renders:
    """The render cache of a run, and the pipeline each render needs."""

    def __init__(self, device: str, offload: str = "none", cache_dir: Path | str | None = None, **key_extra):
        self.device, self.offload, self.cache_dir = device, offload, cache_dir
        self.cache = open_cache(cache_dir)
        self.key_extra = key_extra  # what else decides pixels for this run (e.g. deterministic kernels)
        self.made = 0  # renders made by this process (cache misses)
        self.cached = 0  # served from the on-disk cache
        self.seconds = 0.0
        self.loads = 0  # pipelines loaded (or tried) by this process
        self._recent: dict[str, Image.Image] = {}
        self._kept: dict[str, Image.Image] = {}  # prepared renders waiting to be used, when there is no disk cache
        self._machine: dict[str, str] = {}  # model -> its render key (weights by content, code, machine)
        self.unavailable: dict[str, ModelUnavailable] = {}  # model -> why it cannot render here

    # -- names -------------------------------------------------------------------------------------------------
    def name(self, recipe: Recipe, model: str) -> str:
        if model not in self._machine:
            self._machine[model] = render_key(model, self.device, self.offload, self.cache_dir, **self.key_extra)
        return f"{recipe.key()}-{self._machine[model]}"

    def has(self, recipe: Recipe, model: str) -> bool:
        name = self.name(recipe, model)
        return name in self._recent or name in self._kept or (
            self.cache is not None and self.cache.image_path(name).is_file())

    # -- renders -----------------------------------------------------------------------------------------------
    def get(self, recipe: Recipe, model: str, **how) -> tuple[Image.Image, float]:
        """The render of `recipe` on `model` and the seconds it took now (0: it was made before). `how` (e.g.
        math_attention=True) renders past the caches."""
        if how:
            return self._make(recipe, model, **how)
        name = self.name(recipe, model)
        if name in self._recent:
            return self._recent[name], 0.0
        image, seconds = self._kept.pop(name, None), 0.0
        if image is None and self.cache is not None:
            image = self.cache.get_image(name)
            self.cached += image is not None
        if image is None:
            image, seconds = self._make(recipe, model)
            if self.cache is not None:
                self.cache.put_image(name, image)
        self._recent[name] = image
        while len(self._recent) > RECENT:
            self._recent.pop(next(iter(self._recent)))
        return image, seconds

    def prepare(self, jobs: list[tuple[Recipe, str]]) -> None:
        """Make the renders `jobs` will need that are not made yet, grouped by pipeline, the resident one first: each
        pipeline is loaded once for all of them. A render that fails here is left for its check to report."""
        from . import pipeline

        groups: dict[tuple, list[tuple[Recipe, str]]] = {}
        for recipe, model in jobs:
            try:
                if model in self.unavailable or self.has(recipe, model):
                    continue
                key = pipeline.load_key(recipe, model, self.device, self.offload)
            except Exception:  # noqa: BLE001 -- its check says what is wrong, with the preview's name
                continue
            if (recipe, model) not in groups.setdefault(key, []):
                groups[key].append((recipe, model))
        resident = pipeline.resident()
        for key in sorted(groups, key=lambda k: k != resident):
            for recipe, model in groups[key]:
                if model in self.unavailable:
                    break
                try:
                    image, _ = self.get(recipe, model)
                except Exception:  # noqa: BLE001 -- as above; an unavailable model is remembered
                    continue
                if self.cache is None:
                    self._kept[self.name(recipe, model)] = image

    def _make(self, recipe: Recipe, model: str, **how) -> tuple[Image.Image, float]:
        from . import render

        loaded = self.pipeline(recipe, model)
        start = time.perf_counter()
        try:
            image = render.render(loaded, recipe, **how)
        except (MemoryError, RuntimeError) as exc:
            if not out_of_memory(exc):
                raise
            raise self._give_up(model, recipe, exc) from None
        seconds = time.perf_counter() - start
        self.made += 1
        self.seconds += seconds
        return image, seconds

    def pipeline(self, recipe: Recipe, model: str):
        """The loaded pipeline `recipe` renders on; ModelUnavailable when the model does not load or fit here
        (decided once per model and run)."""
        from . import pipeline

        if model in self.unavailable:
            raise self.unavailable[model]
        fresh = pipeline.load_key(recipe, model, self.device, self.offload) != pipeline.resident()
        self.loads += fresh
        try:
            return pipeline.load_for(recipe, model, self.device, cache_dir=self.cache_dir, offload=self.offload)
        except NotRenderable:
            raise
        except (MemoryError, RuntimeError, OSError, ValueError, KeyError, CaseError) as exc:
            if fresh or out_of_memory(exc):
                raise self._give_up(model, recipe, exc) from None
            raise

    def _give_up(self, model: str, recipe: Recipe, exc: BaseException) -> ModelUnavailable:
        """Free what the failed load or render left behind and remember why the model cannot run here."""
        from . import pipeline

        pipeline.release()
        if out_of_memory(exc):
            need, free = weights_gib(model, recipe.dtype), free_gib(self.device)
            fix = ("try --parity-offload model (or group / sequential), or a GPU with more memory"
                   if self.device.startswith("cuda") else
                   "render on a GPU (--parity-device cuda), or on a machine with more memory")
            err = ModelUnavailable(model, f"out of memory on {self.device}: the model needs about {need:.1f} GiB "
                                          f"in {recipe.dtype} for its weights, {free:.1f} GiB free on "
                                          f"{self.device} ({first_line(exc)})", fix)
        elif isinstance(exc, CaseError):
            err = ModelUnavailable(exc.path or model, exc.problem, exc.fix)
        else:
            err = ModelUnavailable(model, f"cannot load the pipeline: {exc.__class__.__name__}: {first_line(exc)}",
                                   "check the model folder (a complete diffusers folder; re-download a damaged "
                                   "weight file)")
        self.unavailable[model] = err
        return err


def out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(exc).lower() or \
        "can't allocate memory" in str(exc).lower()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else exc.__class__.__name__


def weights_gib(model: str, dtype: str) -> float:
    """The model's weights in `dtype`, from its files' headers (nothing is read but the headers)."""
    from safetensors import safe_open

    from .pipeline import DTYPES
    from .preflight import locate_model

    size = DTYPES[dtype].itemsize
    try:
        folder = Path(locate_model(model))
    except CaseError:
        return float("nan")
    count = 0
    for path in folder.rglob("*.safetensors"):
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    shape = fh.get_slice(key).get_shape()
                    n = 1
                    for d in shape:
                        n *= d
                    count += n
        except Exception:  # noqa: BLE001 -- an unreadable file: the estimate leaves it out
            continue
    return count * size / GIB


def free_gib(device: str) -> float:
    """Memory free for the weights: on the GPU (torch.cuda.mem_get_info), else the machine's available memory."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.mem_get_info(torch.device(device))[0] / GIB
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return float("nan")
