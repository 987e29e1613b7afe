"""The fidelity check: the training recipe's render against the preview. Does the harness reproduce what
ai-toolkit made? If not, an input is missing or different (checkpoint, LoRA step, control image, a config edited
after training) and a gap of the reference render is not blamed on inference."""

from __future__ import annotations

from PIL import Image

from . import compare as cmp
from . import metrics
from .errors import NotRenderable
from .identity import cpu_kind
from .verdicts import fidelity_verdict


def where(env: dict) -> str:
    """The device this run renders on, as the fidelity verdict names it: `cuda (<gpu>)`, `cpu (<cpu kind>)`."""
    return env["device"] + (f" ({env['gpu']})" if env.get("gpu") else
                            f" ({cpu_kind()})" if env["device"] == "cpu" else "")


def skipped(row: dict) -> bool:
    """Not rendered (`--parity-training failed` and the reference matched): the inputs are not in doubt."""
    row["fidelity_verdict"] = "not rendered (--parity-training failed: the reference matched)"
    return True


class Fidelity:
    """`fidelity(task, preview, jpeg, row)`: the `fidelity_*` columns; True unless the training render is known
    not to reproduce the preview. `floors`: the mean-abs floor of a lossless (`png`) and a JPEG (`jpeg`) preview."""

    def __init__(self, render, images, floors: dict, env: dict):
        self.render, self.images, self.floors, self.env = render, images, floors, env

    def __call__(self, task, preview: Image.Image, jpeg, row: dict) -> bool:
        if task.training_problem:
            row["fidelity_verdict"] = f"not renderable here: {task.training_problem}"
            return True  # unknown: do not blame the inputs
        try:
            training, _ = self.render(task.training, task.model)
        except NotRenderable as exc:
            row["fidelity_verdict"] = f"not renderable here: {exc}"
            return True  # unknown: do not blame the inputs
        self.images.save(task, "training", training)
        fidelity = cmp.compare(preview, metrics.encode_jpeg(training, jpeg) if jpeg else training, ssim=False)
        row["fidelity_max_abs"] = fidelity.max_abs
        row["fidelity_mean_abs"] = fidelity.mean_abs
        reproduced, row["fidelity_verdict"] = fidelity_verdict(
            fidelity.mean_abs, row.get("mean_abs"), self.floors["jpeg" if jpeg else "png"],
            recorded_on=f"{task.training.device} (the config's device)", here=where(self.env))
        return reproduced
