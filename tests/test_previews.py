"""Preview indexing and matching each preview to the LoRA checkpoint of its step."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import PARITY_A, V1
from parity.errors import CaseError
from parity.previews import Checkpoint, PrunedCheckpoint, index_checkpoints, index_previews, lora_for_step, pruned


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
    assert "fix: copy that checkpoint" in text and not isinstance(err.value, PrunedCheckpoint)


# A run that saved every 250 steps and kept 4 step files (ai-toolkit deleted 250..1000) and its final file at 2500.
KEPT = {s: Checkpoint(Path(f"job_{s:09d}.safetensors"), s, False) for s in (1250, 1500, 1750, 2000)}
KEPT[2500] = Checkpoint(Path("job.safetensors"), 2500, True)


def test_a_checkpoint_ai_toolkit_pruned_is_said_so():
    with pytest.raises(PrunedCheckpoint) as err:
        lora_for_step(Path("run"), "job", 500, KEPT, keep=4, every=250)
    text = str(err.value)
    assert "job_000000500.safetensors" in text and "no LoRA checkpoint for step 500" in text
    assert "max_step_saves_to_keep = 4" in text and "found for steps: 1250, 1500, 1750, 2000, 2500" in text


@pytest.mark.parametrize("step,keep,every,why", [
    (2250, 4, 250, "newer than the oldest kept: ai-toolkit would have kept it"),
    (500, 0, 250, "the run keeps every checkpoint"),
    (500, 5, 250, "fewer step files than it keeps: none was deleted"),
    (600, 4, 250, "no save at this step (not a multiple of save_every)"),
])
def test_a_checkpoint_missing_for_another_reason_stays_an_error(step, keep, every, why):
    with pytest.raises(CaseError) as err:
        lora_for_step(Path("run"), "job", step, KEPT, keep=keep, every=every)
    assert not isinstance(err.value, PrunedCheckpoint), why
    assert pruned(500, KEPT, 4, 250) and not pruned(step, KEPT, keep, every)


def test_damaged_final_checkpoint_is_reported_per_preview_not_for_the_case(tmp_path):
    """A final file whose header is damaged is taken as the last step's (the config says which), and the
    preflight's LoRA check reports it for the previews of that step only."""
    from parity.preflight import lora_problems

    (tmp_path / "job.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert index_checkpoints(tmp_path, "job") == {}
    ckpts = index_checkpoints(tmp_path, "job", last_step=4)
    assert ckpts[4].final and ckpts[4].step_from_config
    [problem] = lora_problems(str(ckpts[4].path), None)
    assert "not a readable .safetensors" in str(problem) and "job.safetensors" in str(problem)


def test_misnamed_images_are_errors_other_files_are_skipped(tmp_path):
    case = tmp_path / "case"
    (case / "samples").mkdir(parents=True)
    for name in ("renamed.jpg", "notes.txt", ".DS_Store"):
        (case / "samples" / name).write_bytes(b"x")
    previews, stray = index_previews(case)
    assert not previews
    assert {s.path.name: s.image for s in stray} == {"renamed.jpg": True, "notes.txt": False}
