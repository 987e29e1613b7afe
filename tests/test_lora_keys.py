"""lora_keys: how many of a LoRA's keys each engine binds, on a real ai-toolkit LoRA and on copies re-keyed as other
trainers save them; checked against Diffusers' own loader (installed) and ComfyUI's own key map and loader (from
the pinned tarball, where ComfyUI imports)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CASES, DEMO_MODEL, ROOT, TINY_MODEL, V1
from parity import lora_keys
from parity.runner import Options, plan

LORA = CASES / "workspace" / "aitk" / "output" / "demo_qwen_image_edit_plus_lora_v1" / \
    "demo_qwen_image_edit_plus_lora_v1.safetensors"
COMFYUI_TARBALL = ROOT.parent / "shared" / "oracles" / "comfyui-a125cd84.tar.gz"  # CI: shared/ beside the repo
LAYERS = 28  # Linear layers the demo LoRA trains (2 blocks x 14): 56 keys


def kohya(key: str) -> str:
    module, _, kind = key.removeprefix("diffusion_model.").rpartition(".lora_")
    return f"lora_unet_{module.replace('.', '_')}.lora_{'down' if kind == 'A.weight' else 'up'}.weight"


def rekey(tmp_path: Path, name: str, rename, alpha: bool = False, source: Path = LORA) -> Path:
    """A copy of `source` with every key renamed; with `alpha`, one `.alpha` key per layer (rank, i.e. scale 1)
    named after its lora_A key; every tensor distinct so a loader's result tells which key went where."""
    state = load_file(source)
    out = {}
    for i, (key, value) in enumerate(sorted(state.items())):
        new = rename(key)
        out[new] = value.float() + i * 1e-3
        if alpha and key.endswith(".lora_A.weight"):
            stem = new.rsplit(".lora_", 1)[0] if ".lora_" in new else new
            out[stem + ".alpha"] = torch.tensor(float(value.shape[0]))
    path = tmp_path / f"{name}.safetensors"
    save_file(out, path)
    return path


# name -> (rename, with .alpha keys, expected "bound/total" for aitk, server, comfyui, refused by the server)
VARIANTS = {
    "aitk_as_saved": (lambda k: k, False, ("56/56", "56/56", "56/56"), False),
    "no_prefix": (lambda k: k.removeprefix("diffusion_model."), False, ("0/56", "0/56", "56/56"), False),
    "transformer_prefix": (lambda k: "transformer." + k.removeprefix("diffusion_model."), False,
                           ("0/56", "56/56", "56/56"), False),
    "peft_base_model": (lambda k: "base_model.model." + k.removeprefix("diffusion_model."), False,
                        ("0/56", "0/56", "0/56"), False),
    "kohya_with_alpha": (kohya, True, ("0/84", "84/84", "84/84"), False),
    "kohya_without_alpha": (kohya, False, ("0/56", "0/56", "56/56"), True),
    "aitk_with_alpha": (lambda k: k, True, ("56/84", "56/84", "84/84"), False),
    "another_model": (lambda k: k.replace("transformer_blocks", "blocks_of_another_model"), False,
                      ("0/56", "0/56", "0/56"), True),
    "peft_default_adapter": (lambda k: "transformer." + k[16:].replace(".weight", ".default.weight"), False,
                             ("0/56", "0/56", "56/56"), True),
    "five_layers_renamed": (lambda k: k.replace("blocks.1.attn.to_", "blocks.1.attn.t0_"), False,
                            ("46/56", "46/56", "46/56"), False),
}


def test_a_real_ai_toolkit_lora_binds_every_key_in_every_engine():
    found = lora_keys.bindings(str(LORA), str(DEMO_MODEL))
    assert lora_keys.columns(found) == {"lora_keys_aitk": "56/56", "lora_keys_server": "56/56",
                                        "lora_keys_comfyui": "56/56"}
    assert lora_keys.notes(found) == [] and all(b.message() is None for b in found.values())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_a_re_keyed_lora_binds_as_each_engine_rules_say(tmp_path, name):
    rename, alpha, counts, refused = VARIANTS[name]
    found = lora_keys.bindings(str(rekey(tmp_path, name, rename, alpha)), str(DEMO_MODEL))
    assert tuple(found[e].count for e in lora_keys.ENGINES) == counts
    assert bool(found["server"].refused) == refused
    for engine, binding in found.items():
        message = binding.message()
        assert (message is None) == (binding.bound == binding.total and not binding.refused)
        if message and not binding.refused:
            assert f"{binding.bound} of {binding.total} keys bind" in message and repr(binding.unbound[0]) in message


