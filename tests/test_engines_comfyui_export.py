"""ComfyUI graphs written from a recipe (parity/engines/comfyui/export.py): they read back as the same recipe,
they pass the pinned ComfyUI's own prompt validation, and `parity workflow` keeps the closest candidate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import CASES, ROOT, needs_comfyui, run_in_comfyui
from parity import options as opts
from parity.engines.comfyui import export, workflow
from parity.plan import plan

pytestmark = pytest.mark.filterwarnings("ignore")

OUTPUT = CASES / "workspace" / "aitk" / "output"
GRAPH_FIELDS = ("width", "height", "steps", "sigma_schedule", "guidance", "cfg_norm", "seed", "prompt",
                "negative_prompt", "control_crop", "lora", "multiplier", "control_images_vae")


@pytest.fixture(scope="module")
def first_previews():
    """The first planned preview of every bundled case, with its ComfyUI reference recipe."""
    options = opts.build({"device": "cpu", "dtype": "float32", "reference": "comfyui"}, ROOT)
    seen, out = set(), []
    for task in plan(options):
        if task.error is None and task.reference is not None and task.case not in seen:
            seen.add(task.case)
            out.append(task)
    assert len(out) >= 8
    return out


def variants(task):
    """The template's recipe and the other stock choices (flux shift, no CFGNorm, no scaling node)."""
    return export.candidates(task.reference, task.training)


def test_graphs_read_back_as_their_recipe(first_previews, tmp_path):
    """API and UI forms of every candidate of every case, read by the --parity-workflow reader and applied to the
    template recipe, give the same values on every field a graph sets."""
    for task in first_previews:
        names = export.default_names(task.model, task.reference.control_images_vae)
        for recipe in variants(task):
            api = export.api_graph(recipe, names, "x")
            ui = tmp_path / "ui.json"
            ui.write_text(json.dumps(export.ui_graph(api)))
            for graph in (workflow.read(api, "api.json"), workflow.read(workflow.load(ui), ui)):
                back = workflow.recipe(graph, task.reference, Path(recipe.lora or "none").stem[:-10],
                                       lambda name: name)
                for field in GRAPH_FIELDS:
                    assert getattr(back, field) == getattr(recipe, field), (task.id, field)


def test_an_unknown_node_on_the_path_is_named(first_previews, tmp_path):
    task = first_previews[0]
    api = export.api_graph(task.reference, export.default_names(task.model, ()), "x")
    sampler = next(i for i, n in api.items() if n["class_type"] == "KSampler")
    api["99"] = {"class_type": "FreeU_V2", "inputs": {"model": api[sampler]["inputs"]["model"], "b1": 1.3}}
    api[sampler]["inputs"]["model"] = ["99", 0]
    path = tmp_path / "g.json"
    path.write_text(json.dumps(api))
    with pytest.raises(workflow.WorkflowError, match=r"node 99 \(FreeU_V2\) on the sampler's model path"):
        workflow.read_file(path)
    with pytest.raises(opts.OptionError, match="--workflow: .*FreeU_V2"):
        opts.build({"workflow": str(path)}, ROOT, flag=lambda s: s.cli_flag)


def test_choose_keeps_the_closest_and_starts_from_the_template(first_previews):
    task = next(t for t in first_previews if t.reference.control_images_vae)
    seen = []

    def distance_of(recipe):
        seen.append(recipe)
        return 5.0 - (not recipe.cfg_norm) - 2 * ("flux" in recipe.sigma_schedule)

    choice = export.choose(task.reference, task.training, distance_of)
    assert seen[0] == task.reference and choice.template_distance == 5.0
    assert choice.distance == 2.0 and "flux" in choice.recipe.sigma_schedule and not choice.recipe.cfg_norm


@needs_comfyui
def test_exported_graphs_pass_comfyuis_prompt_validation(first_previews, tmp_path):
    """Every candidate graph of every bundled case passes the pinned ComfyUI's execution.validate_prompt (node
    classes, input names, types and ranges, file names in its model and input folders: the files are empty
    stand-ins named as the graphs name them, which validation does not open)."""
    graphs, files = [], {"diffusion_models": set(), "text_encoders": set(), "vae": set(), "loras": set()}
    images = set()
    for task in first_previews:
        names = export.default_names(task.model, task.reference.control_images_vae)
        for recipe in variants(task):
            graphs.append(export.api_graph(recipe, names, "x"))
        files["diffusion_models"].add(names.unet)
        files["text_encoders"].add(names.clip)
        files["vae"].add(names.vae)
        files["loras"].update(Path(r.lora).name for r in variants(task) if r.lora)
        images.update(task.reference.control_images_vae)
    for kind, names in files.items():
        (tmp_path / kind).mkdir()
        for name in names:
            (tmp_path / kind / name).write_bytes(b"")
    (tmp_path / "input").mkdir()
    for image in images:
        (tmp_path / "input" / Path(image).name).write_bytes(Path(image).read_bytes())
    (tmp_path / "graphs.json").write_text(json.dumps(graphs))
    results = run_in_comfyui(f"""
import asyncio
import utils.extra_config
import folder_paths, nodes, execution
root = {str(tmp_path)!r}
for kind in ("diffusion_models", "text_encoders", "vae", "loras"):
    folder_paths.add_model_folder_path(kind, root + "/" + kind, is_default=True)
folder_paths.set_input_directory(root + "/input")
asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
out = []
for graph in json.load(open(root + "/graphs.json")):
    valid = asyncio.run(execution.validate_prompt("check", graph, None))
    out.append([bool(valid[0]), str(valid[1]), str(valid[3])[:500]])
print("RESULT " + json.dumps(out))
""", timeout=600)
    assert len(results) == len(graphs)
    bad = [(i, r) for i, r in enumerate(results) if not r[0]]
    assert not bad, bad[:3]
