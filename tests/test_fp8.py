"""ComfyUI's fp8 weights on the CPU (parity/fp8.py): the transformer's float8_e4m3fn, the text encoder's scaled fp8
and a LoRA merged into the fp8 transformer by stochastic rounding, checked on the demo checkpoints; against
ComfyUI's own code (its fp8 model load, its scaled-fp8 Linear, its stochastic rounding and LoRA patch) when its
pinned tree and venv are here (scripts/get-comfyui)."""

from __future__ import annotations

import json
import subprocess
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DEMO_MODEL, ROOT
from parity import fp8, pipeline, precision, render
from parity.errors import NotRenderable
from parity.forms import LORA_MERGED_FP8, LORA_MERGED_FP32, PRECISION_COMFY_FP8
from test_recipe import recipes

pytestmark = pytest.mark.filterwarnings("ignore")

COMFYUI = ROOT / ".comfyui" / "ComfyUI"
COMFYUI_PYTHON = ROOT / ".venv-comfyui" / "bin" / "python"
T2I_MODEL = DEMO_MODEL.parent / "demo-qwen-image-2512"  # text to image: the quickest demo render (256x192, 4 steps)
LORA_MODULES = ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.net.2",
                "transformer_blocks.1.txt_mod.1")
FP8_TRANSFORMER = "transformer:fp8_e4m3fn"
FP8_TEXT_ENCODER = "text_encoder:fp8_scaled"


def demo_transformer(dtype=torch.bfloat16, model=DEMO_MODEL):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(str(model), subfolder="transformer", torch_dtype=dtype)


def demo_text_encoder():
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(str(DEMO_MODEL), subfolder="text_encoder",
                                                              torch_dtype=torch.bfloat16)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(int)


def t2i_recipe():
    """The 2512 demo case's step-2 preview as ai-toolkit renders it: fp32, its LoRA at multiplier 1, merged."""
    _, training, _ = recipes("demo_qwen_image_2512_lora")[-1]
    assert training.lora and training.dtype == "float32" and training.lora_application == LORA_MERGED_FP32
    return training


def test_parse_reads_comfyuis_fp8_qtypes():
    p = precision.parse(PRECISION_COMFY_FP8)
    assert (p.transformer, p.text_encoder, p.fp8_transformer, p.aitk_quantized) == \
        ("fp8_e4m3fn", "fp8_scaled", True, False)
    assert p.describe() == "transformer fp8_e4m3fn, text_encoder fp8_scaled"
    assert precision.parse("transformer:qfloat8 text_encoder:fp8_scaled").aitk_quantized
    with pytest.raises(NotRenderable, match="not reproduced"):
        precision.parse("transformer:fp8_scaled")  # no scaled-fp8 diffusion model in ComfyUI's Qwen templates
    with pytest.raises(NotRenderable, match="not reproduced"):
        precision.parse("text_encoder:fp8_e4m3fn")
    with pytest.raises(NotRenderable, match="ARA"):
        precision.parse("transformer:fp8_e4m3fn+ara:sha256:abc", "/x/ara.safetensors")


def test_the_cast_saturates_and_keeps_nan():
    """Beyond +-448 the cast gives +-448 (torch 2.14's own cast does too, from fp32, bf16 and fp16), inf too; NaN
    stays NaN; values inside round to nearest even (464 is the tie between 448 and the NaN code: 448)."""
    x = torch.tensor([0.0, -0.0, 1e-4, 0.1, 447.0, 448.0, 460.0, 464.0, 465.0, 480.0, 1e4, -1e4, float("inf"),
                      -float("inf"), float("nan")])
    got = fp8.to_fp8(x).float()
    assert got[4:14].abs().tolist() == [448.0] * 10 and got[11] == -448 and got[13] == -448
    assert torch.isnan(got[14]) and got[3] == 0.1015625
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(fp8.to_fp8(x.to(dtype)).view(torch.uint8), x.to(dtype).to(torch.float8_e4m3fn).view(
            torch.uint8)), dtype


