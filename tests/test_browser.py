"""The page and the report in a real browser: headless Chromium driven by Selenium.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``browser`` extra (``make
test-browser`` installs all three); nothing is downloaded at run time. Screenshots go to
``$BIGREC_SCREENSHOTS`` (default: the test's temporary folder).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

webdriver = pytest.importorskip("selenium.webdriver", reason="the browser extra is not installed (make test-browser)")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("Debian's chromium and chromium-driver are not installed (make test-browser)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from bigrec.app.recommender import Recommender  # noqa: E402
from run_fixture import LONG_TAUGHT, LONG_TITLES, TAUGHT, TITLES, build_run, tiny_run  # noqa: E402
from test_serve import serving  # noqa: E402


def start_browser():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1400,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))


def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("BIGREC_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    driver = start_browser()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    rec = Recommender.from_run(tiny_run(tmp_path_factory), device="cpu")
    with serving(rec, batch_window_ms=5) as base:
        yield base


RANKING_NOTE = ("BIGRec + CI (the paper's formula) chosen on validation NDCG@10 (plain BIGRec 0.0310, "
                "BIGRec + CI (the paper's formula) 0.0412)")


@pytest.fixture(scope="module")
def long_url(tmp_path_factory):
    """A run of Amazon-length titles whose default ranking (CI: a score column besides the distance)
    comes with a note, as ``bigrec demo`` writes one."""
    run = build_run(tmp_path_factory.mktemp("long-titles"), titles=LONG_TITLES, taught=LONG_TAUGHT, use_ci=True,
                    ranking_note=RANKING_NOTE)
    with serving(Recommender.from_run(run, device="cpu"), batch_window_ms=5) as base:
        yield base


# Every pair of result cells (th/td in #results) whose boxes share more than a pixel each way: a table
# wider than its column spills over the next column's cells, which a screenshot shows as text on text.
OVERLAPS = """
const boxes = Array.from(document.querySelectorAll('#results th, #results td'),
                         (c) => [c.textContent, c.getBoundingClientRect()]);
const found = [];
for (let i = 0; i < boxes.length; i++) {
  for (let j = i + 1; j < boxes.length; j++) {
    const [ta, a] = boxes[i], [tb, b] = boxes[j];
    if (Math.min(a.right, b.right) - Math.max(a.left, b.left) > 1 &&
        Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top) > 1) found.push([ta, tb]);
  }
}
return found;
"""

# Cells (and history entries) whose text is wider than their box (clipped or spilling), and title cells
# that stayed on one line: at these widths a 100-to-200-character title fits on no line, so it must wrap.
CLIPPED = """
return Array.from(document.querySelectorAll('#results th, #results td, #history li'))
  .filter((c) => c.scrollWidth > c.clientWidth + 1).map((c) => c.textContent);
"""
UNWRAPPED = """
return Array.from(document.querySelectorAll('#results td'))
  .filter((c) => arguments[0].includes(c.textContent))
  .filter((c) => c.getBoundingClientRect().height < 1.5 * parseFloat(getComputedStyle(c).lineHeight))
  .map((c) => c.textContent);
