"""Known gaps a case declares in its parity.yaml (`expect:`), so that `pytest parity/` is green when nothing changed.

```yaml
expect:
  verdict: mismatch              # or: size mismatch, cannot reproduce preview
  reason: "quantized base: cfg_norm closes 0.67 of the gap; the rest is quantization"
  previews: ["*__000000002_0.*", "2/0"]   # optional: file-name globs or <step>/<index> ids; absent: every preview
```

`expect:` is one such mapping or a list of them (the first that covers a preview applies). A record keeps its real
verdict and gets `expected_verdict`, `expected_reason` and `expected_outcome`: `expected` (the declared verdict:
the check passes, pytest shows XFAIL), or, strictly, `unexpectedly matches` (match or explained: the gap is gone,
remove the declaration), `unexpected error` or `unexpected verdict` (another failing verdict): these fail. Pure:
nothing here renders or reads a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from .errors import CaseError

DECLARABLE = ("mismatch", "size mismatch", "cannot reproduce preview")  # the failing verdicts a gap can be
PASSING = ("match", "explained")  # the verdicts a preview passes with
KEYS = ("verdict", "reason", "previews")
EXPECTED = "expected"
UNEXPECTED_MATCH = "unexpectedly matches"
UNEXPECTED_ERROR = "unexpected error"
UNEXPECTED_VERDICT = "unexpected verdict"
EXAMPLE = 'expect: {verdict: mismatch, reason: "<why this gap is known>"}'


@dataclass(frozen=True)
class Expectation:
    """One declared gap: the verdict, why, and which previews (empty: every preview of the case)."""

    verdict: str
    reason: str
    previews: tuple[str, ...] = ()  # file-name globs, or `<step>/<index>` ids (globs allowed: `*/0`)
    source: str = ""  # the parity.yaml that declares it

    def covers(self, name: str, step: int | None, index: int | None) -> bool:
        if not self.previews:
            return True
        ident = f"{step}/{index}"
        return any(fnmatchcase(ident if "/" in sel else name, sel) for sel in self.previews)


def parse(value, path: Path | str) -> tuple[Expectation, ...]:
    """The `expect:` value of a parity.yaml; a CaseError names the file and the fix."""
    if value is None:
        return ()
    if isinstance(value, str):
        raise CaseError(path, f"`expect: {value}` needs a reason: why is this gap known?", f"write `{EXAMPLE}`")
    entries = value if isinstance(value, list) else [value]
    if not entries or not all(isinstance(e, dict) for e in entries):
        raise CaseError(path, "`expect:` must be a mapping (or a list of mappings) with `verdict:` and `reason:`",
                        f"write `{EXAMPLE}`")
    found = tuple(_entry(e, path) for e in entries)
    if any(not e.previews for e in found[:-1]):
        raise CaseError(path, "an `expect:` entry without `previews:` covers every preview, so the entries after it "
                              "would never apply", "give each entry but the last one `previews:`")
    return found


def _entry(entry: dict, path: Path | str) -> Expectation:
    unknown = sorted(set(map(str, entry)) - set(KEYS))
    if unknown:
        raise CaseError(path, f"`expect:` has unknown key(s) {', '.join(unknown)}", f"use keys from: {', '.join(KEYS)}")
    verdict = entry.get("verdict")
    if verdict not in DECLARABLE:
        raise CaseError(path, f"`expect:` verdict is {verdict!r}, not one a known gap can have",
                        f"write `verdict:` as one of: {', '.join(DECLARABLE)}")
    reason = entry.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise CaseError(path, f"`expect: {{verdict: {verdict}}}` has no reason: why is this gap known?",
                        f"add `reason:` under `expect:` (e.g. `{EXAMPLE}`)")
    previews = entry.get("previews", ())
    if isinstance(previews, str):
        previews = [previews]
    if "previews" in entry and (not isinstance(previews, list) or not previews
                                or not all(isinstance(p, str) and p for p in previews)):
        raise CaseError(path, "`expect: previews:` must list file-name globs or <step>/<index> ids",
                        "write e.g. `previews: [\"*__000000002_0.*\", \"4/1\"]`, or leave it out for every preview")
    return Expectation(verdict=verdict, reason=reason.strip(), previews=tuple(previews), source=str(path))


def for_preview(expectations: tuple[Expectation, ...], name: str, step: int | None,
                index: int | None) -> Expectation | None:
    """The declaration that covers a preview (its file name, step and sample index), if any."""
    return next((e for e in expectations if e.covers(name, step, index)), None)


def outcome(verdict: str, expectation: Expectation) -> str:
    """A verdict against the declared one (strict: a pass where a gap was declared is news too)."""
    if verdict == expectation.verdict:
        return EXPECTED
    if verdict in PASSING:
        return UNEXPECTED_MATCH
    return UNEXPECTED_ERROR if verdict == "error" else UNEXPECTED_VERDICT


def apply(row: dict, expectation: Expectation | None) -> dict:
    """The record with its `expected_*` columns (unchanged without a declaration, or for a skipped row)."""
    if expectation is not None and row.get("verdict") != "skipped":
        row.update(expected_verdict=expectation.verdict, expected_reason=expectation.reason,
                   expected_outcome=outcome(row.get("verdict") or "", expectation))
    return row


def passes(row: dict) -> bool:
    """Green: a passing verdict, a skipped row, or exactly the declared gap."""
    if row.get("expected_outcome"):
        return row["expected_outcome"] == EXPECTED
    return row.get("verdict") in (*PASSING, "skipped")


def problem(row: dict, source: str | Path | None = None) -> str | None:
    """What an unexpected outcome means and how to fix it (None: no declaration, or as declared)."""
    result = row.get("expected_outcome")
    if not result or result == EXPECTED:
        return None
    where = str(source) if source else "parity.yaml"
    said = f"{where} declares `expect: {row.get('expected_verdict')}` ({row.get('expected_reason')})"
    if result == UNEXPECTED_MATCH:
        return (f"{row.get('id')}: {row.get('verdict')}, unexpectedly: {said}. The known gap is gone: remove the "
                f"`expect:` entry for this preview from {where}")
    return (f"{row.get('id')}: {row.get('verdict')} ({result}): {said}. Fix what changed, or if the gap itself "
            f"changed, update `expect:` in {where}")


def note(row: dict) -> str:
    """The line a declared gap passes with (pytest's XFAIL reason)."""
    return f"{row.get('verdict')}, as parity.yaml declares: {row.get('expected_reason')}"
