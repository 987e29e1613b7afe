"""The HTML report in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, the
pages opened from disk. No console errors, nothing fetched from the network, sorting and filtering change the
rows, the slider moves, an injected prompt shows as text and runs nothing; screenshots go to
$REPORT_SHOTS (default /tmp/report-shots). Skips, saying why, without the browser or Playwright."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from test_report import XSS, make_report

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = Path(os.environ.get("REPORT_SHOTS", "/tmp/report-shots"))

if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is absent: install Debian's browser with `apt-get update && apt-get install -y "
                f"chromium` to run the browser tests", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser") / "reports"
    records, paths = make_report(folder, n=12, side=256)
    return folder, records, paths


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A page that records console errors, page errors, dialogs and every request."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    pg.problems, pg.requests, pg.dialogs = [], [], []
    pg.on("console", lambda m: pg.problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
          else None)
    pg.on("pageerror", lambda e: pg.problems.append(f"page error: {e}"))
    pg.on("request", lambda r: pg.requests.append(r.url))
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    yield pg
    context.close()


def open_page(pg, path: Path) -> None:
    pg.goto(path.as_uri())
    load_all_images(pg)


def load_all_images(pg) -> None:
    """Load the lazy images too, so that a broken image path shows."""
    pg.wait_for_load_state("load")
    pg.evaluate("document.querySelectorAll('img[loading=lazy]').forEach(i => i.loading = 'eager')")
    for _ in range(100):  # not wait_for_function: its polling evaluates a string, which the page's CSP forbids
        if pg.evaluate("Array.from(document.images).every(i => i.complete)"):
            break
        pg.wait_for_timeout(50)


def visible_rows(pg) -> list[str]:
    return pg.eval_on_selector_all("#previews tbody tr:not([hidden])", "rows => rows.map(r => r.dataset.case + '|' "
                                   "+ r.cells[1].dataset.v + '|' + r.cells[2].dataset.v)")


def assert_clean(pg) -> None:
    load_all_images(pg)
    assert pg.problems == []
    assert pg.dialogs == []
    assert all(url.startswith("file://") for url in pg.requests), [u for u in pg.requests if not u.startswith("file")]
    broken = pg.evaluate("Array.from(document.images).filter(i => !i.naturalWidth).map(i => i.src)")
    assert broken == []


def test_index_sorts_filters_and_escapes(page, report):
    folder, records, paths = report
    open_page(page, paths["html"])
    assert page.locator("#previews tbody tr").count() == len(records)
    before = visible_rows(page)

    page.click("#previews th:has-text('SSIM')")
    ascending = page.eval_on_selector_all("#previews tbody tr", "rows => rows.map(r => parseFloat(r.cells[6].dataset.v))")
    assert ascending == sorted(ascending) and visible_rows(page) != before
    page.click("#previews th:has-text('SSIM')")
    descending = page.eval_on_selector_all("#previews tbody tr", "rows => rows.map(r => parseFloat(r.cells[6].dataset.v))")
    assert descending == sorted(ascending, reverse=True)
    page.click("#previews th:has-text('case')")
    cases = page.eval_on_selector_all("#previews tbody tr", "rows => rows.map(r => r.dataset.case)")
    assert cases == sorted(cases, key=str.lower)

    page.select_option("#f-verdict", "mismatch")
    assert len(visible_rows(page)) == sum(r["verdict"] == "mismatch" for r in records)
    assert page.text_content("#shown") == str(len(visible_rows(page)))
    page.select_option("#f-verdict", "")
    page.select_option("#f-case", "run_a")
    assert len(visible_rows(page)) == sum(r["case"] == "run_a" for r in records)
    page.select_option("#f-case", "")
    page.fill("#f-search", "<script>")
    assert len(visible_rows(page)) == sum(r["prompt"] == XSS for r in records) > 0
    page.fill("#f-search", "")
    page.click("button.count.v-match")
    assert len(visible_rows(page)) == sum(r["verdict"] == "match" for r in records)
    page.click("button.count[data-verdict='']")
    assert len(visible_rows(page)) == len(records)

    # The injected prompt is text on the page, and nothing ran (no dialog, no extra script element).
    assert page.locator("td.prompt", has_text=XSS).count() == sum(r["prompt"] == XSS for r in records)
    assert page.evaluate("document.scripts.length") == 1
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "index.png"), full_page=True)
    assert (SHOTS / "index.png").stat().st_size > 10_000
    assert_clean(page)


def test_case_page_slider_flicker_and_links(page, report):
    folder, records, paths = report
    case_page = folder / "cases" / "run_a.html"
    open_page(page, case_page)
    box = page.locator(".compare").first
    over = box.locator(".cmp-over")
    clip = lambda: over.evaluate("e => e.style.clipPath")  # noqa: E731
    start = clip()
    slider = box.locator(".cmp-slider")
    slider.focus()
    for _ in range(20):
        page.keyboard.press("ArrowLeft")
    assert slider.input_value() == "30" and clip() != start and "70%" in clip()
    view = box.locator(".cmp-view").bounding_box()
    page.mouse.click(view["x"] + view["width"] * 0.8, view["y"] + view["height"] / 2)
    assert 75 <= int(slider.input_value()) <= 85

    box.locator(".cmp-b").select_option(label="with training cfg_norm")
    assert box.locator(".cmp-under").evaluate("e => e.src").endswith(".cause-cfg_norm.webp")
    box.locator(".cmp-mode[data-mode=flicker]").click()
    seen = set()
    for _ in range(8):
        seen.add(over.evaluate("e => getComputedStyle(e).visibility"))
        page.wait_for_timeout(200)
    assert seen == {"visible", "hidden"}
    box.locator(".cmp-mode[data-mode=slider]").click()
    assert over.evaluate("e => getComputedStyle(e).visibility") == "visible"

    assert page.locator("section.preview").count() == sum(r["case"] == "run_a" for r in records)
    assert page.locator("tr.differs").count() == 3 * page.locator("section.preview").count()
    assert page.locator("svg.chart circle").count() > 0
    assert page.locator("td.prompt, span.prompt", has_text=XSS).count() > 0
    page.locator("section.preview").nth(1).scroll_into_view_if_needed()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "case-top.png"), full_page=False)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(SHOTS / "case.png"), full_page=True)
    assert (SHOTS / "case.png").stat().st_size > 10_000
    assert_clean(page)


def test_index_links_reach_case_pages(page, report):
    folder, _, paths = report
    open_page(page, paths["html"])
    page.locator("#previews tbody tr").first.locator("a.verdict").click()
    page.wait_for_load_state("load")
    assert page.url.startswith((folder / "cases").as_uri()) and "#p-" in page.url
    assert page.locator(page.url.split("#", 1)[1].join(["#", ""])).count() == 1
    assert_clean(page)


def test_report_with_a_hostile_case_name_opens_cleanly(page, tmp_path):
    from parity.report import write_reports

    records = [{"case": XSS, "preview": "a.jpg", "verdict": XSS, "prompt": XSS, "reason": XSS, "step": 0,
                "sample_index": 0, "findings_detail": '[{"field": "' + "x" + '", "training": "<b>", "reference": '
                '"<img src=x onerror=alert(1)>", "effect": "<script>alert(2)</script>"}]',
                "causes": '{"metric": "<i>", "causes": [{"fields": ["<svg onload=alert(3)>"], "share": 0.5}]}',
                "hint_<x>": "<script>alert(4)</script>"}]
    paths = write_reports(records, tmp_path, {"gpu": XSS})
    for target in [paths["html"], *(p for k, p in paths.items() if k.startswith("case:"))]:
        open_page(page, target)
        assert page.evaluate("document.scripts.length") == 1
        assert page.locator("img").count() == 0
        assert XSS in page.inner_text("body")
    assert_clean(page)

