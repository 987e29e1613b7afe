"""The pytest plugin: options, one test item per preview, failure messages, reports at session end.

Thin over `parity.runner`: it only collects, parametrizes and reports (pytest-mpl's shape). Every option is a
command-line flag and an ini key from the one table in `parity.options`, resolved "command line, then ini, then
default" there, as `parity run` resolves its own arguments.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from . import expectations
from . import options as table
from .options import OptionError
from .plan import Task
from .interrupt import INTERRUPT, stop_on_sigterm
from .runner import Checker, plan, set_threads, summary_line


def pytest_addoption(parser):
    table.add_to_pytest(parser)


def options_from(config):
    try:
        return table.from_pytest(config)
    except OptionError as exc:
        raise pytest.UsageError(str(exc)) from None


class ParityPlugin:
    """Session state: the options, the checker (pipelines, render cache) and the records so far."""

    def __init__(self, config):
        self.config = config
        self.options = options_from(config)
        self._checker: Checker | None = None
        self.records: list[dict] = []
        self._polling = False  # INTERRUPT started: this session checks previews
        self._session = None

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
            task = getattr(getattr(item, "callspec", None), "params", {}).get("parity_task")
            if isinstance(task, Task):
                self._parity_session()
                item.add_marker(pytest.mark.parity)
                # pytest-xdist --dist loadgroup: one worker per model and case, so each loads a pipeline once
                item.add_marker(pytest.mark.xdist_group(f"{task.model}|{task.case}"))
                if gpu:
                    item.add_marker(pytest.mark.gpu)

    def _parity_session(self) -> None:
        """This session checks previews: a killed CI job (SIGTERM) still writes the report of what was done.
        Only then, so that the plugin, active in every pytest run once installed, leaves other suites alone."""
        if not hasattr(self.config, "workerinput") and not self._polling:
            stop_on_sigterm()
            INTERRUPT.start()  # stopped in `pytest_unconfigure`
            self._polling = True

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids):
        if any("test_preview[" in i for i in ids):  # under xdist the controller collects nothing itself
            self._parity_session()

    def pytest_sessionstart(self, session):
        self._session = session

    def pytest_runtest_logfinish(self, nodeid, location):
        if INTERRUPT.pending:  # a SIGTERM between previews: pytest stops before the next test, as interrupted
            self._session.shouldstop = "SIGTERM"

    def pytest_unconfigure(self, config):
        if self._polling:
            INTERRUPT.stop()
            self._polling = False

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
        with INTERRUPT.check():
            row = self.checker.check(task, self._session_tasks())
        self._node.user_properties.append(("parity_record", json.dumps(row, default=str)))
        verdict = row["verdict"]
        if verdict == "skipped":
            pytest.skip(row["reason"])
        unexpected = expectations.problem(row, task.expect.source if task.expect else None)
        if unexpected:  # strict: a declared gap that closed, or turned into another verdict, is news
            pytest.fail(unexpected + "\n" + failure_message(row, self.options.report_dir), pytrace=False)
        expected = row.get("expected_outcome") == expectations.EXPECTED
        if verdict not in expectations.PASSING and not expected:
            pytest.fail(failure_message(row, self.options.report_dir), pytrace=False)
        golden = row.get("golden_verdict", "")
        if golden == "missing":
            pytest.skip(row["golden_reason"])
        if golden.startswith("drift") or golden == "recipe changed":
            pytest.fail(failure_message(row, self.options.report_dir), pytrace=False)
        if expected:  # the known gap parity.yaml declares: XFAIL, with its reason
            pytest.xfail(expectations.note(row))

    def _session_tasks(self) -> list[Task]:
        """The previews this process will check (after -k and deselection; under xdist --dist loadgroup a case's
        previews all go to one worker)."""
        items = self._session.items if self._session is not None else []
        return [t for t in (getattr(getattr(i, "callspec", None), "params", {}).get("parity_task") for i in items)
                if isinstance(t, Task)]

    def pytest_report_teststatus(self, report, config):
        """`-v` shows each preview's verdict and seconds next to its id."""
        if report.when != "call":
            return None
        record = _record_of(report)
        if record is None:
            return None
        word = {"passed": "PASSED", "failed": "FAILED", "skipped": "SKIPPED"}[report.outcome]
        letter = {"passed": ".", "failed": "F", "skipped": "s"}[report.outcome]
        colour = {"passed": {"green": True}, "failed": {"red": True}, "skipped": {"yellow": True}}[report.outcome]
        category = report.outcome
        seconds = record.get("check_seconds")
        timing = f" {seconds:.1f}s" if isinstance(seconds, (int, float)) else ""
        verdict = record.get("verdict")
        if record.get("expected_outcome"):  # a declared gap (parity.yaml `expect:`): as declared, or not
            verdict = f"{verdict}, {record['expected_outcome']}"
        if hasattr(report, "wasxfail"):
            category, letter, word, colour = "xfailed", "x", "XFAIL", {"yellow": True}
        return category, letter, (f"{word} ({verdict}{timing})", colour)

    def pytest_sessionfinish(self, session, exitstatus):
        if not self.records or hasattr(self.config, "workerinput"):
            return  # xdist workers send their records to the controller, which writes the reports
        from .merge import record_order
        from .report import write_reports

        env = dict(self._checker.env if self._checker else environment_of(self.options))
        if exitstatus == pytest.ExitCode.INTERRUPTED:
            env["interrupted"] = f"after {len(self.records)} of {session.testscollected} previews"
        write_reports(sorted(self.records, key=record_order), self.options.report_dir, env)

    def pytest_terminal_summary(self, terminalreporter):
        if self.records:
            terminalreporter.write_line(summary_line(self.records))
            terminalreporter.write_line(f"preview-parity report: {self.options.report_dir / 'index.html'} "
                                        f"({len(self.records)} previews; CSV: parity.csv)")


