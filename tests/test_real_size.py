"""scripts/real_size.py (`scripts/gpu-check --real-size`): the real configurations it builds, and a dry run of the
whole check at the demo model's size on this CPU (the GPU run itself needs a GPU)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.filterwarnings("ignore")


def real_size():
    spec = importlib.util.spec_from_file_location("real_size", ROOT / "scripts" / "real_size.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_real_configurations_have_the_real_parameter_counts():
    """Built on the meta device (no memory): the transformer is Qwen-Image's 20.4B, the text encoder
    Qwen2.5-VL-7B's 8.3B with its vision tower."""
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    rs = real_size()
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel(**rs.TRANSFORMER)
        text = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=rs.TEXT, vision_config=rs.VISION))
    assert round(rs.parameters(transformer), 1) == 20.4
    assert round(rs.parameters(text), 1) == 8.3


def test_a_dry_run_on_the_cpu_prints_the_table():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "real_size.py"), "--tiny", "--steps", "2",
                           "--size", "256"], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("device: CPU (--tiny); built in ")
    assert lines[2].startswith("| offload | reference s | reference peak GiB | training s |")
    row = lines[-1].split(" | ")
    assert row[0] == "| none" and all(float(row[i]) > 0 for i in (1, 3, 5)) and row[-1] == "n/a (no GPU) |"


def test_without_a_gpu_the_real_size_check_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    import os

    path = f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}"  # its python3 is this one
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check"), "--real-size"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120, env={**os.environ, "PATH": path})
    assert done.returncode == 1 and "no CUDA device: this check needs a GPU" in done.stderr
