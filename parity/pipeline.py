"""Load a Qwen-Image pipeline once per (model, device, dtype) and apply LoRAs three ways.

The pipeline is the stock Diffusers class the model renders with (`models.Model.pipeline`, e.g.
`QwenImageEditPlusPipeline`), loaded with `from_pretrained` from a hub id or a local folder (offline). LoRA
checkpoints are swapped on the loaded base, never by reloading it.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CaseError, NotRenderable
from .kernels import bf16_conv_mode
from .precision import Precision
from .precision import apply as apply_precision
from .preflight import LORA_PREFIX, locate_model
from .forms import LORA_FUSED, LORA_MERGED_FP8, LORA_MERGED_FP32, LORA_PEFT, LORA_RUNTIME_FP32, QTYPE_FP8

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


def dtype_name(dtype: str) -> str:
    return str(DTYPES[dtype]).removeprefix("torch.")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_pipeline() -> str:
    """The pipeline class when none is named: that of the model a config without `model.arch` trained
    (models.identify's default, Qwen-Image-Edit-2509)."""
    from .models import identify

    return identify("", None, "", None).pipeline


class LoadedModel:
    """A pipeline on one device in one dtype, plus the LoRA state applied to its transformer."""

    def __init__(self, model: str, device: str, dtype: str, precision: Precision | None = None, disk_cache=None,
                 pipeline: str | None = None, offload: str = "none"):
        import diffusers

        self.model = model
        self.pipeline = pipeline or default_pipeline()  # the stock Diffusers class (models.Model.pipeline)
        self.device = device
        self.dtype = DTYPES[dtype]
        # The folder, or the hub id's snapshot in the local cache (no network); an uncached id that the hub
        # answers for is downloaded here, with Hugging Face's progress bars. Fails in seconds when unreachable.
        source = locate_model(model)
        try:
            self.pipe = getattr(diffusers, self.pipeline).from_pretrained(
                source, torch_dtype=self.dtype, local_files_only=Path(source).is_dir())
        except OSError as exc:
            raise CaseError(model, f"cannot load the pipeline: {exc}",
                            "give `model:` in parity.yaml as a local diffusers folder, or make the hub id "
                            "reachable (HF_HOME cache or network)") from None
        if offload == "none":
            self.pipe.to(device)
        self._state(offload, disk_cache, precision)
        if precision is not None:
            start = time.perf_counter()
            self.quantized = apply_precision(self.pipe, precision, disk_cache, self.identity(machine=False))
            self.quantize_seconds = time.perf_counter() - start
        if offload != "none":  # after quantizing: the quantized weights are the ones kept in CPU memory
            enable_offload(self.pipe, offload, device)

    def _state(self, offload: str, disk_cache, precision: Precision | None) -> None:
        self.offload = offload
        self.pipe.set_progress_bar_config(disable=True)
        self._adapter: tuple[str, str] | None = None  # (lora file, adapter name) loaded through PEFT
        self.latent_cache: dict[tuple, torch.Tensor] = {}  # control-image VAE latents (render.control_latents)
        self.prompt_cache: dict[str, tuple] = {}  # prompt embeddings and masks (render.encode_prompt)
        self.disk_cache = disk_cache  # cache.DiskCache shared across processes and runs
        self.conv_mode = bf16_conv_mode(self.device)  # kernels.py: bf16 convolutions on a CPU without native bf16
        # The quantized base of a training recipe (precision.py), applied once: its ARA hooks come before any LoRA.
        self.precision = precision
        self.quantized: dict[str, int] = {}
        self.quantize_seconds = 0.0  # applying the precision (quantizing, or reading the cached quantized weights)

    @classmethod
    def wrap(cls, pipe, name: str, device: str, dtype: str, offload: str = "none") -> "LoadedModel":
        """A pipeline built in memory (scripts/real_size.py: real-size networks with random weights), already on
        `device` or offloaded as `offload` says, for the renderer."""
        self = cls.__new__(cls)
        self.model, self.pipeline, self.device, self.dtype, self.pipe = name, type(pipe).__name__, device, \
            DTYPES[dtype], pipe
        self._state(offload, None, None)
        return self

    def identity(self, machine: bool = True) -> dict:
        """What decides this model's outputs besides the inputs, for on-disk cache keys: the weights by content,
        dtype and libraries, and (`machine`) the device, offload mode, thread count and CPU kind that change bits.
        Quantized weights leave the machine out (quantizing is elementwise: the same bits on every machine)."""
        from .identity import libraries, model_identity
        from .identity import machine as machine_of

        if getattr(self, "_weights", None) is None:  # once: the files do not change under a loaded pipeline
            try:
                cache_dir = self.disk_cache.folder if self.disk_cache is not None else None
                self._weights = model_identity(self.model, cache_dir)
            except CaseError:  # a pipeline built in memory (LoadedModel.wrap): nothing outlives the process
                self._weights = {"in_memory": self.model}
        out = {"model": self._weights, "dtype": str(self.dtype), "libraries": libraries()}
        if machine:
            out.update(machine=machine_of(self.device, self.offload), conv=self.conv_mode)
        return out

    def weights_changed(self) -> bool:
        from .identity import model_identity

        if getattr(self, "_weights", None) is None or "in_memory" in self._weights:
            return False
        return model_identity(self.model, self.disk_cache.folder if self.disk_cache is not None else None) != \
            self._weights

    @property
    def transformer(self):
        return self.pipe.transformer

    @contextlib.contextmanager
    def lora(self, path: str | None, multiplier: float, how: str):
        """Apply a LoRA for the duration of one render, as `how` says, and undo it afterwards."""
        if path is None:
            self._peft_off()
            yield
            return
        if self.offload == "sequential" and how in (LORA_MERGED_FP32, LORA_FUSED, LORA_MERGED_FP8):
            raise NotRenderable(f"a {how} LoRA with sequential offload (the weights wait on the meta device and each "
                                f"layer's forward belongs to accelerate): use --parity-offload model or group")
        if how == LORA_PEFT and self.precision is None:
            self._peft_on(path, multiplier)
            yield
            return
        self._peft_off()
        state = read_lora(path, self.transformer)
        if how == LORA_PEFT:  # PEFT cannot load into optimum-quanto layers: its forward, as hooks
            with peft_like_lora(self.transformer, state, multiplier):
                yield
        elif how == LORA_MERGED_FP8 and self.precision is not None and self.precision.fp8_transformer:
            with fp8_merged_lora(self.transformer, state, multiplier, self.device):
                yield
        elif how == LORA_MERGED_FP8 and self.precision is not None and self.precision.aitk_quantized:
            raise NotRenderable(f"a {how} LoRA on ai-toolkit's quantized base (ComfyUI merges into fp8 weights "
                                f"`transformer:{QTYPE_FP8}` or plain ones)")
        elif how == LORA_MERGED_FP8:  # on plain weights ComfyUI's merge rounds to their own dtype: merged/fp32
            with merged_lora(self.transformer, state, multiplier):
                yield
        elif how == LORA_MERGED_FP32 and self.precision is not None and self.precision.aitk_quantized:
            raise NotRenderable("a LoRA merged into a quantized base (ai-toolkit never merges on one)")
        elif how == LORA_RUNTIME_FP32:
            with runtime_lora(self.transformer, state, multiplier):
                yield
        elif how == LORA_MERGED_FP32:
            with merged_lora(self.transformer, state, multiplier):
                yield
        elif how == LORA_FUSED:
            with fused_lora(self.transformer, state, multiplier):
                yield
        else:
            raise ValueError(f"unknown LoRA application {how!r}")

    def _peft_on(self, path: str, multiplier: float) -> None:
        from diffusers.utils.peft_utils import set_weights_and_activate_adapters

        if self._adapter is None or self._adapter[0] != path:
            if self._adapter is not None:
                self.pipe.delete_adapters(self._adapter[1])
            name = "lora_" + hashlib.sha1(path.encode()).hexdigest()[:10]
            check_lora_keys(path, self.transformer)
            p = Path(path)
            self.pipe.load_lora_weights(str(p.parent), weight_name=p.name, adapter_name=name,
                                        local_files_only=True)
            self._adapter = (path, name)
        self.pipe.enable_lora()
        # What the inference server does for a scale other than 1 (set_weights_and_activate_adapters).
        set_weights_and_activate_adapters(self.transformer, [self._adapter[1]], [multiplier])

    def _peft_off(self) -> None:
        if self._adapter is not None:
            self.pipe.disable_lora()


OFFLOADS = ("none", "model", "sequential", "group")


def enable_offload(pipe, how: str, device: str) -> None:
    """Diffusers' own offloading: the weights live in CPU memory and move to `device` as they are needed.

    model: each component moves whole when it runs (enable_model_cpu_offload), the server's choice for 24-48 GB;
    sequential: each layer moves when it runs (enable_sequential_cpu_offload), the least memory and the slowest;
    group: one transformer block (and the text encoder's and VAE's blocks) at a time (enable_group_offload)."""
    if how == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif how == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif how == "group":
        pipe.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                  offload_type="block_level", num_blocks_per_group=1)
    else:
        raise ValueError(f"unknown offload {how!r} (one of {', '.join(OFFLOADS)})")


