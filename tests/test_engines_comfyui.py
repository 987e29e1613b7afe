"""ComfyUI as the reference engine (parity/engines/comfyui/): its recipe reproduces ComfyUI's own renders.

The recordings under cases/workspace/comfyui/ were written by ComfyUI a125cd84, unmodified, on the demo model
(scripts/record-comfyui, docs/comfyui-recording.md); these tests need no ComfyUI, except the one that runs
ComfyUI's own sigma code, which skips when its tree (scripts/get-comfyui) is absent.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import CASES, ROOT, needs_comfyui, run_in_comfyui
from parity import options as opts
from parity import pipeline, render
from parity.engines import comfyui
from parity.findings import find
from parity.plan import plan
from parity.forms import CFG_X0, PIXELS_ROUND

pytestmark = pytest.mark.filterwarnings("ignore")

CASE = CASES / "workspace" / "aitk" / "output" / "demo_qwen_image_2512_lora"
RECORDED = CASES / "workspace" / "comfyui" / "demo_qwen_image_2512_lora"


@pytest.fixture(scope="module")
def tasks():
    options = opts.build({"device": "cpu", "dtype": "float32", "reference": "comfyui"}, ROOT, cases=(CASE,))
    found = plan(options)
    assert found and all(t.error is None for t in found), [t.error for t in found]
    return found


def recorded(task, suffix: str) -> Path:
    return RECORDED / f"{task.preview.stem}.{suffix}"


def test_the_comfyui_recipe_is_the_templates_graph(tasks):
    for task in tasks:
        graph = json.loads(recorded(task, "graph.json").read_text())
        nodes = {n["class_type"]: n["inputs"] for n in graph.values()}
        r = task.reference
        sampler = nodes["KSampler"]
        assert (sampler["sampler_name"], sampler["scheduler"], sampler["denoise"]) == ("euler", "simple", 1.0)
        assert (r.seed, r.steps, r.guidance) == (sampler["seed"], sampler["steps"], sampler["cfg"])
        assert r.sigma_schedule == f"static shift {nodes['ModelSamplingAuraFlow']['shift']:g}, simple"
        assert (r.width, r.height) == (nodes["EmptySD3LatentImage"]["width"], nodes["EmptySD3LatentImage"]["height"])
        assert (r.prompt, r.negative_prompt) == tuple(n["inputs"]["text"] for n in (graph["6"], graph["7"]))
        lora = nodes.get("LoraLoaderModelOnly")
        assert (r.lora is None) == (lora is None)
        if lora:
            assert (Path(r.lora).name, r.multiplier) == (lora["lora_name"], lora["strength_model"])
        assert (r.cfg_form, r.cfg_norm, r.noise, r.pixels) == (CFG_X0, False, comfyui.NOISE, comfyui.PIXELS)


def test_every_difference_from_the_training_recipe_is_a_named_finding(tasks):
    for task in tasks:
        found = {f.field: f for f in find(task.training, task.reference)}
        assert {"sigma_schedule", "cfg_form", "cfg_norm", "noise", "pixels"} <= set(found), sorted(found)
        assert found["sigma_schedule"].reference == "static shift 3.1, simple"
        assert found["sigma_schedule"].training == \
            "flowmatch-dynamic (mu from tokens, shift 0.5-0.9, exponential), shift_terminal 0.02"
        assert all(f.effect for f in found.values())


def test_sigmas_and_noise_are_comfyuis(tasks):
    for task in tasks:
        r = task.reference
        inputs = load_file(recorded(task, "inputs.safetensors"))
        assert torch.equal(comfyui.sigmas(r.sigma_schedule, r.steps), inputs["sigmas"])
        trace = json.loads(recorded(task, "trace.json").read_text())
        noise = comfyui.initial_noise(r.seed, 16, r.height, r.width)
        assert list(noise.shape) == trace["noise"]["shape"] and str(noise.dtype) == trace["noise"]["dtype"]
        digest = hashlib.sha256(noise.contiguous().numpy().tobytes()).hexdigest()[:16]
        assert digest == trace["noise"]["sha"]  # scripts/record-comfyui tensor_sha


def test_the_comfyui_recipe_reproduces_comfyuis_renders(tasks):
    """Each recorded PNG, rendered from the planned reference recipe on the demo model in fp32 on the CPU: within
    a level (2026-12-07, 2-core Xeon, one thread: 5 and 3 channel values of 147,456 off by 1, max 1). Rounding instead of
    ComfyUI's truncation alone moves them by half a level on average."""
    loaded = pipeline.load(tasks[0].model, "cpu", "float32", pipeline="QwenImagePipeline")
    for task in tasks:
        want = np.asarray(Image.open(recorded(task, "png")).convert("RGB")).astype(int)
        got = np.asarray(render.render(loaded, task.reference)).astype(int)
        diff = np.abs(got - want)
        assert got.shape == want.shape
        assert diff.max() <= 1 and diff.mean() < 0.01, (task.id, diff.mean(), diff.max())
        rounded = np.asarray(render.render(loaded, task.reference.with_fields(pixels=PIXELS_ROUND))).astype(int)
        assert 0.4 < np.abs(rounded - want).mean() < 0.6


