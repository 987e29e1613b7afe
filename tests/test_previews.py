"""Preview indexing and matching each preview to the LoRA checkpoint of its step."""

from __future__ import annotations

import shutil

import pytest

from conftest import PARITY_A, V1
from parity.errors import CaseError
from parity.previews import index_checkpoints, index_previews, lora_for_step


def test_v1_previews_and_checkpoints():
    previews, stray = index_previews(V1)
    assert [(p.step, p.index) for p in previews] == [(s, i) for s in (0, 2, 4) for i in range(3)]
    assert not stray and all(p.ext == "jpg" for p in previews)
    ckpts = index_checkpoints(V1, "tiny_qwen_image_edit_plus_lora_v1")
    assert sorted(ckpts) == [2, 4]
    assert ckpts[4].final and ckpts[4].path.name == "tiny_qwen_image_edit_plus_lora_v1.safetensors"
    assert ckpts[2].path.name.endswith("_000000002.safetensors")
    assert lora_for_step(V1, "x", 0, ckpts) is None  # step 0 renders without the LoRA


def test_thumbs_and_tmp_are_not_previews(tmp_path):
    case = tmp_path / "case"
    shutil.copytree(PARITY_A, case)
    (case / "samples" / ".tmp").mkdir()
    (case / "samples" / ".tmp" / "1__000000009_0.png").write_bytes(b"x")
    (case / "samples" / "notes.txt").write_text("hi")
    (case / "samples" / "1__000000009_0.txt").write_text("hi")
    previews, stray = index_previews(case)
    assert len(previews) == 12 and all(".thumbs" not in str(p.path) for p in previews)
    assert sorted(s.path.name for s in stray) == ["1__000000009_0.txt", "notes.txt"]


def test_missing_step_checkpoint_names_the_file_and_the_fix():
    ckpts = index_checkpoints(V1, "tiny_qwen_image_edit_plus_lora_v1")
    with pytest.raises(CaseError) as err:
        lora_for_step(V1, "tiny_qwen_image_edit_plus_lora_v1", 3, ckpts)
    text = str(err.value)
    assert "tiny_qwen_image_edit_plus_lora_v1_000000003.safetensors" in text and "steps: 2, 4" in text
    assert "max_step_saves_to_keep" in text


def test_damaged_checkpoint_is_a_case_error(tmp_path):
    (tmp_path / "job.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CaseError, match="not a readable .safetensors"):
        index_checkpoints(tmp_path, "job")


def test_optimizer_pickle_is_never_opened(tmp_path, monkeypatch):
    case = tmp_path / "case"
    shutil.copytree(V1, case)
    (case / "optimizer.pt").write_bytes(b"\x80\x04 a pickle that must never be loaded")
    import builtins
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    index_previews(case)
    index_checkpoints(case, "tiny_qwen_image_edit_plus_lora_v1")
    assert not any(p.endswith(".pt") for p in opened)
