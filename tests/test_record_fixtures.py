"""scripts/record-fixtures: the observe-only hook, the /workspace path mapping, what lands in the case folder.

The recording itself runs ai-toolkit (README, "Recording cases"); these tests check the recorder's own parts
and that the bundled recordings agree with the configs they were made from.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from conftest import CASES, ROOT, TRACES

RECORDINGS = ROOT / "scripts" / "recordings"


def recorder():
    path = ROOT / "scripts" / "record-fixtures"
    loader = importlib.machinery.SourceFileLoader("record_fixtures", str(path))
    spec = importlib.util.spec_from_loader("record_fixtures", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_paths_map_between_the_workspace_and_the_local_folder(tmp_path):
    rf = recorder()
    text = "folder_path: /workspace/aitk/data/x\nname_or_path: /workspace/aitk/model\nother: /workspaces/y"
    local = rf.to_local(text, tmp_path)
    assert f"{tmp_path.resolve()}/aitk/data/x" in local and "/workspaces/y" in local
    assert rf.to_workspace(local, tmp_path) == text


def fake_aitk_objects(tmp_path):
    """ai-toolkit's objects as generate_single_image receives them (what the hook reads of them), around a real
    scheduler, generator, tensors and image."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    model = SimpleNamespace(network=SimpleNamespace(multiplier=0.5, is_merged_in=False, is_active=True),
                            model_config=SimpleNamespace(low_vram=False), torch_dtype=torch.float32,
                            model=SimpleNamespace(dtype=torch.float32), vae=SimpleNamespace(dtype=torch.float32))
    pipeline = SimpleNamespace(scheduler=scheduler, vae_scale_factor=8)
    gen_config = SimpleNamespace(
        output_path=str(tmp_path / "ws/aitk/output/run/samples/[time]__000000002_[count].jpg"),
        prompt="make the background black", negative_prompt="", width=1190, height=900, seed=42,
        num_inference_steps=4, guidance_scale=3, guidance_rescale=0.0, network_multiplier=0.5, do_cfg_norm=False,
        ctrl_img=None, ctrl_img_1=str(tmp_path / "ws/aitk/data/sample_ctrl/scene_wide.png"), ctrl_img_2=None,
        ctrl_img_3=None, extra_kwargs={})
    g = torch.Generator("cpu").manual_seed(42)
    cond = SimpleNamespace(text_embeds=torch.randn(1, 7, 16, generator=g), attention_mask=torch.ones(1, 7))
    uncond = SimpleNamespace(text_embeds=torch.randn(1, 5, 16, generator=g), attention_mask=torch.ones(1, 5))
    return model, pipeline, gen_config, cond, uncond


