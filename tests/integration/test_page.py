"""The search page of ``vecpipe serve`` in a real headless browser (Debian's Chromium, driven by
Selenium through chromium-driver): a person's path, typed and clicked, read off the page.

Its own pytest session (``make browser``; ``make test`` runs it after the main one), like the
fault suite: a browser is a heavy process to start, and one start serves the whole file.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Endpoints
from tests.integration.test_serve import ACME, module_config, running, write_corpus
from vecpipe.db.keys import create_key
from vecpipe.db.migrate import migrate

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium; Selenium Manager kept offline (the driver is Debian's)."""
    if CHROMIUM is None or DRIVER is None:
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are missing; scripts/install-chromium.sh "
                        "installs them (CI runs it).")
        pytest.skip("chromium and chromedriver are not installed (scripts/install-chromium.sh)")
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_a_person_searches_from_the_page_and_reads_ranked_results(
        endpoints: Endpoints, encoder: Any, browser: Any, tmp_path: Path) -> None:
    """Type a key and a query, pick hybrid, click Search: the ranked chunks appear with their
    scores; a wrong key shows the service's sentence. A screenshot is saved."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    cfg = module_config(endpoints)
    migrate(cfg)
    write_corpus(cfg, encoder, "acme", ACME)
    key = create_key(cfg, "acme").key
    shots = Path(os.environ.get("VECPIPE_TEST_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with running(cfg, encoder) as url:
        browser.get(url + "/")
        assert browser.title == "vecpipe search"
        browser.find_element(By.ID, "key").send_keys(key)
        browser.find_element(By.ID, "query").send_keys("how do I swap the printer toner")
        Select(browser.find_element(By.ID, "mode")).select_by_value("hybrid")
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 30).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "li.hit"))
        docs = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "li.hit .doc")]
        scores = [float(e.text) for e in browser.find_elements(By.CSS_SELECTOR, "li.hit .score")]
        assert docs[0].strip().startswith("toner")
        assert scores == sorted(scores, reverse=True)
        status = browser.find_element(By.ID, "status").text
        assert "hybrid search" in status and "results" in status
        browser.save_screenshot(str(shots / "search-page.png"))
        assert (shots / "search-page.png").stat().st_size > 1000

        field = browser.find_element(By.ID, "key")
        field.clear()
        field.send_keys("vp_00000000_not-a-key")
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 30).until(
            lambda d: d.find_element(By.ID, "status").text.startswith("401"))
        assert "not valid" in browser.find_element(By.ID, "status").text
        assert browser.find_elements(By.CSS_SELECTOR, "li.hit") == []
