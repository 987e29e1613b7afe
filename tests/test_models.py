"""models: which member of the Qwen family a run trained, and what each side does for it."""

from __future__ import annotations

import pytest
import torch

from conftest import DEMO_MODEL, TINY_CASES, TINY_MODEL
from parity import models, pipeline
from parity.aitk_config import SampleItem
from parity.errors import CaseError
from parity.forms import LORA_FUSED, LORA_PEFT

EDIT_PLUS = models.rendered()["qwen_image_edit_plus"]
EDIT_PLUS_2511 = models.rendered()["qwen_image_edit_plus_2511"]


@pytest.mark.parametrize("arch, tag, name_or_path, expected", [
    ("qwen_image_edit_plus", None, "Qwen/Qwen-Image-Edit-2509", "qwen_image_edit_plus"),
    ("qwen_image_edit_plus", None, "/models/my-edit-model", "qwen_image_edit_plus"),  # the UI's plain arch: 2509
    ("", None, "/models/my-edit-model", "qwen_image_edit_plus"),  # configs from before `arch`
    ("qwen_image_edit_plus", "2509", "/models/x", "qwen_image_edit_plus"),
    ("qwen_image_edit_plus", "2511", "/models/x", "qwen_image_edit_plus_2511"),  # the UI's tag wins
    ("qwen_image_edit_plus", None, "Qwen/Qwen-Image-Edit-2511", "qwen_image_edit_plus_2511"),
    ("qwen_image", None, "Qwen/Qwen-Image", "qwen_image"),
    ("qwen_image", "2512", "/models/x", "qwen_image_2512"),
    ("qwen_image", None, "/models/Qwen-Image-2512", "qwen_image_2512"),
    ("qwen_image_edit", None, "Qwen/Qwen-Image-Edit", "qwen_image_edit"),
    ("qwen_image_edit", None, "/models/Qwen-Image-Edit-2511-merged", "qwen_image_edit"),  # no variants there
    ("qwen_image", None, "/models/qwen-image-25120", "qwen_image"),  # not the number 2512
])
def test_a_run_is_identified_as_ai_toolkit_and_the_server_tell_the_models_apart(arch, tag, name_or_path, expected):
    model = models.identify(arch, tag, name_or_path, "config.yaml")
    assert model.id == expected and model.arch == (arch or "qwen_image_edit_plus")
    assert model.name == f"{model.arch}{':' + model.variant if model.variant else ''} ({expected})"


def test_an_arch_outside_the_family_or_not_rendered_yet_is_one_clear_error():
    with pytest.raises(CaseError) as err:
        models.identify("flux_kontext", None, "black-forest-labs/FLUX.1-Kontext-dev", "/runs/a/config.yaml")
    text = str(err.value)
    assert "/runs/a/config.yaml" in text and "'flux_kontext'" in text and "fix:" in text
    assert all(name in text for name in ("qwen_image,", "qwen_image_edit,", "qwen_image_edit_plus", "2511", "2512"))
    with pytest.raises(CaseError, match=r"tagged '2600' .* none of the checkpoints .* fix: tag the arch with one "
                                        r"of: 2509, 2511"):
        models.identify("qwen_image_edit_plus", "2600", "x", "config.yaml")


def test_edit_plus_control_images_as_each_side_routes_them():
    rules = models.rules(EDIT_PLUS)
    assert rules is models.rules(EDIT_PLUS_2511)
    item = SampleItem(0, "p", "p", 64, 64, 64, 64, "", 0, 1.0, 1, 1.0, "a.png", "a.png", "b.png", None, None, False)
    assert rules.training_control_images(item) == (("a.png", "a.png", "b.png"), ("a.png", "b.png"))
    assert rules.reference_control_images(item) == ("a.png", "b.png")
    flag = SampleItem(0, "p", "p", 64, 64, 64, 64, "", 0, 1.0, 1, 1.0, "c.png", None, None, None, None, True)
    assert rules.training_control_images(flag) == (("c.png",), ("c.png",))


def test_each_model_module_keys_the_server_requests_control_images_and_a_pipeline_defaults_to_2509s():
    """The per-model rules live in parity/models/: the request's control-image keys (requests.py asks the model's
    module), and the pipeline class loaded when none is named (pipeline.py asks models.identify's default)."""
    for model in models.rendered().values():
        keys = models.rules(model).request_control_images(("a.png", "b.png"))
        assert keys == {"ctrl_img_1": "a.png", "ctrl_img_2": "b.png"}, model.id
        assert models.rules(model).request_control_images(()) == {}
    assert pipeline.default_pipeline() == EDIT_PLUS.pipeline == "QwenImageEditPlusPipeline"


def test_2509_and_2511_differ_on_the_server_in_how_the_lora_goes_on():
    assert (EDIT_PLUS.reference_lora, EDIT_PLUS_2511.reference_lora) == (LORA_PEFT, LORA_FUSED)
    assert EDIT_PLUS.hub_id == "Qwen/Qwen-Image-Edit-2509" and EDIT_PLUS_2511.hub_id == "Qwen/Qwen-Image-Edit-2511"


