"""The documentation: every relative link in README.md, docs/*.md and scripts/demo_model/README.md resolves (the
file exists; a `#anchor` names a heading of the target, slugged as GitHub slugs it), and README.md stays short."""
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250


def doc_pages():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "scripts" / "demo_model" / "README.md"]


FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target); the target may be <bracketed> and may carry a "title"
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]*)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ID = re.compile(r"""<[^>]+\b(?:id|name)\s*=\s*["']([^"']+)["']""")


def prose_lines(text):
    """The lines outside fenced code blocks, with their numbers."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if match:
            if fence is None:
                fence = match.group(1)
            elif match.group(1) == fence:
                fence = None
            continue
        if fence is None:
            yield number, line


def links(text):
    """(line number, target) of every inline link, image and reference definition outside code."""
    for number, line in prose_lines(text):
        line = INLINE_CODE.sub("", line)
        targets = [m.group(1) for m in INLINE_LINK.finditer(line)]
        ref = REFERENCE_DEF.match(line)
        if ref:
            targets.append(ref.group(1))
        for target in targets:
            yield number, target.strip("<>")


def slug(heading):
    """GitHub's anchor for a heading: the rendered text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = INLINE_CODE.sub(lambda m: m.group(2), text)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path):
    """Every anchor a page has: its headings' slugs (a repeated one gets -1, -2, ...) and HTML ids."""
    seen, found = {}, set()
    text = path.read_text(encoding="utf-8")
    for _, line in prose_lines(text):
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
        found.update(HTML_ID.findall(line))
    return found


def problems(page):
    out = []
    for number, target in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
            continue  # http(s), mailto and other schemes: not checked here
        path, _, anchor = target.partition("#")
        path = path.split("?", 1)[0]
        where = f"{page.relative_to(ROOT)}:{number}: {target}"
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            out.append(f"{where}: no such file {resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved}")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            out.append(f"{where}: no heading with the anchor #{anchor} in {resolved.relative_to(ROOT)}")
    return out


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert page.exists(), f"{page.relative_to(ROOT)} is missing"
    assert problems(page) == []


def test_the_docs_index_lists_every_page():
    index = ROOT / "docs" / "README.md"
    listed = {target.partition("#")[0] for _, target in links(index.read_text(encoding="utf-8"))}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "README.md" and p.name not in listed]
    assert missing == [], f"docs/README.md does not link {missing}"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move depth into docs/"


def test_the_checker_finds_broken_links(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# Title\n\n## The `x.y` option (more)\n\n## Again\n\n## Again\n")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md#the-xy-option-more) [ok](a.md#again-1) [ok](#local) [web](https://example.com/x.md)\n"
        "[mail](mailto:a@b.c) `[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n## Local\n"
        "[missing](nowhere.md) [bad anchor](a.md#nope) ![img](pic.png)\n")
    assert problems(page) == [
        "b.md:7: nowhere.md: no such file nowhere.md",
        "b.md:7: a.md#nope: no heading with the anchor #nope in a.md",
        "b.md:7: pic.png: no such file pic.png",
    ]
