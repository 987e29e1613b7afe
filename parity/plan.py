"""Plan a run: every preview of every case, with its two recipes, or every problem that stops it.

case -> (preflight) -> recipes. Nothing is rendered or loaded here: the model is only located (a local folder,
or the local Hugging Face cache), LoRA files and images are checked by their headers, so a run over broken
cases reports all of their problems in seconds. A broken case is an error for that case, never for the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import engines, expectations, lora_keys, models, preflight, quantize
from .aitk_config import SampleItem, TrainingJob
from .case import PARITY_FILE, BrokenCase, Case, discover, map_path
from .errors import CaseError
from .identity import file_sha256
from .options import Options
from .previews import Preview, PrunedCheckpoint, index_checkpoints, index_previews, lora_for_step
from .engines.aitk import training_recipe
from .recipe import Recipe


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
    prompt: str = ""  # the sample's prompt as ai-toolkit used it, also when a problem stops the recipes
    training_problem: str | None = None  # an input only the training render needs is missing (e.g. the ARA)
    expect: expectations.Expectation | None = None  # the known gap parity.yaml declares for this preview
    lora_keys: dict[str, str] = field(default_factory=dict)  # lora_keys_<engine>: "bound/total" (lora_keys.py)


def model_for(case: Case, job: TrainingJob, options: Options) -> str:
    if options.model:
        return options.model
    if case.settings.model:
        return case.settings.model
    mapped = map_path(job.model_name_or_path, case.settings.paths)  # a training-machine folder mapped by `paths:`
    return str(mapped) if mapped is not None else job.model_name_or_path


def scheduler_config(folder: str) -> dict:
    """The model's scheduler config, read from its local folder (preflight.locate_model found it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    try:
        return dict(FlowMatchEulerDiscreteScheduler.load_config(folder, subfolder="scheduler",
                                                                local_files_only=Path(folder).is_dir()))
    except (OSError, ValueError) as exc:
        raise CaseError(folder, f"cannot read the model's scheduler config ({exc.__class__.__name__})",
                        "point `model:` in parity.yaml at a complete diffusers folder (scheduler/ included)") from None


@dataclass
class CaseInputs:
    """What every preview of a case shares: the job, the model, its scheduler, the checkpoints."""

    job: TrainingJob
    model: str
    model_folder: str | None  # None: the model is not here (its problem is in `problems`)
    scheduler: dict | None
    checkpoints: dict
    problems: list[CaseError]
    ara: str | None = None  # the accuracy recovery adapter as a recipe value: "sha256:<hex>", or "not found"
    ara_problem: str | None = None  # why it was not found, and the fix (the training render needs it)
    ara_file: str | None = None  # the local file found
    spec: models.Model | None = None  # the family member the run trained (None: not one the harness renders)


def case_inputs(case: Case, options: Options) -> CaseInputs:
    """Read the config (a CaseError stops the case), then check the model and the arch, collecting problems."""
    job = case.job()
    preflight.check_network(job)  # a LoKr/LoHa run: one clear error for the case, not its keys' mismatch
    model = model_for(case, job, options)
    problems: list[CaseError] = []
    spec = None
    try:
        spec = models.of_job(job)  # which of the Qwen family (models/): an error names the supported ones
    except CaseError as err:
        problems.append(err)
    folder = scheduler = None
    try:
        folder = preflight.locate_model(model)
        scheduler = scheduler_config(folder)  # a reachable, uncached hub id: its small json is downloaded
    except CaseError as err:
        problems.append(err)
        folder = None
    local = folder if folder and Path(folder).is_dir() else None
    # e.g. --parity-model naming a 2511 folder for a 2509 run
    mismatch = preflight.variant_problem(model, local, spec, job.path) if spec and folder else None
    if mismatch:
        problems.append(mismatch)
    checkpoints = index_checkpoints(case.folder, job.name, job.train_steps)
    ara, ara_problem, ara_file = accuracy_recovery_adapter(case, job)
    return CaseInputs(job, model, local, scheduler, checkpoints, problems, ara, ara_problem, ara_file, spec)


def accuracy_recovery_adapter(case: Case, job: TrainingJob) -> tuple[str | None, str | None, str | None]:
    """The run's ARA: (content hash, problem, local file); a missing one stops only the training render (the
    reference needs none)."""
    if not job.ara:
        return None, None, None
    try:
        found = quantize.find_ara(job.ara, job.path, lambda ref: case.find(ref, "accuracy recovery adapter"),
                                  case.settings.ara, case.folder / PARITY_FILE)
    except CaseError as err:
        return "not found", str(err), None
    return "sha256:" + file_sha256(found), None, str(found)