class OnDevice:
    """A LoRA factor moved to the device its input is on, once per device: with offloading the layer's weights
    are elsewhere when the hook is made."""

    def __init__(self, tensor: torch.Tensor):
        self.copies = {tensor.device: tensor}

    def to(self, device: torch.device) -> torch.Tensor:
        if device not in self.copies:
            self.copies[device] = next(iter(self.copies.values())).to(device)
        return self.copies[device]


def linear_layers(transformer) -> dict[str, torch.nn.Linear]:
    """Module name -> the plain Linear (inside a PEFT wrapper when an adapter is loaded)."""
    out = {}
    for name, module in transformer.named_modules():
        base = getattr(module, "base_layer", module)
        if isinstance(base, torch.nn.Linear) and ".base_layer" not in name and not name.endswith("base_layer"):
            out[name] = base
    return out


def check_lora_keys(path: str, transformer) -> None:
    """Every key must be ai-toolkit's `diffusion_model.<module>.lora_A|lora_B.weight` for a Linear here, with
    shapes that fit it (the preflight makes the same check from the model's file headers, before loading)."""
    from .preflight import check_lora, joined

    problems = check_lora(path, {n: tuple(m.weight.shape) for n, m in linear_layers(transformer).items()})
    if problems:
        raise CaseError(None, joined(problems))