def test_fp8_transformer_rounds_every_parameter_and_nothing_else():
    """Every parameter (Linear weights and biases, RMSNorm weights: ComfyUI builds the whole model in fp8) becomes
    its fp8 value, in the model's dtype, in the same Parameter objects; buffers stay; a Linear computes on them."""
    original = demo_transformer()
    ours = demo_transformer()
    params = dict(ours.named_parameters())
    n = precision.quantize_transformer(ours, precision.Precision("fp8_e4m3fn"), None, None, None)
    linears = {k: m for k, m in ours.named_modules() if isinstance(m, torch.nn.Linear)}
    assert n == len(linears) > 0
    before = dict(original.named_parameters())
    for name, param in ours.named_parameters():
        assert param is params[name] and param.dtype == torch.bfloat16
        assert fp8.is_fp8_valued(param), name
        assert torch.equal(param, before[name].to(torch.float8_e4m3fn).to(torch.bfloat16)), name
    for name in linears:  # each bf16 weight loses mantissa bits somewhere
        assert not torch.equal(params[name + ".weight"], before[name + ".weight"]), name
    for (name, buffer), (_, was) in zip(ours.named_buffers(), original.named_buffers()):
        assert torch.equal(buffer, was), name
    layer = linears["transformer_blocks.0.attn.to_q"]
    x = torch.randn(2, 5, layer.in_features, dtype=torch.bfloat16)
    plain = before["transformer_blocks.0.attn.to_q.weight"]
    assert torch.equal(layer(x), torch.nn.functional.linear(
        x, plain.to(torch.float8_e4m3fn).to(x.dtype), before["transformer_blocks.0.attn.to_q.bias"].to(
            torch.float8_e4m3fn).to(x.dtype)))


def test_fp8_scaled_text_encoder_scales_each_linear_but_lm_head():
    original = demo_text_encoder()
    ours = demo_text_encoder()
    n = precision.apply(SimpleNamespace(text_encoder=ours), precision.Precision(text_encoder="fp8_scaled"))
    before = dict(original.named_modules())
    scaled = {k: m for k, m in ours.named_modules() if isinstance(m, fp8.ScaledFP8Linear)}
    visual = [k for k in scaled if ".visual." in f".{k}"]
    assert n == {"text_encoder": len(scaled)} and visual and len(visual) < len(scaled)  # language model and vision
    head = ours.get_output_embeddings()
    assert not isinstance(head, fp8.ScaledFP8Linear)
    assert torch.equal(head.weight, original.get_output_embeddings().weight)
    for name, layer in scaled.items():
        w, was = layer.weight, before[name].weight
        assert layer.scale_weight.dtype == torch.float32 and w.dtype == torch.bfloat16
        assert torch.equal(layer.scale_weight, was.float().abs().amax() / 448)
        assert fp8.is_fp8_valued(w) and w.float().abs().amax() == 448
        assert torch.equal(w, fp8.to_fp8(was.float() / layer.scale_weight).to(w.dtype)), name
        # fp8 keeps 3 mantissa bits: each weight within 1/16 of itself, or within half the smallest step
        err = (w.float() * layer.scale_weight - was.float()).abs()
        assert (err <= torch.maximum(was.float().abs() / 16, layer.scale_weight * 2 ** -10) * 1.001).all(), name
        if layer.bias is not None:
            assert torch.equal(layer.bias, fp8.fp8_values(before[name].bias)), name
    plain = {k: p for k, p in original.named_parameters()}
    for name, param in ours.named_parameters():  # embedding, norms, patch convolution: as loaded
        module = name.rpartition(".")[0]
        if module not in scaled:
            assert torch.equal(param, plain[name]), name


def test_scaled_linear_puts_the_scale_on_the_smaller_operand():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48).to(torch.bfloat16)
    fp8.scale_linear(layer)
    w, b, s = layer.weight, layer.bias, layer.scale_weight.to(torch.bfloat16)
    small, large = torch.randn(3, 64, dtype=torch.bfloat16), torch.randn(60, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(small), torch.nn.functional.linear(small * s, w, b))  # 192 < 3072 weights
    assert torch.equal(layer(large), torch.nn.functional.linear(large, w * s, b))  # 3840 > 3072


def test_string_to_seed_is_crc32():
    for key in ("diffusion_model.transformer_blocks.0.attn.to_q.weight", "", "a"):
        assert fp8.string_to_seed(key) == zlib.crc32(key.encode("latin-1"))


