"""`parity run`: progress a person can follow, the same options as the plugin, and an interrupted run that
writes the report of what it did and resumes without rendering anything twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.filterwarnings("ignore")


def parity(*args: str, **kw) -> list[str]:
    return [sys.executable, "-m", "parity.cli", *args]


def run_args(root: Path, tmp: Path, cache: Path) -> list[str]:
    return ["run", str(root), "--dtype", "float32", "--device", "cpu", "--metrics", "", "--cache-dir", str(cache),
            "--report-dir", str(tmp / "reports")]


ENV = {**os.environ, "PARITY_THREADS": "1"}


def test_run_shows_each_preview_with_an_eta_and_a_summary(fast_root, tmp_path):
    done = subprocess.run(parity(*run_args(fast_root, tmp_path, tmp_path / "cache"), "--no-progress"),
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 1, done.stderr  # size mismatches are failures
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("[")]
    assert len(lines) == 6 and lines[0].startswith("[1/6] size mismatch") and lines[-1].startswith("[6/6]")
    assert all("renders made, ETA" in ln and "tiny_qwen_image_edit_plus_lora_v1/" in ln for ln in lines)
    assert "preview-parity: 6 size mismatch (6 previews); 12 renders made" in done.stdout
    assert (tmp_path / "reports" / "index.html").is_file()


def test_progress_bar_on_a_terminal(fast_root, tmp_path):
    """tqdm's bar (counts, ETA, the current preview) when stderr is a terminal."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 160, 0, 0))  # a 160-column terminal
    proc = subprocess.Popen(parity(*run_args(fast_root, tmp_path, tmp_path / "cache")), stdout=subprocess.PIPE,
                            stderr=follower, env=ENV, text=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data.decode(errors="replace"))
    proc.wait(timeout=600)
    screen = "".join(chunks)
    assert "6/6" in screen and ("preview/s" in screen or "s/preview" in screen) and "<00:00" in screen
    assert "tiny_qwen_image_edit_plus_lora_v1/2/2 | " in screen and "renders made" in screen


def interrupt_after_first(cmd: list[str], sig: int, marker: str, stream: str) -> subprocess.CompletedProcess:
    """Start a run, send `sig` as soon as its first finished preview is reported, wait for it to stop."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    watched = getattr(proc, stream)
    seen = []
    for line in watched:
        seen.append(line)
        if marker in line:
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(seen) + out if stream == "stdout" else out,
                                       "".join(seen) + err if stream == "stderr" else err)


# `parity run` with a second's pause after each preview, so that a signal sent after the first always lands
# before the last (the tiny renders take a tenth of a second each); Ctrl-C's default handler in place even where
# this test's own process was started with SIGINT ignored (a background job of a non-interactive shell).
SLOW_RUN = ("import signal, sys, time; from parity import cli, runner; check = runner.Checker.check; "
            "signal.signal(signal.SIGINT, signal.default_int_handler); "
            "runner.Checker.check = lambda self, *a: (check(self, *a), time.sleep(1))[0]; "
            "sys.exit(cli.main(sys.argv[1:]))")


def test_interrupted_run_reports_what_it_did_and_resumes(fast_root, tmp_path):
    cache = tmp_path / "cache"
    slow = [sys.executable, "-c", SLOW_RUN, *run_args(fast_root, tmp_path, cache), "--no-progress"]
    first = interrupt_after_first(slow, signal.SIGINT, "[1/6]", "stderr")
    assert first.returncode == 130, first.stderr
    assert "interrupted: the report of what was done is in" in first.stderr
    done = pd.read_csv(tmp_path / "reports" / "parity.csv")
    assert 1 <= len(done) < 6
    assert done["renders"].iloc[0] == 12  # the case's first preview made the whole case's renders, pipeline by pipeline
    env = json.loads((tmp_path / "reports" / "parity.json").read_text())["environment"]
    assert env["interrupted"] == f"after {len(done)} of 6 previews"
    assert "This run was interrupted after" in (tmp_path / "reports" / "index.html").read_text()

    again = subprocess.run(parity(*run_args(fast_root, tmp_path, cache), "--no-progress"), capture_output=True,
                           text=True, env=ENV, timeout=600)
    assert again.returncode == 1, again.stderr
    full = pd.read_csv(tmp_path / "reports" / "parity.csv").set_index("id")
    assert len(full) == 6
    assert full["renders"].sum() == 0  # nothing made before is rendered again: every render was in the cache
    assert "interrupted" not in json.loads((tmp_path / "reports" / "parity.json").read_text())["environment"]


def test_pytest_run_killed_by_sigterm_writes_its_report(fast_root, tmp_path):
    from conftest import SUITE

    cmd = [sys.executable, "-m", "pytest", str(SUITE), "-p", "no:cacheprovider", "-v", "--parity-cases",
           str(fast_root), "--parity-report-dir", str(tmp_path / "reports"), "--parity-cache-dir",
           str(tmp_path / "cache"), "--parity-dtype", "float32", "--parity-device", "cpu", "--parity-metrics", ""]
    result = interrupt_after_first(cmd, signal.SIGTERM, "FAILED (size mismatch", "stdout")
    assert result.returncode == pytest.ExitCode.INTERRUPTED, result.stdout[-2000:]
    done = pd.read_csv(tmp_path / "reports" / "parity.csv")
    assert 1 <= len(done) < 6
    env = json.loads((tmp_path / "reports" / "parity.json").read_text())["environment"]
    assert env["interrupted"] == f"after {len(done)} of 6 previews"


def test_bad_option_value_is_a_usage_error(fast_root, tmp_path):
    done = subprocess.run(parity("run", str(fast_root), "--explain", "sometimes"), capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert done.returncode == 2
    assert "--explain: 'sometimes' is not one of failed, all, none" in done.stderr
