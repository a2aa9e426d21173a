"""The search page of `simret serve --support DIR` in a real browser (headless Chromium driven by Selenium, as in
tests/test_serve_browser.py): an uploaded image gets its predicted class under the query, as POST /classify
answers it; a result clicked (an indexed image, not an upload) shows none."""
import warnings

import pytest
from browser_support import BROWSER_MARKS, live_server
from cli_run import run
from digit_folders import support_and_queries

from simret.models import RandomWeightsWarning

pytestmark = BROWSER_MARKS


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """``support/digit_{0..2}/`` (4 examples each) and ``queries/`` (the other 2 of each), also indexed."""
    return support_and_queries(tmp_path_factory.mktemp("digits"), classes=range(3), per_class=6, n_support=4,
                               image_size=32)


@pytest.fixture(scope="module")
def server(digits, tmp_path_factory):
    """A live server with a support set on a free loopback port, in a thread; yields its base URL."""
    from simret.serve import create_app

    out = tmp_path_factory.mktemp("idx") / "idx"
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("ignore", RandomWeightsWarning)
        patch.setenv("SIMRET_CACHE", str(tmp_path_factory.mktemp("cache")))
        run("index", digits / "queries", "--out", out, "--model", "test_resnet", "--weights", "none",
            "--max-size", "64", "-j", "0")
        app = create_app(out, reload_interval=0, support=digits / "support")
    with live_server(app) as url:
        yield url


def test_page_shows_the_class_of_an_uploaded_image(server, browser, digits):
    import httpx
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    query = digits / "queries" / "digit_1" / "0004.png"
    with open(query, "rb") as handle:
        expected = httpx.post(f"{server}/classify", files={"image": (query.name, handle)}, timeout=60).json()

    wait = WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,))
    browser.get(f"{server}/")
    wait.until(lambda d: "images" in d.find_element(By.ID, "index-info").text)
    browser.find_element(By.ID, "file").send_keys(str(query))
    wait.until(lambda d: d.find_element(By.ID, "query-class").is_displayed())
    line = browser.find_element(By.ID, "query-class").text
    assert line.startswith(f"class: {expected['class']} ({expected['score']:.4f}, protonet)"), line
    assert all(entry["class"] in line for entry in expected["top"])
    assert browser.find_element(By.ID, "status").get_attribute("class") != "error"

    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results li button"))
    clicked = browser.execute_script("return document.querySelector('#results li').dataset.id")
    browser.find_element(By.CSS_SELECTOR, "#results li button").click()
    wait.until(lambda d: d.find_element(By.ID, "query-name").text == clicked)
    assert not browser.find_element(By.ID, "query-class").is_displayed()  # an indexed image: no upload to label