def test_stochastic_rounding_gives_neighbouring_fp8_values():
    torch.manual_seed(1)
    x = torch.randn(300, 40) * 0.05
    out = fp8.stochastic_round(x, 1234)
    assert out.dtype == torch.float8_e4m3fn and torch.equal(out.view(torch.uint8),
                                                             fp8.stochastic_round(x, 1234).view(torch.uint8))
    assert not torch.equal(out.view(torch.uint8), fp8.stochastic_round(x, 1235).view(torch.uint8))
    nearest = x.to(torch.float8_e4m3fn).float()
    got = out.float()
    assert (got != nearest).any() and (got == nearest).float().mean() > 0.5
    ulp = 2.0 ** (torch.floor(torch.log2(x.abs())).clamp(min=-6) - 3)  # fp8's step at |x| (subnormals: 2^-9)
    assert ((got - x).abs() < ulp).all()  # x rounded down or up, one step at most
    assert abs((got - x).mean()) < abs((nearest - x).abs().mean())  # unbiased on average


@pytest.fixture(scope="module")
def fp8_model():
    return pipeline.LoadedModel(str(T2I_MODEL), "cpu", "float32", precision.parse(FP8_TRANSFORMER),
                                pipeline="QwenImagePipeline")


def test_fp8_render_differs_from_the_plain_one_but_stays_close(fp8_model):
    training = t2i_recipe()
    plain = pixels(render.render(pipeline.load_for(training, str(T2I_MODEL), "cpu"), training))
    recipe = training.with_fields(precision=FP8_TRANSFORMER)
    assert pipeline.load_key(recipe, str(T2I_MODEL), "cpu") != pipeline.load_key(training, str(T2I_MODEL), "cpu")
    loaded = pipeline.load_for(recipe, str(T2I_MODEL), "cpu")
    assert loaded is not pipeline.load_for(training, str(T2I_MODEL), "cpu") and loaded.precision.fp8_transformer
    pipeline.release()
    ours = pixels(render.render(fp8_model, recipe))  # the LoRA merged in fp32, rounded to fp32 (the fp8 values)
    d = np.abs(ours - plain)
    assert 0.2 < d.mean() < 4, d.mean()  # measured 1.15 (the LoRA itself moves this preview by 18.9)
    with pytest.raises(ValueError, match="precision"):
        render.render(fp8_model, training)  # a plain recipe on the fp8 pipeline: refused


def test_fp8_scaled_text_encoder_render_differs_but_stays_close(tiny_model):
    """The tiny edit case's reference render (bf16, two control images through the vision tower)."""
    _, _, reference = recipes("tiny_qwen_image_edit_plus_lora_v1")[-1]
    plain = pixels(render.render(pipeline.load_for(reference, tiny_model, "cpu"), reference))
    recipe = reference.with_fields(precision=FP8_TEXT_ENCODER)
    assert pipeline.load_key(recipe, tiny_model, "cpu") != pipeline.load_key(reference, tiny_model, "cpu")
    loaded = pipeline.load_for(recipe, tiny_model, "cpu")
    assert loaded.quantized["text_encoder"] > 0 and "transformer" not in loaded.quantized
    ours = pixels(render.render(loaded, recipe))
    pipeline.release()
    d = np.abs(ours - plain)
    assert 0.05 < d.mean() < 2, d.mean()  # measured 0.42


def effective_weights(transformer, names, monkeypatch) -> dict[str, torch.Tensor]:
    """The weight each named Linear multiplies by now (what its forward hands to F.linear)."""
    modules = dict(transformer.named_modules())
    seen = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: seen.append(w) or real(x, w, b))
    out = {}
    with torch.no_grad():
        for name in names:
            seen.clear()
            modules[name](torch.zeros(1, modules[name].in_features, dtype=modules[name].weight.dtype))
            [out[name]] = seen
    monkeypatch.undo()
    return out


