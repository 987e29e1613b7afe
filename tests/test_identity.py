"""Cache keys by content: the model's files, the code on the pixel path, and the machine where it changes bits."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import DEMO_MODEL
from parity import identity


def test_the_pixel_path_is_found_from_the_renderers_imports():
    names = {str(p.relative_to(identity.PACKAGE)) for p in identity.pixel_modules()}
    assert {"render.py", "pipeline.py", "preprocess.py", "precision.py", "quantize.py", "kernels.py", "recipe.py",
            "models/__init__.py", "models/qwen_image.py", "models/qwen_image_edit.py",
            "models/qwen_image_edit_plus.py"} <= names
    assert not names & {"report.py", "runner.py", "plugin.py", "aitk_config.py", "identity.py"}


@pytest.fixture
def package_copy(tmp_path) -> Path:
    copy = tmp_path / "parity"
    shutil.copytree(identity.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "templates"))
    return copy


@pytest.mark.parametrize("edited", ["models/qwen_image.py", "models/qwen_image_edit_plus.py", "models/__init__.py",
                                    "precision.py", "quantize.py", "kernels.py", "recipe.py", "preprocess.py"])
def test_editing_a_pixel_module_changes_the_code_digest(package_copy, edited):
    before = identity.code_digest(package_copy)
    with open(package_copy / edited, "a") as fh:
        fh.write("\n# an edit\n")
    assert identity.code_digest(package_copy) != before


def test_editing_the_report_keeps_the_renders(package_copy):
    before = identity.code_digest(package_copy)
    with open(package_copy / "report.py", "a") as fh:
        fh.write("\n# an edit\n")
    assert identity.code_digest(package_copy) == before


def flip_a_weight_byte(folder: Path) -> Path:
    """One byte of a weight value (past the safetensors header) changed in place; the mtime moves on."""
    path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    st = path.stat()
    header = int.from_bytes(path.read_bytes()[:8], "little")
    with open(path, "r+b") as fh:
        fh.seek(8 + header + 100)
        byte = fh.read(1)
        fh.seek(8 + header + 100)
        fh.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    return path


def test_a_weight_changed_in_place_changes_the_models_identity(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, model)
    digests = tmp_path / "cache"
    before = identity.model_digest(str(model), digests)
    assert identity.model_digest(str(model), digests) == before  # memoised: the same answer, nothing read again
    flip_a_weight_byte(model)
    assert identity.model_digest(str(model), digests) != before


def test_digests_are_memoised_by_path_size_and_mtime_across_processes(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"x" * 1000)
    memo = tmp_path / "memo.json"
    first = identity.FileDigests(memo)(path)
    assert memo.is_file() and identity.FileDigests(memo)._known  # a later process reads the memo
    path.write_bytes(b"y" * 1000)
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))
    assert identity.FileDigests(memo)(path) != first


def test_a_hub_snapshot_is_keyed_by_its_commit(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--Org--Model" / "snapshots" / ("a" * 40)
    shutil.copytree(DEMO_MODEL, snapshot)
    monkeypatch.setattr("parity.preflight.locate_model", lambda model: str(snapshot))
    assert identity.model_identity("Org/Model") == {"hub": "Org/Model", "commit": "a" * 40}


def test_the_thread_count_and_cpu_kind_key_cpu_renders_only():
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = identity.machine("cpu")
        torch.set_num_threads(2)
        two = identity.machine("cpu")
    finally:
        torch.set_num_threads(threads)
    assert one != two and one["cpu"] == two["cpu"] != ""
    gpu = identity.machine("cuda")
    assert "threads" not in gpu and "cpu" not in gpu
    assert identity.machine("cpu", "none") != identity.machine("cuda", "model")
