"""Broken inputs of every kind: a corpus of case folders with one bad thing each, every one run as its own
cases root. Each gives error rows naming the culprit file and the fix, within seconds (no render), the rest of
the run goes on, and no case folder changes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file, save_file

from conftest import CASES, DEMO_MODEL, TINY_CASES, TINY_MODEL, V1
from parity import preflight
from parity.errors import CaseError
from parity.options import Options
from parity.runner import plan, run

pytestmark = pytest.mark.filterwarnings("ignore")
NAME = V1.name
SECONDS = 20  # per broken case, when nothing needs rendering (the bound)


@pytest.fixture(scope="module", autouse=True)
def imported():
    """Import the libraries once (diffusers, transformers, peft: ~10 s cold), so a case's seconds are its own."""
    from parity.runner import environment

    environment("cpu")


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def make_case(root: Path) -> Path:
    """A copy of the v1 run (its control images beside it), the bundled model by absolute path."""
    shutil.copytree(TINY_CASES / "workspace" / "aitk" / "data", root / "aitk" / "data")
    case = root / "aitk" / "output" / NAME
    shutil.copytree(V1, case, ignore=shutil.ignore_patterns("optimizer.pt"))
    (case / "parity.yaml").write_text(f"model: {TINY_MODEL.resolve()}\npaths:\n  /workspace: ../../..\n")
    return case


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


def preview(case: Path, step: int, index: int) -> Path:
    return next((case / "samples").glob(f"*__{step:09d}_{index}.jpg"))


