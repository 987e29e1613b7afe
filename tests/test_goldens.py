"""Regression mode through pytester: the golden lifecycle, accepted differences, xdist and shards."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
from PIL import Image

from conftest import run_suite

pytest_plugins = ["pytester"]
# how many renders a run made depends on what the render cache held before it, as its timings do
RUN_STATE = ["render_seconds", "check_seconds", "renders"]
STABLE = lambda frame: frame.drop(columns=RUN_STATE).sort_values("id").reset_index(drop=True)  # noqa: E731


def outcome_lines(result) -> str:
    return "\n".join(result.outlines)


def test_golden_lifecycle(pytester, small_root, tmp_path, render_cache):
    goldens = tmp_path / "goldens"
    goldens.mkdir()
    args = ("--parity-goldens", str(goldens))
    # missing -> skipped, with the command that creates it
    result = run_suite(pytester, small_root, tmp_path / "r1", render_cache, *args, "-rs")
    result.assert_outcomes(skipped=2)
    assert "--parity-update-goldens" in outcome_lines(result)
    # update -> written
    result = run_suite(pytester, small_root, tmp_path / "r2", render_cache, *args, "--parity-update-goldens")
    result.assert_outcomes(passed=2)
    stored = sorted(goldens.rglob("*.png"))
    assert len(stored) == 2 and all(p.with_suffix(".json").is_file() for p in stored)
    assert stored[0].relative_to(goldens).parts[0].startswith("cpu-bfloat16-")
    # same -> pass, identical
    result = run_suite(pytester, small_root, tmp_path / "r3", render_cache, *args)
    result.assert_outcomes(passed=2)
    assert set(pd.read_csv(tmp_path / "r3" / "parity.csv")["golden_verdict"]) == {"identical"}
    # changed render -> fail with the drift, the obtained image left next to the golden
    original = stored[0].read_bytes()
    img = Image.open(stored[0]).convert("RGB")
    img.putpixel((5, 5), tuple(255 - v for v in img.getpixel((5, 5))))
    img.save(stored[0])
    result = run_suite(pytester, small_root, tmp_path / "r4", render_cache, *args)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*golden: drift render drifted from the golden: max abs *"])
    assert list(goldens.rglob("*.obtained.png"))
    # another fingerprint -> labelled cross-environment, judged against the floor
    for p in goldens.rglob("*.obtained.png"):
        p.unlink()
    stored[0].write_bytes(original)
    folder = stored[0].relative_to(goldens).parts[0]
    (goldens / folder).rename(goldens / "NVIDIA_H100_80GB_HBM3-bfloat16-0123456789")
    result = run_suite(pytester, small_root, tmp_path / "r5", render_cache, *args)
    result.assert_outcomes(passed=2)
    csv = pd.read_csv(tmp_path / "r5" / "parity.csv")
    assert all("(cross-environment)" in f for f in csv["golden_fingerprint"])
    assert set(csv["golden_verdict"]) == {"within floor (cross-environment)"}


def test_accepted_fields_pass_as_explained(pytester, small_root, tmp_path, render_cache):
    settings = next(small_root.rglob("parity.yaml"))
    strict = "thresholds: {max_abs_max: 0}\n"
    settings.write_text(settings.read_text() + strict)
    result = run_suite(pytester, small_root, tmp_path / "r", render_cache)
    result.assert_outcomes(failed=2)  # the known differences fail a strict threshold ...
    settings.write_text(settings.read_text() + "accept: [cfg_norm, control_prompt_resize, text_encoder_rope, "
                                               "lora_application]\n")
    result = run_suite(pytester, small_root, tmp_path / "r", render_cache)
    result.assert_outcomes(passed=2)  # ... and pass as "explained" once accepted
    assert set(pd.read_csv(tmp_path / "r" / "parity.csv")["verdict"]) == {"explained"}
    settings.write_text(settings.read_text().replace("cfg_norm, ", ""))  # one known difference not accepted
    result = run_suite(pytester, small_root, tmp_path / "r", render_cache)
    # step 3 fails (the accepted fields' switch no longer reaches the training render's distance); step 6 prompt
    # 1's closing set reaches it with accepted fields alone (cfg_norm moves it by less): explained by its set
    result.assert_outcomes(failed=1, passed=1)
    rows = pd.read_csv(tmp_path / "r" / "parity.csv").set_index("id")
    assert rows.loc["tiny_qwen_edit_plus_parity_a/3/0", "verdict"] == "mismatch"
    explained = rows.loc["tiny_qwen_edit_plus_parity_a/6/1"]
    assert explained["verdict"] == "explained" and explained["reason"].startswith("gap closed by accepted fields")
    assert "cfg_norm" not in explained["closing_set"]


def test_xdist_and_shards_give_the_serial_rows(pytester, small_root, tmp_path, render_cache):
    run_suite(pytester, small_root, tmp_path / "serial", render_cache).assert_outcomes(passed=2)
    run_suite(pytester, small_root, tmp_path / "xdist", render_cache, "-n", "2").assert_outcomes(passed=2)
    for i in (1, 2):
        run_suite(pytester, small_root, tmp_path / f"shard{i}", render_cache, "--parity-shard", f"{i}/2")
    merged = tmp_path / "merged"
    subprocess.run([sys.executable, "-m", "parity.cli", "merge-reports", str(tmp_path / "shard1"),
                    str(tmp_path / "shard2"), "--out", str(merged)], check=True)
    serial = STABLE(pd.read_csv(tmp_path / "serial" / "parity.csv"))
    pd.testing.assert_frame_equal(serial, STABLE(pd.read_csv(tmp_path / "xdist" / "parity.csv")))
    pd.testing.assert_frame_equal(serial, STABLE(pd.read_csv(merged / "parity.csv")))
    assert (merged / "index.html").is_file() and (merged / "images").is_dir()


def test_deterministic_switch_is_applied_and_recorded(monkeypatch):
    import torch

    from parity.runner import Checker, Options

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        checker = Checker(Options(deterministic=True, metrics=()))
        assert torch.are_deterministic_algorithms_enabled()
        assert checker.env["deterministic"] == "true"
        import os
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.use_deterministic_algorithms(before)


def test_shard_option_is_validated(pytester, small_root, tmp_path, render_cache):
    result = run_suite(pytester, small_root, tmp_path / "r", render_cache, "--parity-shard", "3/2")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*--parity-shard: 3/2: I must be between 1 and N*"])
