"""Every column of `reports/parity.csv`, once, in the CSV's fixed order, with what it holds. The records in
`reports/parity.json` use the same names, in the same order. `docs/columns.md` is generated from this module
(`scripts/gen-columns`; tests/test_columns.py checks it is current).

The order only grows at the end: a column keeps its name and place across versions, and a new one is appended
(scripts index the CSV by name, but a person reading it side by side with an older one finds the same layout).
The `training.<field>` and `reference.<field>` columns come one per recipe field (recipe.FIELD_NAMES). A record
key that is not listed here (none is, today: tests/test_columns.py checks a run's records) goes after these
columns, sorted by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from .lora_keys import COLUMNS as LORA_KEY_COLUMNS
from .lora_keys import ENGINE_NAMES
from .recipe import FIELD_NAMES


@dataclass(frozen=True)
class Column:
    name: str
    meaning: str  # one line, markdown
    group: str = ""  # shown as one row in the docs: the columns made per recipe field


def _metric(name: str, label: str) -> list[Column]:
    """The columns of one perceptual distance (metrics.REGISTRY), after the unsuffixed one."""
    return [Column(f"{name}_raw", f"{label} against the raw reference render"),
            Column(f"{name}_jpeg", f"{label} against the reference render encoded as the JPEG preview was "
                                   f"(empty for a lossless preview)"),
            Column(f"{name}_id", f"{label}'s versioned id: network, weights, resize (`pil-lanczos/long256`)"),
            Column(f"{name}_unavailable", f"why {label} was not measured (e.g. its weights are not on this "
                                          f"machine); empty when it was")]


def _recipe(side: str) -> list[Column]:
    return [Column(f"{side}.{field}", f"the {side} recipe's `{field}` ([recipe-fields.md](recipe-fields.md))",
                   group=f"{side}.<field>") for field in FIELD_NAMES]


HINTS = (  # hints.Hints, measured on the raw pair
    ("size_dw", "the render's width minus the preview's, in pixels"),
    ("size_dh", "the render's height minus the preview's, in pixels"),
    ("shift_x", "pixels the render's content sits right of the preview's (phase correlation, to 0.1 px)"),
    ("shift_y", "pixels the render's content sits below the preview's"),
    ("delta_e_mean", "mean per-pixel CIEDE2000 colour difference (on 256 px copies)"),
    ("colour_cast_delta_e", "CIEDE2000 between the two mean colours: a global colour or brightness shift"),
    ("lab_offset_l", "mean L* of the render minus the preview's: brightness"),
    ("lab_offset_a", "mean a* of the render minus the preview's: + redder, - greener"),
    ("lab_offset_b", "mean b* of the render minus the preview's: + yellower, - bluer"),
    ("error_low_freq_share", "share of the error energy at periods over 20 px (0-1): near 1 for a cast or tone "
                             "change, low for noise or detail"),
    ("hf_energy_ratio", "high-frequency energy of the render over the preview's: well below 1, the render is "
                        "softer (e.g. rendered smaller and upscaled)"),
    ("jpeg_explained", "share of the raw squared error that the JPEG encoding accounts for (empty for a lossless "
                       "preview)"),
)

COLUMNS: tuple[Column, ...] = (
    Column("case", "the case: the name of the training run's output folder"),
    Column("preview", "the preview's file name in the case's `samples/`"),
    Column("step", "the training step the preview was rendered at"),
    Column("sample_index", "the sample prompt's index in the config's `sample:` list"),
    Column("verdict", "`match`, `explained`, `mismatch`, `size mismatch`, `cannot reproduce preview`, `error` or "
                      "`skipped` ([attribution.md](attribution.md))"),
    Column("reason", "why: the thresholds missed, the input that is missing, the error with its fix"),
    Column("ssim", "SSIM of the reference render against the preview (as `judge_on` says: for a JPEG preview, "
                   "the render encoded as the preview was)"),
    Column("psnr", "PSNR in dB, likewise"),
    Column("mean_abs", "mean absolute difference in 0-255 levels, likewise"),
    Column("max_abs", "largest absolute difference in 0-255 levels, likewise"),
    Column("width", "the reference recipe's width in pixels"),
    Column("height", "the reference recipe's height in pixels"),
    Column("seed", "the reference recipe's seed"),
    Column("steps", "the reference recipe's sampling steps"),
    Column("guidance", "the reference recipe's guidance scale"),
    Column("multiplier", "the reference recipe's LoRA multiplier"),
    Column("prompt", "the prompt as rendered (the sample's prompt when there is no recipe)"),
    Column("lora", "the LoRA file of the preview's step (empty: rendered without one)"),
    Column("model", "the model, as `arch[:tag] (server id)` ([models.md](models.md))"),
    Column("device", "the device this run rendered on"),
    Column("dtype", "the reference recipe's dtype"),
    Column("render_seconds", "seconds the reference render took now (0: it came from the render cache)"),
    Column("fidelity_verdict", "the training recipe's render against the preview: `reproduced`, `reproduced "
                               "within cross-device drift ...`, `cannot reproduce preview`, `not renderable "
                               "here: ...` or `not rendered ...`"),
    Column("fidelity_max_abs", "largest absolute difference of the training render (encoded as the preview was) "
                               "from the preview, in 0-255 levels"),
    Column("fidelity_mean_abs", "mean absolute difference, likewise; `reproduced` within the fidelity floor"),
    Column("findings", "the recipe fields whose training and reference values differ, `; `-joined"),
    Column("ssim_raw", "SSIM against the raw reference render (not re-encoded)"),
    Column("psnr_raw", "PSNR against the raw reference render"),
    Column("mean_abs_raw", "mean absolute difference from the raw reference render"),
    Column("max_abs_raw", "largest absolute difference from the raw reference render"),
    Column("id", "the preview's id, `<case>/<step>/<sample_index>`"),
    Column("notes", "what planning noted for the preview (a step-0 render without the LoRA, a checkpoint taken "
                    "without metadata, config keys not modelled, ...), `; `-joined"),
    Column("torch", "the torch version"),
    Column("diffusers", "the diffusers version"),
    *_recipe("training"),
    *_recipe("reference"),
    Column("findings_detail", "JSON list of `{field, training, reference, effect}`, one per differing field"),
    Column("top_cause", "the recipe field, or fields joined by `+`, whose switch closes most of the gap; empty "
                        "when the gap is within the noise floor"),
    Column("top_cause_share", "the share of the gap the top cause closes (0-1)"),
    Column("causes", "JSON: `{metric, gap, floor, reference_distance, training_distance, causes: [{fields, "
                     "distance, share, reverse_distance, testable, reason}], closing_set: [{cause, distance, "
                     "share, marginal}], closed, closing_renders}`, or `{unavailable}`"),
    Column("golden_verdict", "the reference render against its stored golden (`--parity-goldens`): `identical`, "
                             "`drift`, `within floor (cross-environment)`, `missing`, `updated`, ..."),
    Column("golden_max_abs", "largest absolute difference from the golden, in 0-255 levels"),
    Column("golden_fingerprint", "the environment of the golden compared with (`(cross-environment)`: not "
                                 "this one)"),
    Column("lpips_alex", "LPIPS v0.1 on AlexNet (lower is closer), against the render as `judge_on` says"),
    Column("stlpips_alex", "shift-tolerant LPIPS on AlexNet (lower is closer), likewise"),
    Column("check_seconds", "wall seconds checking the preview: renders, metrics, attribution"),
    Column("renders", "renders made for the preview (0: all came from the render cache)"),
    Column("server_request_id", "server mode: the id of the request sent to the server"),
    Column("server_seconds", "server mode: seconds the server took"),
    Column("server_image", "server mode: where the server's image was saved"),
    Column("server_vs_local_mean_abs", "server mode with `--parity-server-local`: the server's image against "
                                       "the harness' render of the same request (mean abs, 0-255 levels)"),
    Column("server_vs_local_max_abs", "likewise, the largest absolute difference"),
    Column("comfyui_prompt_id", "live ComfyUI (`--parity-comfyui`): the id of the prompt queued"),
    Column("comfyui_seconds", "live ComfyUI: seconds from queueing the graph to its image"),
    Column("comfyui_image", "live ComfyUI: the image's name in ComfyUI's output folder"),
    Column("comfyui_graph", "live ComfyUI: where the API graph sent for the preview is saved"),
    Column("comfyui_vs_local_mean_abs", "live ComfyUI with `--parity-comfyui-local`: ComfyUI's image against the "
                                        "harness' render of the same recipe (mean abs, 0-255 levels)"),
    Column("comfyui_vs_local_max_abs", "likewise, the largest absolute difference"),
    Column("expected_verdict", "the verdict the case's `parity.yaml` declares for a known gap (`expect:`)"),
    Column("expected_reason", "the declaration's reason"),
    Column("expected_outcome", "`expected`, `unexpectedly matches`, `unexpected error` or `unexpected verdict`; "
                               "empty without a declaration"),
    Column("closing_set", "attribution's closing set: the causes that close the gap together, with their "
                          "cumulative shares (`cfg_norm 0.67 > precision 0.93`)"),
    Column("closing_share", "the share of the gap the closing set closes"),
    Column("interactions", "causes whose share alone and after the others differ (the switches interact)"),
    Column("fix", "`--parity-reverse`: the smallest change to the server's request that brings the preview "
                  "within the thresholds, verified by rendering"),
    Column("fix_distance", "the distance of the fixed request's render from the preview"),
    Column("fix_passes", "whether the fixed request's render passes the thresholds"),
    *(Column(LORA_KEY_COLUMNS[engine], f"the LoRA keys {ENGINE_NAMES[engine]} binds, `bound/total`")
      for engine in LORA_KEY_COLUMNS),
    *(Column(f"hint_{name}", meaning) for name, meaning in sorted(HINTS)),
    *_metric("lpips_alex", "LPIPS (alex)"),
    *_metric("stlpips_alex", "ST-LPIPS (alex)"),
    Column("judge_on", "which comparison the unsuffixed metric columns and the verdict use: `jpeg` for a JPEG "
                       "preview, else `raw`"),
    Column("jpeg_settings", "how the preview file was JPEG-encoded (`jpeg-q75-s2`); empty for a lossless one"),
    Column("jpeg_settings_source", "where those settings came from (`quantization tables`, or why a default)"),
    Column("floor_mean_abs", "`--parity-noise-floor`: the training recipe through the math attention kernel "
                             "against the fused one, mean abs"),
    Column("floor_max_abs", "likewise, the largest absolute difference"),
    Column("floor_how", "how that floor was measured"),
    Column("golden_mean_abs", "mean absolute difference from the golden, in 0-255 levels"),
    Column("golden_reason", "why the golden verdict is not `identical`"),
    Column("golden_path", "the golden image compared with (or written)"),
    Column("golden_obtained", "on drift: the render, saved next to the golden"),
)
NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)
_PLACE = {name: i for i, name in enumerate(NAMES)}


def ordered(names) -> list[str]:
    """`names` in the CSV's order: the known ones in table order, then any other, sorted."""
    names = list(dict.fromkeys(names))
    return sorted((n for n in names if n in _PLACE), key=_PLACE.get) + sorted(n for n in names if n not in _PLACE)


