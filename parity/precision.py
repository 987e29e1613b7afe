"""Put a loaded pipeline into a recipe's precision: the quantized base ai-toolkit sampled its previews on.

A recipe's `precision` reads `transformer:<qtype>[+ara:sha256:<hex>] text_encoder:<qtype>` (or `none`), as
recipe._quantization writes it from the training config. ai-toolkit 0.12.26 (notes:
shared/research/aitk-quantization.md) builds that base as follows, and so does `apply`:

- optimum-quanto types (`qfloat8`, `qint8`, ...): optimum-quanto itself (the version ai-toolkit pins) replaces
  every Linear by a frozen QLinear: the transformer block by block, then its other layers; the text encoder
  (vision tower and `lm_head` included) layer by layer. Weights only, never activations; the VAE stays as loaded.
- `uint2`..`uint7` without an ARA: every transformer Linear whose input size is a multiple of 64 runs on its
  dequantized weight (quantize.uintx_weight, equal bit for bit to ai-toolkit's); `uint8` changes nothing.
- `uintN|<ARA>`: only the Linear layers the ARA names are quantized (the others stay plain: ai-toolkit's
  "additional layers" pass asks for uint8, a no-op), and the ARA, a LoRA of scale 1 at multiplier 1 in the
  model's dtype, is added to their output at every forward. It is attached here, at load time, so the user's
  LoRA (added per render) comes after it, as ai-toolkit chains them.

ComfyUI's fp8 weight dtypes (parity.fp8; issue 46 point 4) are further values, for ComfyUI recipes:

- transformer `fp8_e4m3fn` (UNETLoader weight_dtype fp8_e4m3fn, or the official `*_fp8_e4m3fn` files): every
  parameter of the transformer rounded to its float8_e4m3fn value in place, as ComfyUI stores the model in fp8 and
  casts each weight for its matmul (exact in bf16 and fp32). A LoRA on it merges as forms.LORA_MERGED_FP8.
- text_encoder `fp8_scaled` (`qwen_2.5_vl_7b_fp8_scaled`): each Linear of the language model and the vision tower a
  fp8.ScaledFP8Linear (fp8 weight, float32 per-tensor scale assumed absmax/448, fp8 bias), as ComfyUI computes it.

Quantizing goes one layer at a time in place, so it never holds two copies of the model. The quantized layers are
kept in the on-disk cache (keyed by the model's files, the qtype and the ARA's content), so a later process or
run reads them instead of quantizing again. The fp8 roundings are not kept on disk: an elementwise cast of the
loaded weights, quicker than reading them back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from safetensors import safe_open

from . import fp8
from .errors import NotRenderable
from .forms import QTYPE_FP8, QTYPE_FP8_SCALED
from .recipe import quantization_parts
from .quantize import uintx_applies, uintx_bits, uintx_weight

ARA_PREFIX = "diffusion_model."  # ai-toolkit's key prefix, "transformer." once converted for loading
# optimum-quanto's names (ai-toolkit's get_qtype reads quanto's `qtypes` by the config's string)
QUANTO_QTYPES = ("qfloat8", "qfloat8_e4m3fn", "qfloat8_e4m3fnuz", "qfloat8_e5m2", "qint8", "qint4", "qint2")
TORCHAO_QTYPES = ("int8", "float8")  # ai-toolkit's layer-offloading rewrite (torchao 0.10.0): not reproduced
# ComfyUI's fp8 weight dtypes (parity.fp8), per component: fp8 storage cast per matmul; scaled fp8 (text encoder file)
COMFY_QTYPES = {"transformer": (QTYPE_FP8,), "text_encoder": (QTYPE_FP8_SCALED,)}


@dataclass(frozen=True)
class Precision:
    """The quantization of each component; `ara` is the adapter's local file, `ara_digest` its content hash."""

    transformer: str | None = None
    text_encoder: str | None = None
    ara: str | None = None
    ara_digest: str | None = None

    @property
    def key(self) -> tuple:
        return (self.transformer, self.text_encoder, self.ara_digest)

    @property
    def aitk_quantized(self) -> bool:
        """A component in one of ai-toolkit's quantizations (optimum-quanto, uintN, an ARA), not only ComfyUI's fp8."""
        comfy = {q for qtypes in COMFY_QTYPES.values() for q in qtypes}
        return bool(self.ara_digest) or any(q and q not in comfy for q in (self.transformer, self.text_encoder))

    @property
    def fp8_transformer(self) -> bool:
        """The transformer's weights are ComfyUI's float8_e4m3fn (a LoRA merges into it as LORA_MERGED_FP8)."""
        return self.transformer == QTYPE_FP8

    def describe(self) -> str:
        parts = []
        if self.transformer:
            parts.append(f"transformer {self.transformer}" + ("+ARA" if self.ara_digest else ""))
        if self.text_encoder:
            parts.append(f"text_encoder {self.text_encoder}")
        return ", ".join(parts) or "none"


