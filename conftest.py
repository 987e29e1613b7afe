"""Shared fixtures for the harness' own tests (tests/). The parity suite itself lives in parity/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).parent
CASES = ROOT / "cases"  # the bundled cases: recorded on the demo model, what `pytest parity/` checks
DEMO_MODEL = CASES / "workspace" / "aitk" / "demo-qwen-image-edit-2509"
# The first recording, on a tiny random-weights checkpoint in bf16: the tests' cases for the bf16-only behaviours
# (text-encoder rotary dtype, bf16 kernels and rounding, fp32 LoRA deltas rounded to bf16) and for quick flows.
TINY_CASES = ROOT / "tests" / "data" / "tiny"
TINY_MODEL = TINY_CASES / "workspace" / "aitk" / "tiny-qwen-image-edit-2509"
TRACES = ROOT / "tests" / "data" / "traces"
V1 = TINY_CASES / "workspace" / "aitk" / "output" / "tiny_qwen_image_edit_plus_lora_v1"
STRONG = TINY_CASES / "workspace" / "aitk" / "output" / "tiny_qwen_image_edit_plus_lora_strong_v1"
PARITY_A = TINY_CASES / "workspace" / "aitk-a" / "output" / "tiny_qwen_edit_plus_parity_a"


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


SUITE = ROOT / "parity" / "test_parity.py"  # what `pytest parity/` collects


def copy_tiny_case(root: Path, workspace: str, case: Path, keep: tuple[str, ...], ignore: tuple[str, ...] = ()
                   ) -> Path:
    """A copy of a tiny workspace (`aitk`, `aitk-a`) under `root` (without the `ignore` patterns) in which `case`
    keeps only the previews whose names end with one of `keep`, and its parity.yaml names the tiny checkpoint by
    its absolute path; returns the copied case folder."""
    shutil.copytree(TINY_CASES / "workspace" / workspace, root / workspace,
                    ignore=shutil.ignore_patterns(*ignore) if ignore else None)
    folder = root / workspace / "output" / case.name
    for p in (folder / "samples").iterdir():
        if p.is_file() and not p.name.endswith(keep):
            p.unlink()
    settings = folder / "parity.yaml"
    settings.write_text(settings.read_text().replace("../../../aitk/tiny-qwen-image-edit-2509",
                                                     str(TINY_MODEL.resolve())))
    return folder


@pytest.fixture
def small_root(tmp_path) -> Path:
    """parity_a with two of its previews (PNG, non-square control images), model and paths mapped."""
    root = tmp_path / "cases"
    case = copy_tiny_case(root, "aitk-a", PARITY_A, ("__000000003_0.png", "__000000006_1.png"))
    shutil.rmtree(case / "samples" / ".thumbs")
    return root


def run_suite(pytester, root: Path, report: Path, cache: Path, *extra: str):
    """`pytest parity/` on `root` in a subprocess. On a CPU the dtype `auto` gives the fp32 reference the bundled
    (fp32) cases check with; the tiny cases are bf16 recordings, so their suite runs ask for bf16."""
    if not any(e.startswith("--parity-dtype") for e in extra):
        extra = ("--parity-dtype", "bfloat16", *extra)
    return pytester.runpytest_subprocess(str(SUITE), "--parity-cases", str(root), "--parity-report-dir", str(report),
                                         "--parity-cache-dir", str(cache), "--parity-device", "cpu",
                                         "-p", "no:cacheprovider", "-v", *extra)


@pytest.fixture
def fast_root(tmp_path) -> Path:
    """A quick-to-render copy of the v1 run for tests that must really render (resume, progress, prompts):
    no control images (no ~1024 px VAE encode), fp32 (fast on every CPU, bf16-native or not), 64x64, 2 steps.
    Its previews are the v1 JPEGs of steps 0 and 2, so verdicts are `size mismatch`: only the flow is tested."""
    import yaml

    root = tmp_path / "fast-cases"
    case = root / V1.name
    case.mkdir(parents=True)
    (case / "samples").mkdir()
    for p in sorted((V1 / "samples").glob("*.jpg")):
        if "__000000004_" not in p.name:
            shutil.copy(p, case / "samples" / p.name)
    for p in V1.glob("*.safetensors"):
        shutil.copy(p, case / p.name)
    doc = yaml.safe_load((V1 / "config.yaml").read_text())
    proc = doc["config"]["process"][0]
    proc["train"]["dtype"] = "fp32"
    proc["sample"].update(width=64, height=64, sample_steps=2)
    for item in proc["sample"]["samples"]:
        for key in ("ctrl_img", "ctrl_img_1", "ctrl_img_2", "ctrl_img_3", "width", "height"):
            item.pop(key, None)
    (case / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    (case / "parity.yaml").write_text(f"model: {TINY_MODEL.resolve()}\n")
    return root


COMFYUI_TREE = ROOT / ".comfyui" / "ComfyUI"  # scripts/get-comfyui: the pinned ComfyUI and its venv
COMFYUI_PYTHON = ROOT / ".venv-comfyui" / "bin" / "python"
needs_comfyui = pytest.mark.skipif(not COMFYUI_TREE.is_dir() or not COMFYUI_PYTHON.exists(),
                                   reason="ComfyUI's tree or its venv is absent (scripts/get-comfyui)")


def run_in_comfyui(body: str, timeout: float = 300):
    """Run `body` in the pinned ComfyUI's venv with its tree importable and its argument parser given `--cpu`;
    `body` prints one line `RESULT <json>`, which is returned decoded."""
    import json
    import subprocess

    script = (f"import json, sys\nsys.path.insert(0, {str(COMFYUI_TREE)!r})\nsys.argv = [sys.argv[0], '--cpu']\n"
              f"import comfy.options\ncomfy.options.enable_args_parsing()\n{body}")
    done = subprocess.run([str(COMFYUI_PYTHON), "-c", script], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, done.stderr[-3000:]
    return json.loads(line[len("RESULT "):])