def stand_in_render(model, pipeline, gen_config, cond, uncond, generator, extra):
    """What the hooked call does that the hook must not disturb: snaps the size, sets the schedule, draws noise."""
    gen_config.width, gen_config.height = gen_config.width // 32 * 32, gen_config.height // 32 * 32
    pipeline.scheduler.set_timesteps(gen_config.num_inference_steps)
    noise = torch.rand(gen_config.height // 8, gen_config.width // 8, 3, generator=generator)
    return Image.fromarray((noise.numpy() * 255).astype(np.uint8))


def test_the_hook_records_every_preview_and_changes_nothing(tmp_path):
    rf = recorder()
    ws = tmp_path / "ws"
    trace = rf.Trace(tmp_path / "trace", ws)
    hooked = trace.wrap(stand_in_render)
    args = fake_aitk_objects(tmp_path)
    g1, g2 = torch.Generator("cpu").manual_seed(42), torch.Generator("cpu").manual_seed(42)
    state_before = g1.get_state().clone()
    observed = hooked(*args, g1, {})
    plain = stand_in_render(*fake_aitk_objects(tmp_path), g2, {})
    assert np.array_equal(np.asarray(observed), np.asarray(plain))  # same image, same generator afterwards
    assert torch.equal(g1.get_state(), g2.get_state())
    [row] = [json.loads(line) for line in (tmp_path / "trace" / "samples_trace.jsonl").read_text().splitlines()]
    assert row["output_path_template"] == "/workspace/aitk/output/run/samples/[time]__000000002_[count].jpg"
    assert row["ctrl_img_1"] == "/workspace/aitk/data/sample_ctrl/scene_wide.png" and row["ctrl_img"] is None
    assert (row["requested_width"], row["requested_height"]) == (1190, 900)
    assert (row["snapped_width"], row["snapped_height"]) == (1184, 896)  # read after the call
    assert row["network_multiplier(active)"] == 0.5 and row["network_is_merged_in"] is False
    assert row["model_dtype"] == "torch.float32" and row["seed"] == 42 and row["do_cfg_norm"] is False
    assert len(row["scheduler_timesteps_used"]) == 4 and row["scheduler_config"]["shift"] == 1.0
    inputs = load_file(tmp_path / "trace" / "call00_inputs.safetensors")
    assert torch.equal(inputs["generator_state"], state_before)  # the state the call started from
    assert torch.equal(inputs["cond_text_embeds"], args[3].text_embeds)
    assert trace.controls == {"/workspace/aitk/data/sample_ctrl/scene_wide.png"}
    lossless = Image.open(tmp_path / "trace" / "call00_preview_lossless.png")
    assert np.array_equal(np.asarray(lossless), np.asarray(observed))


def test_a_call_that_raises_is_recorded_with_its_error_and_raised_again(tmp_path):
    rf = recorder()
    trace = rf.Trace(tmp_path / "trace", tmp_path / "ws")

    def no_image(model, pipeline, gen_config, cond, uncond, generator, extra):
        return None.size  # what the stock edit pipeline does with image=None

    args = fake_aitk_objects(tmp_path)
    with pytest.raises(AttributeError):
        trace.wrap(no_image)(*args, torch.Generator("cpu").manual_seed(42), {})
    [row] = [json.loads(line) for line in (tmp_path / "trace" / "samples_trace.jsonl").read_text().splitlines()]
    assert row["error"] == "AttributeError: 'NoneType' object has no attribute 'size'"
    assert row["prompt"] == args[2].prompt and "output_image_size" not in row and trace.calls == 1
    assert trace.controls == {"/workspace/aitk/data/sample_ctrl/scene_wide.png"}  # copied with the case


def finished_run(rf, ws, name: str, preview: str, content: bytes) -> dict:
    """What ai-toolkit leaves in the scratch workspace after job `name`: its config with local paths and one
    preview. Returns the job."""
    job = yaml.safe_load((RECORDINGS / f"{name}.yaml").read_text())
    run = ws / "aitk/output" / name
    (run / "samples").mkdir(parents=True)
    (run / "samples" / preview).write_bytes(content)
    (run / "config.yaml").write_text(rf.to_local(yaml.safe_dump(job), ws))
    return job


def test_collect_copies_the_output_and_the_sample_controls_with_workspace_paths(tmp_path):
    rf = recorder()
    ws, out = tmp_path / "ws", tmp_path / "out"
    job = finished_run(rf, ws, "demo_qwen_image_edit_plus_lora_v1", "1__000000000_0.jpg", b"jpeg")
    (ws / "aitk/data/sample_ctrl").mkdir(parents=True)
    for name in ("scene_a", "scene_b", "scene_wide"):
        Image.new("RGB", (8, 8)).save(ws / f"aitk/data/sample_ctrl/{name}.png")
    controls = {f"/workspace/aitk/data/sample_ctrl/{name}.png" for name in ("scene_a", "scene_b", "scene_wide")}
    copied = rf.collect(job, ws, out, controls)
    case = out / "aitk/output/demo_qwen_image_edit_plus_lora_v1"
    assert case in copied and (case / "samples" / "1__000000000_0.jpg").read_bytes() == b"jpeg"
    assert yaml.safe_load((case / "config.yaml").read_text()) == job  # local paths written back as /workspace
    assert sorted(p.name for p in (out / "aitk/data/sample_ctrl").iterdir()) == [
        "scene_a.png", "scene_b.png", "scene_wide.png"]


def test_a_re_recording_replaces_the_output_and_keeps_the_cases_parity_yaml(tmp_path):
    """Recording a job again replaces what the previous recording wrote (a preview it no longer renders is gone)
    but keeps the `parity.yaml` written by hand in the case folder."""
    rf = recorder()
    ws, out = tmp_path / "ws", tmp_path / "out"
    job = finished_run(rf, ws, "demo_qwen_image_lora", "2__000000002_0.jpg", b"new")
    case = out / "aitk/output/demo_qwen_image_lora"
    (case / "samples").mkdir(parents=True)
    (case / "samples" / "1__000000000_0.jpg").write_bytes(b"old")
    (case / "parity.yaml").write_text("accept: [cfg_norm]\n")
    rf.collect(job, ws, out, set())
    assert sorted(p.name for p in (case / "samples").iterdir()) == ["2__000000002_0.jpg"]
    assert (case / "parity.yaml").read_text() == "accept: [cfg_norm]\n"


def test_a_folder_that_is_not_ai_toolkit_is_refused(tmp_path, capsys):
    rf = recorder()
    with pytest.raises(SystemExit):
        rf.parse_args(["--aitk", str(tmp_path), "--workspace", str(tmp_path), "--config", str(tmp_path / "c.yaml")])
    assert "is not an ai-toolkit checkout" in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted(p.name for p in RECORDINGS.glob("*.yaml")))
def test_each_bundled_recording_is_its_config_and_has_a_trace_per_preview(config):
    job = yaml.safe_load((RECORDINGS / config).read_text())
    name = job["config"]["name"]
    job = yaml.safe_load((RECORDINGS / config).read_text().replace("[name]", name))  # as ai-toolkit loads it
    found = list(CASES.glob(f"workspace/*/output/{name}"))
    if not found:
        pytest.skip(f"{name} is not recorded yet (scripts/record-fixtures)")
    [case] = found
    assert yaml.safe_load((case / "config.yaml").read_text()) == job  # ai-toolkit's copy of the config given
    previews = sorted((case / "samples").glob("*__*_*.*"), key=lambda p: p.name.split("__")[1])
    rows = [json.loads(line) for line in (TRACES / name / "samples_trace.jsonl").read_text().splitlines()]
    failed = [row for row in rows if "error" in row]  # a call ai-toolkit raised on: its run stopped there
    assert failed in ([], rows[-1:])
    rows = rows[:len(rows) - len(failed)]
    assert len(rows) == len(previews) > 0
    for row, preview in zip(rows, previews):
        step, index = preview.stem.split("__")[1].split("_")
        assert row["output_path_template"].endswith(f"__{step}_[count]{preview.suffix}")
        assert Image.open(preview).size == tuple(row["output_image_size"])
        assert (TRACES / name / Path(row["lossless_png"]).name).is_file()