def parse(precision: str, ara_file: str | None = None) -> Precision | None:
    """The recipe value as a Precision (None for `none`). NotRenderable: a qtype this harness cannot reproduce,
    or an ARA that was not found."""
    if precision in ("", "none"):
        return None
    values = quantization_parts(precision)
    if not values or set(values) - {"transformer", "text_encoder"}:
        raise NotRenderable(f"unreadable precision {precision!r}")
    ara_digest = None
    transformer = values.get("transformer")
    if transformer and "+ara:" in transformer:
        transformer, _, ara_digest = transformer.partition("+ara:")
        if not ara_digest.startswith("sha256:"):
            raise NotRenderable("the accuracy recovery adapter (ARA) the run names was not found (see the "
                                "fidelity column: which file, and where to put it)")
        if not ara_file:
            raise NotRenderable("the recipe names an ARA by its hash but not its file")
    for component, qtype in (("transformer", transformer), ("text_encoder", values.get("text_encoder"))):
        if qtype:
            check_qtype(component, qtype, with_ara=component == "transformer" and ara_digest is not None)
    return Precision(transformer, values.get("text_encoder"), ara_file if ara_digest else None, ara_digest)


def check_qtype(component: str, qtype: str, with_ara: bool) -> None:
    if qtype in QUANTO_QTYPES or qtype in COMFY_QTYPES[component]:
        if with_ara:
            raise NotRenderable(f"an ARA with {qtype} is not reproduced (ai-toolkit's ARA runs pair with uint2-uint7)")
        return
    if uintx_bits(qtype) is not None and component == "transformer":
        return
    if qtype in TORCHAO_QTYPES:
        raise NotRenderable(f"{component} {qtype}: torchao's weight-only {qtype} (ai-toolkit's layer offloading) is "
                            f"not reproduced; set layer_offloading off, or compare with the reference only")
    raise NotRenderable(f"{component} quantization {qtype!r} is not reproduced (reproduced: "
                        f"{', '.join(QUANTO_QTYPES)} through optimum-quanto; uint2-uint8 on the transformer; "
                        f"ComfyUI's transformer {QTYPE_FP8} and text_encoder {QTYPE_FP8_SCALED})")


def linear_names(module: torch.nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]


