"""The two recipe builders: training recipes equal what ai-toolkit recorded; findings name the differences."""

from __future__ import annotations

import json

import pytest

from conftest import CASES, TINY_CASES, TINY_MODEL, TRACES
from parity.case import discover
from parity.plan import accuracy_recovery_adapter
from parity.findings import find
from parity.models import by_name
from parity.previews import index_checkpoints, index_previews, lora_for_step
from parity.engines.aitk import AITK_SCHEDULER, training_recipe
from parity.engines.server import reference_recipe
from parity.forms import LORA_PEFT, LORA_RUNTIME_FP32
from parity.recipe import FIELD_NAMES, switch
from parity.preprocess import PROMPT_RESIZE, PROMPT_RESIZE_TRANSPOSED, prompt_size

RUNS = ["tiny_qwen_image_edit_plus_lora_v1", "tiny_qwen_image_edit_plus_lora_strong_v1",
        "tiny_qwen_edit_plus_parity_a", "demo_qwen_image_edit_plus_lora_v1",
        "demo_qwen_edit_plus_parity_a", "demo_qwen_edit_plus_qfloat8", "demo_qwen_edit_plus_uint3_ara",
        "demo_qwen_image_lora", "demo_qwen_image_2512_lora", "demo_qwen_image_edit_lora",
        "demo_qwen_image_edit_ctrl_img_1", "demo_qwen_edit_plus_2511_lora"]
SCHED = json.loads((TINY_MODEL / "scheduler/scheduler_config.json").read_text())


def recipes(run: str):
    case = next(c for c in discover([TINY_CASES, CASES]) if c.name == run)
    job = case.job()
    previews, _ = index_previews(case.folder)
    ckpts = index_checkpoints(case.folder, job.name)
    merged = len({it.network_multiplier for it in job.items}) == 1 and not job.quantize
    ara, _, ara_file = accuracy_recovery_adapter(case, job)
    out = []
    for pv in previews:
        ck = lora_for_step(case.folder, job.name, pv.step, ckpts)
        lora = str(ck.path) if ck else None
        item = job.items[pv.index]
        out.append((pv, training_recipe(job, item, lora, case.resolve, lora_merged=merged, ara=ara,
                                    ara_file=ara_file),
                    reference_recipe(job, item, lora, case.resolve, scheduler=SCHED, device="cpu", dtype="bfloat16")))
    return out


@pytest.mark.parametrize("run", RUNS)
def test_training_recipes_equal_the_traces(run):
    rows = [json.loads(line) for line in open(TRACES / run / "samples_trace.jsonl")]
    rows = [row for row in rows if "error" not in row]  # a call ai-toolkit raised on left no preview
    built = recipes(run)
    assert len(built) == len(rows)
    for (pv, t, _), row in zip(built, rows):  # traces are in call order: step, then sample index
        assert f"__{pv.step:09d}_" in row["output_path_template"]
        assert (t.width, t.height) == (row["snapped_width"], row["snapped_height"])
        assert t.seed == row["seed"] and t.generator_device == row["generator_device"]
        assert t.steps == row["num_inference_steps"]
        assert t.guidance == row["guidance_scale(true_cfg_scale)"]
        assert t.multiplier == row["network_multiplier(active)"]
        if pv.step > 0:
            assert (t.lora_application == LORA_RUNTIME_FP32) == (not row["network_is_merged_in"])
        # ai-toolkit's own edit-plus pipeline rescales only with do_cfg_norm; the stock ones it uses for the other
        # models always do
        custom = row["pipeline_class"].endswith("QwenImageEditPlusCustomPipeline")
        assert t.cfg_norm == (row["do_cfg_norm"] if custom else True)
        assert custom or row["pipeline_class"].endswith("." + by_name(t.model).pipeline)
        assert t.vae_tiling == row["low_vram(vae tiling)"]
        assert json.loads(t.scheduler) == {k: row["scheduler_config"][k] for k in AITK_SCHEDULER}
        assert t.prompt == row["prompt"] and t.negative_prompt == row["negative_prompt"]
        assert t.dtype == row["model_dtype"].removeprefix("torch.")
        assert t.output_format == ("png" if row["output_path_template"].endswith(".png") else "jpeg-q75")


def test_v1_findings_include_the_cfg_norm_rescale():
    for pv, t, r in recipes("tiny_qwen_image_edit_plus_lora_v1"):
        fields = [f.field for f in find(t, r)]
        assert "cfg_norm" in fields and r.cfg_norm is True and t.cfg_norm is False
        assert ("lora_application" in fields) == (pv.step > 0)  # step 0 renders no LoRA on either side
        assert (r.lora_application == LORA_PEFT) == (pv.step > 0)
        # ctrl_a is square, so the transposed rule is a no-op for prompt 0; prompts 1 and 2 use 320x240/200x300
        assert ("control_prompt_resize" in fields) == (pv.index > 0)


def test_non_square_control_images_give_the_transposed_resize_finding():
    for _, t, r in recipes("tiny_qwen_edit_plus_parity_a"):
        fields = [f.field for f in find(t, r)]
        assert "control_prompt_resize" in fields
        assert (t.control_prompt_resize, r.control_prompt_resize) == (PROMPT_RESIZE, PROMPT_RESIZE_TRANSPOSED)


def test_prompt_resize_rules():
    assert prompt_size(320, 240, PROMPT_RESIZE) == (448, 320)  # landscape stays landscape
    assert prompt_size(320, 240, PROMPT_RESIZE_TRANSPOSED) == (320, 448)  # the server turns it portrait
    assert prompt_size(256, 256, PROMPT_RESIZE) == prompt_size(256, 256, PROMPT_RESIZE_TRANSPOSED) == (384, 384)


def test_switch_and_field_names():
    _, t, r = recipes("tiny_qwen_edit_plus_parity_a")[5]
    mixed = switch(r, t, ("cfg_norm", "control_images"))
    assert mixed.cfg_norm is False and mixed.control_images_prompt == t.control_images_prompt
    assert mixed.lora_application == r.lora_application
    assert set(t.as_row()) == set(FIELD_NAMES)
    assert t.as_row()["cfg_norm"] == "false" and r.as_row()["cfg_norm"] == "true"
    assert t.key() != r.key() and t.key() == switch(t, r, ()).key()


@pytest.mark.parametrize("training,reference,differs", [("cuda:0", "cuda", False), ("cuda:1", "cuda", False),
                                                        ("cuda", "cuda:0", False), ("cpu", "cuda", True)])
def test_a_device_index_is_not_a_finding(training, reference, differs):
    """ai-toolkit's `device: cuda:0` runs the kernels the reference's `cuda` runs: an index picks a card."""
    import dataclasses

    case = next(c for c in discover([TINY_CASES]) if c.name == "tiny_qwen_image_edit_plus_lora_v1")
    job = dataclasses.replace(case.job(), device=training)
    item = job.items[0]
    t = training_recipe(job, item, None, case.resolve)
    r = reference_recipe(job, item, None, case.resolve, scheduler=SCHED, device=reference, dtype="bfloat16")
    assert ("device" in [f.field for f in find(t, r)]) == differs
    assert t.device == training.partition(":")[0]