def in_order(record: dict) -> dict:
    """The record with its keys in the CSV's order (a JSON record reads like a CSV row)."""
    return {name: record[name] for name in ordered(record)}


def markdown_table() -> str:
    """The column list as a markdown table, in order (the columns made per recipe field as one row a side)."""
    lines = ["| column | meaning |", "|---|---|"]
    for i, column in enumerate(COLUMNS):
        if not column.group:
            lines.append(f"| `{column.name}` | {column.meaning} |")
        elif i == 0 or COLUMNS[i - 1].group != column.group:
            side = column.group.split(".")[0]
            lines.append(f"| `{column.group}` | the {side} recipe's value of each recipe field, one column per "
                         f"field in recipe-field order ([recipe-fields.md](recipe-fields.md)) |")
    return "\n".join(lines)


PAGE_HEAD = """\
# CSV and JSON columns

<!-- generated from parity/columns.py by scripts/gen-columns: edit there, then run it -->

What each column of `reports/parity.csv` holds, in the CSV's order; `reports/parity.json` has the same records
under the same names, in the same order (`{"environment": {...}, "records": [...]}`, [report.md](report.md)). The
recipe fields behind the `training.<field>` and `reference.<field>` columns are in
[recipe-fields.md](recipe-fields.md#recipe-fields).

## CSV columns

`parity.csv` has one row per preview file and every column below, always, in this order; columns keep their
names and places across versions, and new ones are appended. An empty cell is a value not measured (an older run,
an error, an untestable cause, a mode that was off). Metrics are against the preview; for JPEG previews against
the render encoded as the preview was (`*_raw`: against the raw render). `fidelity_max_abs`/`fidelity_mean_abs`:
the training render, encoded as the preview was, against the preview file, in 0-255 levels; the fidelity verdict
is `reproduced` when the mean is within the floor (1 level for lossless previews, 3 for JPEG q75, whose
re-encoding of a render a few levels off moves noise-like images by ~1.7 levels on average).

"""

