"""Which keys of a LoRA file each engine binds to a layer of the Qwen-Image transformer, from file headers only.

The most reported cause of "the preview looks nothing like my inference" is a LoRA whose keys the inference engine
does not recognise: it loads the file, warns in a log nobody reads, and renders the base model. Each engine has its
own rules for which key names it accepts; this module models them, one function per engine, and counts the keys
that reach a layer. Nothing is loaded but the safetensors headers of the LoRA and of the model's transformer.

- ai-toolkit (`aitk`): the form it saves and the harness renders, `diffusion_model.<Linear>.lora_A|lora_B.weight`.
- the reference server (`server`): Diffusers' `QwenImageLoraLoaderMixin.load_lora_weights` (the server calls it as
  is), diffusers 0.39.
- ComfyUI (`comfyui`): `LoraLoader` -> `comfy/sd.py` `load_lora_for_models`, snapshot a125cd84. ComfyUI's Qwen
  transformer names its modules as Diffusers does (`comfy/ldm/qwen_image/model.py`), so its state-dict keys are
  `diffusion_model.` + the names in the model folder's headers; tests/test_lora_keys.py checks this against
  ComfyUI's own code where it imports.

Only LoRA factor pairs are modelled (with their `.alpha`): a LoHa/LoKr/OFT file, which the harness refuses anyway
(preflight.check_network), would count as unbound. A key binds when its name reaches a layer; whether its shape fits
is preflight.check_lora's question.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

ENGINES = ("aitk", "server", "comfyui")
ENGINE_NAMES = {"aitk": "ai-toolkit", "server": "the reference server (Diffusers)", "comfyui": "ComfyUI"}
COLUMNS = {engine: f"lora_keys_{engine}" for engine in ENGINES}  # record columns, "bound/total"
FIRST = 3  # unbound keys a message names
MAX_HEADER = 100 * 1024 * 1024  # a safetensors header larger than this is not one


@dataclass(frozen=True)
class Layers:
    """The transformer as the engines see it: its parameters (name -> shape), its Linear layers, its modules."""

    params: dict[str, tuple[int, ...]]
    linears: frozenset[str]  # modules with a 2-D weight: every Linear of the Qwen-Image transformer
    modules: frozenset[str]  # every module that owns a parameter, and their parents

    @classmethod
    def of(cls, params: dict[str, tuple[int, ...]]) -> Layers:
        linears = frozenset(k.removesuffix(".weight") for k, s in params.items()
                            if k.endswith(".weight") and len(s) == 2)
        modules = set()
        for name in params:
            parts = name.split(".")[:-1]
            modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        return cls(dict(params), linears, frozenset(modules))


@dataclass(frozen=True)
class Binding:
    """How many of a LoRA's keys one engine binds to a layer, and which it leaves unbound."""

    engine: str
    total: int
    bound: int
    unbound: tuple[str, ...]  # in file order (the header's keys sorted)
    refused: str = ""  # the engine refuses the whole file (it raises): why; nothing is bound then

    @property
    def count(self) -> str:
        return f"{self.bound}/{self.total}"

    def message(self) -> str | None:
        """The finding when the engine binds fewer keys than the file has; None when it binds all."""
        name = ENGINE_NAMES[self.engine]
        if self.refused:
            return f"LoRA not loadable in {name}: {self.refused} (0 of {self.total} keys bind)"
        if self.bound == self.total:
            return None
        first = ", ".join(repr(k) for k in self.unbound[:FIRST])
        how = "silently not applied" if self.bound == 0 else "partly applied"
        return (f"LoRA {how} in {name}: {self.bound} of {self.total} keys bind (first unbound: {first}); "
                f"{RULES[self.engine]}")


RULES = {
    "aitk": "ai-toolkit saves and renders `diffusion_model.<module>.lora_A|lora_B.weight` for a Linear module",
    "server": "Diffusers keeps `transformer.<module>.lora_A|lora_B.weight` for a Linear module, after stripping "
              "`diffusion_model.` and converting kohya `lora_unet_<module_with_underscores>.lora_down|lora_up."
              "weight` (each with its `.alpha`); it ignores `.alpha` keys beside lora_A/lora_B and drops keys with "
              "any other prefix with a log warning only",
    "comfyui": "ComfyUI binds `<module>`, `diffusion_model.<module>`, `transformer.<module>`, `lora_unet_<module_"
               "with_underscores>` or `lycoris_<module_with_underscores>` followed by `.lora_A|lora_B.weight` or "
               "`.lora_down|lora_up.weight` (and a few older forms), and only logs 'lora key not loaded' for the "
               "rest",
}


