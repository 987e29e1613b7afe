"""The library core: check each planned preview (`plan.py`) and return plain records; `run` writes the reports.

case -> recipes -> render -> compare -> findings -> record. The pytest plugin and the CLI both call this. A
preview's check never raises for that preview's sake: every problem becomes its `error` row.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

from PIL import Image

from . import expectations, fidelity, metrics
from .errors import CaseError
from .explainer import Explainer
from .fidelity import Fidelity
from .findings import find
from .goldens import Goldens, fingerprint, golden_name
from .interrupt import INTERRUPT
from .options import Options
from .plan import Task, plan  # noqa: F401 (re-exported: the library's entry points)
from .preview_file import open_preview, preview_jpeg  # noqa: F401 (re-exported)
from .recipe import FIELD_NAMES, Recipe
from .renders import Renders
from .report_images import ReportImages
from .engines.server.client import ServerError
from .verdicts import explained_by_set, judge


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
    from .kernels import bf16_conv_mode

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "device": device, "gpu": gpu, "cpu_bf16_conv": bf16_conv_mode(device)}


class Checker:
    """Checks previews, one record each: the reference image against the preview, the training recipe's fidelity,
    the goldens, the verdict. Its parts: `renders` (the render cache, renders.py), `images` (report_images.py),
    `server` (`remote_reference`: server_mode.py, comfyui_mode.py), `fidelity` (fidelity.py), `explainer`
    (explainer.py: attribution and accepted fields); the verdict rules are pure functions (verdicts.py)."""

    def __init__(self, options: Options):
        self.options = options
        self.images = ReportImages(options.report_dir, options.report_images)
        if options.deterministic:
            deterministic()
        self.env = environment(options.device)
        self.env["deterministic"] = str(options.deterministic).lower()
        goldens = Goldens(options.goldens, update=options.update_goldens) if options.goldens is not None else None
        self.goldens = goldens if goldens is not None and goldens.active else None
        # the metrics run on the render device: on a GPU they cost well under 1 % of a real render
        self.metric_set = metrics.build(options.metrics, lpips_weights=options.lpips_weights, device=options.device)
        self.renders = Renders(options.device, options.offload, options.cache_dir, deterministic=options.deterministic)
        self.explainer = Explainer(options, self.renders, self.images)
        self.fidelity = Fidelity(self.render, self.images, options.fidelity_floor, self.env)  # fidelity.py
        self._prepared: set[str] = set()  # cases whose renders were made together (`prepare`)
        self.server = remote_reference(options, self.render, self.images)  # None: the reference is rendered here

    def render(self, recipe: Recipe, model: str) -> tuple[Image.Image, float]:
        return self.renders.get(recipe, model)

    def explain(self, task: Task, preview: Image.Image, row: dict, only: tuple[str, ...] | None = None):
        return self.explainer.explain(task, preview, row, only)  # explainer.py

    def prescribe(self, task: Task, preview: Image.Image | None = None):
        return self.explainer.prescribe(task, preview)  # explainer.py

    def prepare(self, tasks: list[Task]) -> None:
        """Make the renders these tasks surely need, grouped by pipeline (each loaded once): the reference, and the
        training recipe when it is always rendered. Called with a case's tasks before its first check."""
        jobs = []
        for task in tasks:
            if task.error or task.reference is None:
                continue
            if self.server is None or self.server.local:
                jobs.append((task.reference, task.model))
            if self.options.training == "always" and not task.training_problem:
                jobs.append((task.training, task.model))
        self.renders.prepare(jobs)

    def prepare_case(self, task: Task, tasks: list[Task]) -> None:
        """`prepare` the tasks of `task`'s case, once per case."""
        if tasks and task.case not in self._prepared:
            self._prepared.add(task.case)
            self.prepare([t for t in tasks if t.case == task.case])

    def check(self, task: Task, run_tasks: list[Task] = ()) -> dict:
        """The record of one preview. Never raises for a preview's sake: a bad input is an `error` row naming the
        file and the fix, and anything unforeseen an `error` row with the exception (Ctrl-C still stops). With
        `run_tasks` (every preview this process checks), the first preview of a case makes the renders of the whole
        case, grouped by pipeline: its row counts them."""
        if self.server is not None:
            task = self.server.task(task)
        row = base_row(task, self.env)
        if task.error:
            row.update(verdict="skipped" if "skipped" in task.notes else "error", reason=task.error)
            return expectations.apply(row, task.expect)  # a known gap parity.yaml declares (`expect:`)
        start, renders = time.perf_counter(), self.renders.made
        self.prepare_case(task, run_tasks)
        try:
            self._check(task, row)
        except (CaseError, ServerError) as err:
            row.update(verdict="error", reason=str(err))
        except Exception as exc:  # noqa: BLE001 -- one preview's failure is never the run's
            where = traceback.extract_tb(exc.__traceback__)[-1]
            row.update(verdict="error", reason=f"unexpected {exc.__class__.__name__} while checking "
                                               f"{task.preview}: {exc} (at {Path(where.filename).name}:{where.lineno})")
        row["check_seconds"] = round(time.perf_counter() - start, 3)
        row["renders"] = self.renders.made - renders  # made now; the rest came from the render cache
        return expectations.apply(row, task.expect)

    def _check(self, task: Task, row: dict) -> None:
        preview = open_preview(task.preview)
        if self.server is None:
            reference, seconds = self.render(task.reference, task.model)
            row["render_seconds"] = round(seconds, 3)
        else:
            reference = self.server.reference(task, row)
        self.images.save(task, "preview", preview)
        self.images.save(task, "reference", reference)
        jpeg = preview_jpeg(task.preview)  # quality and subsampling read from the preview file
        result = metrics.compare_preview(preview, reference, self.metric_set, jpeg=jpeg, device=self.options.device)
        parity, parity_raw = result.judged.comparison, result.raw.comparison
        row.update(parity.as_row())
        row.update({f"{k}_raw": v for k, v in parity_raw.as_row().items()})
        row.update(result.as_row())
        failed = self.judge_reference(task, preview, reference, result)
        needed = failed or self.options.training == "always" or self.options.explain == "all"
        reproduced = self.fidelity(task, preview, jpeg, row) if needed else fidelity.skipped(row)
        if self.goldens is not None:
            row.update(self.goldens.check(reference, task.reference, fingerprint(self.env, task.reference.dtype),
                                          golden_name(task.case, task.preview)))
        self.conclude(task, preview, row, failed, reproduced, parity.same_size)

    def judge_reference(self, task: Task, preview: Image.Image, reference: Image.Image, result) -> list:
        """The thresholds the reference render misses (with its maps saved), or the size gap."""
        parity = result.judged.comparison
        if not parity.same_size:  # e.g. the divisors differ: attribution and `accept` can still name the field
            return [f"preview is {parity.size_a[0]}x{parity.size_a[1]}, regeneration is "
                    f"{parity.size_b[0]}x{parity.size_b[1]}"]
        self.images.save_maps(task, preview, reference, result.raw)
        return judge(parity, task.thresholds)

    def conclude(self, task: Task, preview: Image.Image, row: dict, failed: list, reproduced: bool,
                 same_size: bool) -> None:
        """The verdict, and attribution where asked. With `--parity-explain failed`, a preview the accepted
        fields explain (verdict `explained`) has passed: attribution renders only those fields' switches (their
        share of the gap); the other differing fields are listed, not rendered (`all` renders every one)."""
        outcome = self.verdict(task, preview, row, failed, reproduced) if same_size or reproduced else {}
        explain = self.options.explain == "all" or (self.options.explain == "failed" and failed)
        if explain and (same_size or reproduced):  # a size gap with a wrong-size training render: inputs
            only = None
            if self.options.explain == "failed" and outcome.get("verdict") == "explained":
                only = self.explainer.accepted(task)
            result = self.explainer.explain(task, preview, row, only=only)
            if outcome.get("verdict") == "mismatch" and result is not None and result.closing is not None:
                outcome = explained_by_set(outcome, result.closing, self.explainer.accepted(task))
        if not same_size and outcome.get("verdict") != "explained":
            outcome = dict(verdict="size mismatch", reason=failed[0])
        row.update(outcome)

    def verdict(self, task: Task, preview: Image.Image, row: dict, failed: list[str], reproduced: bool) -> dict:
        accepted = self.explainer.accepted(task)
        renderable = not str(row.get("fidelity_verdict", "")).startswith("not renderable")
        if failed and accepted and reproduced and renderable:
            explained, detail = self.explainer.explained_by(task, preview, accepted)
            if explained:
                return dict(verdict="explained", reason=f"gap explained by accepted fields {', '.join(accepted)} "
                                                        f"({detail}); " + "; ".join(failed))
        if not failed:
            return dict(verdict="match", reason="")
        if not reproduced:
            return dict(verdict="cannot reproduce preview",
                        reason=f"the training recipe does not reproduce the preview either (max abs "
                               f"{row['fidelity_max_abs']}, mean abs {row['fidelity_mean_abs']:.2f} levels): an input "
                               f"is missing or different (checkpoint, LoRA step, control image, or the config edited "
                               f"after training); " + "; ".join(failed))
        return dict(verdict="mismatch", reason="; ".join(failed))


