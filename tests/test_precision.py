"""Quantized bases as ai-toolkit builds them: optimum-quanto types through optimum-quanto, uintN through
parity.quantize, the ARA attached before the user's LoRA, the quantized layers cached on disk."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from conftest import DEMO_MODEL
from parity import pipeline, precision
from parity.cache import DiskCache
from parity.errors import NotRenderable
from parity.quantize import uintx_applies, uintx_weight

pytestmark = pytest.mark.filterwarnings("ignore")
ARA = DEMO_MODEL.parent / "ara" / "demo_qwen_image_edit_2509_uint3.safetensors"


def demo_transformer():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(str(DEMO_MODEL), subfolder="transformer",
                                                       torch_dtype=torch.bfloat16)


def plain_linears(module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def test_parse_reads_the_recipe_value_and_refuses_what_is_not_reproduced():
    assert precision.parse("none") is None
    p = precision.parse("transformer:qfloat8 text_encoder:qfloat8")
    assert (p.transformer, p.text_encoder, p.ara) == ("qfloat8", "qfloat8", None)
    p = precision.parse("transformer:uint3+ara:sha256:abc text_encoder:qfloat8", "/x/ara.safetensors")
    assert (p.transformer, p.ara, p.ara_digest) == ("uint3", "/x/ara.safetensors", "sha256:abc")
    assert p.describe() == "transformer uint3+ARA, text_encoder qfloat8"
    assert precision.parse("text_encoder:qfloat8").transformer is None  # quantize: false, quantize_te: true
    with pytest.raises(NotRenderable, match="not found"):
        precision.parse("transformer:uint3+ara:not found text_encoder:qfloat8")
    with pytest.raises(NotRenderable, match="layer offloading"):
        precision.parse("transformer:float8 text_encoder:float8")
    with pytest.raises(NotRenderable, match="not reproduced"):
        precision.parse("transformer:nvfp4")
    with pytest.raises(NotRenderable, match="not reproduced"):
        precision.parse("text_encoder:uint3")  # ai-toolkit's uintx goes to the transformer only here


def test_quanto_layers_are_optimum_quanto_itself():
    """Our layer-by-layer loop makes what optimum-quanto's own quantize + freeze makes, to the bit."""
    from optimum.quanto import freeze, qfloat8, quantize

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 80)).to(torch.bfloat16)
    theirs = copy.deepcopy(model)
    assert precision.quantize_quanto(model, "qfloat8", [model[0], model], None, None) == 2
    quantize(theirs, weights=qfloat8)
    freeze(theirs)
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    for ours, ref in zip(model, theirs):
        if isinstance(ours, torch.nn.Linear):
            assert torch.equal(ours.weight._data.view(torch.uint8), ref.weight._data.view(torch.uint8))
            assert torch.equal(ours.weight._scale, ref.weight._scale)
    assert torch.equal(model(x), theirs(x))


@pytest.fixture(scope="module")
def qfloat8_model(tmp_path_factory):
    p = precision.parse("transformer:qfloat8 text_encoder:qfloat8")
    return pipeline.LoadedModel(str(DEMO_MODEL), "cpu", "bfloat16", p)


def test_qfloat8_quantizes_every_linear_of_transformer_and_text_encoder_and_nothing_else(qfloat8_model):
    from optimum.quanto.nn import QModuleMixin

    pipe = qfloat8_model.pipe
    for component in (pipe.transformer, pipe.text_encoder):  # the vision tower and lm_head included
        linears = plain_linears(component)
        assert linears and all(isinstance(m, QModuleMixin) and m.frozen for m in linears.values())
    assert qfloat8_model.quantized == {"transformer": len(plain_linears(pipe.transformer)),
                                       "text_encoder": len(plain_linears(pipe.text_encoder))}
    assert not any(isinstance(m, QModuleMixin) for m in pipe.vae.modules())  # the VAE is never quantized


def test_uint3_without_ara_quantizes_every_layer_whose_input_is_a_multiple_of_64():
    original = demo_transformer()
    ours = demo_transformer()
    n = precision.quantize_transformer(ours, precision.Precision("uint3"), None, None, None)
    before, after = plain_linears(original), plain_linears(ours)
    quantized = [k for k, m in before.items() if uintx_applies(m.weight, 3)]
    assert n == len(quantized) > 0 and len(quantized) < len(before)  # attention (96 inputs) stays as it is
    for name, layer in after.items():
        expected = uintx_weight(before[name].weight.detach(), 3) if name in quantized else before[name].weight
        assert torch.equal(layer.weight, expected), name