def test_each_new_field_renders_on_its_own(tasks):
    """Every engine field can be switched alone (attribution's counterfactuals): ComfyUI's sigmas in the Diffusers
    loop, the Diffusers scheduler in ComfyUI's loop, Diffusers' noise in it."""
    loaded = pipeline.load(tasks[0].model, "cpu", "float32", pipeline="QwenImagePipeline")
    training, reference = tasks[-1].training, tasks[-1].reference
    base = np.asarray(render.render(loaded, reference)).astype(int)
    for field in ("sigma_schedule", "cfg_form", "noise"):
        image = render.render(loaded, reference.with_fields(**{field: getattr(training, field)}))
        assert image.size == (reference.width, reference.height)
        moved = np.abs(np.asarray(image).astype(int) - base).mean()
        if field == "sigma_schedule":
            assert moved > 1, field  # another trajectory
        else:
            assert moved < 0.01, (field, moved)  # equal in exact arithmetic; fp32 rounding only


@needs_comfyui
def test_sigmas_equal_comfyuis_own_code():
    """ComfyUI's ModelSamplingDiscreteFlow (as ModelSamplingAuraFlow patches it), ModelSamplingFlux (the
    ModelSamplingFlux node, and Qwen's own default at mu 1.15) and simple_scheduler, run in its own venv, against
    the harness's sigmas for `static shift S` and `flux shift mu M`, bit for bit."""
    from parity.engines.comfyui.sampling import flux_text

    cases = [(shift, steps) for shift in (3.1, 3.0, 1.0, 2.5, 1.15) for steps in (1, 3, 4, 7, 20, 50)]
    theirs = run_in_comfyui(f"""
import comfy.samplers
from comfy.model_sampling import CONST, ModelSamplingDiscreteFlow, ModelSamplingFlux
class Sampling(ModelSamplingDiscreteFlow, CONST):
    pass
class Flux(ModelSamplingFlux, CONST):
    pass
out = []
for shift, steps in {cases!r}:
    for m in (Sampling(), Flux()):
        m.set_parameters(shift=shift, **({{"multiplier": 1.0}} if isinstance(m, Sampling) else {{}}))
        out.append(comfy.samplers.simple_scheduler(m, steps).tolist())
print("RESULT " + json.dumps(out))
""")
    for (shift, steps), aura, flux in zip(cases, theirs[0::2], theirs[1::2]):
        assert comfyui.simple_sigmas(shift, steps).tolist() == aura, (shift, steps)
        assert comfyui.sigmas(flux_text(shift), steps).tolist() == flux, (shift, steps)


def test_the_reference_option():
    assert opts.build({}, ROOT).reference == "server"
    with pytest.raises(opts.OptionError, match="--parity-reference"):
        opts.build({"reference": "comfy"}, ROOT)
    with pytest.raises(opts.OptionError, match="--parity-server"):
        opts.build({"reference": "comfyui", "server": "http://127.0.0.1:8000"}, ROOT)


def test_recipes_without_engine_fields_keep_their_cache_keys(tasks):
    """The new fields at their defaults (every training and server recipe) leave Recipe.key() as it was before
    them, so renders cached then are found again; an engine's values change it."""
    from dataclasses import asdict

    from parity.recipe import KEY_DEFAULTS, file_digest

    r = tasks[-1].training
    data = {k: v for k, v in asdict(r).items() if k not in ("output_format", "device", "ara_file", *KEY_DEFAULTS)}
    data.update(control_images_prompt=[], control_images_vae=[], lora=file_digest(r.lora))
    before = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:20]
    assert r.key() == before
    assert r.with_fields(noise=comfyui.NOISE).key() != before


# --- the edit slice: the v1 case (2509) through the official 2509 edit template -----------------------------------

EDIT_CASE = CASES / "workspace" / "aitk" / "output" / "demo_qwen_image_edit_plus_lora_v1"
EDIT_RECORDED = CASES / "workspace" / "comfyui" / "demo_qwen_image_edit_plus_lora_v1"


@pytest.fixture(scope="module")
def edit_tasks():
    options = opts.build({"device": "cpu", "dtype": "float32", "reference": "comfyui"}, ROOT, cases=(EDIT_CASE,))
    found = [t for t in plan(options) if t.preview is not None]
    assert len(found) == 6 and all(t.error is None for t in found), [t.error for t in found]
    return found


@pytest.fixture(scope="module")
def edit_model(edit_tasks):
    return pipeline.load(edit_tasks[0].model, "cpu", "float32", pipeline="QwenImageEditPlusPipeline")