class _Refused(Exception):
    """The engine raises on this file."""


# -- the files -------------------------------------------------------------------------------------------------

def header(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's JSON header (8-byte length, then JSON); no tensor is read."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER:
            raise ValueError(f"header of {size} bytes: not a safetensors file")
        meta = json.loads(fh.read(size))
    return {k: tuple(int(d) for d in v["shape"]) for k, v in sorted(meta.items()) if k != "__metadata__"}


@functools.lru_cache(maxsize=8)
def transformer_layers(model_folder: str) -> Layers | None:
    """The transformer of a Diffusers model folder, from its safetensors headers (None: no transformer there)."""
    files = sorted((Path(model_folder) / "transformer").glob("*.safetensors"))
    if not files:
        return None
    params: dict[str, tuple[int, ...]] = {}
    for path in files:
        params.update(header(path))
    return Layers.of(params)


def bindings(path: str, model_folder: str | None) -> dict[str, Binding] | None:
    """engine -> Binding for the LoRA file at `path` on the model in `model_folder`; None when either cannot be
    read (preflight names that problem). Cached per file version and model."""
    if not model_folder:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _bindings(str(path), st.st_size, st.st_mtime_ns, str(model_folder))


@functools.lru_cache(maxsize=256)
def _bindings(path: str, size: int, mtime: int, model_folder: str) -> dict[str, Binding] | None:
    try:
        keys = list(header(path))
        layers = transformer_layers(model_folder)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # not a safetensors header
        return None
    if layers is None or not keys:
        return None
    return {"aitk": aitk(keys, layers), "server": server(keys, layers), "comfyui": comfyui(keys, layers)}


def columns(found: dict[str, Binding] | None) -> dict[str, str]:
    """The record's columns: lora_keys_<engine> = "bound/total" (none when the file or model is not readable)."""
    return {COLUMNS[e]: b.count for e, b in found.items()} if found else {}


def notes(found: dict[str, Binding] | None, engines=("server", "comfyui")) -> list[str]:
    """One note per engine that binds fewer keys than the file has. ai-toolkit's own unbound keys are left out by
    default: preflight.check_lora makes them an error of the preview already."""
    if not found:
        return []
    return [m for e in engines if e in found and (m := found[e].message())]


def _binding(engine: str, keys: list[str], bound: set[str]) -> Binding:
    return Binding(engine, len(keys), sum(k in bound for k in keys), tuple(k for k in keys if k not in bound))


# -- ai-toolkit ------------------------------------------------------------------------------------------------

AITK_PREFIX = "diffusion_model."
AB = (".lora_A.weight", ".lora_B.weight")


def aitk(keys: list[str], layers: Layers) -> Binding:
    # parity/preflight.py check_lora (the harness' training render; ai-toolkit saves transformer LoRAs this way)
    bound = {k for k in keys if k.startswith(AITK_PREFIX) and k.endswith(AB)
             and k.removeprefix(AITK_PREFIX)[:-len(AB[0])] in layers.linears}
    return _binding("aitk", keys, bound)


# -- the reference server: Diffusers ---------------------------------------------------------------------------

# Kohya names flatten the module path with `_`; Diffusers rebuilds the dots, keeping these module names whole
# (longest first), and maps the top-level modules by a fixed table.
KOHYA_WORDS = sorted((("add", "q", "proj"), ("add", "k", "proj"), ("add", "v", "proj"), ("to", "add", "out"),
                      ("to", "q"), ("to", "k"), ("to", "v"), ("to", "out"), ("add", "q"), ("add", "k"), ("add", "v"),
                      ("txt", "mlp"), ("img", "mlp"), ("txt", "mod"), ("img", "mod")), key=len, reverse=True)
KOHYA_TOP = {"img_in": "img_in", "txt_in": "txt_in", "proj_out": "proj_out", "norm_out_linear": "norm_out.linear",
             "time_text_embed_timestep_embedder_linear_1": "time_text_embed.timestep_embedder.linear_1",
             "time_text_embed_timestep_embedder_linear_2": "time_text_embed.timestep_embedder.linear_2"}
KOHYA_BLOCKS = "transformer_blocks"
# Older Diffusers names renamed to PEFT's when the first key is not PEFT's (the first matching pattern only).
UNET_TO_PEFT = ((".to_out_lora.up", ".to_out.0.lora_B"), (".to_out_lora.down", ".to_out.0.lora_A"),
                (".to_q_lora.down", ".to_q.lora_A"), (".to_q_lora.up", ".to_q.lora_B"),
                (".to_k_lora.down", ".to_k.lora_A"), (".to_k_lora.up", ".to_k.lora_B"),
                (".to_v_lora.down", ".to_v.lora_A"), (".to_v_lora.up", ".to_v.lora_B"),
                (".lora.up", ".lora_B"), (".lora.down", ".lora_A"),
                (".to_out.lora_magnitude_vector", ".to_out.0.lora_magnitude_vector"))


def _kohya_name(key: str) -> str:
    # diffusers/loaders/lora_conversion_utils.py _convert_non_diffusers_qwen_lora_to_diffusers, its convert_key
    for flat, dotted in KOHYA_TOP.items():
        if key == flat or key.startswith(flat + "."):
            return dotted + key[len(flat):]
    base, _, suffix = key.rpartition(".") if "." in key else (key, "", "")
    rest = base[len(KOHYA_BLOCKS) + 1:]  # cut whatever is there: a key of another layout comes out garbled
    head, dot, tail = rest.partition(".")
    parts, words, i = head.split("_"), [], 0
    while i < len(parts):
        n = next((len(w) for w in KOHYA_WORDS if tuple(parts[i:i + len(w)]) == w), 1)
        words.append("_".join(parts[i:i + n]))
        i += n
    return f"{KOHYA_BLOCKS}.{'.'.join(words)}{dot}{tail}" + (f".{suffix}" if suffix else "")


def _diffusers_qwen_conversion(names: dict[str, str], folded: dict[str, str]) -> dict[str, str]:
    """name as Diffusers has it -> file key, after Diffusers' conversion of non-Diffusers Qwen LoRAs; `folded` gets
    each kohya `.alpha` key folded into its layer's factors (alpha key -> that layer's lora_down key)."""
    # diffusers/loaders/lora_conversion_utils.py _convert_non_diffusers_qwen_lora_to_diffusers
    def rename(fn):
        out: dict[str, str] = {}
        for name, key in names.items():
            out[fn(name)] = key  # two names made equal collapse into one, the later file key kept
        return out

    if any(n.startswith("diffusion_model.") for n in names):
        names = rename(lambda n: n.removeprefix("diffusion_model."))
    if any(n.startswith("lora_unet_") for n in names):
        names = rename(lambda n: _kohya_name(n.removeprefix("lora_unet_")))
    if any("default." in n for n in names):
        names = rename(lambda n: n.replace("default.", ""))
    down, up = ".lora_down.weight", ".lora_up.weight"
    out: dict[str, str] = {}
    left = dict(names)
    if any(down in n or up in n for n in names):
        for name in list(names):
            if not name.endswith(down):
                continue
            up_name, alpha = name.replace(down, up), name.replace(down, ".alpha")
            if up_name not in left:
                raise _Refused(f"{names[name]!r} has no {up} partner (KeyError in Diffusers' Qwen conversion)")
            if alpha not in left:
                raise _Refused(f"{names[name]!r} has no `.alpha` key, which Diffusers' Qwen conversion needs for "
                               f"every kohya layer (KeyError)")
            out[name.replace(down, AB[0])] = left.pop(name)
            out[up_name.replace(up, AB[1])] = left.pop(up_name)
            folded[left.pop(alpha)] = names[name]
    elif any(AB[0] in n or AB[1] in n for n in names):
        for name in list(names):
            if AB[0] in name or AB[1] in name:
                out[name] = left.pop(name)
            elif ".alpha" in name:
                left.pop(name)  # dropped: the file's alpha is ignored
    if left:
        first = next(iter(left.values()))
        raise _Refused(f"Diffusers' Qwen conversion does not know {len(left)} keys (first: {first!r}) and fails "
                       f"('state_dict should be empty')")
    return {f"transformer.{n}": k for n, k in out.items()}


def server(keys: list[str], layers: Layers) -> Binding:
    # diffusers/loaders/lora_pipeline.py QwenImageLoraLoaderMixin.lora_state_dict + load_lora_weights, then
    # diffusers/loaders/peft.py PeftAdapterMixin.load_lora_adapter and PEFT's inject_adapter_in_model (state_dict)
    names = {k: k for k in keys if "dora_scale" not in k}  # DoRA scales are filtered out with a warning
    folded: dict[str, str] = {}
    try:
        if any(n.endswith(".alpha") or n.startswith(("lora_unet_", "diffusion_model.")) or "default." in n
               for n in names):
            names = _diffusers_qwen_conversion(names, folded)
        missing = next((k for n, k in names.items() if "lora" not in n), None)
        if missing is not None:
            raise _Refused(f"{missing!r} has no 'lora' in its name ('Invalid LoRA checkpoint')")
        names = {n.removeprefix("transformer."): k for n, k in names.items() if n.startswith("transformer.")}
        if names and "lora_A" not in next(iter(names)):
            names = {_unet_to_peft(n): k for n, k in names.items()}
        targets = {n.rsplit(".lora_", 1)[0] for n in names}
        wrapped = targets & layers.modules
        if names and not wrapped:
            raise _Refused(f"PEFT finds none of its target modules in the transformer (first: "
                           f"{sorted(targets)[0]!r}; 'Target modules ... not found in the base model')")
        if wrapped - layers.linears:
            raise _Refused(f"PEFT cannot wrap {sorted(wrapped - layers.linears)[0]!r}, which is not a Linear layer")
    except _Refused as err:
        return Binding("server", len(keys), 0, tuple(keys), str(err))
    bound = {k for n, k in names.items() if n.endswith(AB) and n[:-len(AB[0])] in layers.linears}
    bound |= {alpha for alpha, down in folded.items() if down in bound}  # scales its layer: it takes effect
    return _binding("server", keys, bound)


def _unet_to_peft(name: str) -> str:
    # diffusers/utils/state_dict_utils.py convert_unet_state_dict_to_peft (convert_state_dict, UNET_TO_DIFFUSERS)
    name = name.replace(".processor.", ".")
    for old, new in UNET_TO_PEFT:
        if old in name:
            return name.replace(old, new)
    return name


# -- ComfyUI ---------------------------------------------------------------------------------------------------

# (up, down, mid) key suffixes of one LoRA layer, in the order ComfyUI tries them: the first form present is used.
COMFY_FORMS = ((".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),
               ("_lora.up.weight", "_lora.down.weight", None), (".lora_B.weight", ".lora_A.weight", None),
               (".lora.up.weight", ".lora.down.weight", None), (".lora_B", ".lora_A", None),
               (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),
               (".lora_B.default.weight", ".lora_A.default.weight", None))


def comfyui_key_map(params) -> dict[str, str]:
    """LoRA layer name -> the model key it patches, for ComfyUI's Qwen-Image model whose transformer has `params`."""
    # comfy/lora.py model_lora_keys_unet: the loop every model gets, then its QwenImage branch (unet_to_diffusers
    # gives nothing for a DiT)
    out: dict[str, str] = {}
    for p in params:
        key = "diffusion_model." + p
        if p.endswith(".weight"):
            module = p.removesuffix(".weight")
            out["lora_unet_" + module.replace(".", "_")] = key
            out["diffusion_model." + module] = key
        else:
            out[key] = key
    for p in params:
        if p.endswith(".weight"):
            module = p.removesuffix(".weight")
            out[module] = out["transformer." + module] = out["lycoris_" + module.replace(".", "_")] = \
                "diffusion_model." + p
    return out


def comfyui(keys: list[str], layers: Layers) -> Binding:
    # comfy/sd.py load_lora_for_models: comfy/lora_convert.py convert_lora (no rule for Qwen), then comfy/lora.py
    # load_lora with the key map, each layer read by comfy/weight_adapter/lora.py LoRAAdapter.load
    present, loaded = set(keys), set()
    for name in comfyui_key_map(layers.params):
        loaded.update(k for k in (name + ".alpha", name + ".dora_scale") if k in present)
        for up, down, mid in COMFY_FORMS:
            if name + up not in present:
                continue
            if name + down not in present:
                return Binding("comfyui", len(keys), 0, tuple(keys),
                               f"{name + up!r} has no {down} partner (KeyError in ComfyUI's LoRA loader)")
            loaded.update(k for k in (name + up, name + down, mid and name + mid, name + ".reshape_weight")
                          if k and k in present)
            break
    return _binding("comfyui", keys, loaded)
