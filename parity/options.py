"""Every option of a run, in one table that drives the pytest flags, the ini keys, the `parity` CLI's
arguments and the README's table (`python -m parity.options` prints it).

A setting `name` is `--parity-<name>` and ini key `parity_<name>` for pytest, `--<name>` for `parity run`;
values are resolved "command line, then ini (pytest), then default" from raw text by one converter, so the two
front ends cannot drift apart.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_THRESHOLDS = {"ssim_min": 0.9}
# Fidelity: the training render, encoded as the preview was, against the preview file, judged on the mean
# absolute difference (0-255 levels). The fixtures' CPU bf16 previews reproduce here within mean 0.45 / max 6
# levels lossless; saving a render that is a few levels off as JPEG q75 again moves noise-like images by ~1.7
# levels on average (max ~26), so a JPEG preview gets a wider floor. A wrong input (LoRA step, seed,
# checkpoint, control image) moves the image by far more.
FIDELITY_FLOOR = {"png": 1.0, "jpeg": 3.0}
THRESHOLD_NAMES = ("ssim_min", "mean_abs_max", "max_abs_max", "psnr_min")


@dataclass(frozen=True)
class Options:
    cases: tuple[Path, ...] = (Path("cases"),)
    report_dir: Path = Path("reports")
    device: str = "cpu"
    dtype: str = "bfloat16"  # a resolved dtype: the front ends (`build`) turn the option's `auto` into the device's
    model: str | None = None  # overrides every case's model
    cache_dir: Path | None = None
    thresholds: dict = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    fidelity_floor: dict = field(default_factory=lambda: dict(FIDELITY_FLOOR))
    explain: str = "failed"  # attribution for: failed | all | none
    metric: str = "mean_abs"  # the distance attribution ranks causes by
    reverse: bool = False  # attribution also renders the training recipe with each reference value
    noise_floor: bool = False  # measure the floor: the training recipe again through other attention kernels
    accept: tuple[str, ...] = ()  # recipe fields whose differences are accepted (with each case's `accept:`)
    floor: float = 0.0  # noise floor of `metric` for "explained" and attribution
    goldens: Path | None = None  # regression mode: stored known-good reference renders
    update_goldens: bool = False
    deterministic: bool = False
    shard: tuple[int, int] | None = None  # (i, n): this run checks the i-th of n shards (1-based)
    metrics: tuple[str, ...] = ("lpips_alex", "stlpips_alex")  # perceptual distances (parity.metrics.REGISTRY)
    lpips_weights: str | None = None  # AlexNet trunk for lpips_alex (else torchvision's cache)
    report_images: str = "compact"  # how the report stores images: compact (WebP) | lossless (PNG); images.py
    training: str = "always"  # when the training recipe is rendered: always | failed (the reference comparison)
    offload: str = "none"  # how the pipeline's weights use the accelerator: none | model | sequential | group
    server: str | None = None  # a running ai-toolkit-inference server's URL: its images are the reference side
    server_timeout: float = 600.0  # seconds to wait for the server's image of one preview
    server_local: bool = False  # also render the server's request here and compare it with the server's image
    reference: str = "server"  # the reference engine whose recipe is rendered: server | comfyui (parity/engines/)
    workflow: Path | None = None  # a user's ComfyUI graph: the reference recipe of every preview (implies comfyui)
    comfyui: str | None = None  # a running ComfyUI's URL: it runs each preview's graph, its image is the reference
    comfyui_timeout: float = 600.0  # seconds to wait for ComfyUI's image of one preview
    comfyui_local: bool = False  # also render the ComfyUI recipe here and compare it with ComfyUI's image


class OptionError(ValueError):
    """A bad option value: a usage error in both front ends."""


@dataclass(frozen=True)
class Setting:
    name: str
    help: str
    default: str  # as text, the way a person writes it (what the README shows)
    kind: str = "text"  # text | path | paths | float | words | choice | flag | shard
    choices: tuple[str, ...] = ()
    cli: bool = True  # `parity run` takes it as --<name> (cases: the positional PATHs)
    shown_default: str = ""  # the README's default column, when the raw default needs words

    @property
    def flag(self) -> str:
        return "--parity-" + self.name.replace("_", "-")

    @property
    def cli_flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return "parity_" + self.name


SETTINGS: tuple[Setting, ...] = (
    Setting("cases", "folders searched recursively for ai-toolkit output folders", "cases", "paths", cli=False),
    Setting("report_dir", "where parity.csv, parity.json, index.html and images go", "reports", "path"),
    Setting("report_images", "how the report stores images: compact (full-size WebP, ~1.3 MB a 1024 px preview) or "
            "lossless (full-size PNG, ~13 MB)", "compact", "choice", ("compact", "lossless")),
    Setting("reference", "the reference engine, whose recipe each preview is compared with: server (the runcomfy "
            "ai-toolkit-inference server on stock Diffusers) or comfyui (ComfyUI's native graph as the model's "
            "official template sets it up)", "server", "choice", ("server", "comfyui")),
    Setting("workflow", "a ComfyUI workflow (API format, or the UI format ComfyUI saves) whose sampler path is the "
            "reference for every preview, filled with each preview's prompt, seed, images, LoRA step and size "
            "(implies --parity-reference comfyui)", "", "path"),
    Setting("device", "render device: cuda or cpu", "", shown_default="cuda if available, else cpu"),
    Setting("dtype", "compute dtype of the reference render; auto: what the reference server uses on the device "
            "(bfloat16 on CUDA, float32 on a CPU)", "auto", "choice", ("auto", "bfloat16", "float32", "float16")),
    Setting("model", "hub id or diffusers folder used for every case (overrides parity.yaml)", "",
            shown_default="(none)"),
    Setting("cache_dir", "render and control-latent cache, keyed by recipe and environment ('' turns it off)",
            ".parity-cache", "path"),
    Setting("ssim_min", "default SSIM threshold (a case's parity.yaml thresholds win)",
            str(DEFAULT_THRESHOLDS["ssim_min"]), "float"),
    Setting("mean_abs_max", "default mean-abs-difference threshold, 0-255 levels", "", "float", shown_default="unset"),
    Setting("max_abs_max", "default max-abs-difference threshold, 0-255 levels", "", "float", shown_default="unset"),
    Setting("psnr_min", "default PSNR threshold, dB", "", "float", shown_default="unset"),
    Setting("explain", "attribution (counterfactual renders) for failed, all or no previews (an `explained` "
            "preview, failed only on accepted fields, gets just their switch)", "failed", "choice",
            ("failed", "all", "none")),
    Setting("metric", "distance attribution ranks causes by", "mean_abs", "choice",
            ("mean_abs", "max_abs", "ssim", "psnr")),
    Setting("reverse", "attribution also renders the training recipe with each reference value (what to change "
            "at inference to get the preview back)", "false", "flag"),
    Setting("noise_floor", "measure each explained preview's noise floor (one more render, math attention kernel)",
            "false", "flag"),
    Setting("floor", "a fixed noise floor of the attribution metric, for 'explained'", "0", "float"),
    Setting("metrics", "perceptual distances computed (names from parity.metrics.REGISTRY)",
            "lpips_alex stlpips_alex", "words"),
    Setting("lpips_weights", "AlexNet weights file for lpips_alex (else torchvision's cache under TORCH_HOME)", "",
            shown_default="(torchvision cache)"),
    Setting("goldens", "regression mode: folder of known-good reference renders (checked when it exists)",
            "goldens", "path"),
    Setting("update_goldens", "store each reference render as this environment's golden", "false", "flag"),
    Setting("accept", "recipe fields whose differences are accepted (space separated; with each case's "
            "`accept:`)", "", "words", shown_default="(none)"),
    Setting("deterministic", "deterministic algorithms, cuBLAS workspace config, TF32 off (recorded in the report)",
            "false", "flag"),
    Setting("shard", "I/N: check only the I-th of N shards (CI matrix jobs); merge with `parity merge-reports`",
            "", "shard", shown_default="(none)"),
    Setting("training", "when the training recipe is rendered (the fidelity check): always, or only for previews "
            "whose reference comparison failed (a run whose previews match renders each once)", "always", "choice",
            ("always", "failed")),
    Setting("offload", "keep the weights in CPU memory and move them to the GPU as Diffusers' offload does: none, "
            "model (enable_model_cpu_offload), sequential (enable_sequential_cpu_offload), group "
            "(enable_group_offload, one transformer block at a time)", "none", "choice",
            ("none", "model", "sequential", "group")),
    Setting("server", "a running reference server (runcomfy-com/ai-toolkit-inference) URL: each preview's request "
            "(`parity requests`) is sent there and its image is the reference render; nothing is sent anywhere "
            "else", "", shown_default="(none: render locally)"),
    Setting("server_timeout", "seconds to wait for the server's image of one preview", "600", "float"),
    Setting("server_local", "with --parity-server: also render the request here and compare it with the server's "
            "image (how closely the harness models the server)", "false", "flag"),
    Setting("comfyui", "a running ComfyUI's URL: each preview's ComfyUI recipe (--parity-reference comfyui, or "
            "--parity-workflow) is queued there as a graph of stock nodes and its image is the reference render; "
            "nothing is sent anywhere else (implies --parity-reference comfyui)", "",
            shown_default="(none: render locally)"),
    Setting("comfyui_timeout", "seconds to wait for ComfyUI's image of one preview", "600", "float"),
    Setting("comfyui_local", "with --parity-comfyui: also render the recipe here and compare it with ComfyUI's "
            "image (how closely the harness models that ComfyUI)", "false", "flag"),
)
BY_NAME = {s.name: s for s in SETTINGS}


def _bool(text) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise OptionError(f"{text!r} is not true or false")


def convert(setting: Setting, raw, root: Path):
    """Raw text (or a list, for paths) -> the value Options holds."""
    kind = setting.kind
    if kind == "flag":
        return _bool(raw)
    if kind == "paths":
        items = raw if isinstance(raw, (list, tuple)) else str(raw).split()
        return tuple(_path(root, str(p)) for p in items)
    text = "" if raw is None else str(raw).strip()
    if kind == "path":
        return _path(root, text) if text else None
    if kind == "float":
        if not text:
            return None
        try:
            return float(text)
        except ValueError:
            raise OptionError(f"takes a number, not {text!r}") from None
    if kind == "words":
        return tuple(text.split())
    if kind == "choice":
        if text not in setting.choices:
            raise OptionError(f"{text!r} is not one of {', '.join(setting.choices)}")
        return text
    if kind == "shard":
        return parse_shard(text)
    return text or None


def parse_shard(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise OptionError(f"takes I/N (e.g. 2/4), not {text!r}") from None
    if not 1 <= i <= n:
        raise OptionError(f"{text}: I must be between 1 and N")
    return i, n


def _path(root: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


def build(raw: dict[str, object], root: Path, flag=lambda s: s.flag, **fixed) -> Options:
    """Options from raw values by setting name (missing: the default); `fixed` overrides (e.g. explain="all").
    A bad value is an OptionError naming the option as the front end spells it (`flag`)."""
    from .pipeline import default_device

    values = {}
    for s in SETTINGS:
        value = raw.get(s.name)
        try:
            values[s.name] = convert(s, s.default if value is None else value, root)
        except OptionError as exc:
            raise OptionError(f"{flag(s)}: {exc}") from None
    thresholds = {k: values.pop(k) for k in THRESHOLD_NAMES}
    thresholds = {k: v for k, v in thresholds.items() if v is not None}
    values["device"] = values["device"] or default_device()
    values["dtype"] = auto_dtype(values["device"]) if values["dtype"] == "auto" else values["dtype"]
    if values["offload"] != "none" and not values["device"].startswith("cuda"):
        raise OptionError(f"{flag(BY_NAME['offload'])}: {values['offload']!r} moves weights between CPU memory and a "
                          f"GPU, and this run renders on {values['device']!r} (use --device cuda, or offload none)")
    values["floor"] = values["floor"] or 0.0
    values["server_timeout"] = values["server_timeout"] or 600.0
    if values["server"] and not str(values["server"]).startswith(("http://", "https://")):
        raise OptionError(f"{flag(BY_NAME['server'])}: {values['server']!r} is not an http(s) URL "
                          f"(e.g. http://127.0.0.1:8000)")
    if values["server"] and values["reference"] != "server":
        raise OptionError(f"{flag(BY_NAME['reference'])}: {values['reference']!r} renders the reference here, and "
                          f"{flag(BY_NAME['server'])} takes it from the server (use one of them)")
    values["comfyui_timeout"] = values["comfyui_timeout"] or 600.0
    if values["comfyui"]:
        if not str(values["comfyui"]).startswith(("http://", "https://")):
            raise OptionError(f"{flag(BY_NAME['comfyui'])}: {values['comfyui']!r} is not an http(s) URL "
                              f"(e.g. http://127.0.0.1:8188)")
        if values["server"]:
            raise OptionError(f"{flag(BY_NAME['comfyui'])}: the reference comes from ComfyUI, and "
                              f"{flag(BY_NAME['server'])} takes it from the reference server (use one of them)")
        values["reference"] = "comfyui"
    if values["workflow"]:
        values["reference"] = "comfyui"
        _check_workflow(values["workflow"], flag(BY_NAME["workflow"]), values["server"])
    values["cases"] = values["cases"] or (root / "cases",)
    values.update(fixed)
    return Options(thresholds=thresholds, **values)


def _check_workflow(path: Path, name: str, server: str | None) -> None:
    """The graph reads as a reference (in seconds, before any case is planned): else an OptionError naming the
    file and the node."""
    from .engines.comfyui import workflow

    if server:
        raise OptionError(f"{name}: the reference comes from the server with --parity-server; use one of them")
    try:
        workflow.read_file(path)
    except workflow.WorkflowError as exc:
        raise OptionError(f"{name}: {exc}") from None


def auto_dtype(device: str) -> str:
    """The reference server's dtype on `device` (BasePipeline._default_dtype_for_device): bf16 on CUDA, fp32 on a
    CPU. Never pinned by a repo's ini, so a 20B model is not rendered in fp32 on a GPU by accident."""
    return "bfloat16" if device.startswith("cuda") else "float32"


