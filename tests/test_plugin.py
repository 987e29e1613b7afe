"""The pytest plugin end to end through pytester: `pytest parity/` on a small case, passing and failing."""

from __future__ import annotations


import pandas as pd
import pytest

from conftest import SUITE, run_suite

pytest_plugins = ["pytester"]


def test_suite_passes_and_writes_reports(pytester, small_root, tmp_path, render_cache):
    result = run_suite(pytester, small_root, tmp_path / "rep", render_cache)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_preview?tiny_qwen_edit_plus_parity_a/3/0? PASSED*",
                                 "*preview-parity report:*index.html*"])
    csv = pd.read_csv(tmp_path / "rep" / "parity.csv")
    assert sorted(csv["id"]) == ["tiny_qwen_edit_plus_parity_a/3/0", "tiny_qwen_edit_plus_parity_a/6/1"]
    assert set(csv["verdict"]) == {"match"}
    assert (tmp_path / "rep" / "index.html").is_file()
    images = tmp_path / "rep" / "images" / "tiny_qwen_edit_plus_parity_a"
    names = {p.name.split(".", 1)[1] for p in images.glob("*__000000003_0.*")}
    # compact images (the default): WebP; these previews are PNGs, so they are encoded like the renders
    assert names == {"preview.webp", "reference.webp", "training.webp", "diff.webp", "ssim_map.webp",
                     "stlpips_alex_map.webp"}
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in images.iterdir() if p.is_file())  # readable by all


def test_failure_names_metrics_findings_and_report(pytester, small_root, tmp_path, render_cache):
    case = next(small_root.rglob("parity.yaml"))
    case.write_text(case.read_text() + "thresholds: {max_abs_max: 0}\n")
    result = run_suite(pytester, small_root, tmp_path / "rep", render_cache)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*tiny_qwen_edit_plus_parity_a/3/0: mismatch*", "*metrics: ssim=*",
                                 "*cfg_norm: false -> true*", "*control_prompt_resize:*transposed*",
                                 f"*report: {tmp_path / 'rep' / 'index.html'}*"])
    assert len(pd.read_csv(tmp_path / "rep" / "parity.csv")) == 2  # reports also when items fail


def test_options_come_from_ini(pytester, small_root, tmp_path, render_cache):
    pytester.makeini(f"""
        [pytest]
        parity_cases = {small_root}
        parity_report_dir = {tmp_path / 'ini-rep'}
        parity_cache_dir = {render_cache}
        parity_device = cpu
        parity_report_images = lossless
    """)
    result = pytester.runpytest_subprocess(str(SUITE), "-p", "no:cacheprovider", "-c", str(pytester.path / "tox.ini"),
                                           "--rootdir", str(pytester.path))
    result.assert_outcomes(passed=2)
    assert (tmp_path / "ini-rep" / "parity.csv").is_file()
    images = tmp_path / "ini-rep" / "images" / "tiny_qwen_edit_plus_parity_a"
    assert {p.suffix for p in images.iterdir() if p.is_file()} == {".png"}  # lossless: PNG, the preview copied
    preview = next(images.glob("*__000000003_0.preview.png"))
    assert preview.read_bytes() == next(small_root.rglob("*__000000003_0.png")).read_bytes()


def test_bad_report_images_option_is_a_usage_error(pytester, small_root, tmp_path, render_cache):
    result = run_suite(pytester, small_root, tmp_path / "rep", render_cache, "--parity-report-images", "tiny")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--parity-report-images: 'tiny' is not one of compact, lossless*"])


def test_verbose_shows_each_preview_with_its_seconds_and_a_summary(pytester, fast_root, tmp_path):
    result = run_suite(pytester, fast_root, tmp_path / "rep", tmp_path / "cache", "--parity-dtype", "float32",
                       "--parity-metrics", "")
    result.assert_outcomes(failed=6)
    result.stdout.fnmatch_lines(["*test_preview?tiny_qwen_image_edit_plus_lora_v1/0/0? FAILED (size mismatch *.*s)*",
                                 "*preview-parity: 6 size mismatch (6 previews); 12 renders made, the rest from the "
                                 "render cache; * s checking*"])


def test_a_case_without_previews_is_a_row_not_a_crash(pytester, fast_root, tmp_path):
    for p in (fast_root / "tiny_qwen_image_edit_plus_lora_v1" / "samples").iterdir():
        p.unlink()
    result = run_suite(pytester, fast_root, tmp_path / "rep", tmp_path / "cache")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*tiny_qwen_image_edit_plus_lora_v1/config: error*", "*holds no preview images*"])
    assert len(pd.read_csv(tmp_path / "rep" / "parity.csv")) == 1


def test_a_root_without_cases_is_a_failed_item_not_an_internal_error(pytester, tmp_path):
    (tmp_path / "nothing").mkdir()
    result = run_suite(pytester, tmp_path / "nothing", tmp_path / "rep", tmp_path / "cache")
    result.assert_outcomes(failed=1)
    assert "INTERNALERROR" not in result.stdout.str()
    result.stdout.fnmatch_lines(["*nothing/cases root: error*", "*holds no ai-toolkit output folder*"])


def test_other_suites_keep_their_signal_handling(pytester):
    """Installed, the plugin is active in every pytest run: only a run that checks previews turns SIGTERM
    into a graceful stop (tested in test_cli.py); any other suite sees the default handler."""
    pytester.makepyfile(test_other="""
        import signal

        def test_sigterm_is_untouched():
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_declared_gap_passes_as_xfail_and_fails_once_it_closes(pytester, small_root, tmp_path, render_cache):
    """`expect:` in parity.yaml: a preview that mismatches as declared passes (XFAIL, exit 0 when nothing else
    fails); once it matches, it fails and says to remove the declaration (strict)."""
    settings = next(small_root.rglob("parity.yaml"))
    plain = settings.read_text()
    gap = 'expect: {verdict: mismatch, reason: "strict thresholds", previews: ["*__000000003_0.*"]}\n'
    quick = ("--parity-explain", "none", "--parity-metrics", "")  # two renders a preview, the same in both runs
    settings.write_text(plain + "thresholds: {max_abs_max: 0}\n" + gap)  # both previews mismatch
    result = run_suite(pytester, small_root, tmp_path / "r1", render_cache, *quick)
    result.assert_outcomes(xfailed=1, failed=1)  # 3/0 as declared; 6/1's mismatch is not declared: red
    result.stdout.fnmatch_lines(["*test_preview?tiny_qwen_edit_plus_parity_a/3/0? XFAIL (mismatch, expected *s)*",
                                 "*6/1? FAILED (mismatch *s)*", "*a known, understood gap? declare it*"])
    csv = pd.read_csv(tmp_path / "r1" / "parity.csv").set_index("id")
    row = csv.loc["tiny_qwen_edit_plus_parity_a/3/0"]
    assert (row["verdict"], row["expected_verdict"], row["expected_outcome"], row["expected_reason"]) == \
           ("mismatch", "mismatch", "expected", "strict thresholds")
    settings.write_text(plain + gap)  # the case's own thresholds: 3/0 matches where a mismatch is declared
    result = run_suite(pytester, small_root, tmp_path / "r2", render_cache, *quick)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*3/0? FAILED (match, unexpectedly matches *s)*",
                                 "*tiny_qwen_edit_plus_parity_a/3/0: match, unexpectedly: * declares `expect: "
                                 "mismatch` (strict thresholds). The known gap is gone: remove the `expect:` entry "
                                 "for this preview from *parity.yaml*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED
