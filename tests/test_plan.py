"""plan: what a quantized run's accuracy recovery adapter (ARA) does to its recipes and its training render;
previews whose checkpoint ai-toolkit pruned; the model of a run written on a Windows machine."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import TINY_CASES, TINY_MODEL, V1, copy_tiny_case
from parity.findings import differing_fields
from parity.identity import file_sha256 as sha256
from parity.runner import Checker, Options, plan

ARA = "ostris/accuracy_recovery_adapters/qwen_image_edit_2509_torchao_uint3.safetensors"


@pytest.fixture
def quantized_root(tmp_path, monkeypatch) -> Path:
    """The tiny v1 case as a `uint3|<hub ARA>` run with a qfloat8 text encoder (ai-toolkit's example config for
    this model), one preview, and an empty Hugging Face cache."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    root = tmp_path / "cases"
    case = copy_tiny_case(root, "aitk", V1, ("__000000002_0.jpg",), ignore=("tiny-qwen-image-edit-2509", "*strong*"))
    config = case / "config.yaml"
    config.write_text(config.read_text().replace(
        "      quantize: false\n      quantize_te: false\n      low_vram: false\n",
        f"      quantize: true\n      qtype: uint3|{ARA}\n      quantize_te: true\n      qtype_te: qfloat8\n"
        f"      low_vram: true\n"))
    return root


def one_task(root: Path):
    [task] = plan(Options(cases=(root,), device="cpu", metrics=()))
    return task


def test_a_missing_ara_stops_only_the_training_render_and_says_where_to_put_it(quantized_root):
    task = one_task(quantized_root)
    assert task.error is None and task.reference.precision == "none"
    assert task.training.precision == "transformer:uint3+ara:not found text_encoder:qfloat8"
    assert task.training.lora_application == "runtime/fp32" and task.training.vae_tiling  # never merged; low_vram
    assert "precision" in differing_fields(task.training, task.reference)
    row: dict = {}
    assert Checker(Options(cases=(quantized_root,), device="cpu", metrics=())).fidelity(task, None, None, row)
    verdict = row["fidelity_verdict"]
    assert verdict.startswith("not renderable here:") and ARA in verdict and "config.yaml" in verdict
    assert "huggingface-cli download ostris/accuracy_recovery_adapters" in verdict and "`ara: <file>`" in verdict


def test_the_ara_is_found_in_the_hub_cache_or_by_parity_yaml_and_named_by_content(quantized_root, tmp_path):
    import huggingface_hub.constants

    snapshot = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--ostris--accuracy_recovery_adapters"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0123abcd")
    cached = snapshot / "snapshots" / "0123abcd" / Path(ARA).name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"an adapter")
    task = one_task(quantized_root)
    assert task.training.precision == f"transformer:uint3+ara:sha256:{sha256(cached)} text_encoder:qfloat8"
    assert task.training_problem is None

    mine = tmp_path / "my_ara.safetensors"
    mine.write_bytes(b"another adapter")  # parity.yaml's `ara:` wins over the cache
    settings = next(quantized_root.rglob("parity.yaml"))
    settings.write_text(settings.read_text() + f"ara: {mine}\n")
    assert one_task(quantized_root).training.precision.startswith(f"transformer:uint3+ara:sha256:{sha256(mine)} ")
    settings.write_text(settings.read_text().replace(str(mine), str(tmp_path / "gone.safetensors")))
    task = one_task(quantized_root)
    assert task.training.precision.startswith("transformer:uint3+ara:not found")
    assert "gone.safetensors" in task.training_problem and "does not exist" in task.training_problem


