"""The library core: plan the previews of some cases, check each one, and return plain records.

case -> recipes -> render -> compare -> findings -> record. The pytest plugin and the CLI both call this.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from . import compare as cmp
from . import metrics
from .aitk_config import SampleItem, TrainingJob
from .case import BrokenCase, Case, discover
from .errors import CaseError
from .findings import find
from .previews import Preview, index_checkpoints, index_previews, lora_for_step
from .recipe import FIELD_NAMES, Recipe, differing_fields, reference_recipe, switch, training_recipe
from .goldens import Goldens, fingerprint, golden_name
from .images import check_mode, save_preview
from .images import save as write_image
from .store import save_png

DEFAULT_THRESHOLDS = {"ssim_min": 0.9}
# Cached renders are only valid for the code that made them.
RENDER_CODE = hashlib.sha256(b"".join((Path(__file__).parent / f).read_bytes()
                                      for f in ("render.py", "pipeline.py", "preprocess.py"))).hexdigest()[:12]
MAP_NAMES = {"diff": "diff", "ssim": "ssim_map"}  # image suffixes the report reads
# Fidelity: the training render, encoded as the preview was, against the preview file, judged on the mean
# absolute difference (0-255 levels). The fixtures' CPU bf16 previews reproduce here within mean 0.45 / max 6
# levels lossless; saving a render that is a few levels off as JPEG q75 again moves noise-like images by ~1.7
# levels on average (max ~26), so a JPEG preview gets a wider floor. A wrong input (LoRA step, seed,
# checkpoint, control image) moves the image by far more.
FIDELITY_FLOOR = {"png": 1.0, "jpeg": 3.0}


@dataclass(frozen=True)
class Options:
    cases: tuple[Path, ...] = (Path("cases"),)
    report_dir: Path = Path("reports")
    device: str = "cpu"
    dtype: str = "bfloat16"
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


@dataclass
class Task:
    """One preview to check: everything except the pixels."""

    id: str
    case: str
    case_folder: Path
    preview: Path | None
    step: int | None = None
    index: int | None = None
    model: str | None = None
    training: Recipe | None = None
    reference: Recipe | None = None
    thresholds: dict = field(default_factory=dict)
    accept: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    error: str | None = None


def _model_for(case: Case, job: TrainingJob, options: Options) -> str:
    if options.model:
        return options.model
    if case.settings.model:
        return case.settings.model
    name = job.model_name_or_path
    for prefix, target in case.settings.paths:  # a training-machine folder mapped by `paths:`
        if name == prefix or name.startswith(prefix + "/"):
            return str(target / name[len(prefix):].lstrip("/"))
    return name


def scheduler_config(model: str) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    try:
        return dict(FlowMatchEulerDiscreteScheduler.load_config(model, subfolder="scheduler",
                                                                local_files_only=Path(model).is_dir()))
    except (OSError, ValueError) as exc:
        raise CaseError(model, f"cannot read the model's scheduler config ({exc.__class__.__name__})",
                        "set `model:` in parity.yaml to a diffusers folder (or a hub id that is cached)") from None


def _case_tasks(case: Case, options: Options) -> list[Task]:
    previews, stray = index_previews(case.folder)
    tasks: list[Task] = []
    try:
        job = case.job()
        model = _model_for(case, job, options)
        sched = scheduler_config(model)
        checkpoints = index_checkpoints(case.folder, job.name)
    except CaseError as err:
        return [_error_task(case.name, case.folder, pv, str(err)) for pv in previews] or \
               [_error_task(case.name, case.folder, None, str(err))]
    thresholds = {**options.thresholds, **case.settings.thresholds}
    for pv in previews:
        task = Task(id=f"{case.name}/{pv.step}/{pv.index}", case=case.name, case_folder=case.folder,
                    preview=pv.path, step=pv.step, index=pv.index, model=model, thresholds=thresholds,
                    accept=case.settings.accept)
        try:
            _build_recipes(task, case, job, pv, checkpoints, sched, options)
        except CaseError as err:
            task.error = str(err)
        tasks.append(task)
    for s in stray:
        tasks.append(Task(id=f"{case.name}/stray/{s.path.name}", case=case.name, case_folder=case.folder,
                          preview=s.path, error=f"{s.path}: {s.reason}", notes=["skipped"]))
    # Two previews with the same step and index (a resumed run): keep both, tell them apart.
    seen: dict[str, int] = {}
    for t in tasks:
        seen[t.id] = seen.get(t.id, 0) + 1
    for t in tasks:
        if seen[t.id] > 1 and t.preview is not None:
            t.id += f"/{t.preview.stem.split('__')[0]}"
    return tasks


def _build_recipes(task: Task, case: Case, job: TrainingJob, pv: Preview, checkpoints, sched, options) -> None:
    if job.arch and job.arch != "qwen_image_edit_plus":
        raise CaseError(job.path, f"model.arch is {job.arch!r}; this harness models qwen_image_edit_plus only",
                        "use a Qwen-Image-Edit-2509 (qwen_image_edit_plus) training run")
    if pv.index >= len(job.items):
        raise CaseError(pv.path, f"sample index {pv.index} but the config has {len(job.items)} prompts",
                        "use the config of the run that wrote this preview")
    item: SampleItem = job.items[pv.index]
    ckpt = lora_for_step(case.folder, job.name, pv.step, checkpoints)
    lora = str(ckpt.path) if ckpt else None
    if ckpt is None:
        task.notes.append("step 0: rendered without the LoRA (an untrained LoRA has a zero up-matrix)")
    # ai-toolkit merges the LoRA only when every prompt uses the same multiplier and the base is not quantized.
    merged = len({it.network_multiplier for it in job.items}) == 1 and not job.quantize
    task.training = training_recipe(job, item, lora, case.resolve, lora_merged=merged)
    task.reference = reference_recipe(job, item, lora, case.resolve, scheduler=sched, device=options.device,
                                      dtype=options.dtype)
    if job.unknown:
        task.notes.append("config keys not modelled: " + ", ".join(job.unknown))


def _error_task(case: str, folder: Path, pv: Preview | None, message: str) -> Task:
    ident = f"{case}/{pv.step}/{pv.index}" if pv else f"{case}/config"
    return Task(id=ident, case=case, case_folder=folder, preview=pv.path if pv else None,
                step=pv.step if pv else None, index=pv.index if pv else None, error=message)


def plan(options: Options) -> list[Task]:
    """Every preview of every case under the roots, with its recipes (or the error that stops it)."""
    tasks: list[Task] = []
    for case in discover(list(options.cases)):
        if isinstance(case, BrokenCase):
            previews, _ = index_previews(case.folder)
            tasks += [_error_task(case.name, case.folder, pv, str(case.error)) for pv in previews] or \
                [_error_task(case.name, case.folder, None, str(case.error))]
        else:
            tasks += _case_tasks(case, options)
    if options.shard:
        i, n = options.shard
        tasks = [t for k, t in enumerate(tasks) if k % n == i - 1]
    return tasks


def preview_jpeg(path: Path):
    """How a preview file was JPEG-encoded (None for lossless), read once per file version."""
    st = os.stat(path)
    return _preview_jpeg(str(path), st.st_size, st.st_mtime)


@functools.lru_cache(maxsize=256)
def _preview_jpeg(path: str, size: int, mtime: float):
    return metrics.preview_jpeg(path)


def open_preview(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise CaseError(path, f"preview image cannot be read ({exc.__class__.__name__})",
                        "copy the preview again from the training machine, or delete it") from None


def deterministic() -> None:
    """Deterministic kernels: what --parity-deterministic switches on (recorded in the report)."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False