def test_lora_merged_into_fp8_is_stochastically_rounded_and_undone(fp8_model, monkeypatch):
    training = t2i_recipe()
    recipe = training.with_fields(precision=FP8_TRANSFORMER, lora_application=LORA_MERGED_FP8)
    transformer = fp8_model.transformer
    state = pipeline.read_lora(recipe.lora, transformer)
    weights = {k: p.detach().clone() for k, p in transformer.named_parameters()}
    without = pixels(render.render(fp8_model, recipe.with_fields(lora=None)))
    with fp8_model.lora(recipe.lora, 0.75, LORA_MERGED_FP8):
        merged = effective_weights(transformer, state, monkeypatch)
    for name, (down, up) in state.items():
        w = dict(transformer.named_modules())[name].weight
        want = fp8.merge_lora(w, down, up, 0.75, name, "cpu").to(w.dtype)
        assert fp8.is_fp8_valued(merged[name]) and torch.equal(merged[name], want), name
        fp32_sum = w + 0.75 * (up.float() @ down.float())
        assert not torch.equal(want, fp8.fp8_values(fp32_sum))  # stochastic, not to nearest
    assert all("forward" not in vars(m) for m in transformer.modules())  # the class's forward again
    assert all(torch.equal(p, weights[k]) for k, p in transformer.named_parameters())
    with_lora = pixels(render.render(fp8_model, recipe))
    assert np.abs(with_lora - without).mean() > 5  # the LoRA is applied (18.9 on the plain base)
    merged32 = pixels(render.render(fp8_model, recipe.with_fields(lora_application=LORA_MERGED_FP32)))
    assert 0 < np.abs(with_lora - merged32).mean() < 4  # measured 1.86: fp8 rounding of the sum vs none
    assert np.array_equal(pixels(render.render(fp8_model, recipe.with_fields(lora=None))), without)  # undone


def test_lora_merged_fp8_on_other_bases():
    """On plain weights ComfyUI's merge rounds to their own dtype: the fp8 form is merged/fp32 there (so attribution
    can switch `precision` alone); ai-toolkit's quantized bases refuse both merged forms."""
    lora = t2i_recipe().lora
    plain = pipeline.LoadedModel(str(T2I_MODEL), "cpu", "float32", pipeline="QwenImagePipeline")
    layer = plain.transformer.get_submodule(LORA_MODULES[0])  # a layer the LoRA covers
    probe = torch.randn(1, 8, layer.in_features)
    before = layer(probe)
    with plain.lora(lora, 1.0, LORA_MERGED_FP8):
        as_fp8_form = layer(probe)
    with plain.lora(lora, 1.0, LORA_MERGED_FP32):
        assert torch.equal(layer(probe), as_fp8_form) and not torch.equal(as_fp8_form, before)
    plain.precision = precision.Precision("qfloat8")  # ai-toolkit's quantized bases refuse a merged LoRA
    for how in (LORA_MERGED_FP32, LORA_MERGED_FP8):
        with pytest.raises(NotRenderable, match="quantized base"):
            with plain.lora(lora, 1.0, how):
                pass
    plain.precision = precision.Precision(text_encoder="fp8_scaled")  # no fp8 transformer
    with plain.lora(lora, 1.0, LORA_MERGED_FP32):  # ComfyUI's bf16/fp32 model under an fp8 text encoder
        pass


# ---- against ComfyUI's own code -------------------------------------------------------------------------------