def test_ara_covers_the_layers_it_names_and_is_added_before_the_user_lora(tmp_path):
    """ai-toolkit's chain on a covered layer: bf16(uint3 base + ARA), then + bf16(fp32 LoRA delta * m)."""
    original = demo_transformer()
    transformer = demo_transformer()
    ara = precision.read_ara(str(ARA), transformer)
    assert all(name.startswith("transformer_blocks.") for name in ara) and "img_in" not in ara
    precision.quantize_transformer(transformer, precision.Precision("uint3", ara=str(ARA)), ara, None, None)
    precision.attach_ara(transformer, ara)
    before, after = plain_linears(original), plain_linears(transformer)
    for name, layer in after.items():
        quantized = name in ara and uintx_applies(before[name].weight, 3)
        expected = uintx_weight(before[name].weight.detach(), 3) if quantized else before[name].weight
        assert torch.equal(layer.weight, expected), name  # uncovered layers stay plain bf16 (the uint8 no-op)
    x = torch.randn(2, 5, 384, dtype=torch.bfloat16)
    name = "transformer_blocks.0.img_mlp.net.2"
    layer, (down, up) = after[name], ara[name]
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    with_ara = base + (x @ down.T) @ up.T
    assert torch.equal(layer(x), with_ara)
    a = torch.randn(4, 384) * 0.1
    b = torch.randn(layer.out_features, 4) * 0.1
    with pipeline.runtime_lora(transformer, {name: (a, b)}, 0.5):
        delta = ((x.float() @ a.T) @ b.T * 0.5).to(torch.bfloat16)
        assert torch.equal(layer(x), with_ara + delta)


def test_an_ara_whose_keys_name_no_layer_is_refused(tmp_path):
    bad = tmp_path / "ara.safetensors"
    save_file({"diffusion_model.nothing.here.lora_A.weight": torch.zeros(4, 64, dtype=torch.bfloat16),
               "diffusion_model.nothing.here.lora_B.weight": torch.zeros(64, 4, dtype=torch.bfloat16)}, bad)
    with pytest.raises(NotRenderable, match="no key of this accuracy recovery adapter names a Linear"):
        precision.read_ara(str(bad), demo_transformer())


def test_quantized_layers_come_from_the_cache_the_second_time(tmp_path, monkeypatch):
    cache = DiskCache(tmp_path)
    first = demo_transformer()
    p = precision.Precision("uint3")
    precision.quantize_transformer(first, p, None, cache, {"model": "demo"})
    monkeypatch.setattr(precision, "uintx_weight", lambda *a: pytest.fail("quantized again"))
    second = demo_transformer()
    precision.quantize_transformer(second, p, None, cache, {"model": "demo"})
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(plain_linears(first).values(),
                                                                plain_linears(second).values()))
    # optimum-quanto's frozen weights: read back from the cache, not frozen again
    from optimum.quanto.nn import QLinear

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16)).to(torch.bfloat16)
    again = copy.deepcopy(model)
    precision.quantize_quanto(model, "qfloat8", [model], cache, "q-test")
    monkeypatch.setattr(QLinear, "freeze", lambda self: pytest.fail("frozen again"))
    precision.quantize_quanto(again, "qfloat8", [again], cache, "q-test")
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(model(x), again(x))


def test_peft_like_lora_equals_peft_on_a_plain_base():
    """The reference's PEFT LoRA, as hooks for a quantized base that PEFT cannot load into: equal to PEFT's own
    forward on every layer of a plain base (bf16, multiplier 0.5)."""
    lora = next((DEMO_MODEL.parent / "output" / "demo_qwen_image_edit_plus_lora_v1").glob("*_000000002.safetensors"))
    loaded = pipeline.LoadedModel(str(DEMO_MODEL), "cpu", "bfloat16")
    loaded._peft_on(str(lora), 0.5)
    state = pipeline.read_lora(str(lora), loaded.transformer)
    torch.manual_seed(2)
    peft_out, inputs = {}, {}
    modules = dict(loaded.transformer.named_modules())
    for name in state:
        layer = modules[name]  # PEFT's lora.Linear around the plain layer
        inputs[name] = torch.randn(2, 3, layer.base_layer.in_features, dtype=torch.bfloat16)
        peft_out[name] = layer(inputs[name])
    loaded._peft_off()
    with pipeline.peft_like_lora(loaded.transformer, state, 0.5):
        for name in state:
            assert torch.equal(modules[name](inputs[name]), peft_out[name]), name