# -- the two front ends ------------------------------------------------------------------------------------------

def add_to_pytest(parser) -> None:
    group = parser.getgroup("parity", "preview-parity: regenerate ai-toolkit previews with the reference pipeline")
    for s in SETTINGS:
        if s.kind == "flag":
            group.addoption(s.flag, action="store_true", default=None, help=s.help)
            parser.addini(s.ini, s.help, type="bool", default=False)
        elif s.kind == "paths":
            group.addoption(s.flag, nargs="+", default=None, help=s.help)
            parser.addini(s.ini, s.help, type="linelist", default=[s.default])
        else:
            group.addoption(s.flag, default=None, help=s.help + _choices(s), metavar=s.name.upper())
            parser.addini(s.ini, s.help, default=s.default)


def from_pytest(config) -> Options:
    """Command line, then ini, then default; paths relative to pytest's rootdir."""
    raw = {}
    for s in SETTINGS:
        value = config.getoption(s.ini)
        raw[s.name] = config.getini(s.ini) if value is None else value
    return build(raw, Path(config.rootpath))


def add_to_argparse(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    for s in SETTINGS:
        if not s.cli or s.name in skip:
            continue
        if s.kind == "flag":
            parser.add_argument(s.cli_flag, dest=s.name, action="store_true", default=None, help=s.help)
        else:
            default = s.shown_default or repr(s.default)
            parser.add_argument(s.cli_flag, dest=s.name, default=None, metavar=s.name.upper(),
                                help=f"{s.help}{_choices(s)} (default: {default})")


def from_argparse(args: argparse.Namespace, root: Path | None = None, **fixed) -> Options:
    raw = {s.name: getattr(args, s.name, None) for s in SETTINGS}
    raw["cases"] = getattr(args, "paths", None) or None
    return build(raw, root or Path.cwd(), flag=lambda s: s.cli_flag if s.cli else "PATH", **fixed)


def _choices(s: Setting) -> str:
    return f" [{', '.join(s.choices)}]" if s.choices else ""


def markdown_table() -> str:
    """The README's option table."""
    lines = ["| pytest flag | ini key | `parity run` | default | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        cli = f"`{s.cli_flag}`" if s.cli else "`PATH...`"
        default = s.shown_default or (f"`{s.default}`" if s.default else "(none)")
        arg = "" if s.kind == "flag" else (" PATH..." if s.kind == "paths" else "")
        meaning = s.help + (f" (`{'`, `'.join(s.choices)}`)" if s.choices else "")
        lines.append(f"| `{s.flag}{arg}` | `{s.ini}` | {cli} | {default} | {meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
