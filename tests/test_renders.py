"""The render cache and the one resident pipeline: renders keyed by content, made grouped by pipeline, and a
model that does not fit said once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from conftest import TINY_MODEL, V1
from parity import pipeline
from parity.options import Options
from parity.renders import Renders
from parity.runner import Checker, plan, run
from test_identity import flip_a_weight_byte


@pytest.fixture
def own_model(tmp_path, fast_root) -> str:
    """fast_root on a copy of the tiny model this test may change."""
    model = tmp_path / "model"
    shutil.copytree(TINY_MODEL, model)
    (fast_root / V1.name / "parity.yaml").write_text(f"model: {model}\n")
    return str(model)


def first_task(root):
    return next(t for t in plan(Options(cases=(root,), device="cpu", dtype="float32", metrics=())) if t.reference)


def test_a_weight_changed_in_place_is_rendered_again(fast_root, own_model, tmp_path):
    task = first_task(fast_root)
    renders = Renders("cpu", cache_dir=tmp_path / "cache")
    before, _ = renders.get(task.reference, own_model)
    assert Renders("cpu", cache_dir=tmp_path / "cache").has(task.reference, own_model)  # a later run reuses it
    flip_a_weight_byte(Path(own_model))
    again = Renders("cpu", cache_dir=tmp_path / "cache")
    assert not again.has(task.reference, own_model)
    again.get(task.reference, own_model)
    assert again.made == 1 and pipeline.resident() is not None


def test_pixel_code_and_threads_are_in_the_key(fast_root, own_model, tmp_path, monkeypatch):
    import torch

    task = first_task(fast_root)
    name = Renders("cpu", cache_dir=tmp_path / "c").name(task.reference, own_model)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert Renders("cpu", cache_dir=tmp_path / "c").name(task.reference, own_model) != name
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr("parity.identity.pixel_code", lambda: "edited")
    assert Renders("cpu", cache_dir=tmp_path / "c").name(task.reference, own_model) != name


def quantized(root) -> None:
    """The fast case trained on a qfloat8 base (ai-toolkit's UI default): two pipelines per preview."""
    config = root / V1.name / "config.yaml"
    doc = yaml.safe_load(config.read_text())
    doc["config"]["process"][0]["model"].update(quantize=True, qtype="qfloat8")
    config.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_each_pipeline_is_loaded_once_per_case_and_never_two_at_once(fast_root, tmp_path, monkeypatch):
    quantized(fast_root)
    loads, resident = [], []
    original = pipeline.LoadedModel.__init__

    def counting(self, model, device, dtype, precision=None, *args, **kwargs):
        resident.append(len(pipeline._MODELS))
        loads.append(precision.key if precision else None)
        original(self, model, device, dtype, precision, *args, **kwargs)

    monkeypatch.setattr(pipeline.LoadedModel, "__init__", counting)
    pipeline.release()
    options = Options(cases=(fast_root,), report_dir=tmp_path / "rep", device="cpu", dtype="float32",
                      cache_dir=None, metrics=(), explain="none")
    records = run(options)
    assert len(records) > 2 and all(r["fidelity_verdict"] for r in records)
    assert len(loads) == 2 and set(loads) == {None, ("qfloat8", None, None)}  # the reference, the quantized base
    assert resident == [0, 0]  # the one before was freed first


def test_out_of_memory_is_one_message_and_one_load(fast_root, tmp_path, monkeypatch):
    """A simulated allocation failure at load: the first preview says what it needs and what to try, the others
    get the same message at once, and the model is loaded once."""
    import torch

    tries = []

    def out_of_memory(self, *args, **kwargs):
        tries.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipeline.LoadedModel, "__init__", out_of_memory)
    pipeline.release()
    options = Options(cases=(fast_root,), report_dir=tmp_path / "rep", device="cpu", dtype="float32",
                      cache_dir=None, metrics=())
    tasks = plan(options)
    checker = Checker(options)
    rows = [checker.check(t, tasks) for t in tasks]
    assert len(tries) == 1
    assert {r["verdict"] for r in rows} == {"error"} and len({r["reason"] for r in rows}) == 1
    reason = rows[0]["reason"]
    assert "out of memory on cpu" in reason and "needs about" in reason and "GiB free" in reason
    assert "--parity-device cuda" in reason
