"""The pytest plugin: options, one test item per preview, failure messages, reports at session end.

Thin over `parity.runner`: it only collects, parametrizes and reports (pytest-mpl's shape). Every option is a
command-line flag and an ini key, resolved "command line, then ini, then default" in `option()`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .runner import DEFAULT_THRESHOLDS, Checker, Options, plan, set_threads

# name -> (help, default). Flags are --parity-<name with dashes>, ini keys parity_<name>.
OPTIONS = {
    "cases": ("folders searched recursively for ai-toolkit output folders", "cases"),
    "report_dir": ("where parity.csv, parity.json, index.html and images go", "reports"),
    "report_images": ("how the report stores images: compact (full-size WebP, ~1.3 MB a 1024px preview) or "
                      "lossless (full-size PNG, ~13 MB)", "compact"),
    "device": ("cuda or cpu (default: cuda when available)", ""),
    "dtype": ("compute dtype of the reference render: bfloat16, float32, float16", "bfloat16"),
    "model": ("hub id or diffusers folder used for every case (overrides parity.yaml)", ""),
    "cache_dir": ("render cache folder ('' turns caching off)", ".parity-cache"),
    "explain": ("attribution (counterfactual renders) for: failed | all | none", "failed"),
    "metric": ("distance attribution ranks causes by: mean_abs | max_abs | ssim | psnr", "mean_abs"),
    "goldens": ("regression mode: folder of known-good reference renders (checked when it exists)", "goldens"),
    "accept": ("recipe fields whose differences are accepted (space separated; with each case's `accept:`)", ""),
    "floor": ("noise floor of the attribution metric, for 'explained'", "0"),
    "shard": ("I/N: check only the I-th of N shards (CI matrix jobs); merge with `parity merge-reports`", ""),
    "metrics": ("perceptual distances to compute (names from parity.metrics.REGISTRY)", "lpips_alex stlpips_alex"),
    "lpips_weights": ("AlexNet weights file for lpips_alex (else torchvision's cache under TORCH_HOME)", ""),
    "ssim_min": ("default SSIM threshold (parity.yaml thresholds win)", str(DEFAULT_THRESHOLDS["ssim_min"])),
    "mean_abs_max": ("default mean-abs-difference threshold, 0-255 levels", ""),
    "max_abs_max": ("default max-abs-difference threshold, 0-255 levels", ""),
    "psnr_min": ("default PSNR threshold, dB", ""),
}
THRESHOLD_OPTIONS = ("ssim_min", "mean_abs_max", "max_abs_max", "psnr_min")


def pytest_addoption(parser):
    group = parser.getgroup("parity", "preview-parity: regenerate ai-toolkit previews with the reference pipeline")
    group.addoption("--parity-update-goldens", action="store_true", default=False,
                    help="store each reference render as the golden for this environment")
    group.addoption("--parity-deterministic", action="store_true", default=None,
                    help="deterministic algorithms, cuBLAS workspace config, TF32 off (recorded in the report)")
    parser.addini("parity_deterministic", "deterministic algorithms (true/false)", type="bool", default=False)
    group.addoption("--parity-noise-floor", action="store_true", default=False,
                    help="measure each explained preview's noise floor (one more render, math attention kernel)")
    for name, (help_text, default) in OPTIONS.items():
        flag = "--parity-" + name.replace("_", "-")
        if name == "cases":
            group.addoption(flag, nargs="+", default=None, help=help_text)
            parser.addini("parity_cases", help_text, type="linelist", default=[default])
        else:
            group.addoption(flag, default=None, help=help_text)
            parser.addini("parity_" + name, help_text, default=default)


def option(config, name: str):
    """Command line, then ini, then default."""
    value = config.getoption("parity_" + name)
    if value is None:
        value = config.getini("parity_" + name)
    return value


def options_from(config) -> Options:
    from .pipeline import default_device

    root = Path(config.rootpath)
    cases = option(config, "cases")
    cache = option(config, "cache_dir")
    thresholds = {k: float(option(config, k)) for k in THRESHOLD_OPTIONS if str(option(config, k)).strip()}
    return Options(
        cases=tuple(_path(root, c) for c in cases),
        report_dir=_path(root, option(config, "report_dir")),
        device=option(config, "device") or default_device(),
        dtype=option(config, "dtype"),
        model=option(config, "model") or None,
        cache_dir=_path(root, cache) if cache else None,
        thresholds=thresholds,
        explain=option(config, "explain"),
        metric=option(config, "metric"),
        accept=tuple(str(option(config, "accept")).split()),
        floor=float(option(config, "floor")),
        goldens=_path(root, option(config, "goldens")) if option(config, "goldens") else None,
        update_goldens=config.getoption("parity_update_goldens"),
        deterministic=bool(config.getoption("parity_deterministic") or config.getini("parity_deterministic")),
        shard=parse_shard(option(config, "shard")),
        noise_floor=config.getoption("parity_noise_floor"),
        metrics=tuple(str(option(config, "metrics")).split()),
        lpips_weights=option(config, "lpips_weights") or None,
        report_images=report_images(option(config, "report_images")),
    )


def report_images(mode: str) -> str:
    from .images import check_mode

    try:
        return check_mode(str(mode).strip())
    except ValueError as exc:
        raise pytest.UsageError(f"--parity-report-images: {exc}") from None


def parse_shard(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--parity-shard takes I/N (e.g. 2/4), not {text!r}") from None
    if not 1 <= i <= n:
        raise pytest.UsageError(f"--parity-shard {text}: I must be between 1 and N")
    return i, n


def _path(root: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else root / path


class ParityPlugin:
    """Session state: the options, the checker (pipelines, render cache) and the records so far."""

    def __init__(self, config):
        self.config = config
        self.options = options_from(config)
        self._checker: Checker | None = None
        self.records: list[dict] = []

    @property
    def checker(self) -> Checker:
        if self._checker is None:
            set_threads()
            self._checker = Checker(self.options)
        return self._checker

    def pytest_generate_tests(self, metafunc):
        if "parity_task" not in metafunc.fixturenames:
            return
        tasks = plan(self.options)
        metafunc.parametrize("parity_task", tasks, ids=[t.id for t in tasks])

    def pytest_collection_modifyitems(self, items):
        gpu = self.options.device.startswith("cuda")
        for item in items:
            if "parity_task" in getattr(item, "fixturenames", ()):
                task = item.callspec.params["parity_task"]
                item.add_marker(pytest.mark.parity)
                # pytest-xdist --dist loadgroup: one worker per model and case, so each loads a pipeline once
                item.add_marker(pytest.mark.xdist_group(f"{task.model}|{task.case}"))
                if gpu:
                    item.add_marker(pytest.mark.gpu)

    def pytest_runtest_logreport(self, report):
        # Records travel on the test reports, so the controller gets them from xdist workers too.
        if report.when == "call":
            for key, value in report.user_properties:
                if key == "parity_record":
                    self.records.append(json.loads(value))

    @pytest.fixture
    def parity_checker(self, request):
        self._node = request.node
        return self

    def verify(self, task) -> None:
        row = self.checker.check(task)
        self._node.user_properties.append(("parity_record", json.dumps(row, default=str)))
        verdict = row["verdict"]
        if verdict == "skipped":
            pytest.skip(row["reason"])
        if verdict not in ("match", "explained"):
            pytest.fail(failure_message(row, self.options.report_dir), pytrace=False)
        golden = row.get("golden_verdict", "")
        if golden == "missing":
            pytest.skip(row["golden_reason"])
        if golden.startswith("drift") or golden == "recipe changed":
            pytest.fail(failure_message(row, self.options.report_dir), pytrace=False)

    def pytest_sessionfinish(self, session):
        if not self.records or hasattr(self.config, "workerinput"):
            return  # xdist workers send their records to the controller, which writes the reports
        from .report import write_reports

        env = self._checker.env if self._checker else environment_of(self.options)
        from .merge import record_order

        write_reports(sorted(self.records, key=record_order), self.options.report_dir, env)

    def pytest_terminal_summary(self, terminalreporter):
        if self.records:
            terminalreporter.write_line(f"preview-parity report: {self.options.report_dir / 'index.html'} "
                                        f"({len(self.records)} previews; CSV: parity.csv)")


def failure_message(row: dict, report_dir: Path) -> str:
    lines = [f"{row['id']}: {row['verdict']}", f"  {row['reason']}"]
    if row.get("ssim") is not None:
        lines.append(f"  metrics: ssim={row['ssim']:.4f} psnr={row['psnr']:.2f} mean_abs={row['mean_abs']:.3f} "
                     f"max_abs={row['max_abs']}")
    if row.get("top_cause"):
        lines.append(f"  top cause: {row['top_cause']} closes {row['top_cause_share']:.0%} of the gap")
    if row.get("fidelity_verdict"):
        lines.append(f"  fidelity (training recipe vs preview): {row['fidelity_verdict']}, "
                     f"max_abs={row.get('fidelity_max_abs')}")
    findings = json.loads(row.get("findings_detail") or "[]")
    if findings:
        lines.append("  recipe fields that differ (training -> reference):")
        lines += [f"    {f['field']}: {f['training']} -> {f['reference']}  ({f['effect']})" for f in findings]
    if row.get("golden_verdict"):
        lines.append(f"  golden: {row['golden_verdict']} {row.get('golden_reason', '')}".rstrip())
    lines.append(f"  report: {Path(report_dir) / 'index.html'}")
    return "\n".join(lines)


def environment_of(options: Options) -> dict:
    from .runner import environment

    env = environment(options.device)
    env["deterministic"] = str(options.deterministic).lower()
    return env


def pin_worker_gpu(config) -> None:
    """Under pytest-xdist on a machine with several GPUs, give each worker its own (before torch starts)."""
    worker = getattr(config, "workerinput", {}).get("workerid", "")
    if not worker.startswith("gw") or "CUDA_VISIBLE_DEVICES" in os.environ or not shutil.which("nvidia-smi"):
        return
    gpus = [line for line in subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("GPU ")]
    if len(gpus) > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(int(worker[2:]) % len(gpus))


def pytest_configure(config):
    pin_worker_gpu(config)
    config.addinivalue_line("markers", "parity: one preview regenerated and compared by preview-parity")
    config.addinivalue_line("markers", "gpu: renders on a CUDA device")
    config.pluginmanager.register(ParityPlugin(config), "parity-session")