"""


def pick(browser, wait, typed: str, title: str) -> None:
    box = browser.find_element(By.ID, "search")
    box.clear()
    box.send_keys(typed)
    wait.until(lambda d: any(li.text == title for li in d.find_elements(By.CSS_SELECTOR, "#suggestions li")))
    next(li for li in browser.find_elements(By.CSS_SELECTOR, "#suggestions li") if li.text == title).click()


def test_a_person_builds_a_history_and_gets_recommendations(browser, url, tmp_path):
    wait = WebDriverWait(browser, 60)
    browser.get(url + "/")
    wait.until(lambda d: "ml-100k" in d.find_element(By.ID, "run-info").text)
    assert "items" in browser.find_element(By.ID, "run-info").text
    history, answer = TAUGHT[0]
    pick(browser, wait, "toy st", history[0])
    pick(browser, wait, "hea", history[1])
    assert [li.text.removesuffix(" remove") for li in browser.find_elements(By.CSS_SELECTOR, "#history li")] == history
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("5")
    browser.find_element(By.ID, "ci").send_keys("off")
    browser.find_element(By.ID, "go").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#results table")))
    columns = browser.find_elements(By.CSS_SELECTOR, "#results .column")
    assert [c.find_element(By.TAG_NAME, "h2").text for c in columns] == ["BIGRec", "SASRec", "Popularity"]
    for column in columns:
        rows = column.find_elements(By.CSS_SELECTOR, "tr")[1:]
        assert len(rows) == 5 and all(r.find_elements(By.TAG_NAME, "td")[1].text in TITLES for r in rows)
    first = columns[0].find_elements(By.CSS_SELECTOR, "tr")[1].find_elements(By.TAG_NAME, "td")[1].text
    assert first == answer  # the adapter was taught this answer for this history
    assert answer in columns[0].find_element(By.CSS_SELECTOR, ".gen").text
    browser.save_screenshot(str(shots(tmp_path) / "page.png"))

    # a bad input: the API's message appears on the page, the results stay
    k.clear()
    k.send_keys("0")
    browser.find_element(By.ID, "go").click()
    error = wait.until(ec.visibility_of_element_located((By.ID, "error")))
    assert error.text.startswith("Recommendation failed: k:")
    assert browser.find_elements(By.CSS_SELECTOR, "#results table")
    browser.save_screenshot(str(shots(tmp_path) / "page_error.png"))


def test_the_demo_report_renders_from_disk(browser, tmp_path_factory, tiny_model_dir, tmp_path):
    from common import demo_args, write_small_movielens

    from bigrec.cli import main

    root = tmp_path_factory.mktemp("report")
    run_dir = root / "run"
    assert main(demo_args(run_dir, tiny_model_dir, write_small_movielens(root), decoding="free")) == 0
    browser.get((run_dir / "report.html").resolve().as_uri())
    assert "SASRec (same 32 examples)" in browser.find_element(By.TAG_NAME, "body").text  # shown, not folded
    for summary in browser.find_elements(By.TAG_NAME, "summary"):  # the folded tables open on a click
        summary.click()
    tables = browser.find_elements(By.TAG_NAME, "table")
    assert len(tables) >= 4 and all(t.is_displayed() for t in tables)
    image = browser.find_element(By.TAG_NAME, "img")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) >= 500
    browser.save_screenshot(str(shots(tmp_path) / "report.png"))


def test_long_titles_wrap_and_no_result_cell_overlaps_another(browser, long_url, tmp_path):
    """Amazon titles at a 1,500 px window overlapped the BIGRec distance and score columns with the
    SASRec column; below 1,300 px the columns stack instead. The run's ranking (its note
    on how validation chose it) is stated once, in the header, not again above the BIGRec table."""
    wait = WebDriverWait(browser, 60)
    browser.set_window_size(1500, 1000)
    try:
        browser.get(long_url + "/")
        wait.until(lambda d: "items" in d.find_element(By.ID, "run-info").text)
        history, _ = LONG_TAUGHT[0]
        for title in history:
            pick(browser, wait, title[:18], title)
        k = browser.find_element(By.ID, "k")
        k.clear()
        k.send_keys(str(len(LONG_TITLES) - len(history)))  # every other title, in each of the three tables
        browser.find_element(By.ID, "go").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results table")) == 3)
        columns = browser.find_elements(By.CSS_SELECTOR, "#results .column")
        assert [c.find_element(By.TAG_NAME, "h2").text for c in columns] == ["BIGRec", "SASRec", "Popularity"]
        assert [th.text for th in columns[0].find_elements(By.TAG_NAME, "th")] == ["#", "item", "distance", "score"]
        for width in (1500, 1000, 700):
            browser.set_window_size(width, 1000)
            height = browser.execute_script("return document.documentElement.scrollHeight")
            browser.set_window_size(width, height + 100)  # the whole page in the screenshot, taken before
            browser.save_screenshot(str(shots(tmp_path) / f"page_long_titles_{width}.png"))  # the checks
            assert browser.execute_script("return document.documentElement.scrollWidth <= innerWidth"), width
            assert browser.execute_script(OVERLAPS) == [], width
            assert browser.execute_script(CLIPPED) == [], width
            assert browser.execute_script(UNWRAPPED, LONG_TITLES) == [], width
            tops = [c.rect["y"] for c in columns]
            assert tops[0] == tops[1] == tops[2] if width >= 1300 else tops[0] < tops[1] < tops[2], (width, tops)
        page_text = browser.find_element(By.TAG_NAME, "body").text
        assert page_text.count(RANKING_NOTE) == 1
        assert RANKING_NOTE in browser.find_element(By.TAG_NAME, "header").text
    finally:
        browser.set_window_size(1400, 1000)
