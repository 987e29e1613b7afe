"""The library core: check each planned preview (`plan.py`) and return plain records; `run` writes the reports.

case -> recipes -> render -> compare -> findings -> record. The pytest plugin and the CLI both call this. A
preview's check never raises for that preview's sake: every problem becomes its `error` row.
"""

from __future__ import annotations

import functools
import json
import os
import time
import traceback
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from . import compare as cmp
from . import expectations, metrics
from .errors import CaseError, NotRenderable
from .findings import find
from .goldens import Goldens, fingerprint, golden_name
from .identity import cpu_kind
from .images import check_mode, save_preview
from .images import save as write_image
from .interrupt import INTERRUPT
from .options import Options
from .plan import Task, plan  # noqa: F401 (re-exported: the library's entry points)
from .recipe import FIELD_NAMES, Recipe, differing_fields, switch
from .renders import Renders
from .engines.server.client import ServerError
from .verdicts import explained_by_set, fidelity_verdict, judge, passes

MAP_NAMES = {"diff": "diff", "ssim": "ssim_map"}  # image suffixes the report reads


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
    from .kernels import bf16_conv_mode

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "device": device, "gpu": gpu, "cpu_bf16_conv": bf16_conv_mode(device)}


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
        self.renders = Renders(options.device, options.offload, options.cache_dir, deterministic=options.deterministic)
        self._prepared: set[str] = set()  # cases whose renders were made together (`prepare`)
        self.server = None  # server mode (--parity-server): the reference images come from a running server
        if options.server:
            from .engines.server.client import ServerSide

            self.server = ServerSide(options.server, options.server_timeout)

    def render(self, recipe: Recipe, model: str) -> tuple[Image.Image, float]:
        return self.renders.get(recipe, model)

    def prepare(self, tasks: list[Task]) -> None:
        """Make the renders these tasks surely need, grouped by pipeline (each loaded once): the reference, and the
        training recipe when it is always rendered. Called with a case's tasks before its first check."""
        jobs = []
        for task in tasks:
            if task.error or task.reference is None:
                continue
            if self.server is None or self.options.server_local:
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
            reference, fields = self.server.image(task)
            row.update(fields)
            if self.options.server_local:
                self.server_vs_local(task, reference, row)
        self.save_image(task, "preview", preview)
        self.save_image(task, "reference", reference)
        jpeg = preview_jpeg(task.preview)  # quality and subsampling read from the preview file
        result = metrics.compare_preview(preview, reference, self.metric_set, jpeg=jpeg, device=self.options.device)
        parity, parity_raw = result.judged.comparison, result.raw.comparison
        row.update(parity.as_row())
        row.update({f"{k}_raw": v for k, v in parity_raw.as_row().items()})
        row.update(result.as_row())
        failed = self.judge_reference(task, preview, reference, result)
        needed = failed or self.options.training == "always" or self.options.explain == "all"
        reproduced = self.fidelity(task, preview, jpeg, row) if needed else self.fidelity_skipped(row)
        if self.goldens is not None:
            row.update(self.goldens.check(reference, task.reference, fingerprint(self.env, task.reference.dtype),
                                          golden_name(task.case, task.preview)))
        self.conclude(task, preview, row, failed, reproduced, parity.same_size)

    def server_vs_local(self, task: Task, served: Image.Image, row: dict) -> None:
        """The server's image against the harness' render of the same request, saved as the server saves (JPEG
        q95): how closely the harness models the server."""
        local, seconds = self.render(task.reference, task.model)
        row["render_seconds"] = round(seconds, 3)
        self.save_image(task, "local", local)
        same = cmp.compare(served, cmp.encode_like(local, "jpeg-q95"), ssim=False)
        row["server_vs_local_mean_abs"], row["server_vs_local_max_abs"] = same.mean_abs, same.max_abs

    def judge_reference(self, task: Task, preview: Image.Image, reference: Image.Image, result) -> list:
        """The thresholds the reference render misses (with its maps saved), or the size gap."""
        parity = result.judged.comparison
        if not parity.same_size:  # e.g. the divisors differ: attribution and `accept` can still name the field
            return [f"preview is {parity.size_a[0]}x{parity.size_a[1]}, regeneration is "
                    f"{parity.size_b[0]}x{parity.size_b[1]}"]
        for name, image in metrics.maps(preview, reference, result.raw).items():
            self.save_image(task, MAP_NAMES.get(name, name + "_map"), image)
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
                only = self.accepted(task)
            result = self.explain(task, preview, row, only=only)
            if outcome.get("verdict") == "mismatch" and result is not None and result.closing is not None:
                outcome = explained_by_set(outcome, result.closing, self.accepted(task))
        if not same_size and outcome.get("verdict") != "explained":
            outcome = dict(verdict="size mismatch", reason=failed[0])
        row.update(outcome)

    @staticmethod
    def fidelity_skipped(row: dict) -> bool:
        row["fidelity_verdict"] = "not rendered (--parity-training failed: the reference matched)"
        return True

    def fidelity(self, task: Task, preview: Image.Image, jpeg, row: dict) -> bool:
        """The training render against the preview: does the harness reproduce what ai-toolkit made?"""
        if task.training_problem:
            row["fidelity_verdict"] = f"not renderable here: {task.training_problem}"
            return True  # unknown: do not blame the inputs
        try:
            training, _ = self.render(task.training, task.model)
        except NotRenderable as exc:
            row["fidelity_verdict"] = f"not renderable here: {exc}"
            return True  # unknown: do not blame the inputs
        self.save_image(task, "training", training)
        fidelity = cmp.compare(preview, metrics.encode_jpeg(training, jpeg) if jpeg else training, ssim=False)
        row["fidelity_max_abs"] = fidelity.max_abs
        row["fidelity_mean_abs"] = fidelity.mean_abs
        floor = self.options.fidelity_floor["jpeg" if jpeg else "png"]
        here = self.env["device"] + (f" ({self.env['gpu']})" if self.env.get("gpu") else
                                     f" ({cpu_kind()})" if self.env["device"] == "cpu" else "")
        reproduced, row["fidelity_verdict"] = fidelity_verdict(
            fidelity.mean_abs, row.get("mean_abs"), floor,
            recorded_on=f"{task.training.device} (the config's device)", here=here)
        return reproduced

    def verdict(self, task: Task, preview: Image.Image, row: dict, failed: list[str], reproduced: bool) -> dict:
        accepted = self.accepted(task)
        renderable = not str(row.get("fidelity_verdict", "")).startswith("not renderable")
        if failed and accepted and reproduced and renderable:
            explained, detail = self.explained_by(task, preview, accepted)
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

    @staticmethod
    def preview_encoder(task: Task):
        """Save-and-reload as the preview file was saved (JPEG quality and subsampling read from the file)."""
        jpeg = preview_jpeg(task.preview)
        return (lambda image: metrics.encode_jpeg(image, jpeg)) if jpeg else (lambda image: image)

    def accepted(self, task: Task) -> tuple[str, ...]:
        findings = set(differing_fields(task.training, task.reference))
        return tuple(f for f in FIELD_NAMES if f in findings and f in set(self.options.accept) | set(task.accept))

    def explained_by(self, task: Task, preview: Image.Image, fields: tuple[str, ...]) -> tuple[bool, str]:
        """The reference render with the accepted fields switched to their training values passes the thresholds,
        or comes down to the training render's own distance (plus the noise floor): the gap is explained by
        differences the user accepted, and what is left is within tolerance."""
        from .attribution import distance

        encode, metric = self.preview_encoder(task), self.options.metric
        image = self.render(switch(task.reference, task.training, fields), task.model)[0]
        switched = distance(preview, image, encode, metric)
        training = distance(preview, self.render(task.training, task.model)[0], encode, metric)
        within = passes(preview, image, encode, task.thresholds)
        how = "passes the thresholds" if within else "does not pass the thresholds"
        detail = (f"{metric} {switched:.4g} with them at the training value ({how}) vs {training:.4g} for the "
                  f"training recipe")
        return within or switched <= training + self.options.floor, detail

    def noise_floor(self, task: Task, preview: Image.Image, row: dict) -> float:
        """The same training recipe through PyTorch's math attention kernel instead of the fused one: how far
        kernel-level rounding alone moves this image (the floor verdicts and attribution are measured against)."""
        from .attribution import distance

        again, _ = self.renders.get(task.training, task.model, math_attention=True)
        encode = self.preview_encoder(task)
        same = encode(self.render(task.training, task.model)[0])  # in the comparison's encoding
        floor = {m: distance(same, again, encode, m) for m in ("mean_abs", "max_abs", "ssim", "psnr")}
        row.update({"floor_mean_abs": floor["mean_abs"], "floor_max_abs": floor["max_abs"],
                    "floor_how": "training recipe, math vs fused attention kernel (same device and dtype)"})
        return floor[self.options.metric]

    def explain(self, task: Task, preview: Image.Image, row: dict, only: tuple[str, ...] | None = None):
        """Counterfactual renders: which finding explains the gap (attribution), saved and recorded; with `only`
        (the accepted fields of an explained preview), just the causes that hold one of them."""
        from .attribution import attribute, counterfactuals
        floor = self.options.floor
        if task.training_problem:  # e.g. the ARA was not found: say which file, as the fidelity column does
            row["causes"] = json.dumps({"unavailable": f"the training recipe is not rendered here: "
                                                      f"{task.training_problem}"})
            return None
        try:
            self.renders.prepare([(r, task.model) for r in (task.reference, task.training, *counterfactuals(
                task.training, task.reference, only, self.options.reverse))])  # one load per pipeline
            if self.options.noise_floor:
                floor = max(floor, self.noise_floor(task, preview, row))
            encode = self.preview_encoder(task)
            result = attribute(lambda recipe: self.render(recipe, task.model)[0], preview, task.training,
                               task.reference, metric=self.options.metric, floor=floor,
                               reverse=self.options.reverse, encode=encode, only=only,
                               only_reason=f"the accepted fields ({', '.join(only or ())}) explain the gap; "
                                           f"--parity-explain all renders it",
                               passes=lambda image: passes(preview, image, encode, task.thresholds),
                               prepare=lambda recipes: self.renders.prepare([(r, task.model) for r in recipes]))
        except NotRenderable as exc:  # attribution measures against the training render
            row["causes"] = json.dumps({"unavailable": f"the training recipe is not rendered here: {exc}"})
            return None
        row.update(result.as_columns())
        if self.options.reverse and result.closing is not None:  # a failed preview: the request that fixes it
            fix = self.prescribe(task, preview)
            row.update(fix=fix.describe(), fix_distance=fix.distance, fix_passes=fix.passes)
        for cause in result.causes:
            if cause.distance is not None:  # already rendered: served from the in-memory cache
                image, _ = self.render(switch(task.reference, task.training, cause.fields), task.model)
                self.save_image(task, f"cause-{cause.name}", image)
        return result

    def prescribe(self, task: Task, preview: Image.Image | None = None):
        """The smallest change to the server's request for this preview that brings its render within the
        thresholds, verified by rendering (prescription.py)."""
        from .attribution import distance
        from .prescription import prescribe
        from .engines.server.requests import prepare

        preview = open_preview(task.preview) if preview is None else preview
        encode, metric = self.preview_encoder(task), self.options.metric
        return prescribe(lambda recipe: self.render(recipe, task.model)[0],
                         lambda image: distance(preview, image, encode, metric),
                         lambda image: passes(preview, image, encode, task.thresholds), prepare(task)[1])

    def save_image(self, task: Task, kind: str, image: Image.Image) -> Path:
        """One image of a preview for the report (images.py: names and encodings)."""
        folder = Path(self.options.report_dir) / "images" / task.case
        if kind == "preview":
            return save_preview(task.preview, image, folder, task.preview.stem, self.options.report_images)
        return write_image(image, folder, task.preview.stem, kind, self.options.report_images)


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