def test_fused_lora_equals_diffusers_fuse_lora_and_leaves_the_base_as_it_was():
    """The server's fuse_lora (2511, 2512) on a bf16 base at multiplier 0.7: every layer's output equal bit for
    bit to the one Diffusers' own fuse_lora gives, and the weights untouched afterwards."""
    lora = next((DEMO_MODEL.parent / "output" / "demo_qwen_image_edit_plus_lora_v1").glob("*_000000002.safetensors"))
    loaded = pipeline.LoadedModel(str(DEMO_MODEL), "cpu", "bfloat16")
    state = pipeline.read_lora(str(lora), loaded.transformer)
    before = {k: v.clone() for k, v in loaded.transformer.state_dict().items()}
    torch.manual_seed(3)
    modules = dict(loaded.transformer.named_modules())
    inputs = {n: torch.randn(2, 3, modules[n].in_features, dtype=torch.bfloat16) for n in state}
    with loaded.lora(str(lora), 0.7, LORA_FUSED):
        ours = {n: modules[n](x) for n, x in inputs.items()}
    after = loaded.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    loaded._peft_on(str(lora), 1.0)
    loaded.pipe.fuse_lora(adapter_names=[loaded._adapter[1]], lora_scale=0.7)
    wrapped = dict(loaded.transformer.named_modules())
    for name, x in inputs.items():
        assert torch.equal(wrapped[name](x), ours[name]), name
    assert any(not torch.equal(ours[n], torch.nn.functional.linear(x, before[n + ".weight"], before.get(n + ".bias")))
               for n, x in inputs.items())  # the LoRA did something


def test_qwen_image_recipes_floor_by_each_side_and_ignore_control_images(tmp_path):
    """A `qwen_image` run: ai-toolkit floors sizes to 32, the server to 16; both rescale the CFG result (stock
    QwenImagePipeline); no control image on either side; 2512 (by name_or_path) fuses the LoRA on the server."""
    import dataclasses

    import yaml

    from parity.aitk_config import load_job
    from parity.findings import differing_fields
    from parity.engines.aitk import training_recipe
    from parity.engines.server import reference_recipe

    source = TINY_CASES / "workspace" / "aitk" / "output" / "tiny_qwen_image_edit_plus_lora_v1" / "config.yaml"
    for name_or_path, expected, lora in (("Qwen/Qwen-Image", "qwen_image", LORA_PEFT),
                                         ("Qwen/Qwen-Image-2512", "qwen_image_2512", LORA_FUSED)):
        doc = yaml.safe_load(source.read_text())
        doc["config"]["process"][0]["model"].update(arch="qwen_image", name_or_path=name_or_path)
        config = tmp_path / f"{expected}.yaml"
        config.write_text(yaml.safe_dump(doc))
        job = load_job(config)
        item = dataclasses.replace(job.items[0], width=336, requested_width=336)
        t = training_recipe(job, item, "lora.safetensors", lambda p, what: p)
        r = reference_recipe(job, item, "lora.safetensors", lambda p, what: p, scheduler={}, device="cpu",
                             dtype="bfloat16")
        assert t.model == r.model == models.rendered()[expected].name
        assert (t.width, r.width, t.height, r.height) == (320, 336, 256, 256)
        assert t.cfg_norm and r.cfg_norm
        assert t.control_images_prompt == t.control_images_vae == r.control_images_prompt == ()
        assert (t.lora_application, r.lora_application) == ("runtime/fp32", lora)  # multipliers differ: not merged
        assert {"width", "lora_application"} <= set(differing_fields(t, r))
        assert not {"model", "cfg_norm", "control_images"} & set(differing_fields(t, r))


def test_qwen_image_edit_routes_one_control_image_per_side_and_refuses_what_ai_toolkit_cannot_render(tmp_path):
    """ai-toolkit: the prompt encoder takes the first of ctrl_img, ctrl_img_1..3 (aspect kept, ~1 megapixel), the
    VAE reads ctrl_img only, resized bilinear to the request; the server: ctrl_img_1 first, its turned formula,
    Lanczos. A ctrl_img_1-only sample crashes ai-toolkit; two control images are refused by the server."""
    from parity.preprocess import (PROMPT_RESIZE_1024, PROMPT_RESIZE_1024_TRANSPOSED, VAE_RESIZE_REQUEST_BILINEAR,
                                   VAE_RESIZE_REQUEST_LANCZOS)

    rules = models.rules(models.rendered()["qwen_image_edit"])
    legacy = SampleItem(0, "p", "p", 64, 64, 64, 64, "", 0, 1.0, 1, 1.0, "c.png", "c.png", None, None, None, False)
    assert rules.training_control_images(legacy) == (("c.png",), ("c.png",))
    assert rules.reference_control_images(legacy) == ("c.png",)
    only_1 = SampleItem(3, "p", "p", 64, 64, 64, 64, "", 0, 1.0, 1, 1.0, None, "d.png", None, None, None, False)
    with pytest.raises(CaseError, match="sample item 3 names ctrl_img_1 but no ctrl_img"):
        rules.training_control_images(only_1)
    two = SampleItem(4, "p", "p", 64, 64, 64, 64, "", 0, 1.0, 1, 1.0, None, "d.png", "e.png", None, None, False)
    with pytest.raises(CaseError, match="sample item 4 has 2 control images"):
        rules.reference_control_images(two)
    assert (rules.TRAINING_PROMPT_RESIZE, rules.REFERENCE_PROMPT_RESIZE) == (PROMPT_RESIZE_1024,
                                                                             PROMPT_RESIZE_1024_TRANSPOSED)
    assert (rules.TRAINING_VAE_RESIZE, rules.REFERENCE_VAE_RESIZE) == (VAE_RESIZE_REQUEST_BILINEAR,
                                                                       VAE_RESIZE_REQUEST_LANCZOS)


