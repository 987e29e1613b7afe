"""The library core: plan the previews of some cases, check each one, and return plain records.

case -> recipes -> render -> compare -> findings -> record. The pytest plugin and the CLI both call this.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from . import compare as cmp
from .aitk_config import SampleItem, TrainingJob
from .case import BrokenCase, Case, discover
from .errors import CaseError
from .findings import find
from .previews import Preview, index_checkpoints, index_previews, lora_for_step
from .recipe import FIELD_NAMES, Recipe, reference_recipe, training_recipe
from .store import write_atomic, save_png

DEFAULT_THRESHOLDS = {"ssim_min": 0.9}
# Fidelity: the training render, encoded as the preview was, against the preview file. The fixtures' CPU
# bf16 previews reproduce here within a few levels (kernel-level rounding differs between CPUs).
DEFAULT_FIDELITY_MAX_ABS = 8


@dataclass(frozen=True)
class Options:
    cases: tuple[Path, ...] = (Path("cases"),)
    report_dir: Path = Path("reports")
    device: str = "cpu"
    dtype: str = "bfloat16"
    model: str | None = None  # overrides every case's model
    cache_dir: Path | None = None
    thresholds: dict = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    fidelity_max_abs: float = DEFAULT_FIDELITY_MAX_ABS


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
                    preview=pv.path, step=pv.step, index=pv.index, model=model, thresholds=thresholds)
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
    return tasks


def open_preview(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise CaseError(path, f"preview image cannot be read ({exc.__class__.__name__})",
                        "copy the preview again from the training machine, or delete it") from None


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
        self.env = environment(options.device)
        self.renders = 0

    def render(self, recipe: Recipe, model: str) -> tuple[Image.Image, float]:
        from . import pipeline, render

        cache = None
        if self.options.cache_dir is not None:
            fp = json.dumps([recipe.key(), model, self.options.device, self.env], sort_keys=True)
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
        images = self.image_paths(task)
        save_png(preview, images["preview"])
        save_png(reference, images["reference"])
        fmt = task.training.output_format
        parity_raw = cmp.compare(preview, reference)
        parity = cmp.compare(preview, cmp.encode_like(reference, fmt)) if fmt != "png" else parity_raw
        row.update(parity.as_row())
        row.update({f"{k}_raw": v for k, v in parity_raw.as_row().items()})
        try:
            training, _ = self.render(task.training, task.model)
            save_png(training, images["training"])
            fidelity = cmp.compare(preview, cmp.encode_like(training, fmt))
            row["fidelity_max_abs"] = fidelity.max_abs
            row["fidelity_mean_abs"] = fidelity.mean_abs
            reproduced = fidelity.max_abs is not None and fidelity.max_abs <= self.options.fidelity_max_abs
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
        save_png(cmp.diff_heatmap(preview, reference), images["diff"])
        save_png(cmp.ssim_heatmap(preview, reference), images["ssim_map"])
        failed = judge(parity, task.thresholds)
        if not failed:
            row.update(verdict="match", reason="")
        elif not reproduced:
            row.update(verdict="cannot reproduce preview",
                       reason=f"the training recipe does not reproduce the preview either (max abs "
                              f"{row['fidelity_max_abs']} levels): an input is missing or different "
                              f"(checkpoint, LoRA step, control image); " + "; ".join(failed))
        else:
            row.update(verdict="mismatch", reason="; ".join(failed))
        return row

    def image_paths(self, task: Task) -> dict[str, Path]:
        folder = Path(self.options.report_dir) / "images" / task.case
        stem = task.preview.stem
        return {k: folder / f"{stem}.{k}.png" for k in ("preview", "reference", "training", "diff", "ssim_map")}


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
    import hashlib

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