def read_lora(path: str, transformer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (A, B) as stored (no alpha: ai-toolkit saves alpha = rank, so the scale is 1)."""
    check_lora_keys(path, transformer)
    out: dict[str, list] = {}
    with safe_open(path, framework="pt") as fh:
        for key in fh.keys():
            name, _, kind = key.removeprefix(LORA_PREFIX).rpartition(".lora_")
            out.setdefault(name, [None, None])[0 if kind == "A.weight" else 1] = fh.get_tensor(key)
    return {k: (a, b) for k, (a, b) in out.items()}


@contextlib.contextmanager
def output_hooks(transformer, state, make_hook):
    """While the block runs, each Linear the LoRA state names has its output passed through the forward hook
    `make_hook(layer, lora_A, lora_B)` returns."""
    modules = linear_layers(transformer)
    handles = [modules[name].register_forward_hook(make_hook(modules[name], a, b)) for name, (a, b) in state.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def runtime_lora(transformer, state, multiplier: float):
    """ai-toolkit's LoRAModule: the base layer's output plus the LoRA path computed in fp32 at run time."""

    def make_hook(layer, a, b):
        down, up = OnDevice(a.to(torch.float32)), OnDevice(b.to(torch.float32))

        def hook(module, args, output):
            # network_mixins.forward: lora_up(lora_down(x.float())) * scale(=1) * multiplier, cast, then added
            x = args[0]
            lx = torch.nn.functional.linear(torch.nn.functional.linear(x.to(torch.float32), down.to(x.device)),
                                            up.to(x.device))
            return output + (lx * torch.tensor([multiplier], dtype=torch.float32, device=lx.device)).to(output.dtype)

        return hook

    return output_hooks(transformer, state, make_hook)


def peft_like_lora(transformer, state, multiplier: float):
    """What a PEFT LoRA adapter computes (peft's lora.Linear.forward, at the scale the server sets): the factors in
    the layer's dtype, the input cast to it, base output + B(A(x)) * multiplier (alpha = rank), back in the output
    dtype. For a base PEFT cannot load into (optimum-quanto layers); equal to PEFT itself on a plain base (tested)."""

    def make_hook(layer, a, b):
        dtype = layer.weight.dtype
        down, up = OnDevice(a.to(dtype)), OnDevice(b.to(dtype))
        rank = a.shape[0]
        scaling = multiplier * rank / rank  # set_scale: scale * lora_alpha / r, and ai-toolkit's alpha is the rank

        def hook(module, args, output):
            x = args[0]
            lx = torch.nn.functional.linear(torch.nn.functional.linear(x.to(dtype), down.to(x.device)),
                                            up.to(x.device))
            return (output + lx * scaling).to(output.dtype)

        return hook

    return output_hooks(transformer, state, make_hook)


@contextlib.contextmanager
def weight_lora(transformer, state, weight_for, factor_dtype: torch.dtype | None = None):
    """Each Linear the LoRA state names runs on the weight `weight_for(W, lora_A, lora_B)` makes at every forward
    (factors on W's device, in `factor_dtype`, else W's dtype), one layer at a time: the base is never changed (so nothing has to be undone, and
    an undo by subtraction would not be exact) and no second copy of the model is held, resident or offloaded."""
    from optimum.quanto import QTensor

    modules = linear_layers(transformer)
    layers = []
    for name, (a, b) in state.items():
        layer = modules[name]
        dtype = factor_dtype or layer.weight.dtype
        down, up = OnDevice(a.to(dtype)), OnDevice(b.to(dtype))

        def forward(x, layer=layer, down=down, up=up):
            w = layer.weight.dequantize() if isinstance(layer.weight, QTensor) else layer.weight
            return torch.nn.functional.linear(x, weight_for(w, down.to(w.device), up.to(w.device)), layer.bias)

        layer.forward = forward  # shadows the class's forward on this instance only
        layers.append(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def fused_lora(transformer, state, multiplier: float):
    """The reference server's fuse_lora (2511, 2512): W + delta in the base dtype, delta as PEFT's merge computes it
    (B @ A * multiplier, alpha = rank; in fp32 and then rounded to the base dtype on a CPU in bf16/fp16, in the base
    dtype elsewhere), the sum rounded once as its in-place add rounds it. On a quantized base (only as
    attribution's counterfactual) the dequantized weight stands for W."""

    def weight_for(w, down, up):
        on_cpu_half = w.device.type == "cpu" and w.dtype in (torch.float16, torch.bfloat16)
        delta = (up.float() @ down.float() * multiplier).to(w.dtype) if on_cpu_half else up @ down * multiplier
        return w + delta

    return weight_lora(transformer, state, weight_for)


def merged_lora(transformer, state, multiplier: float):
    """ai-toolkit's merge_in: W + multiplier * B @ A computed in fp32 and rounded to the base dtype: the very weight
    its in-place merge stores, made per forward (tested equal to merging in place)."""

    def weight_for(w, down, up):
        return (w.to(torch.float32) + multiplier * (up @ down)).to(w.dtype)

    return weight_lora(transformer, state, weight_for, factor_dtype=torch.float32)


@contextlib.contextmanager
def fp8_merged_lora(transformer, state, multiplier: float, device: str | torch.device):
    """ComfyUI's LoRA on its fp8 diffusion model (forms.LORA_MERGED_FP8): each Linear the LoRA names runs on
    fp8.merge_lora's weight, the fp8 weight plus multiplier * B @ A in fp32 (as merged_lora computes the sum),
    stochastically rounded back to float8_e4m3fn with the seed of its ComfyUI key, computed on the render `device`
    (whose random stream ComfyUI's rounding draws from). The merged weights are made once, layer by layer, and kept
    in fp8 (one byte per element of the covered layers: ComfyUI itself keeps a full backup of every patched weight);
    each forward casts its weight to the layer's dtype, exactly, as ComfyUI's manual_cast does. The base's own
    (fp8-rounded) weights are never changed, so after the render the layers are as they were, bit for bit."""
    from . import fp8

    modules = linear_layers(transformer)
    layers = []
    try:
        for name, (a, b) in state.items():
            layer = modules[name]
            merged = OnDevice(fp8.merge_lora(layer.weight, a, b, multiplier, name, device).to(layer.weight.device))

            def forward(x, layer=layer, merged=merged):
                w = layer.weight
                return torch.nn.functional.linear(x, merged.to(w.device).to(w.dtype), layer.bias)

            layer.forward = forward  # shadows the class's forward on this instance only
            layers.append(layer)
        yield
    finally:
        for layer in layers:
            del layer.forward


_MODELS: dict[tuple, LoadedModel] = {}  # at most one: a second base model is never resident beside the first


def load(model: str, device: str, dtype: str, cache_dir: Path | str | None = None,
         precision: Precision | None = None, pipeline: str | None = None,
         offload: str = "none") -> LoadedModel:
    """The loaded pipeline for (model, device, dtype, precision, class, offload), loaded on first use and kept
    until another is needed: the one before is freed first, so at the real size (~58 GB in bf16) a quantized
    training base and the bf16 reference swap, they never stack. `cache_dir`: where control-image latents, prompt
    embeddings and quantized weights are kept on disk for later processes and runs."""
    from .cache import open_cache

    pipeline = pipeline or default_pipeline()
    key = (model, device, dtype_name(dtype), precision.key if precision else None, pipeline, offload)
    cache = open_cache(cache_dir) if cache_dir is not None else None
    if key in _MODELS and _MODELS[key].weights_changed():
        release()  # its files were replaced under this process: what it holds is not that model any more
    if key not in _MODELS:
        release()
        _MODELS[key] = LoadedModel(model, device, dtype, precision, cache, pipeline, offload)
    if cache is not None:
        _MODELS[key].disk_cache = cache
    return _MODELS[key]


def release() -> None:
    """Free the resident pipeline (and what a failed load left behind)."""
    import gc

    from .precision import return_freed_memory

    _MODELS.clear()
    gc.collect()
    return_freed_memory()  # glibc keeps freed weights in its heap otherwise, under the next model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resident() -> tuple | None:
    """The key of the pipeline held now (`load_key`'s form), if any."""
    return next(iter(_MODELS), None)


def load_key(recipe, model: str, device: str, offload: str = "none") -> tuple:
    """Which pipeline a recipe renders on (NotRenderable: a quantization that is not reproduced)."""
    from .models import by_name
    from .precision import parse

    precision = parse(recipe.precision, recipe.ara_file)
    return (model, device, dtype_name(recipe.dtype), precision.key if precision else None,
            by_name(recipe.model).pipeline, offload)


def load_for(recipe, model: str, device: str, cache_dir: Path | str | None = None,
             offload: str = "none") -> LoadedModel:
    """The loaded pipeline a recipe renders on: its dtype and its precision (NotRenderable: a quantization
    that is not reproduced)."""
    from .models import by_name
    from .precision import parse

    return load(model, device, recipe.dtype, cache_dir, parse(recipe.precision, recipe.ara_file),
                by_name(recipe.model).pipeline, offload)
