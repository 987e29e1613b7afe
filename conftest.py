"""Shared fixtures for the harness' own tests (tests/). The parity suite itself lives in parity/."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).parent
CASES = ROOT / "cases"
TINY_MODEL = CASES / "workspace" / "aitk" / "tiny-qwen-image-edit-2509"
TRACES = ROOT / "tests" / "data" / "traces"
V1 = CASES / "workspace" / "aitk" / "output" / "tiny_qwen_image_edit_plus_lora_v1"
STRONG = CASES / "workspace" / "aitk" / "output" / "tiny_qwen_image_edit_plus_lora_strong_v1"
PARITY_A = CASES / "workspace" / "aitk-a" / "output" / "tiny_qwen_edit_plus_parity_a"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    import torch

    torch.set_num_threads(1)  # two threads on two shared cores time erratically


@pytest.fixture(scope="session")
def tiny_model() -> str:
    return str(TINY_MODEL.resolve())


@pytest.fixture(scope="session")
def render_cache() -> Path:
    """The same render cache `pytest parity/` fills, so tests reuse renders the main job already made."""
    return ROOT / ".parity-cache"
