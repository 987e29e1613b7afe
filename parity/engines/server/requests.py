"""The reference server's request for each preview: what to send to runcomfy-com/ai-toolkit-inference so that it
renders the preview as closely as it can, and what it cannot be told (notes: shared/research/runcomfy-server.md).

case -> recipes -> request. The request carries ai-toolkit's values wherever the server's schema has a place for
them: the prompt after `[trigger]`/`[name]` (so no trigger word is sent), the negative prompt, the size ai-toolkit
snapped to, the seed it walked to (the server never walks), steps, guidance, the LoRA of the preview's step at its
multiplier (one LoRA per request; a step-0 preview, rendered without a LoRA, gets the case's LoRA at multiplier 0,
since the server demands one), and the control images ai-toolkit's VAE encoded, in its order, as `ctrl_img_1..3`.
What stays different is the server's own way (its CFG norm, resizes, LoRA method, dtype, JPEG q95, ...): the
request's server recipe is the harness' reference recipe with those values, and the findings between it and the
training recipe are listed beside each request.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from ...findings import find
from ...models import by_name, rules
from ...plan import Task
from ...recipe import Recipe

IMAGE_MODES = ("base64", "path")


def server_recipe(task: Task, stand_in: str | None) -> Recipe:
    """What the server renders for this preview's request: the reference recipe (the server's rules) with every
    value the request can carry set to ai-toolkit's."""
    t, r = task.training, task.reference
    model = by_name(r.model)
    divisor = model.reference_divisor
    images = t.control_images_vae
    if t.lora is None and stand_in:  # the stand-in goes on as the server puts any LoRA on
        r = r.with_fields(lora_application=model.reference_lora)
    return r.with_fields(width=t.width // divisor * divisor, height=t.height // divisor * divisor, seed=t.seed,
                         steps=t.steps, guidance=t.guidance, prompt=t.prompt, negative_prompt=t.negative_prompt,
                         lora=t.lora or stand_in, multiplier=t.multiplier if t.lora else 0.0,
                         control_images_prompt=images, control_images_vae=images,
                         output_format="jpeg-q95")  # the server saves its result as JPEG at quality 95


def encode_image(path: str, mode: str) -> str:
    if mode == "path":
        return str(Path(path).resolve())
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def request(task: Task, images: str = "base64", fix=None) -> dict:
    """One JSON line: the request, the differences that remain, and notes; with `fix(task) -> Prescription`, the
    request with the verified fix applied and a `fix` entry saying what changed and what its render measured."""
    line = prepare(task, images)[0]
    if fix is not None:
        prescription = fix(task)
        prompt, loras = line["request"]["prompts"][0], line["request"]["loras"]
        for name, value in prescription.changes.items():
            if name == "network_multiplier":
                loras[0][name] = value
            else:
                prompt[name] = value
        line["fix"] = {"changes": prescription.changes, "passes": prescription.passes,
                       "distance": prescription.distance, "renders": prescription.renders,
                       "summary": prescription.describe()}
    return line


def prepare(task: Task, images: str = "base64") -> tuple[dict, Recipe]:
    """(the JSON line of `request`, the recipe the server renders for it)."""
    notes = []
    stand_in = None
    if task.training.lora is None:  # any LoRA of the run's own: at multiplier 0 it adds nothing
        stand_in = next(iter(sorted(str(p) for p in task.case_folder.glob("*.safetensors"))), None)
        notes.append("step 0: ai-toolkit rendered it without a LoRA; the server needs one, so the case's LoRA goes "
                     "at multiplier 0" if stand_in else
                     "step 0 without a LoRA, and the case holds none: the server refuses a request without one "
                     "(LORA_FILE_REQUIRED); add any LoRA of this model at multiplier 0")
    server = server_recipe(task, stand_in)
    model = by_name(server.model)
    prompt = {"prompt": server.prompt, "neg": server.negative_prompt, "width": server.width, "height": server.height,
              "seed": server.seed, "sample_steps": server.steps, "guidance_scale": server.guidance}
    for key, path in rules(model).request_control_images(server.control_images_vae).items():  # ctrl_img_<n>
        prompt[key] = encode_image(path, images)
    body = {"model": model.id, "prompts": [prompt],
            "loras": [{"path": str(Path(server.lora).resolve()), "network_multiplier": server.multiplier}]
            if server.lora else []}
    if images == "path":
        notes.append("control images as local paths: the server reads only base64 or http(s) URLs (ai-toolkit-"
                     "inference af4aec1), so these are for a client that turns them into one of those")
    compared = server if task.training.lora else server.with_fields(lora=None, multiplier=task.training.multiplier)
    remaining = [{"field": f.field, "training": f.training, "server": f.reference, "effect": f.effect}
                 for f in find(task.training, compared)]
    return {"id": task.id, "preview": str(task.preview), "request": body, "remaining": remaining,
            "notes": notes}, server


def write(tasks: list[Task], out, images: str = "base64", fix=None) -> tuple[int, list[str]]:
    """JSON lines for every preview with recipes (with `fix`, each with its verified fix applied); (lines written,
    the errors of the others)."""
    written, problems = 0, []
    for task in tasks:
        if task.training is None or task.reference is None:
            problems.append(f"{task.id}: {task.error or 'no recipes'}")
            continue
        out.write(json.dumps(request(task, images, fix)) + "\n")
        out.flush()
        written += 1
    return written, problems
