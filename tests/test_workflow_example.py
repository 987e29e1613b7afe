"""The bundled example of a user's ComfyUI graph (issue 47, cases/workspace/comfyui/workflows/): the official
Qwen-Image-Edit-2509 template with a Lightning-style LoRA at 4 steps, cfg 1 and fp8 weights, and the stand-in
Lightning LoRA of the demo model. They are what their scripts make, the harness's own reader reads the example as
saved, and every v1 preview gets a reference recipe from it."""

from __future__ import annotations

import hashlib
import importlib.machinery
import os
import importlib.util
import json
from pathlib import Path

import pytest

from conftest import CASES, ROOT, needs_comfyui, run_in_comfyui
from parity import options as opts
from parity.engines.comfyui import workflow
from parity.forms import CROP_KONTEXT
from parity.lora_keys import comfyui, header, transformer_layers
from parity.lora_stack import comfy_layers
from parity.plan import plan

pytestmark = pytest.mark.filterwarnings("ignore")

FOLDER = CASES / "workspace" / "comfyui" / "workflows"
EXAMPLE = FOLDER / "qwen_image_edit_2509_lightning_fp8.json"
# The official template the example is made from is not kept in this project (another project's file): the tests
# that remake the example from it run where it is given, e.g. PARITY_COMFY_TEMPLATE=.../image_qwen_image_edit_2509.json
TEMPLATE = Path(os.environ.get("PARITY_COMFY_TEMPLATE", "/nonexistent/image_qwen_image_edit_2509.json"))
needs_template = pytest.mark.skipif(not TEMPLATE.is_file(), reason="the official 2509 template is not given "
                                    "(PARITY_COMFY_TEMPLATE): the example is checked as committed")
STANDIN = FOLDER / "demo-qwen-image-edit-2509-lightning-4steps.safetensors"
TRAINED = "demo_qwen_image_edit_plus_lora_v1.safetensors"
MODEL = CASES / "workspace" / "aitk" / "demo-qwen-image-edit-2509"
CASE = CASES / "workspace" / "aitk" / "output" / "demo_qwen_image_edit_plus_lora_v1"
# the 12 Linear layers per block that lightx2v's Qwen-Image(-Edit) Lightning LoRAs cover
COVERED = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
           "txt_mlp.net.2"}


def script(name: str):
    path = ROOT / "scripts" / name
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


# -- the files are what their scripts make -------------------------------------------------------------------------

@needs_template
def test_template_is_the_pinned_one_unmodified():
    make = script("make-workflow-example")
    assert hashlib.sha256(TEMPLATE.read_bytes()).hexdigest() == make.TEMPLATE_SHA256
    assert not json.loads(TEMPLATE.read_text()).get("definitions", {}).get("subgraphs")  # flat at that commit


@needs_template
def test_example_is_what_the_script_makes(tmp_path):
    make = script("make-workflow-example")
    assert make.main(["--template", str(TEMPLATE), "--out", str(tmp_path / "example.json")]) == 0
    assert (tmp_path / "example.json").read_bytes() == EXAMPLE.read_bytes()


def test_standin_is_what_the_script_makes(tmp_path):
    make = script("make-lightning-standin")
    assert make.main(["--out", str(tmp_path / "standin.safetensors")]) == 0
    assert (tmp_path / "standin.safetensors").read_bytes() == STANDIN.read_bytes()


# -- the stand-in: the real files' layout, bound by ComfyUI ---------------------------------------------------------

