"""requests: the reference server's request for each bundled preview carries what ai-toolkit used (its trace),
and lists what the server cannot be told."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CASES, ROOT, TRACES
from parity.engines.server.requests import request
from parity.runner import Options, plan

TASKS = [t for t in plan(Options(cases=(CASES,), dtype="float32")) if t.training is not None]
RUNS = sorted({t.case for t in TASKS})


def local(workspace_path: str) -> Path:
    return CASES / "workspace" / Path(workspace_path).relative_to("/workspace")


def vae_images(row: dict) -> list[str]:
    """The control images ai-toolkit's VAE encoded for this call, in order (its trace's keys, per pipeline)."""
    if row["pipeline_class"].endswith("QwenImageEditPlusCustomPipeline"):
        return [p for p in (row["ctrl_img"] or row["ctrl_img_1"], row["ctrl_img_2"], row["ctrl_img_3"]) if p]
    if row["pipeline_class"].endswith(".QwenImageEditPipeline"):
        return [row["ctrl_img"]] if row["ctrl_img"] else []
    return []


@pytest.mark.parametrize("run", RUNS)
def test_each_request_carries_what_ai_toolkit_used(run):
    rows = [json.loads(line) for line in (TRACES / run / "samples_trace.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "error" not in r]
    tasks = [t for t in TASKS if t.case == run]
    assert len(tasks) == len(rows)
    for task, row in zip(tasks, rows):
        out = request(task)
        body = out["request"]
        [prompt] = body["prompts"]
        assert f"__{task.step:09d}_" in row["output_path_template"]
        assert body["model"] == task.reference.model.split("(")[1].rstrip(")")
        assert (prompt["width"], prompt["height"]) == (row["snapped_width"], row["snapped_height"])
        assert prompt["seed"] == row["seed"] and prompt["sample_steps"] == row["num_inference_steps"]
        assert prompt["guidance_scale"] == row["guidance_scale(true_cfg_scale)"]
        assert prompt["prompt"] == row["prompt"] and prompt["neg"] == row["negative_prompt"]
        if not list(task.case_folder.glob("*.safetensors")):  # ai-toolkit stopped before saving one
            assert body["loras"] == [] and "LORA_FILE_REQUIRED" in out["notes"][0]
        else:
            [lora] = body["loras"]  # the server takes exactly one
            assert lora["network_multiplier"] == (row["network_multiplier(active)"] if task.step else 0.0)
            assert Path(lora["path"]).is_file() and Path(lora["path"]).suffix == ".safetensors"
        sent = [base64.b64decode(prompt[k]) for k in ("ctrl_img_1", "ctrl_img_2", "ctrl_img_3") if k in prompt]
        assert sent == [local(p).read_bytes() for p in vae_images(row)]
        assert "ctrl_img" not in prompt and not set(prompt) - {"prompt", "neg", "width", "height", "seed",
                                                              "sample_steps", "guidance_scale", "ctrl_img_1",
                                                              "ctrl_img_2", "ctrl_img_3"}
        fields = [r["field"] for r in out["remaining"]]
        assert not {"seed", "steps", "guidance", "prompt", "negative_prompt", "width", "height", "multiplier",
                    "lora"} & set(fields)
        assert "output_format" in fields  # the server answers with a JPEG at quality 95


def test_what_the_server_cannot_be_told_is_listed():
    by_id = {t.id: t for t in TASKS}
    v1 = request(by_id["demo_qwen_image_edit_plus_lora_v1/4/0"])
    assert {r["field"] for r in v1["remaining"]} >= {"cfg_norm", "lora_application"}
    wide = request(by_id["demo_qwen_image_edit_lora/2/0"])
    assert {r["field"] for r in wide["remaining"]} >= {"control_prompt_resize", "control_vae_resize"}
    divisor = request(by_id["demo_qwen_image_lora/0/0"])  # asked 272 wide, ai-toolkit made 256: 256 is asked
    assert divisor["request"]["prompts"][0]["width"] == 256 and "width" not in [r["field"] for r in
                                                                                divisor["remaining"]]
    step0 = request(by_id["demo_qwen_image_edit_plus_lora_v1/0/0"])
    assert step0["notes"][0].startswith("step 0: ai-toolkit rendered it without a LoRA")


def test_parity_requests_writes_json_lines_and_names_what_it_skipped(tmp_path):
    out = tmp_path / "requests.jsonl"
    done = subprocess.run([sys.executable, "-m", "parity.cli", "requests", str(CASES), "--dtype", "float32",
                           "--images", "path", "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(TASKS) and f"{len(TASKS)} requests -> {out}" in done.stderr
    assert "no request: demo_qwen_image_edit_ctrl_img_1/unrendered/1" in done.stderr
    paths = [v for line in lines for k, v in line["request"]["prompts"][0].items() if k.startswith("ctrl_img")]
    assert paths and all(Path(p).is_absolute() and Path(p).is_file() for p in paths)


def test_fixed_requests_are_rendered_and_say_whether_they_pass(tmp_path, render_cache):
    """`parity requests --fixed` on one v1 preview whose request, as written, passes the case's thresholds: the
    line keeps the request unchanged and says so with its measured distance (one render, from the render cache
    the main job fills). The v1 case's prompt-0 previews have no request fix (the server's CFG norm has no request
    field; measured 2026-12-07: every guidance and multiplier candidate stays 45-53 levels away)."""
    import shutil

    case = tmp_path / "cases" / "v1"
    source = CASES / "workspace" / "aitk" / "output" / "demo_qwen_image_edit_plus_lora_v1"
    shutil.copytree(source, case, ignore=shutil.ignore_patterns("samples"))
    (case / "samples").mkdir()
    shutil.copy(next(source.glob("samples/*__000000004_1.jpg")), case / "samples")
    settings = (case / "parity.yaml").read_text().replace("../../../aitk/demo-qwen-image-edit-2509",
                                                          str((source / "../../../aitk/demo-qwen-image-edit-2509")
                                                              .resolve()))
    (case / "parity.yaml").write_text(settings.replace("/workspace: ../../..", f"/workspace: {CASES / 'workspace'}"))
    out = tmp_path / "fixed.jsonl"
    done = subprocess.run([sys.executable, "-m", "parity.cli", "requests", str(case), "--fixed", "--images", "path",
                           "--out", str(out), "--device", "cpu", "--cache-dir", str(render_cache)],
                          capture_output=True, text=True, timeout=900, env={**__import__("os").environ,
                                                                             "PARITY_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    [line] = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["fix"]["passes"] and line["fix"]["changes"] == {} and line["fix"]["renders"] == 1
    assert line["fix"]["summary"] == "the request as written passes the thresholds"
    assert line["request"]["prompts"][0]["guidance_scale"] == 3.0
