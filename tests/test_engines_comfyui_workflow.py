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
