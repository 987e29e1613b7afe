"""bench/memory.py (issue 44): its pieces at the demo model's size, so the script cannot rot. The bench itself (5 real-
size blocks, minutes, up to ~11 GiB) is run by hand; here: the model folder it builds, the cases it makes, the
per-child peak it reads, and the result line it prints."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_result_line_reads_back(bench):
    line = bench.last_line({"R1": 1.2249, "R2": 1.5, "R3": 2.0}, 5.254)
    assert line == "memory: reference 1.22 quantized 1.50 explain 2.00 (weights 5.25 GiB, device cpu)"
    assert bench.parse_last_line(line) == {"R1": 1.22, "R2": 1.5, "R3": 2.0, "W": 5.25, "device": "cpu"}
    with pytest.raises(ValueError):
        bench.parse_last_line("memory: reference 1.2 quantized 1.50 explain 2.00 (weights 5.25 GiB, device cpu)")


def test_a_tiny_model_folder_and_its_cases(bench, tmp_path):
    """--tiny --blocks 1: the demo sizes with one block per stack, saved as a diffusers folder the harness plans on,
    with a LoRA in ai-toolkit's key format that fits the transformer; the quantized case asks for qfloat8."""
    from parity.preflight import check_lora
    from parity.runner import Options, plan

    model = tmp_path / "model"
    info = bench.ensure_model(model, tiny=True, blocks=1, layers=1, vision=1, in_process=True)
    assert (info["blocks"], info["layers"], info["vision"]) == (1, 1, 1)
    assert json.loads((model / "transformer" / "config.json").read_text())["num_layers"] == 1
    te = json.loads((model / "text_encoder" / "config.json").read_text())
    assert te["text_config"]["num_hidden_layers"] == 1 and te["vision_config"]["depth"] == 1
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "QwenImagePipeline"
    assert all((model / part).is_dir() for part in ("vae", "tokenizer", "processor", "scheduler"))
    assert bench.weight_bytes(model) > 0
    assert bench.ensure_model(model, tiny=True, blocks=1, layers=1, vision=1) == info  # kept: not built again

    from diffusers import QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel.from_pretrained(model / "transformer")
    shapes = {n: tuple(m.weight.shape) for n, m in transformer.named_modules() if type(m).__name__ == "Linear"}
    assert check_lora(str(model / "lora.safetensors"), shapes) == []

    for kind, precision in (("bf16", "none"), ("qfloat8", "transformer:qfloat8 text_encoder:qfloat8")):
        case = bench.make_case(tmp_path / "cases" / kind, model, quantized=kind == "qfloat8")
        process = yaml.safe_load((case / "config.yaml").read_text())["config"]["process"][0]
        assert process["sample"]["sample_steps"] == 2 and len(process["sample"]["samples"]) == 1
        tasks = plan(Options(cases=(case.parent,), device="cpu", dtype="bfloat16"))
        assert len(tasks) == 1 and not tasks[0].error, tasks[0].error
        task = tasks[0]
        assert (task.step, task.reference.width, task.reference.steps) == (2, 256, 2)
        assert task.training.precision == precision and task.training.dtype == "bfloat16"
        assert task.reference.lora.endswith(f"{bench.CASE_NAME}_000000002.safetensors")
        assert str(model) in str(task.model)


def test_each_child_peak_is_its_own_and_the_cap_stops_it(bench, tmp_path):
    grow = "import time; x = bytearray({n} << 20); x[::4096] = b'1' * len(x[::4096]); time.sleep(0.5)"
    big = bench.measure("big", [sys.executable, "-c", grow.format(n=300)], {}, cap=8 << 30)
    small = bench.measure("small", [sys.executable, "-c", grow.format(n=20)], {}, cap=8 << 30)
    assert big.ok and big.maxrss > 300 << 20
    assert small.ok and small.maxrss < big.maxrss - (200 << 20)  # not the earlier child's peak
    stopped = bench.measure("capped", [sys.executable, "-c", grow.format(n=400)], {}, cap=200 << 20)
    assert stopped.capped and not stopped.ok