def environment(device: str) -> dict[str, str]:
    import diffusers
    import peft
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else ""
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "device": device, "gpu": gpu}


class Checker:
    """Renders and compares tasks; holds the render cache and where images go."""

    def __init__(self, options: Options):
        self.options = options
        check_mode(options.report_images)
        if options.deterministic:
            deterministic()
        self.env = environment(options.device)
        self.env["deterministic"] = str(options.deterministic).lower()
        self.goldens = None
        if options.goldens is not None:
            goldens = Goldens(options.goldens, update=options.update_goldens)
            self.goldens = goldens if goldens.active else None
        # the metrics run on the render device: on a GPU they cost well under 1 % of a real render
        self.metric_set = metrics.build(options.metrics, lpips_weights=options.lpips_weights, device=options.device)
        self.renders = 0
        self._recent: dict[str, Image.Image] = {}  # the last few renders: one preview's are reused

    def render(self, recipe: Recipe, model: str) -> tuple[Image.Image, float]:
        key = f"{recipe.key()}|{model}"
        if key in self._recent:
            return self._recent[key], 0.0
        image, seconds = self._render(recipe, model)
        self._recent[key] = image
        while len(self._recent) > 16:
            self._recent.pop(next(iter(self._recent)))
        return image, seconds

    def _render(self, recipe: Recipe, model: str) -> tuple[Image.Image, float]:
        from . import pipeline, render

        cache = None
        if self.options.cache_dir is not None:
            fp = json.dumps([recipe.key(), model, self.options.device, self.env, RENDER_CODE], sort_keys=True)
            cache = Path(self.options.cache_dir) / f"{recipe.key()}-{_short_hash(fp)}.png"
            if cache.is_file():
                with Image.open(cache) as im:
                    return im.convert("RGB"), 0.0
        loaded = pipeline.load(model, self.options.device, recipe.dtype)
        start = time.perf_counter()
        image = render.render(loaded, recipe)
        seconds = time.perf_counter() - start
        self.renders += 1
        if cache is not None:
            save_png(image, cache)
        return image, seconds

    def check(self, task: Task) -> dict:
        row = base_row(task, self.env)
        if task.error:
            row.update(verdict="skipped" if "skipped" in task.notes else "error", reason=task.error)
            return row
        from .render import NotRenderable

        try:
            preview = open_preview(task.preview)
            reference, seconds = self.render(task.reference, task.model)
        except CaseError as err:
            row.update(verdict="error", reason=str(err))
            return row
        row["render_seconds"] = round(seconds, 3)
        self.save_image(task, "preview", preview)
        self.save_image(task, "reference", reference)
        jpeg = preview_jpeg(task.preview)  # quality and subsampling read from the preview file
        result = metrics.compare_preview(preview, reference, self.metric_set, jpeg=jpeg, device=self.options.device)
        parity, parity_raw = result.judged.comparison, result.raw.comparison
        row.update(parity.as_row())
        row.update({f"{k}_raw": v for k, v in parity_raw.as_row().items()})
        row.update(result.as_row())
        try:
            training, _ = self.render(task.training, task.model)
            self.save_image(task, "training", training)
            fidelity = cmp.compare(preview, metrics.encode_jpeg(training, jpeg) if jpeg else training, ssim=False)
            row["fidelity_max_abs"] = fidelity.max_abs
            row["fidelity_mean_abs"] = fidelity.mean_abs
            floor = self.options.fidelity_floor["jpeg" if jpeg else "png"]
            reproduced = fidelity.mean_abs is not None and fidelity.mean_abs <= floor
            row["fidelity_verdict"] = "reproduced" if reproduced else "cannot reproduce preview"
        except CaseError as err:
            row.update(verdict="error", reason=str(err))
            return row
        except NotRenderable as exc:
            row["fidelity_verdict"] = f"not renderable here: {exc}"
            reproduced = True  # unknown: do not blame the inputs
        if not parity.same_size:
            row.update(verdict="size mismatch",
                       reason=f"preview is {parity.size_a[0]}x{parity.size_a[1]}, regeneration is "
                              f"{parity.size_b[0]}x{parity.size_b[1]}")
            return row
        for name, image in metrics.maps(preview, reference, result.raw).items():
            self.save_image(task, MAP_NAMES.get(name, name + "_map"), image)
        failed = judge(parity, task.thresholds)
        if self.goldens is not None:
            row.update(self.goldens.check(reference, task.reference, fingerprint(self.env, task.reference.dtype),
                                          golden_name(task.case, task.preview)))
        if self.options.explain == "all" or (self.options.explain == "failed" and failed):
            self.explain(task, preview, row)
        accepted = self.accepted(task)
        if failed and accepted and reproduced:
            explained, detail = self.explained_by(task, preview, accepted)
            if explained:
                row.update(verdict="explained", reason=f"gap explained by accepted fields "
                                                       f"{', '.join(accepted)} ({detail}); " + "; ".join(failed))
                return row
        if not failed:
            row.update(verdict="match", reason="")
        elif not reproduced:
            row.update(verdict="cannot reproduce preview",
                       reason=f"the training recipe does not reproduce the preview either (max abs "
                              f"{row['fidelity_max_abs']}, mean abs {row['fidelity_mean_abs']:.2f} levels): an "
                              f"input is missing or different "
                              f"(checkpoint, LoRA step, control image, or the config edited after "
                              f"training); " + "; ".join(failed))
        else:
            row.update(verdict="mismatch", reason="; ".join(failed))
        return row

    @staticmethod
    def preview_encoder(task: Task):
        """Save-and-reload as the preview file was saved (JPEG quality and subsampling read from the file)."""
        jpeg = preview_jpeg(task.preview)
        return (lambda image: metrics.encode_jpeg(image, jpeg)) if jpeg else (lambda image: image)

    def accepted(self, task: Task) -> tuple[str, ...]:
        findings = set(differing_fields(task.training, task.reference))
        return tuple(f for f in FIELD_NAMES if f in findings and f in set(self.options.accept) | set(task.accept))

    def explained_by(self, task: Task, preview: Image.Image, fields: tuple[str, ...]) -> tuple[bool, str]:
        """Switching the accepted fields to their training values brings the render down to the training
        render's distance (plus the noise floor): the gap is explained by differences the user accepted."""
        from .attribution import distance

        encode, metric = self.preview_encoder(task), self.options.metric
        switched = distance(preview, self.render(switch(task.reference, task.training, fields), task.model)[0],
                            encode, metric)
        training = distance(preview, self.render(task.training, task.model)[0], encode, metric)
        return switched <= training + self.options.floor, f"{metric} {switched:.4g} with them at the training " \
                                                           f"value vs {training:.4g} for the training recipe"

    def noise_floor(self, task: Task, preview: Image.Image, row: dict) -> float:
        """The same training recipe through PyTorch's math attention kernel instead of the fused one: how far
        kernel-level rounding alone moves this image (the floor verdicts and attribution are measured against)."""
        from . import pipeline, render
        from .attribution import distance

        loaded = pipeline.load(task.model, self.options.device, task.training.dtype)
        again = render.render(loaded, task.training, math_attention=True)
        self.renders += 1
        encode = self.preview_encoder(task)
        same = encode(self.render(task.training, task.model)[0])  # in the comparison's encoding
        floor = {m: distance(same, again, encode, m) for m in ("mean_abs", "max_abs", "ssim", "psnr")}
        row.update({"floor_mean_abs": floor["mean_abs"], "floor_max_abs": floor["max_abs"],
                    "floor_how": "training recipe, math vs fused attention kernel (same device and dtype)"})
        return floor[self.options.metric]

    def explain(self, task: Task, preview: Image.Image, row: dict):
        """Counterfactual renders: which finding explains the gap (attribution), saved and recorded."""
        from .attribution import attribute

        floor = self.options.floor
        if self.options.noise_floor:
            floor = max(floor, self.noise_floor(task, preview, row))
        result = attribute(lambda recipe: self.render(recipe, task.model)[0], preview, task.training,
                           task.reference, metric=self.options.metric, floor=floor,
                           reverse=self.options.reverse, encode=self.preview_encoder(task))
        row.update(result.as_columns())
        for cause in result.causes:
            if cause.distance is not None:  # already rendered: served from the in-memory cache
                image, _ = self.render(switch(task.reference, task.training, cause.fields), task.model)
                self.save_image(task, f"cause-{cause.name}", image)
        return result

    def save_image(self, task: Task, kind: str, image: Image.Image) -> Path:
        """One image of a preview for the report (images.py: names and encodings)."""
        folder = Path(self.options.report_dir) / "images" / task.case
        if kind == "preview":
            return save_preview(task.preview, image, folder, task.preview.stem, self.options.report_images)
        return write_image(image, folder, task.preview.stem, kind, self.options.report_images)