COMFY_SCRIPT = """
import json, sys
sys.path.insert(0, {comfyui!r})
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
from safetensors.torch import load_file, save_file
import comfy.float, comfy.lora, comfy.ops
from comfy.model_patcher import string_to_seed
from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
from comfy.text_encoders.llama import Qwen25_7BVLI

inp = load_file({inputs!r})
args = json.loads({args!r})
out, info = {{}}, {{}}
# comfy/float.py stochastic_rounding with the seed model_patcher gives a key
for name, key in args["round"].items():
    out["round." + name] = comfy.float.stochastic_rounding(inp["round." + name], torch.float8_e4m3fn,
                                                           seed=string_to_seed(key)).view(torch.uint8)
info["seeds"] = [string_to_seed(k) for k in args["seeds"]]
# model_patcher.patch_weight_to_device on an fp8 weight (no set_weight/convert_weight on manual_cast ops)
lora = load_file(args["lora"])
for module in args["modules"]:
    key = "diffusion_model." + module + ".weight"
    patches = comfy.lora.load_lora(lora, {{"diffusion_model." + module: key}}, log_missing=False)
    weight = inp["fp8." + module]
    temp = weight.to(torch.float32, copy=True)
    merged = comfy.lora.calculate_weight([(args["strength"], patches[key], 1.0, None, None)], temp, key)
    out["lora." + module] = comfy.float.stochastic_rounding(merged, weight.dtype, seed=string_to_seed(key)).view(
        torch.uint8)
# the diffusion model built in fp8 (UNETLoader weight_dtype fp8_e4m3fn) and the demo checkpoint loaded into it
ops = comfy.ops.pick_operations(torch.float8_e4m3fn, torch.bfloat16)
model = QwenImageTransformer2DModel(**args["config"], dtype=torch.float8_e4m3fn, operations=ops)
missing, unexpected = model.load_state_dict(load_file(args["checkpoint"]), strict=False)
info["load"] = [list(missing), list(unexpected)]
info["not_fp8"] = [n for n, p in model.named_parameters() if p.dtype != torch.float8_e4m3fn]
for n, p in model.named_parameters():
    out["model." + n] = p.detach().view(torch.uint8)
sat = torch.nn.Parameter(torch.zeros(inp["saturate"].shape, dtype=torch.float8_e4m3fn), requires_grad=False)
with torch.no_grad():
    sat.copy_(inp["saturate"])
out["saturate"] = sat.view(torch.uint8)
# the scaled-fp8 text encoder: which parameters are fp8, and one Linear's forward
te = Qwen25_7BVLI(dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1), torch.bfloat16, "cpu",
                  comfy.ops.scaled_fp8_ops(fp8_matrix_mult=False, override_dtype=torch.float8_e4m3fn))
info["te"] = sorted({{(type(m).__name__, n, str(p.dtype)) for m in te.modules()
                      for n, p in m.named_parameters(recurse=False)}})
Linear = comfy.ops.scaled_fp8_ops(fp8_matrix_mult=False, override_dtype=torch.float8_e4m3fn).Linear
for dtype in ("bfloat16", "float32"):
    layer = Linear(64, 48, bias=True, dtype=getattr(torch, dtype))
    with torch.no_grad():
        layer.weight.copy_(inp["te.weight"])
        layer.bias.copy_(inp["te.bias"])
        layer.scale_weight.copy_(inp["te.scale"])
    for size in ("small", "large"):
        out["te.%s.%s" % (dtype, size)] = layer(inp["te.x." + size].to(getattr(torch, dtype)))
save_file(out, {outputs!r})
print("INFO " + json.dumps(info))
"""


