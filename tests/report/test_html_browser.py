"""The HTML report in headless Chromium: no console errors, the table is there, every plot
loads (``naturalWidth > 0``) — and a deleted plot is caught (the check can fail).

Needs the ``selenium`` package (skipped only when it is missing) and Debian's ``chromium`` and
``chromium-driver`` (``apt-get install -y chromium chromium-driver``); a missing browser is a
failure, not a skip, so CI cannot pass without looking at the page.
"""

from __future__ import annotations

from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")

from tests.browser import BrowserMissing, start_chromium  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    try:
        driver = start_chromium()
    except BrowserMissing as e:
        pytest.fail(str(e))
    try:
        yield driver
    finally:
        driver.quit()


def _load(driver, page: Path) -> tuple[list[dict], list[list]]:
    driver.get(page.as_uri())
    driver.execute_script("return document.readyState")
    driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "Promise.all(Array.from(document.images).map(i => i.complete ? null :"
        " new Promise(r => { i.onload = r; i.onerror = r; }))).then(() => done(true));")
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth]);")
    errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    return errors, images


def test_html_report_opens_without_errors_and_shows_everything(browser, report_dir: Path
                                                                ) -> None:
    from selenium.webdriver.common.by import By

    errors, images = _load(browser, report_dir / "report.html")
    assert errors == []
    table = browser.find_element(By.ID, "results")
    rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == 8 and table.is_displayed()
    headers = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    assert headers[:5] == ["cell", "model", "method", "tool", "scheme"] and "KLD" in headers
    plots = sorted(p.name for p in (report_dir / "plots").glob("*.png"))
    assert sorted(Path(src).name for src, _ in images) == plots and len(plots) == 6
    assert all(width > 0 for _, width in images), images
    assert browser.find_element(By.ID, "errors").is_displayed()
    assert browser.find_element(By.ID, "equal-memory").is_displayed()


def test_a_missing_plot_is_caught(browser, report_dir: Path) -> None:
    (report_dir / "plots" / "speed.png").unlink()
    errors, images = _load(browser, report_dir / "report.html")
    widths = {Path(src).name: w for src, w in images}
    assert widths["speed.png"] == 0 and widths["size_vs_kld.png"] > 0
    assert any("speed.png" in e.get("message", "") or "ERR_FILE_NOT_FOUND" in
               e.get("message", "") for e in errors), errors