def _record_of(report) -> dict | None:
    for key, value in getattr(report, "user_properties", ()):
        if key == "parity_record":
            return json.loads(value)
    return None


def failure_message(row: dict, report_dir: Path) -> str:
    lines = [f"{row['id']}: {row['verdict']}", f"  {row['reason']}"]
    if row.get("ssim") is not None:
        lines.append(f"  metrics: ssim={row['ssim']:.4f} psnr={row['psnr']:.2f} mean_abs={row['mean_abs']:.3f} "
                     f"max_abs={row['max_abs']}")
    if row.get("top_cause"):
        lines.append(f"  top cause: {row['top_cause']} closes {row['top_cause_share']:.0%} of the gap")
    if row.get("closing_set"):
        lines.append(f"  closing set: {row['closing_set']}")
    if row.get("interactions"):
        lines.append(f"  interactions: {row['interactions']}")
    if row.get("fidelity_verdict"):
        lines.append(f"  fidelity (training recipe vs preview): {row['fidelity_verdict']}, "
                     f"max_abs={row.get('fidelity_max_abs')}")
    findings = json.loads(row.get("findings_detail") or "[]")
    if findings:
        lines.append("  recipe fields that differ (training -> reference):")
        lines += [f"    {f['field']}: {f['training']} -> {f['reference']}  ({f['effect']})" for f in findings]
    if row.get("golden_verdict"):
        lines.append(f"  golden: {row['golden_verdict']} {row.get('golden_reason', '')}".rstrip())
    if row.get("verdict") in expectations.DECLARABLE and not row.get("expected_outcome"):
        lines.append(f"  a known, understood gap? declare it in the case's parity.yaml: "
                     f"`expect: {{verdict: {row['verdict']}, reason: \"...\"}}`")
    lines.append(f"  report: {Path(report_dir) / 'index.html'}")
    return "\n".join(lines)


def environment_of(options) -> dict:
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