FAMILY_CHECKPOINTS = {"demo-qwen-image": "qwen_image", "demo-qwen-image-2512": "qwen_image_2512",
                      "demo-qwen-image-edit": "qwen_image_edit", "demo-qwen-image-edit-2509": "qwen_image_edit_plus",
                      "demo-qwen-image-edit-2511": "qwen_image_edit_plus_2511"}


def test_the_bundled_checkpoints_are_remade_by_their_script_and_load_with_their_pipeline(tmp_path):
    """One bundled diffusers folder per member of the family, written from the demo model by
    scripts/make-family-checkpoints (byte for byte), each loaded with the stock pipeline class its model uses."""
    import subprocess
    import sys

    import diffusers

    from conftest import ROOT

    aitk = DEMO_MODEL.parent
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make-family-checkpoints"), "--out", str(tmp_path)],
                   check=True, cwd=ROOT, capture_output=True)
    for name, model_id in FAMILY_CHECKPOINTS.items():
        spec = models.rendered()[model_id]
        folder = aitk / name
        if name != DEMO_MODEL.name:
            made = sorted(p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*") if p.is_file())
            assert made == sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
            assert all((tmp_path / name / p).read_bytes() == (folder / p).read_bytes() for p in made)
        pipe = getattr(diffusers, spec.pipeline).from_pretrained(str(folder))
        assert type(pipe).__name__ == spec.pipeline
        assert pipe.transformer.config.zero_cond_t == (model_id == "qwen_image_edit_plus_2511")
        assert (getattr(pipe, "processor", None) is None) == (spec.arch == "qwen_image")


def test_every_model_of_the_family_has_a_bundled_case_and_ai_toolkit_errors_are_said():
    """`pytest parity/` covers all five ids. A Qwen-Image-Edit sample with only ctrl_img_1 stopped ai-toolkit's
    run (recorded): the case lists it as not rendered, with the reason, and checks the preview before it."""
    from conftest import CASES
    from parity.runner import Options, plan

    tasks = plan(Options(cases=(CASES,), dtype="float32"))
    assert {t.training.model for t in tasks if t.training} == {m.name for m in models.rendered().values()}
    crashed = [t for t in tasks if t.case == "demo_qwen_image_edit_ctrl_img_1"]
    assert [(t.id, t.error is None) for t in crashed] == [("demo_qwen_image_edit_ctrl_img_1/0/0", True),
                                                          ("demo_qwen_image_edit_ctrl_img_1/unrendered/1", False)]
    assert crashed[1].notes == ["skipped"] and crashed[1].error.startswith(
        "sample item 1 has no preview, as expected: sample item 1 names ctrl_img_1 but no ctrl_img")
    assert "AttributeError" in crashed[1].error and crashed[1].prompt == "make the background white"


def test_merged_lora_is_the_weight_ai_toolkit_merges_in_place_and_no_copy_is_kept():
    """ai-toolkit's merge_in (W + m * B @ A in fp32, stored back in bf16) made per forward: the same output bit for
    bit as merging in place, and the base weights untouched (nothing to undo, nothing saved)."""
    from parity.pipeline import linear_layers, merged_lora, read_lora

    from test_recipe import recipes

    t = next(t for _, t, _ in recipes("tiny_qwen_image_edit_plus_lora_strong_v1") if t.lora)
    loaded = pipeline.load(str(TINY_MODEL), "cpu", "bfloat16")
    state = read_lora(t.lora, loaded.transformer)
    name, (a, b) = next(iter(state.items()))
    layer = linear_layers(loaded.transformer)[name]
    before = layer.weight.detach().clone()
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), merged_lora(loaded.transformer, state, 0.7):
        ours = layer(x)
    in_place = (before.float() + 0.7 * (b.float() @ a.float())).to(torch.bfloat16)
    assert torch.equal(ours, torch.nn.functional.linear(x, in_place, layer.bias))
    assert torch.equal(layer.weight, before) and "forward" not in layer.__dict__