def read_ara(path: str, transformer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Covered Linear name -> (down, up) of the ARA file, as ai-toolkit attaches it: every distinct key stem
    (`diffusion_model.<module>` -> `transformer.<module>`) is a substring to look for in
    `transformer.<Linear path>`; each Linear that contains one is covered, with the weights stored for its own
    name. The adapter's rank is the first lora_A's; alpha = rank, so its scale is 1."""
    with safe_open(path, framework="pt") as fh:
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    stems = list(dict.fromkeys("transformer." + k.removeprefix(ARA_PREFIX).split(".lora_")[0] for k in state))
    out = {}
    for name in linear_names(transformer):
        clean = "transformer." + name
        if not any(stem in clean for stem in stems):
            continue
        down, up = state.get(f"{ARA_PREFIX}{name}.lora_A.weight"), state.get(f"{ARA_PREFIX}{name}.lora_B.weight")
        if down is None or up is None:
            raise NotRenderable(f"{path}: the ARA covers {name} (its keys contain a stem of that name) but holds "
                                f"no lora_A/lora_B for it: ai-toolkit would leave it at zero, not modelled")
        out[name] = (down, up)
    if not out:
        raise NotRenderable(f"{path}: no key of this accuracy recovery adapter names a Linear layer of the "
                            f"transformer (keys look like {ARA_PREFIX}<module>.lora_A.weight)")
    return out


def attach_ara(transformer, ara: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list:
    """ai-toolkit's ARA forward on each covered layer: output + (up(down(x in the ARA's dtype)) * 1 * 1), cast to
    the output's dtype and added. The ARA lives in the model's dtype (network.force_to(dtype=torch_dtype))."""
    modules = dict(transformer.named_modules())
    handles = []
    for name, (down, up) in ara.items():
        layer = modules[name]
        dtype, device = layer.weight.dtype, layer.weight.device
        down, up = down.to(device, dtype), up.to(device, dtype)

        def hook(module, args, output, down=down, up=up):
            x = args[0].to(down.dtype)
            delta = torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)
            return output + delta.to(output.dtype)

        handles.append(layer.register_forward_hook(hook))
    return handles


def apply(pipe, precision: Precision, cache=None, identity: dict | None = None) -> dict[str, int]:
    """Quantize `pipe`'s transformer and text encoder in place as `precision` says; attach the ARA. Returns the
    number of layers quantized per component (what the tests and the bench report)."""
    counts = {}
    if precision.transformer:
        ara = read_ara(precision.ara, pipe.transformer) if precision.ara else None
        counts["transformer"] = quantize_transformer(pipe.transformer, precision, ara, cache, identity)
        if ara:
            attach_ara(pipe.transformer, ara)
            counts["ara"] = len(ara)
    if precision.text_encoder == QTYPE_FP8_SCALED:
        own_plain_parameters(pipe.text_encoder)
        counts["text_encoder"] = fp8.scale_text_encoder(pipe.text_encoder, return_freed_memory)
    elif precision.text_encoder:
        counts["text_encoder"] = quantize_quanto(pipe.text_encoder, precision.text_encoder,
                                                 layer_groups(pipe.text_encoder), cache,
                                                 cache_name("text_encoder", precision.text_encoder, None, identity))
    return counts


def cache_name(component: str, qtype: str, ara_digest: str | None, identity: dict | None) -> str | None:
    if identity is None:
        return None
    import json
    from importlib.metadata import version

    text = json.dumps([component, qtype, ara_digest, identity, version("optimum-quanto")], sort_keys=True,
                      default=str)
    return f"quant-{component}-{qtype}-" + hashlib.sha256(text.encode()).hexdigest()[:20]


def quantize_transformer(transformer, precision: Precision, ara, cache, identity) -> int:
    qtype = precision.transformer
    if qtype == QTYPE_FP8:  # ComfyUI's fp8 model: every parameter, one at a time (not cached: a cast is quicker)
        return fp8.round_transformer(transformer, return_freed_memory)
    name = cache_name("transformer", qtype, precision.ara_digest, identity)
    if qtype in QUANTO_QTYPES:
        # the blocks one by one, then what is outside them (img_in, txt_in, time embedding, norm_out, proj_out)
        return quantize_quanto(transformer, qtype, [*transformer.transformer_blocks, transformer], cache, name)
    bits = uintx_bits(qtype)
    if ara is None:  # every Linear gets a weight of its own: the files can go once the plain weights are copied
        own_plain_parameters(transformer)
    targets = list(ara) if ara is not None else linear_names(transformer)
    return quantize_uintx_layers(transformer, bits, targets, cache, name)


@torch.no_grad()
def own_plain_parameters(model: torch.nn.Module) -> None:
    """Copy the parameters that stay plain (norms, embeddings, convolutions: all but the Linear weights and biases,
    which quantizing replaces) into memory of their own. from_pretrained leaves every weight a view of its
    safetensors file, mapped whole, and a mapping lasts while any view of it does: one norm weight left in a file
    keeps all of it mapped, with every page quantizing read counted as resident beside the quantized weights
    (bench/memory.py measured the whole bf16 model's bytes so). Copied first, each file is unmapped once its last
    Linear is quantized. The copies are small (the text encoder's embedding is the largest) and equal bit for bit;
    a tied parameter stays tied (its one Parameter gets the copy)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.clone()


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere). Quantizing a layer
    frees weight-sized temporaries (quanto's float copy of the weight, the scaled values) between the quantized
    weights it keeps; glibc keeps freed blocks under its mmap threshold (up to 32 MiB) in its heap, counted as
    resident, so without this the freed memory grows with the model (bench/memory.py: 1.1 GB per GB of qfloat8
    weights on the real layer sizes)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = lambda: None  # noqa: E731
        try:
            import ctypes
            import sys

            if sys.platform.startswith("linux"):
                trim = ctypes.CDLL("libc.so.6").malloc_trim
                _MALLOC_TRIM = lambda: trim(0)  # noqa: E731
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
            pass
    _MALLOC_TRIM()


_MALLOC_TRIM = None


def layer_groups(text_encoder) -> list[torch.nn.Module]:
    """The text encoder's repeated layers (language model, vision tower), then the whole (what is left)."""
    groups = []
    for module in text_encoder.modules():
        if isinstance(module, torch.nn.ModuleList):
            groups.extend(module)
    return [*groups, text_encoder]


def quantize_quanto(model, qtype: str, groups: list[torch.nn.Module], cache, name: str | None) -> int:
    """optimum-quanto's QLinear for every Linear, frozen, one group at a time (ai-toolkit's own loop: a Linear
    already quantized in an earlier group is skipped). With a cache: the frozen weights are read from it when
    there (no quantizing), saved to it when not."""
    from optimum.quanto import qtypes
    from optimum.quanto.nn import QModuleMixin, quantize_module

    own_plain_parameters(model)
    stored = cache.open_tensors(name) if cache is not None and name else None
    keys: dict[str, list[str]] = {}
    for key in stored.keys() if stored is not None else ():
        keys.setdefault(key.split(".weight.")[0], []).append(key)
    full_names = {id(m): n for n, m in model.named_modules()}
    for group in groups:
        for path, layer in list(group.named_modules()):
            if not path or not isinstance(layer, torch.nn.Linear) or isinstance(layer, QModuleMixin):
                continue  # (a group that is itself a Linear is replaced from its parent's group)
            qlayer = quantize_module(layer, weights=qtypes[qtype])
            parent, _, child = path.rpartition(".")
            setattr(group.get_submodule(parent) if parent else group, child, qlayer)
            layer.weight = layer.bias = None  # as quanto does: the plain weights go now, not at the end
            if stored is None:
                qlayer.freeze()
            else:  # this layer's frozen weight from the cache (a QLinear rebuilds it from `weight._data` ...)
                full = full_names[id(layer)]
                qlayer.load_state_dict({k[len(full) + 1:]: stored.get_tensor(k) for k in keys.get(full, ())},
                                       strict=False)
                if not qlayer.frozen:
                    raise RuntimeError(f"the quantized-weights cache entry {name} lacks {full}: delete it, run again")
            return_freed_memory()
    qnames = [n for n, m in model.named_modules() if isinstance(m, QModuleMixin)]
    if stored is None and cache is not None and name:
        state = model.state_dict()
        cache.put_tensors(name, {k: v for k, v in state.items() if any(k.startswith(q + ".weight.") for q in qnames)})
    return len(qnames)


@torch.no_grad()
def quantize_uintx_layers(transformer, bits: int, targets: list[str], cache, name: str | None) -> int:
    """Each target Linear runs on its dequantized uintN weight (a layer ai-toolkit refuses stays as it is)."""
    modules = dict(transformer.named_modules())
    stored = cache.open_tensors(name) if cache is not None and name else None
    done = {}
    for target in targets:
        layer = modules[target]
        if not uintx_applies(layer.weight, bits):
            continue
        weight = stored.get_tensor(target) if stored is not None else uintx_weight(layer.weight.detach(), bits)
        layer.weight.data = weight.to(layer.weight.device, layer.weight.dtype)
        done[target] = layer.weight.data
        return_freed_memory()
    if stored is None and cache is not None and name:
        cache.put_tensors(name, {k: v.cpu() for k, v in done.items()})
    return len(done)