def preview_problems(case: Case, inputs: CaseInputs, pv: Preview) -> tuple[SampleItem | None, list[CaseError]]:
    """Every problem of one preview (its file, its prompt, its size, its LoRA, its control images)."""
    job, problems = inputs.job, []
    try:
        preflight.check_image(pv.path, "preview image",
                              "copy the preview again from the training machine, or delete it")
    except CaseError as err:
        problems.append(err)
    if pv.index >= len(job.items):
        problems.append(CaseError(pv.path, f"sample index {pv.index} but the config has {len(job.items)} prompts",
                                  "use the config of the run that wrote this preview"))
        return None, problems
    item = job.items[pv.index]
    where = f"sample item {item.index}"
    problems += preflight.size_problems(job.path, where, item.width, item.height,
                                        (item.requested_width, item.requested_height),
                                        models.of_job(job).reference_divisor)
    try:
        ckpt = lora_for_step(case.folder, job.name, pv.step, inputs.checkpoints, job.max_step_saves_to_keep,
                             job.save_every)
        if ckpt is not None:
            problems += preflight.lora_problems(str(ckpt.path), inputs.model_folder)
    except CaseError as err:
        problems.append(err)
    prompt_imgs, vae_imgs, reference_imgs = (), (), ()
    if inputs.spec is not None:
        rules = models.rules(inputs.spec)
        try:
            (prompt_imgs, vae_imgs), reference_imgs = (rules.training_control_images(item),
                                                       rules.reference_control_images(item))
        except CaseError as err:  # a sample one side cannot render: named in the config
            problems.append(CaseError(job.path, err.problem, err.fix))
            return item, problems
    for path in dict.fromkeys((*prompt_imgs, *vae_imgs, *reference_imgs)):
        try:
            local = case.resolve(path, "control image")
            preflight.check_image(local, f"control image ({path})",
                                  "replace it with the control image the training used (PNG or JPEG)")
        except CaseError as err:
            problems.append(err)
    return item, problems


def lora_key_counts(case: Case, inputs: CaseInputs, pv: Preview) -> tuple[dict[str, str], list[str]]:
    """How many of the preview's LoRA keys each engine binds (columns lora_keys_<engine>), and a note for each
    inference engine that binds fewer: the LoRA would be silently (partly) ignored there. From headers only."""
    try:
        ckpt = lora_for_step(case.folder, inputs.job.name, pv.step, inputs.checkpoints)
    except CaseError:  # a missing checkpoint: preview_problems says so
        return {}, []
    found = lora_keys.bindings(str(ckpt.path), inputs.model_folder) if ckpt else None
    return lora_keys.columns(found), lora_keys.notes(found)


def case_tasks(case: Case, options: Options) -> list[Task]:
    previews, stray = index_previews(case.folder)
    try:
        inputs = case_inputs(case, options)
    except CaseError as err:
        return [error_task(case.name, case.folder, pv, str(err)) for pv in previews] or \
               [error_task(case.name, case.folder, None, str(err))]
    thresholds = {**options.thresholds, **case.settings.thresholds}
    tasks: list[Task] = []
    for pv in previews:
        task = Task(id=f"{case.name}/{pv.step}/{pv.index}", case=case.name, case_folder=case.folder,
                    preview=pv.path, step=pv.step, index=pv.index, model=inputs.model, thresholds=thresholds,
                    accept=case.settings.accept,
                    expect=expectations.for_preview(case.settings.expect, pv.path.name, pv.step, pv.index))
        item, problems = preview_problems(case, inputs, pv)
        task.prompt = item.prompt if item else ""
        task.lora_keys, key_notes = lora_key_counts(case, inputs, pv)
        task.notes += key_notes
        problems = inputs.problems + problems
        pruned = [p for p in problems if isinstance(p, PrunedCheckpoint)]
        if pruned:  # ai-toolkit deleted its LoRA: nothing to check it with, said as a skip
            task.error = str(pruned[0])
            task.notes.append("skipped")
        elif problems:
            task.error = preflight.joined(problems)
        else:
            try:
                build_recipes(task, case, inputs, pv, item, options)
            except CaseError as err:
                task.error = str(err)
        tasks.append(task)
    tasks += unrendered_tasks(case, inputs, {pv.index for pv in previews})
    for s in stray:
        task = Task(id=f"{case.name}/stray/{s.path.name}", case=case.name, case_folder=case.folder,
                    preview=s.path, error=f"{s.path}: {s.reason}")
        if not s.image:
            task.notes.append("skipped")  # not an image: listed, not an error
        tasks.append(task)
    if not previews and not stray:
        tasks.append(error_task(case.name, case.folder, None, str(CaseError(
            case.folder / "samples", "holds no preview images (ai-toolkit names them <ms>__<step:09d>_<i>.jpg)",
            "copy the samples/ folder of the run from the training machine"))))
    # Two previews with the same step and index (a resumed run): keep both, tell them apart.
    seen: dict[str, int] = {}
    for t in tasks:
        seen[t.id] = seen.get(t.id, 0) + 1
    for t in tasks:
        if seen[t.id] > 1 and t.preview is not None:
            t.id += f"/{t.preview.stem.split('__')[0]}"
    return tasks


