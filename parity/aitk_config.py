"""Read an ai-toolkit job config the way ai-toolkit 0.12 reads it (DESIGN section 3).

Everything here is plain data: no torch, no files other than the YAML itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import CaseError

TRAINER_TYPES = {"diffusion_trainer", "sd_trainer", "ui_trainer"}

# SampleConfig defaults of ai-toolkit (toolkit/config_modules.py).
SAMPLE_DEFAULTS: dict[str, Any] = {
    "sampler": "ddpm",
    "sample_every": 100,
    "width": 512,
    "height": 512,
    "neg": False,
    "seed": 0,
    "walk_seed": False,
    "guidance_scale": 7,
    "sample_steps": 20,
    "network_multiplier": 1,
    "format": "jpg",
    "do_cfg_norm": False,
}
KNOWN_SAMPLE_KEYS = set(SAMPLE_DEFAULTS) | {
    "samples", "prompts", "sample_start_step", "guidance_rescale", "refiner_start_at", "extra_values",
    "num_frames", "fps", "ctrl_img", "ctrl_idx", "ctrl_img_1", "ctrl_img_2", "ctrl_img_3",
}
KNOWN_ITEM_KEYS = {
    "prompt", "width", "height", "neg", "seed", "guidance_scale", "sample_steps", "network_multiplier",
    "ctrl_img", "ctrl_idx", "ctrl_img_1", "ctrl_img_2", "ctrl_img_3",
}
# In-prompt flags (GenerateImageConfig's prompt parser). Value None: recognised, no recipe effect.
PROMPT_FLAGS = {
    "n": "neg", "w": "width", "h": "height", "d": "seed", "seed": "seed",
    "l": "guidance_scale", "cfg": "guidance_scale", "s": "sample_steps", "steps": "sample_steps",
    "m": "network_multiplier", "network_multiplier": "network_multiplier",
    "ctrl_img": "ctrl_img", "ctrl_idx": "ctrl_idx",
    "p2": None, "n2": None, "gr": None, "a": None, "ref": None, "ev": None, "frames": None, "fps": None,
}


def floor_size(value: int) -> int:
    """ai-toolkit floors a prompt's width/height to a multiple of 8, at least 64."""
    return max(64, int(value) // 8 * 8)


@dataclass(frozen=True)
class SampleItem:
    """One entry of `sample.samples` / `sample.prompts`, with ai-toolkit's rules applied."""

    index: int
    prompt: str  # after flags are stripped, [name] replaced, [trigger] still literal
    raw_prompt: str  # flags stripped, before [name] replacement (the reference only replaces [trigger])
    width: int  # after ai-toolkit's floor to 8 (min 64)
    height: int
    requested_width: int  # as written in the config / flag
    requested_height: int
    neg: str
    seed: int
    guidance_scale: float
    sample_steps: int
    network_multiplier: float
    ctrl_img: str | None
    ctrl_img_1: str | None
    ctrl_img_2: str | None
    ctrl_img_3: str | None
    ctrl_idx: int | None
    ctrl_from_flag: bool  # the control image came from a `--ctrl_img` prompt flag
    explicit: tuple[str, ...] = ()  # fields this item (or its flags) set itself
    unknown: tuple[str, ...] = ()  # keys / flags the harness does not model, reported


@dataclass(frozen=True)
class TrainingJob:
    """The parts of an ai-toolkit job config that decide a preview."""

    path: Path
    name: str
    trigger_word: str | None
    device: str
    train_dtype: str
    train_steps: int | None  # the last step: the final LoRA's step when its metadata does not say
    model_name_or_path: str
    arch: str
    quantize: bool
    qtype: str | None  # the transformer's, when quantize (the part before "|")
    quantize_te: bool
    qtype_te: str | None
    ara: str | None  # the accuracy recovery adapter as written (local path or owner/repo/file), when quantize
    low_vram: bool
    sample: dict[str, Any]
    items: tuple[SampleItem, ...]
    unknown: tuple[str, ...] = field(default=())
    arch_tag: str | None = None  # the UI's ":2511" / ":2512" on model.arch: which checkpoint of the arch
    network_type: str = "lora"  # network.type (NetworkConfig default): lora, locon, lokr, ...
    save_every: int = 1000  # save.save_every (SaveConfig default): a checkpoint at every multiple of it
    max_step_saves_to_keep: int = 5  # save.max_step_saves_to_keep (SaveConfig default); 0 or less keeps all


def _replace_name(value: Any, name: str) -> Any:
    if isinstance(value, str):
        return value.replace("[name]", name)
    if isinstance(value, list):
        return [_replace_name(v, name) for v in value]
    if isinstance(value, dict):
        return {k: _replace_name(v, name) for k, v in value.items()}
    return value


def read_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise CaseError(path, f"is not valid YAML{where}: {getattr(exc, 'problem', exc)}",
                        "correct the YAML syntax at that line") from None
    except UnicodeDecodeError:
        raise CaseError(path, "is not UTF-8 text", "save the file as UTF-8") from None
    except OSError as exc:
        raise CaseError(path, f"cannot be read: {exc.strerror}", "check the file exists and is readable") from None


def trainer_process(doc: Any) -> dict | None:
    """`config.process[0]` when it is a trainer, else None."""
    if not isinstance(doc, dict):
        return None
    cfg = doc.get("config")
    if not isinstance(cfg, dict):
        return None
    procs = cfg.get("process")
    if not isinstance(procs, list) or not procs or not isinstance(procs[0], dict):
        return None
    return procs[0] if procs[0].get("type") in TRAINER_TYPES else None


class _Problems(list):
    """Wrong types found while parsing, all reported together (a person fixes them in one go)."""

    def number(self, where: str, value: Any, kind=float, default=0):
        try:
            if isinstance(value, bool):
                raise ValueError
            return kind(value)
        except (TypeError, ValueError, OverflowError):
            self.append((where, value))
            return default

    def raise_if_any(self, path: Path) -> None:
        self[:] = list(dict.fromkeys((where, repr(value)) for where, value in self))  # a shared key once
        if self:
            listed = "; ".join(f"{where} is {value}" for where, value in self[:10])
            more = f" (and {len(self) - 10} more)" if len(self) > 10 else ""
            raise CaseError(path, f"{len(self)} value(s) of the wrong type or range: {listed}{more}",
                            "write numbers (whole numbers for seeds, sizes and steps) for these keys")


def _parse_flags(path: Path, text: str, where: str) -> tuple[str, dict[str, str], list[str]]:
    """Split a prompt on every `--` as ai-toolkit does; return (prompt, flags, unknown flags)."""
    parts = text.split("--")
    prompt = parts[0].strip()
    flags: dict[str, str] = {}
    unknown: list[str] = []
    for part in parts[1:]:
        part = part.strip()
        if not part:
            continue
        name, _, value = part.partition(" ")
        value = value.strip()
        if name not in PROMPT_FLAGS:
            unknown.append(f"--{name}")
            continue
        target = PROMPT_FLAGS[name]
        if target is None:
            unknown.append(f"--{name} (recognised by ai-toolkit, not modelled for Qwen-Image-Edit)")
            continue
        flags[target] = value
    return prompt, flags, unknown


def parse_sample_items(path: Path, sample: dict, name: str) -> tuple[SampleItem, ...]:
    """The sample items in order, with seeds, sizes and control images as ai-toolkit resolves them."""
    cfg = {**SAMPLE_DEFAULTS, **sample}
    raw_items, listed = _raw_items(path, sample)
    problems = _Problems()
    seed = problems.number("sample.seed", cfg["seed"], int)
    items = []
    for i, raw in enumerate(raw_items):
        where = f"sample.{listed}[{i}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("prompt"), str):
            raise CaseError(path, f"{where} has no prompt string", f"give {where} a `prompt:`")
        item, seed = _sample_item(path, cfg, raw, i, where, seed, problems)
        items.append(item)
    for it in items:
        if it.sample_steps < 1:
            problems.append((f"sample item {it.index} sample_steps (at least 1)", it.sample_steps))
    problems.raise_if_any(path)
    return tuple(items)


def _raw_items(path: Path, sample: dict) -> tuple[list, str]:
    """The raw items and the key they are listed under: `samples:` (dicts), else `prompts:` (strings)."""
    if isinstance(sample.get("samples"), list) and sample["samples"]:
        return sample["samples"], "samples"
    if isinstance(sample.get("prompts"), list):
        return [{"prompt": p} for p in sample["prompts"]], "prompts"
    raise CaseError(path, "sample: has neither a `samples:` list nor a `prompts:` list",
                    "add the prompts the previews were rendered from under sample.samples")


def _item_seed(raw: dict, flags: dict, where: str, i: int, seed: int, walk: bool,
               problems: _Problems) -> tuple[int, int]:
    """(this item's seed, the seed later items start from). An item's own `seed:` is used as is; without
    walk_seed it carries over to later items. A `--seed` flag changes this prompt only."""
    if "seed" in raw:
        item_seed = problems.number(f"{where}.seed", raw["seed"], int)
        if not walk:
            seed = item_seed
    elif walk:
        item_seed = seed + i
    else:
        item_seed = seed
    if "seed" in flags:
        item_seed = problems.number(f"{where} --seed", flags["seed"], int)
    return item_seed, seed


def _sample_item(path: Path, cfg: dict, raw: dict, i: int, where: str, seed: int,
                 problems: _Problems) -> tuple[SampleItem, int]:
    """One item (`raw`, at `where`) over the sample-level values `cfg`; (the item, the seed later items start
    from). Wrong types go to `problems`."""
    unknown = [f"{where}.{k}" for k in raw if k not in KNOWN_ITEM_KEYS]
    explicit = [k for k in raw if k in KNOWN_ITEM_KEYS and k != "prompt"]
    prompt, flags, unknown_flags = _parse_flags(path, raw["prompt"], where)
    unknown += [f"{where} flag {u}" for u in unknown_flags]
    explicit += [k for k in flags]
    item_seed, seed = _item_seed(raw, flags, where, i, seed, bool(cfg["walk_seed"]), problems)
    value = lambda key: flags.get(key, raw.get(key, cfg.get(key)))  # noqa: E731
    # where a value came from, for messages: this item's flag or key, else the sample-level key
    source = lambda key: (f"{where} --{key}" if key in flags else f"{where}.{key}" if key in raw  # noqa: E731
                          else f"sample.{key}")
    req_w = problems.number(source("width"), value("width"), lambda v: int(float(v)), 512)
    req_h = problems.number(source("height"), value("height"), lambda v: int(float(v)), 512)
    base_neg = cfg["neg"] if isinstance(cfg["neg"], str) else ""  # neg: False means "no negative prompt"
    neg = flags.get("neg", raw.get("neg", base_neg))
    for key in ("ctrl_img", "ctrl_img_1", "ctrl_img_2", "ctrl_img_3", "neg"):
        if key in raw and raw[key] is not None and not isinstance(raw[key], (str, bool) if key == "neg" else str):
            problems.append((f"{where}.{key} (a file path string)", raw[key]))
            raw = {k: v for k, v in raw.items() if k != key}
    ctrl_idx = value("ctrl_idx")
    return SampleItem(
        index=i, prompt=prompt, raw_prompt=prompt,
        width=floor_size(req_w), height=floor_size(req_h), requested_width=req_w, requested_height=req_h,
        neg=neg if isinstance(neg, str) else "",
        seed=item_seed,
        guidance_scale=problems.number(source("guidance_scale"), value("guidance_scale")),
        sample_steps=problems.number(source("sample_steps"), value("sample_steps"), int, 1),
        network_multiplier=problems.number(source("network_multiplier"), value("network_multiplier")),
        ctrl_img=flags.get("ctrl_img", raw.get("ctrl_img")),
        # SampleItem: ctrl_img_1 defaults to ctrl_img (a `--ctrl_img` flag is parsed later and does not).
        ctrl_img_1=raw.get("ctrl_img_1", raw.get("ctrl_img")),
        ctrl_img_2=raw.get("ctrl_img_2"),
        ctrl_img_3=raw.get("ctrl_img_3"),
        ctrl_idx=None if ctrl_idx is None else problems.number(source("ctrl_idx"), ctrl_idx, int),
        ctrl_from_flag="ctrl_img" in flags,
        explicit=tuple(explicit),
        unknown=tuple(unknown),
    ), seed


def quantization(path: Path, model: dict) -> dict[str, Any]:
    """The quantization settings as ai-toolkit's ModelConfig reads them: quantize_te defaults to quantize, both
    qtypes to qfloat8, layer offloading (or its old name auto_memory) turns qfloat8 into torchao's float8, and
    `qtype: "uint3|<file>"` names an accuracy recovery adapter (over `accuracy_recovery_adapter:`)."""
    quantize = bool(model.get("quantize", False))
    quantize_te = bool(model.get("quantize_te", quantize))
    qtype, qtype_te = str(model.get("qtype", "qfloat8")), str(model.get("qtype_te", "qfloat8"))
    if model.get("layer_offloading", model.get("auto_memory", False)):
        qtype = "float8" if qtype == "qfloat8" else qtype
        qtype_te = "float8" if qtype_te == "qfloat8" else qtype_te
    ara = model.get("accuracy_recovery_adapter")
    if "|" in qtype:
        parts = qtype.split("|")
        if len(parts) != 2:
            raise CaseError(path, f"model.qtype {qtype!r} has more than one '|' (ai-toolkit stops on it)",
                            "write `qtype: \"uint3|<adapter file>\"` with one '|'")
        qtype, ara = parts
    return {"quantize": quantize, "qtype": qtype if quantize else None, "quantize_te": quantize_te,
            "qtype_te": qtype_te if quantize_te else None, "ara": str(ara) if quantize and ara else None}


def load_job(path: Path) -> TrainingJob:
    """Parse an ai-toolkit job config; a config that is not a trainer job is a CaseError."""
    doc = read_yaml(path)
    proc = trainer_process(doc)
    if proc is None:
        raise CaseError(path, "is not an ai-toolkit trainer config (config.process[0].type is not a trainer)",
                        "point the harness at the config.yaml ai-toolkit copied into the output folder")
    name = doc["config"].get("name")
    if not isinstance(name, str) or not name:
        raise CaseError(path, "has no config.name", "add config.name: the job name used in file names")
    raw_sample = proc.get("sample")
    proc = _replace_name(proc, name)  # ai-toolkit replaces [name] everywhere when it loads the config
    sample = proc.get("sample")
    if not isinstance(sample, dict):
        raise CaseError(path, "has no `sample:` section, so ai-toolkit rendered no previews from it",
                        "use the config of the run that wrote samples/")
    model = proc.get("model") if isinstance(proc.get("model"), dict) else {}
    if "name_or_path" not in model:
        raise CaseError(path, "has no model.name_or_path", "add model.name_or_path of the base checkpoint")
    arch = str(model.get("arch", ""))
    items = parse_sample_items(path, sample, name)
    # Keep the raw prompts (before [name]) for the reference side, which only replaces [trigger].
    raw_list = raw_sample.get("samples") or [{"prompt": p} for p in raw_sample.get("prompts") or []]
    items = tuple(_with_raw_prompt(it, raw_list[it.index]) for it in items)
    unknown = [f"sample.{k}" for k in sample if k not in KNOWN_SAMPLE_KEYS]
    unknown += [u for it in items for u in it.unknown]
    train = proc.get("train") if isinstance(proc.get("train"), dict) else {}
    network = proc.get("network") if isinstance(proc.get("network"), dict) else {}
    save = proc.get("save") if isinstance(proc.get("save"), dict) else {}
    return TrainingJob(
        path=path,
        name=name,
        trigger_word=proc.get("trigger_word"),
        device=str(proc.get("device", "cuda")),
        train_dtype=str(train.get("dtype", "bf16")),
        train_steps=_whole(train.get("steps"), None),
        model_name_or_path=str(model["name_or_path"]),
        arch=arch.split(":")[0],  # "qwen_image_edit_plus:2509" names the same arch (models.identify: the tag)
        **quantization(path, model),
        low_vram=bool(model.get("low_vram", False)),
        sample={**SAMPLE_DEFAULTS, **{k: v for k, v in sample.items() if k not in ("samples", "prompts")}},
        items=items,
        unknown=tuple(unknown),
        arch_tag=arch.partition(":")[2] or None,
        network_type=str(network.get("type", "lora")),
        save_every=_whole(save.get("save_every"), 1000),
        max_step_saves_to_keep=_whole(save.get("max_step_saves_to_keep"), 5),
    )


def _whole(value: Any, default: int | None) -> int | None:
    """A whole number as written, else the default (YAML `true` is not a number of steps)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _with_raw_prompt(item: SampleItem, raw: Any) -> SampleItem:
    text = raw.get("prompt") if isinstance(raw, dict) else None
    if not isinstance(text, str):
        return item
    return replace(item, raw_prompt=_parse_flags(Path(), text, "")[0])


def snap(value: int, multiple: int) -> int:
    return int(value) // multiple * multiple
