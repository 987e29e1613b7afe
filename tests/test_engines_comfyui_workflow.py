"""A user's ComfyUI graph as the reference (parity/engines/comfyui/workflow.py), end to end: a graph with a
Lightning-style extra LoRA, fewer steps, cfg 1 and fp8 weights, run against the bundled 2512 case, and attribution
names each of those among the causes with a measured share."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from conftest import CASES, ROOT
from parity import options as opts
from parity.engines.comfyui import export
from parity.plan import plan
from parity.runner import run

pytestmark = pytest.mark.filterwarnings("ignore")

CASE = CASES / "workspace" / "aitk" / "output" / "demo_qwen_image_2512_lora"


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """The template graph of the 2512 case's step-2 preview, changed as users change it: a second LoRA at
    strength 1 (the case's own step-2 LoRA re-keyed into the kohya layout and halved: any LoRA the graph names),
    2 steps instead of 4, cfg 1, the diffusion model loaded as fp8_e4m3fn."""
    folder = tmp_path_factory.mktemp("graph")
    options = opts.build({"device": "cpu", "dtype": "float32", "reference": "comfyui"}, ROOT, cases=(CASE,))
    task = [t for t in plan(options) if t.preview is not None][-1]
    state = load_file(task.reference.lora)
    extra = {}
    for key, value in state.items():
        module, _, kind = key.removeprefix("diffusion_model.").rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        extra[f"{name}.lora_down.weight" if kind == "A.weight" else f"{name}.lora_up.weight"] = \
            value if kind == "A.weight" else value * 0.5
    save_file(extra, str(folder / "speed_lora.safetensors"))
    recipe = task.reference.with_fields(steps=2, guidance=1.0, precision="transformer:fp8_e4m3fn",
                                        extra_loras=((str(folder / "speed_lora.safetensors"), 1.0),))
    api = export.api_graph(recipe, export.default_names(task.model, ()), "x")
    path = folder / "my_graph.json"
    path.write_text(json.dumps(export.ui_graph(api)))
    return path, task


def test_the_graph_is_the_reference(graph):
    path, template_task = graph
    options = opts.build({"device": "cpu", "dtype": "float32", "workflow": str(path)}, ROOT, cases=(CASE,))
    task = [t for t in plan(options) if t.preview is not None][-1]
    r = task.reference
    assert (r.steps, r.guidance, r.precision) == (2, 1.0, "transformer:fp8_e4m3fn")
    assert [p for p, _ in r.extra_loras] == [str(path.parent / "speed_lora.safetensors")]
    assert r.lora == template_task.reference.lora and r.lora_application.startswith("merged/fp32, stochastic")


def test_attribution_names_the_graphs_changes(graph, tmp_path):
    """Explained against the preview, the extra LoRA, steps, cfg and the fp8 weights are each a cause with a share
    (2026-12-07, 2-core Xeon: a few seconds at 256x192)."""
    path, _ = graph
    options = opts.build({"device": "cpu", "dtype": "float32", "workflow": str(path), "explain": "all",
                          "report_dir": str(tmp_path / "rep"), "cache_dir": str(tmp_path / "cache"),
                          "metrics": ""}, ROOT, cases=(CASE,))
    task = [t for t in plan(options) if t.preview is not None][-1]
    record = run(options, [task])[0]
    data = json.loads(record["causes"])
    shares = {c["fields"][0] if len(c["fields"]) == 1 else "+".join(c["fields"]): c["share"]
              for c in data["causes"] if c["testable"]}
    for field in ("extra_loras", "steps", "guidance", "precision"):
        assert field in shares and shares[field] is not None, (field, sorted(shares))
    assert data["closing_set"], data


def test_a_sampler_custom_advanced_graph_reads_as_its_ksampler_twin():
    """The v1 recording's graph with its KSampler replaced by SamplerCustomAdvanced (RandomNoise, CFGGuider,
    KSamplerSelect, BasicScheduler) gives the same reading."""
    from parity.engines.comfyui import workflow

    recorded = CASES / "workspace" / "comfyui" / "demo_qwen_image_edit_plus_lora_v1" / \
        "1796527107390__000000004_0.graph.json"
    api = json.loads(recorded.read_text())
    k = api.pop("9")["inputs"]
    api.update({
        "30": {"class_type": "RandomNoise", "inputs": {"noise_seed": k["seed"]}},
        "31": {"class_type": "CFGGuider", "inputs": {"model": k["model"], "positive": k["positive"],
                                                     "negative": k["negative"], "cfg": k["cfg"]}},
        "32": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "33": {"class_type": "BasicScheduler", "inputs": {"model": k["model"], "scheduler": "simple",
                                                          "steps": k["steps"], "denoise": 1.0}},
        "9": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["30", 0], "guider": ["31", 0],
                                                                "sampler": ["32", 0], "sigmas": ["33", 0],
                                                                "latent_image": k["latent_image"]}}})
    custom, plain = workflow.read(api, "custom.json"), workflow.read(json.loads(recorded.read_text()), "k.json")
    for field in ("unet", "clip", "loras", "sampling", "cfg_norm", "steps", "cfg", "encode", "image_scale", "latent"):
        assert getattr(custom, field) == getattr(plain, field), field
    api["32"]["inputs"]["sampler_name"] = "dpmpp_2m"
    with pytest.raises(workflow.WorkflowError, match="dpmpp_2m/simple"):
        workflow.read(api, "custom.json")