def judge(c: cmp.Comparison, thresholds: dict) -> list[str]:
    """The thresholds a comparison misses, as readable strings (empty: it passes)."""
    failed = []
    checks = {"ssim_min": (c.ssim, lambda v, t: v >= t, ">="), "psnr_min": (c.psnr, lambda v, t: v >= t, ">="),
              "mean_abs_max": (c.mean_abs, lambda v, t: v <= t, "<="),
              "max_abs_max": (c.max_abs, lambda v, t: v <= t, "<=")}
    for key, limit in thresholds.items():
        value, ok, op = checks[key]
        if value is not None and not ok(value, limit):
            failed.append(f"{key.rsplit('_', 1)[0]} {value:.4g} not {op} {limit:g}")
    return failed


def base_row(task: Task, env: dict) -> dict:
    row = {"id": task.id, "case": task.case, "preview": task.preview.name if task.preview else "",
           "step": task.step, "sample_index": task.index, "verdict": "", "reason": "",
           "ssim": None, "psnr": None, "mean_abs": None, "max_abs": None,
           "fidelity_verdict": "", "fidelity_max_abs": None, "render_seconds": None,
           "top_cause": "", "top_cause_share": None, "causes": "",
           "model": task.model or "", "notes": "; ".join(n for n in task.notes if n != "skipped"),
           "device": env["device"], "torch": env["torch"], "diffusers": env["diffusers"]}
    r = task.reference
    row.update({"width": r.width if r else None, "height": r.height if r else None, "seed": r.seed if r else None,
                "steps": r.steps if r else None, "guidance": r.guidance if r else None,
                "multiplier": r.multiplier if r else None, "prompt": r.prompt if r else "",
                "lora": Path(r.lora).name if r and r.lora else "", "dtype": r.dtype if r else ""})
    findings = find(task.training, task.reference) if task.training and task.reference else []
    row["findings"] = "; ".join(f.field for f in findings)
    row["findings_detail"] = json.dumps([f.__dict__ for f in findings])
    for side, recipe in (("training", task.training), ("reference", task.reference)):
        values = recipe.as_row() if recipe else {}
        for name in FIELD_NAMES:
            row[f"{side}.{name}"] = values.get(name, "")
    return row


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run(options: Options, tasks: list[Task] | None = None) -> list[dict]:
    """Check every task and write the reports; returns the records."""
    from .report import write_reports

    checker = Checker(options)
    records = [checker.check(t) for t in (tasks if tasks is not None else plan(options))]
    write_reports(records, options.report_dir, checker.env)
    return records


def set_threads() -> None:
    """One CPU thread unless told otherwise: two threads on two shared cores time erratically."""
    import torch

    torch.set_num_threads(int(os.environ.get("PARITY_THREADS", "1")))
