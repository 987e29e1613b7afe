"""DESIGN section 3: every parsing rule of ai-toolkit's config, on the fixtures' configs and hand-made ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import PARITY_A, TRACES, V1
from parity.aitk_config import SAMPLE_DEFAULTS, floor_size, load_job
from parity.errors import CaseError


def write_config(tmp_path: Path, sample: dict, name: str = "job", **process) -> Path:
    doc = {"job": "extension", "config": {"name": name, "process": [{
        "type": "diffusion_trainer", "device": "cuda:0",
        "model": {"name_or_path": "Qwen/Qwen-Image-Edit-2509", "arch": "qwen_image_edit_plus"},
        "sample": sample, **process}]}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def trace(run: str) -> list[dict]:
    return [json.loads(line) for line in open(TRACES / run / "samples_trace.jsonl")]


def test_v1_items_match_what_ai_toolkit_used():
    job = load_job(V1 / "config.yaml")
    rows = trace(job.name)[:3]
    assert [it.seed for it in job.items] == [r["seed"] for r in rows] == [42, 1234, 44]
    assert [(it.width, it.height) for it in job.items] == [(r["requested_width"], r["requested_height"]) for r in rows]
    assert [it.network_multiplier for it in job.items] == [r["network_multiplier(active)"] for r in rows]
    assert [it.prompt for it in job.items] == [r["prompt"] for r in rows]
    assert job.items[2].requested_width == 300 and job.items[2].width == 296


def test_parity_a_flags_seeds_trigger_and_name():
    job = load_job(PARITY_A / "config.yaml")
    rows = trace(job.name)[:4]
    assert [it.seed for it in job.items] == [r["seed"] for r in rows] == [7, 11, 7, 7]
    assert job.items[0].prompt == "[trigger] make the square red"  # [trigger] is replaced at sample time
    assert job.trigger_word == "sks"
    assert job.items[2].network_multiplier == 0.6
    assert job.items[2].neg == "blurry, low quality"
    assert (job.items[3].guidance_scale, job.items[3].sample_steps) == (2.5, 5)
    assert (job.items[1].width, job.items[1].height) == (256, 320)
    assert (job.items[0].width, job.items[0].height) == (328, 248)  # 330x250 floored to 8
    assert job.items[0].ctrl_img.endswith("ctrl_wide.png") and job.items[0].ctrl_img_1 is None
    assert job.items[0].ctrl_from_flag
    assert [r["negative_prompt"] for r in rows] == [it.neg for it in job.items]


def test_defaults(tmp_path):
    job = load_job(write_config(tmp_path, {"samples": [{"prompt": "a"}]}))
    item = job.items[0]
    assert (item.width, item.height, item.seed, item.guidance_scale, item.sample_steps) == (512, 512, 0, 7, 20)
    assert item.neg == "" and item.network_multiplier == 1  # neg: False means none
    assert job.sample["format"] == "jpg" and job.sample["do_cfg_norm"] is False
    assert SAMPLE_DEFAULTS["sampler"] == "ddpm"


def test_samples_list_wins_over_legacy_prompts(tmp_path):
    job = load_job(write_config(tmp_path, {"samples": [{"prompt": "from samples"}], "prompts": ["legacy"]}))
    assert [it.prompt for it in job.items] == ["from samples"]


def test_walk_seed_and_item_seed(tmp_path):
    job = load_job(write_config(tmp_path, {"seed": 10, "walk_seed": True, "samples": [
        {"prompt": "a"}, {"prompt": "b", "seed": 99}, {"prompt": "c"}]}))
    assert [it.seed for it in job.items] == [10, 99, 12]


def test_item_seed_carries_over_without_walk_seed(tmp_path):
    job = load_job(write_config(tmp_path, {"seed": 10, "samples": [
        {"prompt": "a"}, {"prompt": "b", "seed": 99}, {"prompt": "c"}]}))
    assert [it.seed for it in job.items] == [10, 99, 99]


def test_seed_flag_changes_only_its_prompt(tmp_path):
    job = load_job(write_config(tmp_path, {"seed": 7, "prompts": ["a", "b --seed 11", "c --d 3", "d"]}))
    assert [it.seed for it in job.items] == [7, 11, 3, 7]


def test_every_flag(tmp_path):
    job = load_job(write_config(tmp_path, {"prompts": [
        "p --n bad --w 301 --h 40 --l 2.5 --s 9 --m 0.3 --ctrl_img /x/c.png --ctrl_idx 1 --p2 x --zz 1",
        "q --cfg 1.5 --steps 4 --network_multiplier 0.2"]}))
    a, b = job.items
    assert a.prompt == "p" and a.neg == "bad" and (a.width, a.height) == (296, 64)
    assert (a.guidance_scale, a.sample_steps, a.network_multiplier, a.ctrl_idx) == (2.5, 9, 0.3, 1)
    assert a.ctrl_img == "/x/c.png" and a.ctrl_img_1 is None
    assert any("--zz" in u for u in a.unknown) and any("--p2" in u for u in a.unknown)
    assert (b.guidance_scale, b.sample_steps, b.network_multiplier) == (1.5, 4, 0.2)
    assert any("--zz" in u for u in job.unknown)  # unknown keys are kept and reported


def test_ctrl_img_1_defaults_to_ctrl_img_for_samples_items(tmp_path):
    job = load_job(write_config(tmp_path, {"samples": [{"prompt": "a", "ctrl_img": "/w/c.png"}]}))
    assert job.items[0].ctrl_img_1 == "/w/c.png"


def test_name_placeholder_and_raw_prompt(tmp_path):
    job = load_job(write_config(tmp_path, {"prompts": ["photo of [name] --w 64"]}, name="myjob"))
    assert job.items[0].prompt == "photo of myjob"
    assert job.items[0].raw_prompt == "photo of [name]"


def test_unknown_keys_are_reported(tmp_path):
    job = load_job(write_config(tmp_path, {"samples": [{"prompt": "a", "colour": "red"}], "mystery": 1}))
    assert "sample.mystery" in job.unknown and "sample.samples[0].colour" in job.unknown


@pytest.mark.parametrize("value,expected", [(300, 296), (64, 64), (63, 64), (10, 64), (1024, 1024)])
def test_floor_size(value, expected):
    assert floor_size(value) == expected


def test_arch_tag_is_stripped(tmp_path):
    path = write_config(tmp_path, {"prompts": ["a"]})
    doc = yaml.safe_load(path.read_text())
    doc["config"]["process"][0]["model"]["arch"] = "qwen_image_edit_plus:2509"
    path.write_text(yaml.safe_dump(doc))
    assert load_job(path).arch == "qwen_image_edit_plus"


@pytest.mark.parametrize("text,problem", [
    ("config: [unclosed", "not valid YAML (line 1"),
    ("job: x\nconfig: {name: a, process: [{type: other}]}", "not an ai-toolkit trainer config"),
    ("config: {name: a, process: [{type: diffusion_trainer, model: {name_or_path: m}}]}", "no `sample:`"),
])
def test_bad_configs_name_the_file_and_the_problem(tmp_path, text, problem):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(CaseError) as err:
        load_job(path)
    assert str(path) in str(err.value) and problem in str(err.value) and "fix:" in str(err.value)


def test_non_number_is_an_error(tmp_path):
    with pytest.raises(CaseError, match="guidance_scale"):
        load_job(write_config(tmp_path, {"samples": [{"prompt": "a", "guidance_scale": "lots"}]}))


ARA = "ostris/accuracy_recovery_adapters/qwen_image_edit_2509_torchao_uint3.safetensors"


@pytest.mark.parametrize("model, expected", [
    ({}, (False, None, False, None, None)),
    ({"quantize": True}, (True, "qfloat8", True, "qfloat8", None)),  # the UI default: te follows the transformer
    ({"quantize": True, "quantize_te": False}, (True, "qfloat8", False, None, None)),
    ({"quantize": False, "quantize_te": True}, (False, None, True, "qfloat8", None)),
    ({"quantize": True, "qtype": f"uint3|{ARA}", "qtype_te": "qfloat8"}, (True, "uint3", True, "qfloat8", ARA)),
    ({"quantize": True, "qtype": "uint3", "accuracy_recovery_adapter": "/data/ara.safetensors"},
     (True, "uint3", True, "qfloat8", "/data/ara.safetensors")),
    ({"quantize": True, "qtype": f"uint3|{ARA}", "accuracy_recovery_adapter": "/data/other.safetensors"},
     (True, "uint3", True, "qfloat8", ARA)),  # the one in qtype wins, as in ai-toolkit
    ({"quantize": False, "qtype": f"uint3|{ARA}"}, (False, None, False, None, None)),  # no quantize, no ARA
    ({"quantize": True, "layer_offloading": True}, (True, "float8", True, "float8", None)),  # torchao's float8
    ({"quantize": True, "auto_memory": True, "qtype": "uint4"}, (True, "uint4", True, "float8", None)),
])
def test_quantization_settings_are_read_as_ai_toolkit_reads_them(tmp_path, model, expected):
    path = write_config(tmp_path, {"samples": [{"prompt": "a"}]})
    doc = yaml.safe_load(path.read_text())
    doc["config"]["process"][0]["model"].update(model)
    path.write_text(yaml.safe_dump(doc))
    job = load_job(path)
    assert (job.quantize, job.qtype, job.quantize_te, job.qtype_te, job.ara) == expected


def test_a_qtype_with_two_pipes_is_refused_naming_the_file(tmp_path):
    path = write_config(tmp_path, {"samples": [{"prompt": "a"}]})
    doc = yaml.safe_load(path.read_text())
    doc["config"]["process"][0]["model"].update({"quantize": True, "qtype": "uint3|a.safetensors|b"})
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(CaseError, match="more than one '\\|'") as err:
        load_job(path)
    assert str(path) in str(err.value)


def test_network_type_and_save_settings_with_ai_toolkits_defaults(tmp_path):
    plain = load_job(write_config(tmp_path, {"prompts": ["a"]}))
    assert (plain.network_type, plain.save_every, plain.max_step_saves_to_keep) == ("lora", 1000, 5)
    job = load_job(write_config(tmp_path, {"prompts": ["a"]}, network={"type": "lokr", "lokr_factor": 4},
                                save={"save_every": 250, "max_step_saves_to_keep": 2}))
    assert (job.network_type, job.save_every, job.max_step_saves_to_keep) == ("lokr", 250, 2)