def test_standin_layout_and_binding():
    keys = header(STANDIN)
    layers = transformer_layers(str(MODEL))
    blocks = {k.split(".")[1] for k in layers.params if k.startswith("transformer_blocks.")}
    modules = {f"transformer_blocks.{b}.{m}" for b in blocks for m in COVERED}
    expected = {f"{m}{suffix}" for m in modules for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha")}
    assert set(keys) == expected  # bare module names, kohya factors, an alpha each; no prefix
    for module in modules:
        rows, cols = layers.params[f"{module}.weight"]
        assert keys[f"{module}.lora_down.weight"] == (64, cols)
        assert keys[f"{module}.lora_up.weight"] == (rows, 64)
        assert keys[f"{module}.alpha"] == ()
    binding = comfyui(list(keys), layers)
    assert (binding.refused, binding.bound, binding.total) == ("", len(keys), len(keys))
    read = comfy_layers(str(STANDIN), list(layers.params))
    assert set(read) == modules
    down, up = read["transformer_blocks.0.attn.to_q"]
    assert up.abs().max() > 0  # alpha/rank folded in, nonzero: it changes the model


# -- the harness's reader, on the example as saved -----------------------------------------------------------------

def test_reader_reads_the_example():
    g = workflow.read_file(EXAMPLE)
    assert g.weight_dtype == "fp8_e4m3fn"
    assert (g.steps, g.cfg) == (4, 1.0)
    assert [(name, strength) for _, name, strength in g.loras] == [(STANDIN.name, 1.0), (TRAINED, 1.0)]
    # the template's own: ModelSamplingAuraFlow shift 3, CFGNorm 1, the Plus encode, FluxKontextImageScale, VAEEncode
    assert g.sampling == ("aura", 3.0) and g.cfg_norm == 1.0
    assert (g.encode, g.image_scale, g.latent) == ("TextEncodeQwenImageEditPlus", CROP_KONTEXT, ("image",))
    assert (g.unet, g.clip) == ("demo-qwen-image-edit-2509.safetensors",
                                "demo-qwen-image-edit-2509_text_encoder.safetensors")
    assert "433" in g.nodes and "89" in g.nodes  # both LoRA loaders are on the sampler's model path


@pytest.fixture(scope="module")
def v1_tasks():
    options = opts.build({"workflow": str(EXAMPLE), "device": "cpu", "dtype": "float32"}, ROOT, cases=(CASE,))
    return plan(options)


def test_every_v1_preview_gets_the_graphs_recipe(v1_tasks):
    assert len(v1_tasks) == 6
    for task in v1_tasks:
        assert task.error is None, task.id
        recipe = task.reference
        assert [(Path(path).resolve(), s) for path, s in recipe.extra_loras] == [(STANDIN.resolve(), 1.0)], task.id
        assert (recipe.steps, recipe.guidance) == (4, 1.0), task.id
        assert recipe.cfg_norm is True, task.id
        if task.step:  # the trained LoRA's loader loads this preview's step checkpoint, at the graph's strength
            assert Path(recipe.lora).name == TRAINED and recipe.multiplier == 1.0, task.id


def test_every_v1_preview_renders_in_fp8(v1_tasks):
    for task in v1_tasks:
        if task.error and "fp8" in task.error:
            pytest.xfail(f"the renderer does not take fp8 weights yet: {task.error}")
        assert "transformer:fp8_e4m3fn" in task.reference.precision.split(), task.id


@needs_comfyui
def test_standin_binds_in_the_pinned_comfyui():
    """ComfyUI's own key map and LoRA loader (the pinned tree) patch every layer of the stand-in, leaving no key."""
    body = f"""
import logging, torch, comfy.lora, comfy.lora_convert, comfy.supported_models, comfy.utils
config = json.load(open({str(MODEL / "transformer" / "config.json")!r}))
sizes = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim", "num_attention_heads",
         "joint_attention_dim", "axes_dims_rope")
model_config = comfy.supported_models.QwenImage({{"image_model": "qwen_image", **{{k: config[k] for k in sizes}}}})
model_config.set_inference_dtype(torch.float32, None)
key_map = comfy.lora.model_lora_keys_unet(model_config.get_model({{}}), {{}})
missed = []
class Missed(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("lora key not loaded: "):
            missed.append(record.getMessage())
logging.getLogger().addHandler(Missed())
patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(comfy.utils.load_torch_file({str(STANDIN)!r})), key_map)
print("RESULT " + json.dumps({{"missed": missed, "patched": sorted(patches)}}))
"""
    found = run_in_comfyui(body)
    layers = transformer_layers(str(MODEL))
    blocks = {k.split(".")[1] for k in layers.params if k.startswith("transformer_blocks.")}
    assert found["missed"] == []
    assert set(found["patched"]) == {f"diffusion_model.transformer_blocks.{b}.{m}.weight" for b in blocks
                                     for m in COVERED}