def test_the_findings_say_which_engine_ignores_the_lora_and_what_it_expects(tmp_path):
    found = lora_keys.bindings(str(rekey(tmp_path, "bare", lambda k: k.removeprefix("diffusion_model."))),
                               str(DEMO_MODEL))
    [note] = lora_keys.notes(found)  # ComfyUI binds the bare names; ai-toolkit's miss is the preflight's error
    assert note.startswith("LoRA silently not applied in the reference server (Diffusers): 0 of 56 keys bind "
                           "(first unbound: 'transformer_blocks.0.attn.add_k_proj.lora_A.weight'")
    assert "`transformer.<module>.lora_A|lora_B.weight`" in note
    found = lora_keys.bindings(str(rekey(tmp_path, "peft", lambda k: "base_model.model." + k[16:])), str(DEMO_MODEL))
    assert [n.split(":")[0] for n in lora_keys.notes(found)] == [
        "LoRA silently not applied in the reference server (Diffusers)", "LoRA silently not applied in ComfyUI"]
    assert "`diffusion_model.<module>`, `transformer.<module>`" in lora_keys.notes(found)[1]
    found = lora_keys.bindings(str(rekey(tmp_path, "kohya", kohya)), str(DEMO_MODEL))
    assert lora_keys.notes(found) == [
        "LoRA not loadable in the reference server (Diffusers): 'lora_unet_transformer_blocks_0_attn_add_k_proj."
        "lora_down.weight' has no `.alpha` key, which Diffusers' Qwen conversion needs for every kohya layer "
        "(KeyError) (0 of 56 keys bind)"]


def test_the_counts_are_cached_per_file_version(tmp_path):
    path = rekey(tmp_path, "lora", lambda k: k)
    assert lora_keys.bindings(str(path), str(DEMO_MODEL))["comfyui"].count == "56/56"
    rekey(tmp_path, "lora", lambda k: "base_model.model." + k)  # same path, new content
    os.utime(path, ns=(1, 1))
    assert lora_keys.bindings(str(path), str(DEMO_MODEL))["comfyui"].count == "0/56"
    assert lora_keys.bindings(str(path), None) is None
    assert lora_keys.bindings(str(tmp_path / "gone.safetensors"), str(DEMO_MODEL)) is None
    (tmp_path / "junk.safetensors").write_bytes(b"PK\x03\x04 a zip")
    assert lora_keys.bindings(str(tmp_path / "junk.safetensors"), str(DEMO_MODEL)) is None


def test_each_preview_record_carries_the_counts_and_the_finding(tmp_path):
    root = tmp_path / "cases"
    shutil.copytree(V1, root / V1.name, ignore=shutil.ignore_patterns("optimizer.pt"))
    case = root / V1.name
    (case / "parity.yaml").write_text(f"model: {TINY_MODEL.resolve()}\n")
    step2 = case / f"{V1.name}_000000002.safetensors"
    state = load_file(step2)
    save_file({k.removeprefix("diffusion_model."): v for k, v in state.items()}, step2)  # as a bare-keyed tool saves
    tasks = {t.id: t for t in plan(Options(cases=(root,), device="cpu", metrics=()))}
    total = len(state)
    assert tasks[f"{V1.name}/4/0"].lora_keys == {e: f"{total}/{total}" for e in lora_keys.COLUMNS.values()}
    assert not any("LoRA" in n for n in tasks[f"{V1.name}/4/0"].notes)
    assert tasks[f"{V1.name}/0/0"].lora_keys == {}  # step 0 renders without the LoRA
    bare = tasks[f"{V1.name}/2/1"]
    assert bare.lora_keys == {"lora_keys_aitk": f"0/{total}", "lora_keys_server": f"0/{total}",
                              "lora_keys_comfyui": f"{total}/{total}"}
    assert "match no linear layer" in bare.error  # ai-toolkit's miss: the preflight's error, as before
    assert any(n.startswith(f"LoRA silently not applied in the reference server (Diffusers): 0 of {total}")
               for n in bare.notes)
    from parity.runner import base_row

    row = base_row(bare, {"device": "cpu", "torch": "", "diffusers": ""})
    assert row["lora_keys_comfyui"] == f"{total}/{total}" and "0 of" in row["notes"]


# -- Diffusers' own loader ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_transformer():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(str(DEMO_MODEL / "transformer"), local_files_only=True)


