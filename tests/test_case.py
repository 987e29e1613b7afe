"""Case discovery, parity.yaml, and resolving training-machine paths inside the case (or an allowed root)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import PARITY_A, TINY_CASES, TINY_MODEL, V1
from parity.case import Case, discover, read_settings
from parity.errors import CaseError


def test_bundled_cases_are_found():
    found = discover([TINY_CASES])
    assert [c.name for c in found] == ["tiny_qwen_image_edit_plus_lora_strong_v1",
                                       "tiny_qwen_image_edit_plus_lora_v1", "tiny_qwen_edit_plus_parity_a"]
    assert all(isinstance(c, Case) for c in found)


def test_paths_map_resolves_workspace_paths():
    case = next(c for c in discover([TINY_CASES]) if c.name == V1.name)
    path = case.resolve("/workspace/aitk/data/sample_ctrl/ctrl_a.png", "control image")
    assert path == (TINY_CASES / "workspace/aitk/data/sample_ctrl/ctrl_a.png").resolve()
    assert case.settings.model == str(TINY_MODEL.resolve())


def copy_case(tmp_path: Path, with_settings: bool = False) -> Case:
    root = tmp_path / "root"
    shutil.copytree(TINY_CASES / "workspace" / "aitk-a", root / "aitk-a")
    folder = root / "aitk-a" / "output" / PARITY_A.name
    if not with_settings:
        (folder / "parity.yaml").unlink()
    [case] = discover([root])
    return case


def test_unique_file_name_is_found_without_a_map(tmp_path):
    case = copy_case(tmp_path)
    path = case.resolve("/somewhere/else/data/sample_ctrl/ctrl_tall.png", "control image")
    assert path.name == "ctrl_tall.png" and path.is_file()


def test_missing_file_names_the_paths_line_that_fixes_it(tmp_path):
    case = copy_case(tmp_path)
    with pytest.raises(CaseError) as err:
        case.resolve("/workspace/x/none.png", "control image")
    assert "none.png" in str(err.value) and "paths: {/workspace/x: <local folder>}" in str(err.value)


def test_several_candidates_is_an_error(tmp_path):
    case = copy_case(tmp_path)
    extra = case.root / "other"
    extra.mkdir()
    shutil.copy(case.root / "aitk-a/data/sample_ctrl/ctrl_tall.png", extra / "ctrl_tall.png")
    with pytest.raises(CaseError, match="several files named 'ctrl_tall.png'"):
        case.resolve("/w/ctrl_tall.png", "control image")


def test_path_outside_the_case_is_refused(tmp_path):
    case = copy_case(tmp_path)
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    with pytest.raises(CaseError, match="outside the case"):
        case.resolve("../../../../secret.png", "control image")


def test_an_existing_local_file_is_used_as_is_unless_paths_maps_it(tmp_path):
    """Checked on the training machine: an absolute path that exists here is that file, wherever it lies; a
    `paths:` prefix that matches still wins, and a path that does not exist here falls back to the name search."""
    case = copy_case(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    local = elsewhere / "ctrl_tall.png"
    shutil.copy(case.root / "aitk-a/data/sample_ctrl/ctrl_tall.png", local)
    assert case.resolve(str(local), "control image") == local.resolve()
    (case.folder / "parity.yaml").write_text(f"paths:\n  {elsewhere}: ../../data/sample_ctrl\n")
    [mapped] = discover([case.root])
    assert mapped.resolve(str(local), "control image") == (case.root / "aitk-a/data/sample_ctrl/ctrl_tall.png")
    local.unlink()
    found = case.resolve(str(local), "control image")  # gone here: found by its name under the root, as before
    assert found == (case.root / "aitk-a/data/sample_ctrl/ctrl_tall.png").resolve()


@pytest.mark.parametrize("written,prefix", [
    (r"C:\Users\me\data\sample_ctrl\ctrl_tall.png", r"C:\Users\me"),
    (r"c:\USERS\Me\data\sample_ctrl\ctrl_tall.png", "C:\\Users\\me\\"),  # Windows compares case-insensitively
    ("C:/Users/me/data/sample_ctrl/ctrl_tall.png", r"C:\Users\me"),
    (r"C:\Users\me\data\sample_ctrl\ctrl_tall.png", "C:/Users/me"),
    (r"\\nas\share\data\sample_ctrl\ctrl_tall.png", r"\\NAS\share"),
])
def test_windows_paths_map_through_paths(tmp_path, written, prefix):
    case = copy_case(tmp_path)
    (case.folder / "parity.yaml").write_text(f"paths: {{'{prefix}': ../..}}\n")
    [case] = discover([case.root])
    assert case.resolve(written, "control image") == (case.root / "aitk-a/data/sample_ctrl/ctrl_tall.png")


def test_an_unmapped_windows_path_names_its_prefix_for_paths(tmp_path):
    case = copy_case(tmp_path)
    with pytest.raises(CaseError) as err:
        case.resolve(r"C:\Users\me\data\none.png", "control image")
    text = str(err.value)
    assert "no file named 'none.png'" in text and r"add `paths: {'C:\Users\me\data': <local folder>}`" in text
    found = case.resolve(r"D:\train\ctrl_wide.png", "control image")  # a unique name is still found
    assert found == (case.root / "aitk-a/data/sample_ctrl/ctrl_wide.png").resolve()


def test_parity_yaml_unknown_key_and_bad_threshold(tmp_path):
    (tmp_path / "parity.yaml").write_text("modle: x\n")
    with pytest.raises(CaseError, match="unknown key"):
        read_settings(tmp_path)
    (tmp_path / "parity.yaml").write_text("thresholds: {ssim: 0.9}\n")
    with pytest.raises(CaseError, match="thresholds"):
        read_settings(tmp_path)


def test_broken_yaml_is_found_and_fails_with_the_file_name(tmp_path):
    case = copy_case(tmp_path)
    (case.folder / "config.yaml").write_text("config: [oops")
    [found] = discover([case.root])
    with pytest.raises(CaseError, match="config.yaml: is not valid YAML"):
        found.job()


def test_broken_parity_yaml_makes_a_broken_case(tmp_path):
    case = copy_case(tmp_path)
    (case.folder / "parity.yaml").write_text("paths: [1, 2]\n")
    [broken] = discover([case.root])
    assert broken.__class__.__name__ == "BrokenCase" and "paths:" in str(broken.error)


def test_parity_yaml_expect_declares_a_known_gap(tmp_path):
    (tmp_path / "parity.yaml").write_text(
        'expect:\n  verdict: mismatch\n  reason: "qfloat8 base: cfg_norm closes 0.67"\n  previews: ["*__000000002_0.*"]\n')
    [gap] = read_settings(tmp_path).expect
    assert (gap.verdict, gap.reason, gap.previews) == ("mismatch", "qfloat8 base: cfg_norm closes 0.67",
                                                       ("*__000000002_0.*",))
    assert gap.source == str(tmp_path / "parity.yaml")
    assert read_settings(tmp_path / "none").expect == ()  # no parity.yaml: nothing declared


def test_parity_yaml_expect_without_a_reason_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "parity.yaml").write_text("expect: mismatch\n")
    with pytest.raises(CaseError) as err:
        read_settings(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'parity.yaml'}: `expect: mismatch` needs a reason")
    assert 'fix: write `expect: {verdict: mismatch, reason: "<why this gap is known>"}`' in str(err.value)
    (tmp_path / "parity.yaml").write_text("expect: {verdict: mismatch}\n")
    with pytest.raises(CaseError, match="has no reason.*fix: add `reason:`"):
        read_settings(tmp_path)


def test_bundled_quantized_cases_declare_their_measured_gap():
    from conftest import CASES

    for name, share in (("demo_qwen_edit_plus_qfloat8", "0.67"), ("demo_qwen_edit_plus_uint3_ara", "0.99")):
        [gap] = read_settings(CASES / "workspace" / "aitk" / "output" / name).expect
        assert gap.verdict == "mismatch" and gap.previews == () and f"cfg_norm alone closes {share}" in gap.reason
