"""The pytest plugin: options, one test item per preview, failure messages, reports at session end.

Thin over `parity.runner`: it only collects, parametrizes and reports (pytest-mpl's shape). Every option is a
command-line flag and an ini key, resolved "command line, then ini, then default" in `option()`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .runner import DEFAULT_THRESHOLDS, Checker, Options, plan, set_threads

# name -> (help, default). Flags are --parity-<name with dashes>, ini keys parity_<name>.
OPTIONS = {
    "cases": ("folders searched recursively for ai-toolkit output folders", "cases"),
    "report_dir": ("where parity.csv, parity.json, index.html and images go", "reports"),
    "device": ("cuda or cpu (default: cuda when available)", ""),
    "dtype": ("compute dtype of the reference render: bfloat16, float32, float16", "bfloat16"),
    "model": ("hub id or diffusers folder used for every case (overrides parity.yaml)", ""),
    "cache_dir": ("render cache folder ('' turns caching off)", ".parity-cache"),
    "ssim_min": ("default SSIM threshold (parity.yaml thresholds win)", str(DEFAULT_THRESHOLDS["ssim_min"])),
    "mean_abs_max": ("default mean-abs-difference threshold, 0-255 levels", ""),
    "max_abs_max": ("default max-abs-difference threshold, 0-255 levels", ""),
    "psnr_min": ("default PSNR threshold, dB", ""),
}
THRESHOLD_OPTIONS = ("ssim_min", "mean_abs_max", "max_abs_max", "psnr_min")


def pytest_addoption(parser):
    group = parser.getgroup("parity", "preview-parity: regenerate ai-toolkit previews with the reference pipeline")
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
    )


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
                item.add_marker(pytest.mark.parity)
                if gpu:
                    item.add_marker(pytest.mark.gpu)

    @pytest.fixture
    def parity_checker(self):
        return self

    def verify(self, task) -> None:
        row = self.checker.check(task)
        self.records.append(row)
        verdict = row["verdict"]
        if verdict == "match":
            return
        if verdict == "skipped":
            pytest.skip(row["reason"])
        pytest.fail(failure_message(row, self.options.report_dir), pytrace=False)

    def pytest_sessionfinish(self, session):
        if not self.records:
            return
        from .report import write_reports

        env = self._checker.env if self._checker else {}
        paths = write_reports(self.records, self.options.report_dir, env)
        self.report_paths = paths

    def pytest_terminal_summary(self, terminalreporter):
        if self.records:
            terminalreporter.write_line(f"preview-parity report: {self.options.report_dir / 'index.html'} "
                                        f"({len(self.records)} previews; CSV: parity.csv)")


def failure_message(row: dict, report_dir: Path) -> str:
    import json

    lines = [f"{row['id']}: {row['verdict']}", f"  {row['reason']}"]
    if row.get("ssim") is not None:
        lines.append(f"  metrics: ssim={row['ssim']:.4f} psnr={row['psnr']:.2f} mean_abs={row['mean_abs']:.3f} "
                     f"max_abs={row['max_abs']}")
    if row.get("fidelity_verdict"):
        lines.append(f"  fidelity (training recipe vs preview): {row['fidelity_verdict']}, "
                     f"max_abs={row.get('fidelity_max_abs')}")
    findings = json.loads(row.get("findings_detail") or "[]")
    if findings:
        lines.append("  recipe fields that differ (training -> reference):")
        lines += [f"    {f['field']}: {f['training']} -> {f['reference']}  ({f['effect']})" for f in findings]
    lines.append(f"  report: {Path(report_dir) / 'index.html'}")
    return "\n".join(lines)


def pytest_configure(config):
    config.addinivalue_line("markers", "parity: one preview regenerated and compared by preview-parity")
    config.addinivalue_line("markers", "gpu: renders on a CUDA device")
    config.pluginmanager.register(ParityPlugin(config), "parity-session")
