"""Index a case's preview images and match each to the LoRA checkpoint of its step.

Preview names are `<ms>__<step:09d>_<i>.<ext>` (ai-toolkit's sample file name); checkpoints are
`<name>_<step:09d>.safetensors`, the final one `<name>.safetensors` with its step in `training_info`.
Only `.safetensors` files are ever opened; `optimizer.pt` and other pickles are never touched.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from .errors import CaseError

PREVIEW_NAME = re.compile(r"^(?P<ms>\d+)__(?P<step>\d{9})_(?P<index>\d+)\.(?P<ext>[A-Za-z0-9]+)$")
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp"}
NOT_PREVIEWS = {".tmp", ".thumbs"}


@dataclass(frozen=True)
class Preview:
    path: Path
    ms: int
    step: int
    index: int
    ext: str

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class StrayFile:
    """A file under samples/ that is not named like a preview: reported, not rendered."""

    path: Path
    reason: str
    image: bool = True  # an image file misnamed (an error: it was meant to be checked) or another file


def index_previews(folder: Path) -> tuple[list[Preview], list[StrayFile]]:
    samples = folder / "samples"
    previews: list[Preview] = []
    stray: list[StrayFile] = []
    if not samples.is_dir():
        return previews, stray
    for path in sorted(p for p in samples.rglob("*") if p.is_file()):
        rel = path.relative_to(samples)
        if any(part in NOT_PREVIEWS or part.startswith(".") for part in rel.parts):
            continue  # ai-toolkit's .tmp/ and .thumbs/, and hidden files (.DS_Store)
        m = PREVIEW_NAME.match(path.name)
        is_image = path.suffix.lower().lstrip(".") in IMAGE_EXTS
        if len(rel.parts) > 1 or not m:
            stray.append(StrayFile(path, "is not named <ms>__<step:09d>_<i>.<ext> directly under samples/, so "
                                   "its step and prompt are unknown -- fix: restore ai-toolkit's file name, or "
                                   "move the file out of samples/", is_image))
            continue
        if m["ext"].lower() not in IMAGE_EXTS:
            stray.append(StrayFile(path, f"extension .{m['ext']} is not an image format ai-toolkit writes",
                                   False))
            continue
        previews.append(Preview(path, int(m["ms"]), int(m["step"]), int(m["index"]), m["ext"].lower()))
    previews.sort(key=lambda p: (p.step, p.index, p.ms))
    return previews, stray


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    final: bool
    step_from_config: bool = False  # a final file without ai-toolkit's metadata: the config's last step


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise CaseError(path, f"is not a readable .safetensors file ({exc})",
                        "copy the checkpoint again from the training machine") from None


def checkpoint_step(path: Path) -> int | None:
    """The step in ai-toolkit's `training_info` metadata; None when it is absent (or the file unreadable: the
    preflight's LoRA check says so for the previews that need it)."""
    try:
        info = read_metadata(path).get("training_info")
        return int(json.loads(info)["step"]) if info else None
    except (CaseError, ValueError, KeyError, TypeError):
        return None


def index_checkpoints(folder: Path, name: str, last_step: int | None = None) -> dict[int, Checkpoint]:
    """step -> checkpoint. A per-step file wins over the final file for the same step. The final file is the
    last step's (`last_step`, the config's train.steps) when its metadata does not say, as after a conversion
    tool re-saved it without ai-toolkit's metadata."""
    found: dict[int, Checkpoint] = {}
    final = folder / f"{name}.safetensors"
    if final.is_file():
        step = checkpoint_step(final)
        if step is not None:
            found[step] = Checkpoint(final, step, True)
        elif last_step is not None:
            found[last_step] = Checkpoint(final, last_step, True, step_from_config=True)
    pattern = re.compile(rf"^{re.escape(name)}_(\d{{9}})\.safetensors$")
    for path in sorted(folder.glob(f"{name}_*.safetensors")):
        m = pattern.match(path.name)
        if m:
            found[int(m[1])] = Checkpoint(path, int(m[1]), False)
    return found


class PrunedCheckpoint(CaseError):
    """The checkpoint of a preview's step was deleted by ai-toolkit itself: the preview cannot be checked (skipped)."""


def pruned(step: int, checkpoints: dict[int, Checkpoint], keep: int, every: int) -> bool:
    """Whether ai-toolkit deleted the checkpoint of `step`: it saved one there (a multiple of save.save_every) and
    keeps only the newest `keep` step files (save.max_step_saves_to_keep; 0 or less keeps all), all still here."""
    kept = sorted(s for s, c in checkpoints.items() if not c.final)
    return 0 < keep <= len(kept) and step < kept[0] and step % max(every, 1) == 0


def lora_for_step(folder: Path, name: str, step: int, checkpoints: dict[int, Checkpoint], keep: int = 0,
                  every: int = 0) -> Checkpoint | None:
    """The checkpoint the preview at `step` was rendered with; None at step 0 (an untrained LoRA is a no-op).
    A missing one is a PrunedCheckpoint where ai-toolkit deleted it (`keep`, `every`: the config's save settings)."""
    if step == 0:
        return None
    if step in checkpoints:
        return checkpoints[step]
    have = ", ".join(str(s) for s in sorted(checkpoints)) or "none"
    path = folder / f"{name}_{step:09d}.safetensors"
    if pruned(step, checkpoints, keep, every):
        raise PrunedCheckpoint(path, f"no LoRA checkpoint for step {step}: ai-toolkit deleted it, as it keeps only "
                               f"the newest save.max_step_saves_to_keep = {keep} step checkpoints (found for steps: "
                               f"{have}), so this preview cannot be checked",
                               "copy it from the training machine if it is still there; a run with a higher "
                               "save.max_step_saves_to_keep keeps every preview checkable")
    raise CaseError(path, f"no LoRA checkpoint for step {step} (checkpoints found for steps: {have})",
                    "copy that checkpoint from the training machine, or remove the previews of that step")