def remote_reference(options: Options, render, images):
    """Where the reference images come from when they are not rendered here: a running reference server
    (`--parity-server`, server_mode.py) or a running ComfyUI (`--parity-comfyui`, comfyui_mode.py); else None."""
    if options.server:
        from .server_mode import ServerMode

        return ServerMode(options, render, images)
    if options.comfyui:
        from .comfyui_mode import ComfyUIMode

        return ComfyUIMode(options, render, images)
    return None


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
                "multiplier": r.multiplier if r else None, "prompt": r.prompt if r else task.prompt,
                "lora": Path(r.lora).name if r and r.lora else "", "dtype": r.dtype if r else ""})
    findings = find(task.training, task.reference) if task.training and task.reference else []
    row["findings"] = "; ".join(f.field for f in findings)
    row["findings_detail"] = json.dumps([f.__dict__ for f in findings])
    row.update(task.lora_keys)  # lora_keys_<engine>: the LoRA keys each engine binds (lora_keys.py)
    for side, recipe in (("training", task.training), ("reference", task.reference)):
        values = recipe.as_row() if recipe else {}
        for name in FIELD_NAMES:
            row[f"{side}.{name}"] = values.get(name, "")
    return row


def run(options: Options, tasks: list[Task] | None = None, progress=None) -> list[dict]:
    """Check every task and write the reports; returns the records.

    `progress` (optional) is told `start(task)` and `done(task, record)`. Interrupted (Ctrl-C, or SIGTERM once
    `interrupt.stop_on_sigterm` is in force), the reports of the previews done so far are written, marked as
    interrupted, and the KeyboardInterrupt goes on; every finished render is in the cache, so running again
    resumes."""
    from .report import write_reports

    tasks = plan(options) if tasks is None else tasks
    checker = Checker(options)
    records: list[dict] = []
    with INTERRUPT.loop():  # a SIGTERM outside a check waits for the loop: the reports are always written whole
        try:
            for task in tasks:
                if progress is not None:
                    progress.start(task)
                with INTERRUPT.check():
                    record = checker.check(task, tasks)
                records.append(record)
                if progress is not None:
                    progress.done(task, record)
        finally:
            env = dict(checker.env)
            if len(records) < len(tasks):
                env["interrupted"] = f"after {len(records)} of {len(tasks)} previews"
            write_reports(records, options.report_dir, env)
    return records


def summary_line(records: list[dict]) -> str:
    """Verdict counts and what the renders cost, for the end of a run (pytest and `parity run`)."""
    counts: dict[str, int] = {}
    for r in records:
        shown = r.get("verdict") or "(none)"
        if r.get("expected_outcome"):  # a gap parity.yaml declares: as declared, or news
            shown += f" ({'expected' if r['expected_outcome'] == expectations.EXPECTED else 'unexpected'})"
        counts[shown] = counts.get(shown, 0) + 1
    verdicts = ", ".join(f"{n} {v}" for v, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    made = sum(r.get("renders") or 0 for r in records)
    seconds = sum(r.get("check_seconds") or 0 for r in records)
    return (f"preview-parity: {verdicts} ({len(records)} previews); {made} renders made, the rest from the render "
            f"cache; {seconds:.1f} s checking")


def set_threads() -> None:
    """One CPU thread unless told otherwise: two threads on two shared cores time erratically."""
    import torch

    torch.set_num_threads(int(os.environ.get("PARITY_THREADS", "1")))