def test_the_edit_recipe_is_the_2509_templates_graph(edit_tasks):
    from parity.forms import CROP_KONTEXT, REFERENCES_COMFY, VISION_COMFY
    from parity.preprocess import PROMPT_RESIZE_COMFY, VAE_RESIZE_COMFY

    for task in edit_tasks:
        graph = json.loads((EDIT_RECORDED / f"{task.preview.stem}.graph.json").read_text())
        by_class = {}
        for node in graph.values():
            by_class.setdefault(node["class_type"], []).append(node["inputs"])
        r = task.reference
        sampler = by_class["KSampler"][0]
        assert (r.seed, r.steps, r.guidance) == (sampler["seed"], sampler["steps"], sampler["cfg"])
        assert r.sigma_schedule == f"static shift {by_class['ModelSamplingAuraFlow'][0]['shift']:g}, simple"
        assert r.cfg_norm and by_class["CFGNorm"][0]["strength"] == 1.0
        latent = by_class["EmptySD3LatentImage"][0]
        assert (r.width, r.height) == (latent["width"], latent["height"])
        assert [Path(p).name for p in r.control_images_vae] == [n["image"] for n in by_class["LoadImage"]]
        assert r.control_images_prompt == r.control_images_vae and len(by_class["FluxKontextImageScale"]) == 1
        assert (r.control_crop, r.control_prompt_resize, r.control_vae_resize, r.vision_tokens,
                r.reference_method) == (CROP_KONTEXT, PROMPT_RESIZE_COMFY, VAE_RESIZE_COMFY, VISION_COMFY,
                                        REFERENCES_COMFY)
        assert [n["prompt"] for n in by_class["TextEncodeQwenImageEditPlus"]] == [r.prompt, r.negative_prompt]


def test_the_edit_findings_name_every_comfyui_difference(edit_tasks):
    found = {f.field: f for f in find(edit_tasks[0].training, edit_tasks[0].reference)}
    assert {"sigma_schedule", "cfg_form", "cfg_norm", "noise", "pixels", "control_crop", "control_prompt_resize",
            "control_vae_resize", "vision_tokens"} <= set(found), sorted(found)
    assert all(f.effect for f in found.values())
    wide = {f.field for f in find(edit_tasks[2].training, edit_tasks[2].reference)}
    assert "reference_method" in wide  # odd-sided reference grids sit one row apart in the two engines


def test_the_edit_conditioning_is_comfyuis(edit_tasks, edit_model):
    """The prompt embeddings the ComfyUI recipe computes with Diffusers' text encoder equal the conditioning
    ComfyUI handed its sampler (window-ordered vision tokens, 3-D positions, its vision image), both prompts."""
    for task in edit_tasks[:3]:
        r = task.reference
        recorded = load_file(EDIT_RECORDED / f"{task.preview.stem}.inputs.safetensors")
        sources = render.control_sources(r)
        for text, name in ((r.prompt, "positive_0"), (r.negative_prompt, "negative_0")):
            embeds, _ = render.prompt_embeds(edit_model, r, text, sources, "default")
            assert embeds.shape == recorded[name].shape, (task.id, name)
            assert (embeds - recorded[name]).abs().max() < 2e-6, (task.id, name)


def test_the_edit_recipe_reproduces_comfyuis_renders(edit_tasks, edit_model):
    """Every recorded v1 PNG (one control image, two, and a wide one), rendered from the planned reference recipe
    on the demo model in fp32 on the CPU: within a level (2026-12-07, 2-core Xeon, one thread: mean 0.0000-0.0001,
    max 1, 11-20 s a render)."""
    for task in edit_tasks:
        want = np.asarray(Image.open(EDIT_RECORDED / f"{task.preview.stem}.png").convert("RGB")).astype(int)
        got = np.asarray(render.render(edit_model, task.reference)).astype(int)
        assert got.shape == want.shape, task.id
        diff = np.abs(got - want)
        assert diff.max() <= 1 and diff.mean() < 0.01, (task.id, diff.mean(), diff.max())


def test_each_edit_field_renders_on_its_own(edit_tasks, edit_model):
    """The wide preview with each ComfyUI edit field switched to ai-toolkit's value alone (attribution's
    counterfactuals): every one renders, and each moves the image (the field matters on this preview)."""
    task = edit_tasks[2]
    reference, training = task.reference, task.training
    base = np.asarray(render.render(edit_model, reference)).astype(int)
    for field in ("control_crop", "control_prompt_resize", "control_vae_resize", "vision_tokens",
                  "reference_method"):
        image = render.render(edit_model, reference.with_fields(**{field: getattr(training, field)}))
        moved = np.abs(np.asarray(image).astype(int) - base).mean()
        assert moved > 0.05, (field, moved)