def unrendered_tasks(case: Case, inputs: CaseInputs, indices: set[int]) -> list[Task]:
    """A `skipped` row for each sample item with no preview because ai-toolkit cannot render it (its model's rules
    say why, e.g. a Qwen-Image-Edit sample with only `ctrl_img_1`): the expected result, said, not checked."""
    if inputs.spec is None:
        return []
    rules, tasks = models.rules(inputs.spec), []
    for item in inputs.job.items:
        if item.index in indices:
            continue
        try:
            rules.training_control_images(item)
        except CaseError as err:
            task = Task(id=f"{case.name}/unrendered/{item.index}", case=case.name, case_folder=case.folder,
                        preview=None, index=item.index, model=inputs.model, prompt=item.prompt,
                        error=f"sample item {item.index} has no preview, as expected: {err.problem}")
            task.notes.append("skipped")
            tasks.append(task)
    return tasks


def build_recipes(task: Task, case: Case, inputs: CaseInputs, pv: Preview, item: SampleItem,
                  options: Options) -> None:
    job = inputs.job
    ckpt = lora_for_step(case.folder, job.name, pv.step, inputs.checkpoints)
    lora = str(ckpt.path) if ckpt else None
    if ckpt is None:
        task.notes.append("step 0: rendered without the LoRA (an untrained LoRA has a zero up-matrix)")
    elif ckpt.step_from_config:
        task.notes.append(f"{ckpt.path.name} has no ai-toolkit metadata: taken as the last step's "
                          f"({pv.step}, train.steps in the config)")
    # ai-toolkit merges the LoRA only when every prompt uses the same multiplier and the base is not quantized.
    merged = len({it.network_multiplier for it in job.items}) == 1 and not job.quantize
    task.training_problem = inputs.ara_problem
    task.training = training_recipe(job, item, lora, case.resolve, lora_merged=merged, ara=inputs.ara,
                                    ara_file=inputs.ara_file)
    task.reference = engines.reference_recipe(options.reference, job, item, lora, case.resolve,
                                              scheduler=inputs.scheduler, device=options.device, dtype=options.dtype,
                                              workflow=options.workflow)
    too_long = preflight.prompt_length_problems(job.path, f"sample item {item.index}", inputs.model_folder,
                                                (task.training, task.reference))
    if too_long:
        task.error = preflight.joined(too_long)
    if job.unknown:
        task.notes.append("config keys not modelled: " + ", ".join(job.unknown))


def error_task(case: str, folder: Path, pv: Preview | None, message: str, what: str = "config") -> Task:
    ident = f"{case}/{pv.step}/{pv.index}" if pv else f"{case}/{what}"
    return Task(id=ident, case=case, case_folder=folder, preview=pv.path if pv else None,
                step=pv.step if pv else None, index=pv.index if pv else None, error=message)


def plan(options: Options) -> list[Task]:
    """Every preview of every case under the roots, with its recipes (or every problem that stops it)."""
    tasks: list[Task] = []
    cases: dict[Path, Case | BrokenCase] = {}
    for root in options.cases:
        try:
            found = discover([root])
        except CaseError as err:
            found = []
            tasks.append(error_task(Path(root).name, Path(root), None, str(err), "cases root"))
            continue
        if not found:
            tasks.append(error_task(Path(root).name, Path(root), None, str(CaseError(
                root, "holds no ai-toolkit output folder (a folder with a trainer config and samples/)",
                "pass the training output folder (or a folder holding several)")), "cases root"))
        for c in found:  # a case under two of the roots is checked once
            cases.setdefault(c.folder, c)
    for case in (cases[k] for k in sorted(cases)):
        if isinstance(case, BrokenCase):
            previews, _ = index_previews(case.folder)
            tasks += [error_task(case.name, case.folder, pv, str(case.error)) for pv in previews] or \
                [error_task(case.name, case.folder, None, str(case.error))]
            continue
        try:
            tasks += case_tasks(case, options)
        except Exception as exc:  # a bug or an input nobody foresaw: that case errors, the run goes on
            tasks.append(error_task(case.name, case.folder, None,
                                    f"{case.config_path}: unexpected {exc.__class__.__name__} while reading the "
                                    f"case: {exc}"))
    if options.shard:
        i, n = options.shard
        tasks = [t for k, t in enumerate(tasks) if k % n == i - 1]
    return tasks