PAGE_NOTES = """\

### Perceptual distances, maps and hints

Besides SSIM/PSNR/abs, each preview gets two learned perceptual distances (lower is closer; `0` is identical),
each measured after a named resize to a 256 px long side (`pil-lanczos/long256`): **`stlpips_alex`**,
shift-tolerant LPIPS (Ghildyal & Liu 2022, the `stlpips` extra), whose package ships all its weights, so it
works offline; and **`lpips_alex`**, LPIPS v0.1 on AlexNet (`lpips` package), whose AlexNet trunk is read only
from torchvision's cache (`$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth`) or `--parity-lpips-weights
PATH`. It never downloads: without the file the column is empty and `lpips_alex_unavailable` says why. Pick the
set with `--parity-metrics` (names from `parity.metrics.REGISTRY`; each metric's versioned id is in
`<name>_id`). A JPEG preview's quality and subsampling are read from its quantization tables (quality 75 when
they match no PIL quality). It is compared both raw (`*_raw`) and against the regeneration encoded the same
way (`*_jpeg`); `judge_on` says which the unsuffixed column and the verdict use (`jpeg` for JPEG previews,
since no pipeline reproduces compression error raw). The `hint_*` columns point at causes: a displacement
(`hint_shift_x/y`), a global colour or brightness shift (`hint_colour_cast_delta_e`, `hint_lab_offset_l/a/b`,
with `hint_error_low_freq_share` near 1), a softer render (`hint_hf_energy_ratio` well below 1), the JPEG
encoding's share of the error (`hint_jpeg_explained`), a size difference (`hint_size_dw/dh`).

`parity.metrics.noise_floor(render, render_again, metrics, others={"cuda/bfloat16": img})` gives, per metric,
the worst value between renders that should match; thresholds tighter than that floor fail on noise alone.

## What the metrics cost

SSIM and the perceptual distances run on the render device: on a GPU, SSIM runs in torch
(`compare.ssim_map_torch`: scikit-image's definition, window, padding and crop, in float32 shifted sums; equal
to scikit-image and to a float64 Wang et al. implementation within 1e-6, tested), since scikit-image has no GPU
path; hints, maps and JPEG encoding stay on the CPU. `python bench/metrics.py` times the full metric set for a
1024x1024 pair on the CPU, one thread (2026-11-26, the CPU machine of that day): 0.81 s for a PNG preview (one
pair: under the 1 s goal), 1.67 s for a JPEG preview (two pairs, raw and `_jpeg`: 0.84 s a pair).
`python bench/render_share.py` (CUDA; needs `accelerate`) times the set next to a real-size render: the
Diffusers transformer and VAE at their released configuration (20.4 B parameters) with random bf16 weights,
since a forward costs the same whatever the weights. On an H100 (2026-11-26, torch 2.11): one transformer
forward at 1024x1024 with one control image 0.450 s, a 25-step true-CFG render 22.6 s; the metric set with SSIM
and the distances on the GPU took 0.176 s for a PNG preview and 0.211 s for a JPEG one: 0.78 % and 0.93 % of
that render, under the 1 % goal (with everything on that machine's CPU: 0.97 s and 2.16 s, 4.3 % and 9.6 %).
What is left is CPU work, mostly the hints (0.1 s).

[Back to the docs index](README.md) · [project README](../README.md)
"""


def page() -> str:
    """docs/columns.md."""
    return PAGE_HEAD + markdown_table() + "\n" + PAGE_NOTES
