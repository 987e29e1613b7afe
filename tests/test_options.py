"""One option table: the pytest flags and ini keys, `parity run`'s arguments and the table in docs/options.md all
come from `parity.options.SETTINGS`, and the same values give the same Options through either front end."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT
from parity import options as table
from parity.cli import parser

pytest_plugins = ["pytester"]

# A value other than the default for every setting, as a person would type it.
VALUES = {"cases": ["a", "b"], "report_dir": "rep", "report_images": "lossless", "device": "cuda:1",
          "dtype": "float16", "model": "/models/x", "cache_dir": "cache", "ssim_min": "0.5", "mean_abs_max": "2",
          "max_abs_max": "30", "psnr_min": "35", "explain": "all", "metric": "ssim", "reverse": True,
          "noise_floor": True, "floor": "0.25", "metrics": "stlpips_alex", "lpips_weights": "/w/alexnet.pth",
          "goldens": "gold", "update_goldens": True, "accept": "cfg_norm control_prompt_resize",
          "deterministic": True, "shard": "2/3", "training": "failed", "offload": "model",
          "server": "http://127.0.0.1:8765", "server_timeout": "90", "server_local": True, "reference": "comfyui",
          "workflow": "graph.json", "comfyui": "http://127.0.0.1:8188", "comfyui_timeout": "45", "comfyui_local": True}
# --parity-server takes the reference image from a server; --parity-reference comfyui, --parity-workflow and
# --parity-comfyui make it ComfyUI's: they exclude each other, so the values are given in two runs.
EXCLUSIVE = ({"reference": "server", "workflow": "", "comfyui": "", "comfyui_local": False},
             {"server": "", "server_local": False})
GRAPH = Path(__file__).parents[1] / "cases" / "workspace" / "comfyui" / "demo_qwen_image_2512_lora" / \
    "1796526733905__000000000_0.graph.json"


def test_every_setting_has_a_test_value():
    assert set(VALUES) == {s.name for s in table.SETTINGS}


def cli_args(values: dict) -> list[str]:
    args = ["run", *values["cases"]]
    for s in table.SETTINGS:
        if s.cli and values[s.name] is not False:
            args += [s.cli_flag] if s.kind == "flag" else [s.cli_flag, values[s.name]]
    return args


class FakeConfig:
    """What the plugin reads from pytest's config: command-line values here, ini empty."""

    def __init__(self, values: dict, rootpath: Path):
        self.values, self.rootpath = values, rootpath

    def getoption(self, name):
        return self.values.get(name.removeprefix("parity_"))

    def getini(self, name):
        s = table.BY_NAME[name.removeprefix("parity_")]
        return False if s.kind == "flag" else [s.default] if s.kind == "paths" else s.default


def test_both_front_ends_give_the_same_options(tmp_path):
    (tmp_path / VALUES["workflow"]).write_text(GRAPH.read_text())  # --parity-workflow reads its graph at once
    defaults = table.build({}, tmp_path)
    changed = set()
    for without in EXCLUSIVE:
        values = {**VALUES, **without}
        from_cli = table.from_argparse(parser().parse_args(cli_args(values)), root=tmp_path)
        from_pytest = table.from_pytest(FakeConfig({k: v for k, v in values.items() if v not in ("", False)},
                                                   tmp_path))
        assert from_cli == from_pytest
        changed |= {name for name in table.Options.__dataclass_fields__
                    if getattr(from_cli, name) != getattr(defaults, name)}
    # every option took the value given (fidelity_floor is the harness' own, not an option)
    assert changed == set(table.Options.__dataclass_fields__) - {"fidelity_floor"}
    assert from_cli.thresholds == {"ssim_min": 0.5, "mean_abs_max": 2.0, "max_abs_max": 30.0, "psnr_min": 35.0}
    assert from_cli.shard == (2, 3) and from_cli.cases == (tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("device, dtype", [("cpu", "float32"), ("cuda", "bfloat16"), ("cuda:3", "bfloat16")])
def test_dtype_auto_is_the_servers_dtype_on_the_device_in_both_front_ends(tmp_path, device, dtype):
    """`auto` (the default): bf16 on CUDA, fp32 on a CPU, as the reference server picks; the same through pytest's
    ini/flags and `parity run`; an explicit dtype still wins."""
    from_cli = table.from_argparse(parser().parse_args(["run", "x", "--device", device]), root=tmp_path)
    from_pytest = table.from_pytest(FakeConfig({"device": device}, tmp_path))
    assert from_cli.dtype == from_pytest.dtype == dtype
    assert table.build({"device": device, "dtype": "float16"}, tmp_path).dtype == "float16"


def test_the_repository_ini_pins_no_dtype():
    """What a user inherits from this checkout's pyproject.toml must not pin a dtype (a 20B model in fp32 on a GPU)."""
    import tomllib

    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert not {"parity_dtype", "parity_device"} & set(ini)


def test_cli_help_lists_every_option():
    text = parser()._subparsers._group_actions[0].choices["run"].format_help()
    for s in table.SETTINGS:
        if s.cli:
            assert s.cli_flag in text, s.name


def test_pytest_help_lists_every_flag_and_ini_key(pytester):
    result = pytester.runpytest_subprocess("--help")
    text = result.stdout.str()
    for s in table.SETTINGS:
        assert s.flag in text and s.ini in text, s.name


def test_docs_table_is_the_generated_one():
    assert table.markdown_table() in (ROOT / "docs" / "options.md").read_text(), \
        "docs/options.md's option table is stale: run scripts/gen-docs"


def test_bad_values_name_the_option_as_each_front_end_spells_it(tmp_path):
    with pytest.raises(table.OptionError, match="--parity-floor: takes a number, not 'low'"):
        table.build({"floor": "low"}, tmp_path)
    with pytest.raises(table.OptionError, match=r"--shard: takes I/N \(e.g. 2/4\), not '3'"):
        table.from_argparse(parser().parse_args(["run", "x", "--shard", "3"]), root=tmp_path)


def test_offload_without_a_gpu_is_a_usage_error_naming_the_fix(tmp_path):
    with pytest.raises(table.OptionError, match=r"--parity-offload: 'group' moves weights between CPU memory and a "
                                                r"GPU, and this run renders on 'cpu' \(use --device cuda"):
        table.build({"offload": "group", "device": "cpu"}, tmp_path)
    assert table.build({"offload": "group", "device": "cuda"}, tmp_path).offload == "group"