def test_a_failing_quantized_preview_is_a_mismatch_without_attribution_not_an_error(quantized_root, tmp_path,
                                                                                    render_cache):
    """The reference comparison runs and judges; attribution and `explained` need the training render, which
    needs the missing ARA: they say so instead of failing the row."""
    import json

    from parity.runner import run

    settings = next(quantized_root.rglob("parity.yaml"))
    settings.write_text(settings.read_text() + "accept: [cfg_norm]\n")
    settings.write_text(settings.read_text().replace("max_abs_max: 30", "max_abs_max: 0"))
    [row] = run(Options(cases=(quantized_root,), report_dir=tmp_path / "r", device="cpu", cache_dir=render_cache,
                        metrics=(), explain="failed"))
    assert row["verdict"] == "mismatch" and "max_abs" in row["reason"] and row["ssim"] > 0.9
    assert row["fidelity_verdict"].startswith("not renderable here:") and "precision" in row["findings"]
    assert "training recipe is not rendered here" in json.loads(row["causes"])["unavailable"]
    page = (tmp_path / "r" / "cases" / f"{V1.name}.html").read_text()
    assert "Not measured: the training recipe is not rendered here" in page


def test_parity_explain_says_why_a_quantized_preview_has_no_attribution(quantized_root, tmp_path, render_cache,
                                                                       capsys):
    from parity.cli import main

    assert main(["explain", str(quantized_root), "--device", "cpu", "--cache-dir", str(render_cache),
                 "--report-dir", str(tmp_path / "r"), "--metrics", ""]) == 0
    out = capsys.readouterr().out
    assert "attribution not measured: the training recipe is not rendered here:" in out and ARA in out


def pruned_root(tmp_path, keep: int) -> Path:
    """The tiny v1 run as ai-toolkit leaves it with `max_step_saves_to_keep: <keep>`: the step-2 checkpoint gone,
    the step-4 one kept beside the final file."""
    root = tmp_path / "cases"
    shutil.copytree(TINY_CASES / "workspace" / "aitk", root / "aitk", ignore=shutil.ignore_patterns("*strong*"))
    case = root / "aitk" / "output" / V1.name
    (case / f"{V1.name}_000000002.safetensors").unlink()
    shutil.copy(case / f"{V1.name}.safetensors", case / f"{V1.name}_000000004.safetensors")
    config = case / "config.yaml"
    config.write_text(config.read_text().replace("max_step_saves_to_keep: 4", f"max_step_saves_to_keep: {keep}"))
    return root


def test_previews_whose_checkpoint_ai_toolkit_pruned_are_skipped_rows_with_the_reason(tmp_path):
    from parity.runner import run

    options = Options(cases=(pruned_root(tmp_path, keep=1),), report_dir=tmp_path / "r", device="cpu", metrics=())
    tasks = plan(options)
    assert [t.id for t in tasks if t.error] == [f"{V1.name}/2/{i}" for i in range(3)]
    rows = run(options, [t for t in tasks if t.error])
    assert {r["verdict"] for r in rows} == {"skipped"}
    for row in rows:
        assert "no LoRA checkpoint for step 2: ai-toolkit deleted it" in row["reason"]
        assert "save.max_step_saves_to_keep = 1" in row["reason"] and "found for steps: 4" in row["reason"]


def test_a_checkpoint_ai_toolkit_would_have_kept_stays_an_error(tmp_path):
    tasks = plan(Options(cases=(pruned_root(tmp_path, keep=4),), device="cpu", metrics=()))
    missing = [t for t in tasks if t.error]
    assert [t.id for t in missing] == [f"{V1.name}/2/{i}" for i in range(3)]
    assert all("skipped" not in t.notes and "no LoRA checkpoint for step 2 (" in t.error for t in missing)


def test_a_windows_model_path_maps_through_paths(tmp_path):
    from parity.case import discover
    from parity.plan import model_for

    root = tmp_path / "cases"
    shutil.copytree(V1, root / V1.name, ignore=shutil.ignore_patterns("optimizer.pt"))
    case_folder = root / V1.name
    config = case_folder / "config.yaml"
    config.write_text(config.read_text().replace("name_or_path: /workspace/aitk/tiny-qwen-image-edit-2509",
                                                 r"name_or_path: D:\models\tiny-qwen-image-edit-2509"))
    (case_folder / "parity.yaml").write_text(f"paths: {{'d:/Models': {TINY_MODEL.parent}}}\n")
    [case] = discover([root])
    assert model_for(case, case.job(), Options(cases=(root,))) == str(TINY_MODEL)
