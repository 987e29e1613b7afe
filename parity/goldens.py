"""Goldens: stored known-good reference renders, keyed by an environment fingerprint (DESIGN section 9).

This module owns the whole lifecycle (pytest-regressions' shape): missing -> skipped with the command that
creates it; `--parity-update-goldens` -> written; same fingerprint -> must be identical (the obtained image is
left next to the golden when it is not); another fingerprint -> labelled cross-environment and judged against
the noise floor. Goldens live in their own folder, never inside a case folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from . import compare as cmp
from .recipe import Recipe
from .store import save_png, write_atomic

# Cross-environment floor (0-255 levels, max abs): CPU fp32 vs CUDA fp32 agree within a few levels on the
# tiny model; bf16 across devices does not (tens of levels), so bf16 goldens are per device.
DEFAULT_CROSS_FLOOR = 8


@dataclass(frozen=True)
class Fingerprint:
    device: str  # "cpu" or the GPU's name
    dtype: str
    torch: str
    diffusers: str
    transformers: str
    peft: str

    @property
    def id(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        name = f"{self.device}-{self.dtype}".replace(" ", "_").replace("/", "_")
        return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def fingerprint(env: dict, dtype: str) -> Fingerprint:
    return Fingerprint(device=env.get("gpu") or env["device"], dtype=dtype, torch=env["torch"],
                       diffusers=env["diffusers"], transformers=env.get("transformers", ""), peft=env.get("peft", ""))


def golden_name(case: str, preview: Path) -> str:
    return f"{case}/{preview.stem}"


class Goldens:
    def __init__(self, folder: Path, update: bool = False, cross_floor: float = DEFAULT_CROSS_FLOOR):
        self.folder = Path(folder)
        self.update = update
        self.cross_floor = cross_floor

    @property
    def active(self) -> bool:
        return self.update or self.folder.is_dir()

    def path(self, fp: Fingerprint, name: str) -> Path:
        return self.folder / fp.id / f"{name}.png"


    def check(self, image: Image.Image, recipe: Recipe, fp: Fingerprint, name: str) -> dict:
        """golden_* columns for one reference render; writes the golden when updating."""
        own = self.path(fp, name)
        if self.update:
            save_png(image, own)
            write_atomic(own.with_suffix(".json"), json.dumps(
                {"fingerprint": asdict(fp), "recipe_key": recipe.key(), "recipe": recipe.as_row()}, indent=1))
            return {"golden_verdict": "updated", "golden_fingerprint": fp.id, "golden_path": str(own)}
        if own.is_file():
            return self._judge(image, recipe, own, fp, name, same=True)
        others = sorted(self.folder.glob(f"*/{name}.png"))
        if others:
            return self._judge(image, recipe, others[0], fp, name, same=False)
        return {"golden_verdict": "missing", "golden_fingerprint": fp.id,
                "golden_reason": f"no golden for {name} under {self.folder}; create it with "
                                 f"`pytest parity/ --parity-update-goldens --parity-goldens {self.folder}`"}

    def _judge(self, image: Image.Image, recipe: Recipe, golden: Path, fp: Fingerprint, name: str,
               same: bool) -> dict:
        meta = json.loads(golden.with_suffix(".json").read_text()) if golden.with_suffix(".json").is_file() else {}
        with Image.open(golden) as im:
            c = cmp.compare(im.convert("RGB"), image)
        stored = golden.relative_to(self.folder).parts[0]
        row = {"golden_fingerprint": stored if same else f"{stored} (cross-environment)",
               "golden_max_abs": c.max_abs, "golden_mean_abs": c.mean_abs, "golden_path": str(golden)}
        if meta.get("recipe_key") and meta["recipe_key"] != recipe.key():
            row.update(golden_verdict="recipe changed",
                       golden_reason="the golden was stored for another recipe; update goldens if intended")
            return row
        if c.max_abs is None:
            row.update(golden_verdict="drift", golden_reason=f"size changed: {c.size_a} -> {c.size_b}")
        elif same:
            ok = c.max_abs == 0
            row.update(golden_verdict="identical" if ok else "drift",
                       golden_reason="" if ok else f"render drifted from the golden: max abs {c.max_abs}, "
                                                   f"mean abs {c.mean_abs:.3f} levels")
        else:
            ok = c.max_abs <= self.cross_floor
            row.update(golden_verdict="within floor (cross-environment)" if ok else "drift (cross-environment)",
                       golden_reason=f"golden from another environment ({stored}): max abs {c.max_abs} "
                                     f"vs floor {self.cross_floor}")
        if row["golden_verdict"].startswith("drift"):  # leave the obtained image next to the expected one
            obtained = self.path(fp, name).with_name(f"{golden.stem}.obtained.png")
            save_png(image, obtained)
            row["golden_obtained"] = str(obtained)
        return row