def rounding_inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    special = torch.tensor([0.0, -0.0, 1e-9, -1e-9, 2 ** -9, 2 ** -10, 3 * 2 ** -11, 0.0156, 1.999, 1.9995, 255.9,
                            -255.9, 447.0, 448.0, 470.0, 1000.0, -1000.0, 1e5, float("inf"), -float("inf"),
                            float("nan"), 0.3, -0.3, 1.0, 2.0, 0.5])
    return {"special": special.repeat(40, 1), "weights": torch.randn(96, 64) * 0.05,
            "bias": torch.randn(96) * 0.02, "sliced": torch.randn(4100, 4100) * 0.02}  # > 4096^2: two slices


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """ComfyUI's own functions run in its venv on the inputs written here: (their outputs, info)."""
    if not COMFYUI.is_dir() or not COMFYUI_PYTHON.exists():
        pytest.skip("ComfyUI's tree or its venv is absent (scripts/get-comfyui)")
    folder = tmp_path_factory.mktemp("comfy-fp8")
    rounded = rounding_inputs()
    inputs = {"round." + k: v for k, v in rounded.items()}
    transformer = demo_transformer(torch.float32, T2I_MODEL)
    modules = dict(transformer.named_modules())
    for module in LORA_MODULES:
        inputs["fp8." + module] = modules[module].weight.detach().to(torch.float8_e4m3fn)
    inputs["saturate"] = torch.tensor([447.0, 460.0, 464.0, 465.0, 479.0, 480.0, 1e4, -1e4, float("inf")],
                                      dtype=torch.bfloat16)
    torch.manual_seed(4)
    layer = torch.nn.Linear(64, 48).to(torch.bfloat16)
    fp8.scale_linear(layer)
    inputs.update({"te.weight": layer.weight.detach().to(torch.float8_e4m3fn),
                   "te.bias": layer.bias.detach().to(torch.float8_e4m3fn), "te.scale": layer.scale_weight,
                   "te.x.small": torch.randn(3, 64), "te.x.large": torch.randn(60, 64)})
    save_file({k: v.contiguous() for k, v in inputs.items()}, folder / "in.safetensors")
    config = {k: v for k, v in transformer.config.items() if k in (
        "patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim", "num_attention_heads",
        "joint_attention_dim", "axes_dims_rope")}
    args = {"round": {name: fp8.weight_key(f"transformer_blocks.{i}.attn.to_q")
                      for i, name in enumerate(rounded)},
            "seeds": ["diffusion_model.img_in.weight", "", "ключ.weight"], "lora": t2i_recipe().lora,
            "modules": list(LORA_MODULES), "strength": 0.75, "config": config,
            "checkpoint": str(T2I_MODEL / "transformer" / "diffusion_pytorch_model.safetensors")}
    script = COMFY_SCRIPT.format(comfyui=str(COMFYUI), inputs=str(folder / "in.safetensors"),
                                 outputs=str(folder / "out.safetensors"), args=json.dumps(args))
    done = subprocess.run([str(COMFYUI_PYTHON), "-c", script], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    line = next((x for x in done.stdout.splitlines() if x.startswith("INFO ")), None)
    assert line, done.stderr[-3000:]
    return {"out": load_file(folder / "out.safetensors"), "info": json.loads(line[5:]), "inputs": inputs,
            "args": args, "transformer": transformer}


def test_stochastic_rounding_equals_comfyuis_own_bit_for_bit(comfy):
    for name, key in comfy["args"]["round"].items():
        ours = fp8.stochastic_round(comfy["inputs"]["round." + name], fp8.string_to_seed(key))
        assert torch.equal(ours.view(torch.uint8), comfy["out"]["round." + name]), name
    assert [fp8.string_to_seed(k) for k in comfy["args"]["seeds"]] == comfy["info"]["seeds"]  # non-ASCII too


def test_lora_merge_equals_comfyuis_model_patcher_bit_for_bit(comfy):
    from safetensors.torch import load_file as read

    lora = read(comfy["args"]["lora"])
    for module in LORA_MODULES:
        down, up = (lora[f"diffusion_model.{module}.lora_{x}.weight"] for x in "AB")
        weight = comfy["inputs"]["fp8." + module].to(torch.float32)
        ours = fp8.merge_lora(weight, down, up, comfy["args"]["strength"], module, "cpu")
        assert torch.equal(ours.view(torch.uint8), comfy["out"]["lora." + module]), module


def test_fp8_transformer_equals_comfyuis_fp8_model_load(comfy):
    """ComfyUI's QwenImageTransformer2DModel built in float8_e4m3fn holds every parameter in fp8 (so the biases
    and norm weights too); the demo checkpoint loaded into it, name by name, equals our rounding of the Diffusers
    transformer loaded in fp32 (the file's dtype: one rounding on both sides); the cast saturates as ours."""
    missing, unexpected = comfy["info"]["load"]
    assert not missing and not unexpected and comfy["info"]["not_fp8"] == []
    transformer = comfy["transformer"]
    fp8.round_transformer(transformer)
    params = dict(transformer.named_parameters())
    theirs = {k.removeprefix("model."): v for k, v in comfy["out"].items() if k.startswith("model.")}
    assert set(theirs) == set(params)
    for name, value in theirs.items():
        assert torch.equal(params[name].to(torch.float8_e4m3fn).view(torch.uint8), value), name
    assert torch.equal(fp8.to_fp8(comfy["inputs"]["saturate"]).view(torch.uint8), comfy["out"]["saturate"])


def test_scaled_linear_equals_comfyuis_scaled_fp8_linear(comfy):
    kinds = {(kind, name, dtype) for kind, name, dtype in map(tuple, comfy["info"]["te"])}
    assert {k for k in kinds if k[0] == "Linear"} == {("Linear", "weight", "torch.float8_e4m3fn"),
                                                      ("Linear", "bias", "torch.float8_e4m3fn"),
                                                      ("Linear", "scale_weight", "torch.float32")}
    assert all("float8" not in dtype for kind, _, dtype in kinds if kind != "Linear")  # norms, embedding, conv
    inputs = comfy["inputs"]
    for dtype in (torch.bfloat16, torch.float32):
        layer = torch.nn.Linear(64, 48, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(inputs["te.weight"].to(dtype))
            layer.bias.copy_(inputs["te.bias"].to(dtype))
        layer.register_buffer("scale_weight", inputs["te.scale"], persistent=False)
        layer.__class__ = fp8.ScaledFP8Linear
        for size in ("small", "large"):
            want = comfy["out"][f"te.{str(dtype)[6:]}.{size}"]
            assert torch.equal(layer(inputs["te.x." + size].to(dtype)), want), (dtype, size)