def bomb_png(path: Path, side: int = 20000) -> None:
    """A PNG whose header claims side x side pixels (400 MP) with almost no data: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def control(case: Path, name: str) -> Path:
    return case.parents[1] / "data" / "sample_ctrl" / name


# kind -> (how to break the copy, which rows must error, what every such row's reason must contain)
# Rows: "all" (every preview of the case), an id suffix like "2/1", or "config" (the case's own row).
def _lora_keys_renamed(case):
    path = case / f"{NAME}_000000002.safetensors"
    state = load_file(path)
    save_file({k.replace("transformer_blocks", "blocks_of_another_model"): v for k, v in state.items()}, path)


def _lora_shapes_wrong(case):
    path = case / f"{NAME}_000000002.safetensors"
    state = load_file(path)
    save_file({k: (v.repeat(2, 1) if k.endswith("lora_B.weight") else v) for k, v in state.items()}, path)


CORPUS = {
    "malformed_yaml": (lambda c: (c / "config.yaml").write_text("config:\n  name: x\n  process: [ {type: a\n"),
                       "all", ["config.yaml", "is not valid YAML", "line"]),
    "non_utf8_yaml": (lambda c: (c / "config.yaml").write_bytes("config:\n  name: caf\xe9\n".encode("latin-1")),
                      "all", ["config.yaml", "is not UTF-8"]),
    "not_an_aitk_job": (lambda c: (c / "config.yaml").write_text("job: extension\nconfig: {name: x, process: "
                                                                  "[{type: image_reference_slider}]}\n"),
                        "all", ["config.yaml", "not an ai-toolkit trainer config"]),
    "unsupported_arch": (lambda c: edit(c / "config.yaml", "arch: qwen_image_edit_plus", "arch: flux_kontext"),
                         "all", ["config.yaml", "'flux_kontext'", "qwen_image_edit_plus", "fix:"]),
    "missing_sample_section": (lambda c: edit(c / "config.yaml", "    sample:\n", "    not_sample:\n"),
                               "all", ["config.yaml", "no `sample:` section"]),
    "empty_samples": (lambda c: (c / "config.yaml").write_text(
        (V1 / "config.yaml").read_text().split("      samples:\n")[0] + "      samples: []\n"),
        "all", ["config.yaml", "neither a `samples:` list nor a `prompts:` list"]),
    "wrong_types": (lambda c: (edit(c / "config.yaml", "      seed: 42\n", "      seed: forty-two\n"),
                               edit(c / "config.yaml", "      guidance_scale: 3\n", "      guidance_scale: high\n")),
                    "all", ["config.yaml", "'forty-two'", "'high'", "sample.seed", "guidance_scale", "fix:"]),
    "size_too_small": (lambda c: edit(c / "config.yaml", "        width: 300\n", "        width: 8\n"),
                       "/2", ["config.yaml", "width is 8 px", "snaps it to 0", "fix:"]),
    "size_absurd": (lambda c: (edit(c / "config.yaml", "        width: 300\n", "        width: 100000\n"),
                               edit(c / "config.yaml", "        height: 200\n", "        height: 100000\n")),
                    "/2", ["config.yaml", "width is 100000 px", "height is 100000 px", "refused before allocating"]),
    "parity_yaml_unknown_key": (lambda c: (c / "parity.yaml").write_text("modle: x\n"),
                                "all", ["parity.yaml", "unknown key(s) modle", "fix:"]),
    "parity_yaml_malformed": (lambda c: (c / "parity.yaml").write_text("model: [unclosed\n"),
                              "all", ["parity.yaml", "is not valid YAML"]),
    "missing_model_folder": (lambda c: (c / "parity.yaml").write_text("model: ../no-such-model\n"),
                             "all", ["no-such-model", "model folder does not exist", "fix:"]),
    "control_missing": (lambda c: control(c, "ctrl_c.png").unlink(), "/2", ["ctrl_c.png", "fix:"]),
    "control_outside_roots": (lambda c: edit(c / "config.yaml", "ctrl_img_1: /workspace/aitk/data/sample_ctrl/ctrl_c.png",
                                             "ctrl_img_1: ../../../../../etc/hostname"),
                              "/2", ["outside the case folder and the allowed roots", "allow_roots"]),
    "control_empty": (lambda c: control(c, "ctrl_c.png").write_bytes(b""), "/2", ["ctrl_c.png", "is empty"]),
    "control_truncated": (lambda c: truncate(control(c, "ctrl_c.png")), "/2", ["ctrl_c.png", "truncated"]),
    "control_not_an_image": (lambda c: control(c, "ctrl_c.png").write_text("<html>not an image</html>"),
                             "/2", ["ctrl_c.png", "not an image file"]),
    "control_bomb": (lambda c: bomb_png(control(c, "ctrl_c.png")), "/2", ["ctrl_c.png", "decompression bomb"]),
    "preview_empty": (lambda c: preview(c, 4, 0).write_bytes(b""), "4/0", ["__000000004_0.jpg", "is empty"]),
    "preview_truncated": (lambda c: truncate(preview(c, 4, 0)), "4/0", ["__000000004_0.jpg", "truncated"]),
    "preview_misnamed": (lambda c: preview(c, 4, 0).rename(c / "samples" / "my favourite.jpg"),
                         "stray/my favourite.jpg", ["my favourite.jpg", "is not named", "fix:"]),
    "preview_out_of_range": (lambda c: shutil.copy(preview(c, 4, 0), c / "samples" / "1__000000004_7.jpg"),
                             "4/7", ["1__000000004_7.jpg", "sample index 7 but the config has 3 prompts"]),
    "preview_without_lora": (lambda c: (c / f"{NAME}_000000002.safetensors").unlink(),
                             "2/", [f"{NAME}_000000002.safetensors", "no LoRA checkpoint for step 2", "fix:"]),
    "lora_not_safetensors": (lambda c: (c / f"{NAME}_000000002.safetensors").write_bytes(b"PK\x03\x04 a zip"),
                             "2/", [f"{NAME}_000000002.safetensors", "not a readable .safetensors"]),
    "lora_keys_match_nothing": (_lora_keys_renamed, "2/",
                                [f"{NAME}_000000002.safetensors", "match no linear layer", "blocks_of_another_model"]),
    "lora_shapes_do_not_fit": (_lora_shapes_wrong, "2/",
                               [f"{NAME}_000000002.safetensors", "do not fit this transformer's shapes"]),
    "no_previews": (lambda c: [p.unlink() for p in (c / "samples").glob("*.jpg")],
                    "config", ["samples", "holds no preview images", "fix:"]),
    "lokr_network": (lambda c: edit(c / "config.yaml", "      type: lora\n", "      type: lokr\n"),
                     "all", ["config.yaml", "network.type is 'lokr'", "not supported", "fix:"]),
    "model_of_another_variant": (lambda c: (c / "parity.yaml").write_text(
        f"model: {DEMO_MODEL.parent / 'demo-qwen-image-edit-2511'}\npaths:\n  /workspace: ../../..\n"),
        "all", ["demo-qwen-image-edit-2511", "is a checkpoint of qwen_image_edit_plus:2511",
                "config.yaml trained qwen_image_edit_plus:2509", "zero_cond_t: true", "fix:"]),
}


def _rows_for(records: dict[str, dict], which: str) -> list[dict]:
    if which == "all":
        return [r for r in records.values() if r["case"] == NAME]
    if which == "config":
        return [records[f"{NAME}/config"]]
    if which.startswith("/"):  # one prompt, every step
        return [r for i, r in records.items() if i.endswith(which)]
    if which.endswith("/"):  # one step, every prompt
        return [r for i, r in records.items() if i.startswith(f"{NAME}/{which}")]
    return [records[f"{NAME}/{which}"]]


@pytest.mark.parametrize("kind", sorted(CORPUS))
def test_broken_case_gives_error_rows_naming_the_culprit(kind, tmp_path):
    breaker, which, words = CORPUS[kind]
    root = tmp_path / "cases"
    case = make_case(root)
    breaker(case)
    before = tree_digest(root)
    start = time.perf_counter()
    options = Options(cases=(root,), report_dir=tmp_path / "reports", device="cpu", cache_dir=None, metrics=())
    tasks = plan(options)
    # The broken previews go through the whole run (rows, reports); the sound ones would only render.
    records = {r["id"]: r for r in run(options, [t for t in tasks if t.error])}
    seconds = time.perf_counter() - start
    assert tree_digest(root) == before  # nothing is ever written into a case folder
    rows = _rows_for(records, which)
    assert rows, (kind, sorted(records))
    for row in rows:
        assert row["verdict"] == "error", (kind, row["id"], row["verdict"], row["reason"])
        for word in words:
            assert word in row["reason"], (kind, word, row["reason"])
    assert set(records) == {r["id"] for r in rows}, kind  # nothing else fails because of it
    assert all(t.training and t.reference for t in tasks if not t.error)  # the rest is ready to render
    assert seconds < SECONDS, (kind, seconds)
    csv = pd.read_csv(tmp_path / "reports" / "parity.csv")
    assert set(csv["id"]) == set(records)  # every broken preview has its row
    Path(os.environ.get("PARITY_CORPUS_TIMES", tmp_path / "times.jsonl")).open("a").write(
        json.dumps({"kind": kind, "seconds": round(seconds, 2)}) + "\n")


def test_every_problem_of_a_preview_in_one_message(tmp_path):
    root = tmp_path / "cases"
    case = make_case(root)
    (case / f"{NAME}_000000002.safetensors").unlink()
    control(case, "ctrl_c.png").write_bytes(b"")
    edit(case / "config.yaml", "        width: 300\n", "        width: 8\n")
    [task] = [t for t in plan(Options(cases=(root,), device="cpu")) if t.id == f"{NAME}/2/2"]
    assert task.error.startswith("3 problems:\n(1) ") and "\n(3) " in task.error
    assert "width is 8 px" in task.error and "ctrl_c.png" in task.error and "no LoRA checkpoint" in task.error
    assert task.prompt == "turn the circle into a blue star"  # shown in the row, so a person knows which sample


def test_final_lora_without_metadata_is_the_last_steps(tmp_path):
    root = tmp_path / "cases"
    case = make_case(root)
    final = case / f"{NAME}.safetensors"
    save_file(load_file(final), final)  # re-saved by a conversion tool: no ai-toolkit metadata
    tasks = {t.id: t for t in plan(Options(cases=(root,), device="cpu"))}
    assert all(t.error is None for t in tasks.values())
    last = tasks[f"{NAME}/4/0"]
    assert Path(last.training.lora).name == final.name
    assert any("no ai-toolkit metadata" in n and "train.steps" in n for n in last.notes)


def test_uncached_hub_id_fails_in_seconds_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    root = tmp_path / "cases"
    case = make_case(root)
    (case / "parity.yaml").write_text("paths:\n  /workspace: ../../..\n")
    edit(case / "config.yaml", "name_or_path: /workspace/aitk/tiny-qwen-image-edit-2509",
         "name_or_path: Qwen/Qwen-Image-Edit-2509")
    for offline in ("1", ""):  # HF_HUB_OFFLINE set; and not set, with the hub unreachable from here
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        import huggingface_hub.constants as hub

        monkeypatch.setattr(hub, "HF_HUB_OFFLINE", bool(offline))
        start = time.perf_counter()
        tasks = plan(Options(cases=(root,), device="cpu"))
        seconds = time.perf_counter() - start
        assert seconds < 10
        reasons = {t.error for t in tasks}
        assert len(reasons) == 1
        reason = reasons.pop()
        assert "Qwen/Qwen-Image-Edit-2509" in reason and "not in the local Hugging Face cache" in reason
        assert "fix:" in reason and ("HF_HUB_OFFLINE" in reason if offline else "unreachable" in reason)


def test_cached_hub_id_is_found_without_the_network(tmp_path, monkeypatch):
    """A hub id in the local Hugging Face cache loads from there: the snapshot folder is the model."""
    hub = tmp_path / "hf" / "hub" / "models--someone--tiny-edit"
    snapshot = hub / "snapshots" / ("0" * 40)
    shutil.copytree(TINY_MODEL, snapshot)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    assert Path(preflight.locate_model("someone/tiny-edit")) == snapshot


def test_image_checks_name_the_problem(tmp_path):
    good = TINY_CASES / "workspace" / "aitk" / "data" / "sample_ctrl" / "ctrl_a.png"
    assert preflight.check_image(good, "control image", "fix it") == (256, 256)
    bomb_png(tmp_path / "bomb.png")
    with pytest.raises(CaseError, match="decompression bomb"):
        preflight.check_image(tmp_path / "bomb.png", "control image", "use a real one")
    with pytest.raises(CaseError, match="does not exist"):
        preflight.check_image(tmp_path / "none.png", "control image", "use a real one")


@pytest.mark.parametrize("width,height,expect", [(256, 256, []), (8, 256, ["width is 8"]),
                                                  (256, 5000, ["height is 5000"]), (31, 31, ["width", "height"])])
def test_size_limits(width, height, expect):
    problems = preflight.size_problems(Path("c.yaml"), "item", max(64, width), max(64, height), (width, height))
    assert len(problems) == len(expect)
    for p, word in zip(problems, expect):
        assert word in str(p)


def test_a_root_without_cases_or_missing_is_a_row(tmp_path):
    (tmp_path / "empty").mkdir()
    tasks = plan(Options(cases=(tmp_path / "empty", tmp_path / "missing"), device="cpu"))
    assert [t.id for t in tasks] == ["empty/cases root", "missing/cases root"]
    assert "holds no ai-toolkit output folder" in tasks[0].error and "fix:" in tasks[0].error
    assert "does not exist" in tasks[1].error


def test_a_loha_run_is_not_supported_instead_of_its_keys_matching_nothing_and_locon_plans(tmp_path):
    root = tmp_path / "cases"
    case = make_case(root)
    edit(case / "config.yaml", "      type: lora\n", "      type: loha\n")
    tasks = plan(Options(cases=(root,), device="cpu"))
    assert len(tasks) == 9 and all(t.error == str(CaseError(
        case / "config.yaml", "network.type is 'loha', which is not supported: the harness renders LoRA networks "
        "only (lora, locon)", "check a run trained with `network: {type: lora}`")) for t in tasks)
    edit(case / "config.yaml", "      type: loha\n", "      type: locon\n")
    assert all(t.error is None for t in plan(Options(cases=(root,), device="cpu")))


@pytest.mark.parametrize("folder,expected", [
    ("demo-qwen-image-edit-2509", "qwen_image_edit_plus"),  # zero_cond_t: false
    ("demo-qwen-image-edit-2511", "qwen_image_edit_plus_2511"),  # zero_cond_t: true
    ("demo-qwen-image-edit", "qwen_image_edit"),  # the one arch of QwenImageEditPipeline
    ("demo-qwen-image-2512", "qwen_image_2512"),  # by its name's tag
    ("demo-qwen-image", None),  # QwenImagePipeline and no tag: Qwen-Image or a renamed 2512, nothing says which
])
def test_a_model_folder_says_which_family_member_it_is_only_when_it_can(folder, expected):
    found = preflight.model_variant(str(DEMO_MODEL.parent / folder), str(DEMO_MODEL.parent / folder))
    assert (found and found[0].id) == expected


def test_a_hub_id_or_a_renamed_folder_says_it_too(tmp_path):
    from parity import models

    assert preflight.model_variant("Qwen/Qwen-Image-Edit-2511", None)[0].id == "qwen_image_edit_plus_2511"
    assert preflight.model_variant("Qwen/Qwen-Image", None)[0].id == "qwen_image"
    assert preflight.model_variant("someone/my-finetune", None) is None
    renamed = tmp_path / "hub" / "models--me--checkpoint" / "snapshots" / "abc"
    shutil.copytree(DEMO_MODEL.parent / "demo-qwen-image-edit-2511", renamed,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.json.gz"))
    assert preflight.model_variant("me/checkpoint", str(renamed))[0].id == "qwen_image_edit_plus_2511"
    plus_2509 = models.rendered()["qwen_image_edit_plus"]
    problem = preflight.variant_problem("me/checkpoint", str(renamed), plus_2509, Path("run/config.yaml"))
    assert str(problem).startswith("me/checkpoint: is a checkpoint of qwen_image_edit_plus:2511")
    assert "run/config.yaml trained qwen_image_edit_plus:2509" in str(problem)
    assert "Qwen/Qwen-Image-Edit-2509" in problem.fix
    assert preflight.variant_problem("Qwen/Qwen-Image-Edit-2509", None, plus_2509, Path("c.yaml")) is None


@pytest.mark.parametrize("case_name", ["demo_qwen_image_edit_plus_lora_v1", "demo_qwen_image_edit_lora"])
def test_a_prompt_takes_the_text_positions_the_models_encoder_gives_it(case_name):
    """Counted without the text encoder (the model's tokenizer and processor, the stock pipeline's template): the
    length of the prompt embeddings the renderer gets from the real one, on both sides (their control images reach
    the encoder at different sizes)."""
    import torch

    from parity.pipeline import LoadedModel
    from parity.render import encode_prompt, open_control

    tasks = list({t.index: t for t in plan(Options(cases=(CASES / "workspace" / "aitk" / "output" / case_name,),
                                                    device="cpu", dtype="float32")) if not t.error}.values())
    folder = preflight.locate_model(tasks[0].model)
    loaded = LoadedModel(folder, "cpu", "float32", pipeline=models_pipeline(tasks[0].reference))
    for recipe in [r for t in tasks for r in (t.training, t.reference)]:
        images = [open_control(p) for p in recipe.control_images_prompt]
        with torch.no_grad():
            embeds, _ = encode_prompt(loaded, recipe.prompt + " and more words", images, recipe.control_prompt_resize,
                                      torch.float32)
        used, _ = preflight.text_positions(folder, recipe, recipe.prompt + " and more words")
        assert used == embeds.shape[1], recipe.control_prompt_resize


def models_pipeline(recipe) -> str:
    from parity import models

    return models.by_name(recipe.model).pipeline


def test_the_text_position_limit_is_where_the_models_transformer_stops():
    import torch
    from diffusers import QwenImageTransformer2DModel

    [task] = [t for t in plan(Options(cases=(CASES / "workspace" / "aitk" / "output" /
                                             "demo_qwen_image_edit_plus_lora_v1",), device="cpu", dtype="float32"))
              if t.id.endswith("/0/0")]
    small = task.reference.with_fields(width=64, height=64, control_images_prompt=(), control_images_vae=())
    _, limit = preflight.text_positions(str(DEMO_MODEL), small, "")
    _, wide_limit = preflight.text_positions(str(DEMO_MODEL), task.reference, "")
    assert limit == 4096 - 2 and wide_limit == 4096 - 32  # the image's positions come first: 64 px, 1024 px
    transformer = QwenImageTransformer2DModel.from_pretrained(DEMO_MODEL, subfolder="transformer")

    def forward(text_positions: int):
        with torch.no_grad():
            transformer(hidden_states=torch.zeros(1, 16, 64), timestep=torch.tensor([0.5]),
                        encoder_hidden_states=torch.zeros(1, text_positions, 16), img_shapes=[[(1, 4, 4)]])
    forward(limit)
    with pytest.raises(RuntimeError, match="must match the size"):
        forward(limit + 1)


def test_a_prompt_longer_than_the_models_text_positions_is_an_error_before_any_render(tmp_path):
    """A 4,900-character prompt (CJK: ~3 tokens a character in the demo model's small vocabulary) on the demo model:
    an error row naming the config, the sample item, its count and the limit; the other items plan as usual."""
    root = tmp_path / "cases"
    shutil.copytree(CASES / "workspace" / "aitk" / "data", root / "aitk" / "data")
    case = root / "aitk" / "output" / "demo_qwen_image_edit_plus_lora_v1"
    shutil.copytree(CASES / "workspace" / "aitk" / "output" / case.name, case,
                    ignore=shutil.ignore_patterns("optimizer.pt"))
    (case / "parity.yaml").write_text(f"model: {DEMO_MODEL}\npaths:\n  /workspace: ../../..\n")
    edit(case / "config.yaml", "prompt: make the shapes blue", "prompt: " + "狐狸跳过懒狗" * 817)
    tasks = {t.id: t for t in plan(Options(cases=(root,), device="cpu", dtype="float32"))}
    for step in (0, 4):
        error = tasks[f"{case.name}/{step}/1"].error
        assert error.startswith(f"{case / 'config.yaml'}: sample item 1: the prompt takes 15")
        assert "text positions" in error and "has 4064 left for text" in error and "fix: shorten the prompt" in error
        assert tasks[f"{case.name}/{step}/0"].error is None and tasks[f"{case.name}/{step}/2"].error is None