def diffusers_bound(transformer, path: Path) -> tuple[set[str], str]:
    """The file keys whose tensor Diffusers' QwenImageLoraLoaderMixin.load_lora_weights puts into a layer (as the
    server calls it), and the error when it refuses the file. `.alpha` keys are left out (folded into factors)."""
    from diffusers.loaders import QwenImageLoraLoaderMixin
    from peft.tuners.lora import LoraLayer

    class Loader(QwenImageLoraLoaderMixin):  # the pipeline's mixin on the transformer alone
        hf_device_map = None

        def __init__(self, t):
            self.transformer = t

        components = property(lambda self: {"transformer": self.transformer})

    adapter = "probe_" + path.stem
    try:
        Loader(transformer).load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter,
                                              local_files_only=True)
    except Exception as exc:  # noqa: BLE001 -- the refusal is the result
        return set(), f"{exc.__class__.__name__}: {exc}"
    state = load_file(path)
    loaded = {}
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            loaded[name] = (module.lora_A[adapter].weight, module.lora_B[adapter].weight)
    bound = set()
    for key, value in state.items():
        for a, b in loaded.values():
            if any(w.shape == value.shape and torch.equal(w, value.to(w.dtype)) for w in (a, b)):
                bound.add(key)
    transformer.delete_adapters(adapter) if loaded else None
    return bound, ""


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_diffusers_own_loader_binds_the_keys_our_model_says(tmp_path, demo_transformer, name):
    rename, alpha, _, _ = VARIANTS[name]
    path = rekey(tmp_path, name, rename, alpha)
    bound, error = diffusers_bound(demo_transformer, path)
    ours = lora_keys.bindings(str(path), str(DEMO_MODEL))["server"]
    assert bool(ours.refused) == bool(error), error
    keys = [k for k in load_file(path) if not k.endswith(".alpha")]
    assert {k for k in keys if k not in ours.unbound} == bound


# -- ComfyUI's own key map and loader ----------------------------------------------------------------------------

COMFY_PROBE = r"""
import json, logging, sys
root, model_folder, files = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, root)
try:
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # no GPU probing on import
    import torch, comfy.lora, comfy.lora_convert, comfy.supported_models, comfy.utils
except ImportError as exc:
    print(f"{exc.__class__.__name__}: {exc}", file=sys.stderr)
    sys.exit(3)
config = json.load(open(model_folder + "/transformer/config.json"))
sizes = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim", "num_attention_heads",
         "joint_attention_dim", "axes_dims_rope")
model_config = comfy.supported_models.QwenImage({"image_model": "qwen_image", **{k: config[k] for k in sizes}})
model_config.set_inference_dtype(torch.float32, None)
model = model_config.get_model({})  # ComfyUI's Qwen-Image model at the demo model's sizes
key_map = comfy.lora.model_lora_keys_unet(model, {})
missed = []
class Missed(logging.Handler):
    def emit(self, record):
        text = record.getMessage()
        if text.startswith("lora key not loaded: "):
            missed.append(text[len("lora key not loaded: "):])
logging.getLogger().addHandler(Missed())
results = {}
for path in files:
    missed.clear()
    try:
        comfy.lora.load_lora(comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(path)), key_map)
        results[path] = {"unbound": sorted(missed), "error": ""}
    except Exception as exc:
        results[path] = {"unbound": [], "error": repr(exc)}
print(json.dumps({"state_keys": list(model.state_dict()), "key_map": key_map, "results": results}))
"""


@pytest.fixture(scope="module")
def comfyui_tree(tmp_path_factory) -> Path:
    """ComfyUI's source extracted from the pinned tarball (never copied into the project)."""
    if not COMFYUI_TARBALL.is_file():
        pytest.skip(f"no ComfyUI tarball at {COMFYUI_TARBALL} (the shared oracles folder beside the repo)")
    folder = tmp_path_factory.mktemp("comfyui")
    with tarfile.open(COMFYUI_TARBALL) as tar:
        tar.extractall(folder, filter="data")
    return folder


def test_comfyui_own_key_map_and_loader_agree_with_ours(tmp_path, comfyui_tree):
    files = {name: rekey(tmp_path, name, rename, alpha) for name, (rename, alpha, _, _) in VARIANTS.items()}
    run = subprocess.run([sys.executable, "-c", COMFY_PROBE, str(comfyui_tree), str(DEMO_MODEL),
                          *map(str, files.values())], capture_output=True, text=True, timeout=300)
    if run.returncode == 3:
        pytest.skip(f"ComfyUI does not import here ({run.stderr.strip().splitlines()[-1]}); "
                    f"`pip install -e '.[test]'` brings what comfy.lora needs")
    assert run.returncode == 0, run.stderr[-3000:]
    comfy = json.loads(run.stdout.strip().splitlines()[-1])
    layers = lora_keys.transformer_layers(str(DEMO_MODEL))
    # ComfyUI's Qwen-Image model names its weights as the Diffusers folder does (its state dict, less its sampler's
    # sigmas), and its key map is ours
    assert {k for k in comfy["state_keys"] if k.startswith("diffusion_model.")} == \
        {"diffusion_model." + k for k in layers.params}
    assert comfy["key_map"] == lora_keys.comfyui_key_map(layers.params)
    for name, path in files.items():
        ours = lora_keys.bindings(str(path), str(DEMO_MODEL))["comfyui"]
        theirs = comfy["results"][str(path)]
        assert bool(theirs["error"]) == bool(ours.refused), (name, theirs["error"])
        if not ours.refused:
            assert sorted(theirs["unbound"]) == sorted(ours.unbound), name
            total = len(load_file(path))
            assert f"{total - len(theirs['unbound'])}/{total}" == VARIANTS[name][2][2]  # ComfyUI's own count
