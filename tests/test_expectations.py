"""Known gaps declared in parity.yaml (`expect:`): a record against its declaration, the pages, `parity run`'s exit."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from parity import cli, expectations
from parity.errors import CaseError
from parity.expectations import Expectation, apply, for_preview, outcome, parse, passes, problem
from parity.plan import Task
from parity.report import COLUMNS, render_pages, write_reports

GAP = Expectation("mismatch", "quantized base: cfg_norm closes 0.67 of the gap", source="/c/parity.yaml")


def record(verdict: str, **more) -> dict:
    return {"id": "case/2/0", "case": "case", "preview": "1__000000002_0.jpg", "step": 2, "sample_index": 0,
            "verdict": verdict, "reason": "ssim 0.62 not >= 0.9" if verdict != "match" else "", **more}


@pytest.mark.parametrize("verdict, expected", [
    ("mismatch", "expected"), ("match", "unexpectedly matches"), ("explained", "unexpectedly matches"),
    ("error", "unexpected error"), ("size mismatch", "unexpected verdict"),
    ("cannot reproduce preview", "unexpected verdict")])
def test_outcome_is_strict(verdict, expected):
    assert outcome(verdict, GAP) == expected
    row = apply(record(verdict), GAP)
    assert row["verdict"] == verdict  # the real verdict stays
    assert (row["expected_verdict"], row["expected_reason"], row["expected_outcome"]) == \
           ("mismatch", GAP.reason, expected)
    assert passes(row) == (expected == "expected")


def test_without_a_declaration_nothing_changes_and_the_old_rule_holds():
    for verdict, green in (("match", True), ("explained", True), ("skipped", True), ("mismatch", False),
                           ("error", False)):
        row = apply(record(verdict), None)
        assert "expected_outcome" not in row and passes(row) is green and problem(row) is None
    skipped = apply(record("skipped"), GAP)  # a skipped row is not judged against the declaration
    assert "expected_outcome" not in skipped and passes(skipped)


def test_problem_says_what_to_do():
    gone = problem(apply(record("match"), GAP), GAP.source)
    assert "case/2/0: match, unexpectedly" in gone and "The known gap is gone: remove the `expect:` entry" in gone
    assert "/c/parity.yaml" in gone and GAP.reason in gone
    error = problem(apply(record("error"), GAP), GAP.source)
    assert "unexpected error" in error and "update `expect:` in /c/parity.yaml" in error
    assert problem(apply(record("mismatch"), GAP), GAP.source) is None
    assert expectations.note(apply(record("mismatch"), GAP)) == f"mismatch, as parity.yaml declares: {GAP.reason}"


def test_previews_select_by_file_name_glob_or_step_and_index():
    entries = parse([{"verdict": "size mismatch", "reason": "divisors", "previews": ["*__000000004_1.*", "6/*"]},
                     {"verdict": "mismatch", "reason": "the rest"}], "/c/parity.yaml")
    assert for_preview(entries, "9__000000004_1.jpg", 4, 1).verdict == "size mismatch"
    assert for_preview(entries, "9__000000006_0.png", 6, 0).verdict == "size mismatch"
    assert for_preview(entries, "9__000000004_0.jpg", 4, 0).verdict == "mismatch"  # the entry for all the rest
    only = parse({"verdict": "mismatch", "reason": "r", "previews": "2/0"}, "p")  # one selector as a string
    assert for_preview(only, "x__000000002_0.jpg", 2, 0) and for_preview(only, "x__000000002_1.jpg", 2, 1) is None
    assert parse(None, "p") == ()


@pytest.mark.parametrize("value, says", [
    ("mismatch", "`expect: mismatch` needs a reason"),
    ({"verdict": "mismatch"}, "has no reason"),
    ({"verdict": "mismatch", "reason": "  "}, "has no reason"),
    ({"verdict": "match", "reason": "r"}, "verdict is 'match'"),
    ({"verdict": "mismatch", "reason": "r", "why": "x"}, "unknown key(s) why"),
    ({"verdict": "mismatch", "reason": "r", "previews": []}, "previews:` must list"),
    ({"verdict": "mismatch", "reason": "r", "previews": [2]}, "previews:` must list"),
    ([{"verdict": "mismatch", "reason": "r"}, {"verdict": "mismatch", "reason": "s", "previews": ["2/0"]}],
     "would never apply"),
    (["mismatch"], "must be a mapping")])
def test_bad_declarations_name_the_file_and_the_fix(value, says):
    with pytest.raises(CaseError) as err:
        parse(value, "/c/parity.yaml")
    assert str(err.value).startswith("/c/parity.yaml: ") and says in str(err.value) and " -- fix: " in str(err.value)


def test_report_shows_a_declared_gap_as_expected_not_red(tmp_path):
    records = [apply(record("mismatch"), GAP), apply({**record("match"), "id": "case/2/1", "sample_index": 1,
                                                      "preview": "1__000000002_1.jpg"}, GAP),
               record("mismatch", id="other/0/0", case="other")]
    paths = write_reports(records, tmp_path, {"device": "cpu"})
    csv = pd.read_csv(paths["csv"])
    assert list(csv.columns[:len(COLUMNS)]) == COLUMNS
    assert {"expected_verdict", "expected_reason", "expected_outcome"} <= set(COLUMNS)
    assert list(csv["expected_outcome"].fillna("")) == ["expected", "unexpectedly matches", ""]
    assert list(csv["verdict"]) == ["mismatch", "match", "mismatch"]  # the real verdicts
    pages = render_pages(records, {"device": "cpu"}, tmp_path)
    index = pages["index.html"]
    assert 'class="verdict v-expected"' in index and ">mismatch (expected)</a>" in index
    assert 'class="verdict v-unexpected"' in index and ">match (unexpected)</a>" in index
    assert 'class="verdict v-mismatch"' in index  # undeclared: red as before
    assert f"parity.yaml expects mismatch: {GAP.reason}" in index
    assert 'data-verdict="mismatch (expected)"' in index  # its own count and filter
    assert "parity.yaml expects mismatch (expected): " in pages["cases/case.html"]


def test_parity_run_exit_code_follows_the_declarations(monkeypatch, tmp_path, capsys):
    tasks = [Task(id="case/2/0", case="case", case_folder=Path("/c"), preview=None, expect=GAP)]
    monkeypatch.setattr(cli, "set_threads", lambda: None)
    monkeypatch.setattr(cli, "stop_on_sigterm", lambda: None)
    monkeypatch.setattr(cli, "plan", lambda options: tasks)
    args = ["run", str(tmp_path), "--no-progress", "--report-dir", str(tmp_path / "r")]
    for verdict, code in (("mismatch", 0), ("match", 1), ("error", 1)):
        monkeypatch.setattr(cli, "run", lambda options, tasks, progress=None: [apply(record(verdict), GAP)])
        assert cli.main(args) == code
        out = capsys.readouterr().out
        if verdict == "mismatch":
            assert out.startswith("mismatch (expected)") and f" case/2/0  {GAP.reason}" in out
        else:
            assert "/c/parity.yaml" in out and "unexpected" in out
    tasks[0].expect = None  # the same mismatch, undeclared: red
    monkeypatch.setattr(cli, "run", lambda options, tasks, progress=None: [apply(record("mismatch"), None)])
    assert cli.main(args) == 1


def test_the_summary_line_says_which_gaps_were_declared():
    from parity.runner import summary_line

    line = summary_line([{"verdict": "mismatch", "expected_outcome": "expected"}, {"verdict": "match"},
                         {"verdict": "match", "expected_outcome": "unexpectedly matches"}])
    assert "1 mismatch (expected)" in line and "1 match (unexpected)" in line and "1 match," in line
