"""The search page in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by
Selenium against a live uvicorn server on a loopback port. Upload a photo, wait for the grid, check the number
of results and the top id, click a result and check that the query changed, toggle the attention overlay,
save a screenshot (SIMRET_SCREENSHOT=path copies it there, e.g. docs/serve-screenshot.png)."""
import os
import shutil
import warnings

import pytest
from browser_support import BROWSER_MARKS, live_server
from cli_run import run

from simret.models import RandomWeightsWarning

pytestmark = BROWSER_MARKS
K = 12


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from simret.data.samples import write_revisited_sample

    root = tmp_path_factory.mktemp("sample")
    write_revisited_sample(root, landmarks=["chelsea", "rocket", "astronaut", "coffee"], image_size=160,
                           extra_distractors=0)
    return root / "rsample" / "jpg"


@pytest.fixture(scope="module")
def server(photos, tmp_path_factory):
    """A live server on a free loopback port, in a thread; yields its base URL."""
    from simret.serve import create_app

    out = tmp_path_factory.mktemp("idx") / "idx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        run("index", photos, "--out", out, "--model", "test_resnet", "--weights", "none", "--max-size", "64", "-j", "0")
        app = create_app(out, reload_interval=0)
    with live_server(app) as url:
        yield url


def test_page_searches_clicks_through_and_shows_attention(server, browser, photos, tmp_path):
    import httpx
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    query = photos / "query_chelsea_q0.jpg"
    with open(query, "rb") as handle:
        expected = httpx.post(f"{server}/search", params={"k": K}, files={"image": (query.name, handle)},
                              timeout=60).json()

    def results(driver):  # read in one script: the grid may be re-rendered between two WebDriver calls
        return driver.execute_script("return Array.from(document.querySelectorAll('#results li'), li => li.dataset.id)")

    wait = WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,))
    browser.get(f"{server}/")
    wait.until(lambda d: "images" in d.find_element(By.ID, "index-info").text)
    browser.find_element(By.ID, "file").send_keys(str(query))
    wait.until(lambda d: len(results(d)) == K)
    assert results(browser) == expected["ids"]
    assert browser.find_element(By.ID, "query-name").text == query.name
    assert browser.find_element(By.ID, "status").get_attribute("class") != "error"
    wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
                             for img in d.find_elements(By.CSS_SELECTOR, "#results img")))

    # a box drawn on the query: the page searches that region, as POST /search?bbox= does
    from selenium.webdriver.common.action_chains import ActionChains

    image = browser.find_element(By.ID, "query-img")
    width, height = image.size["width"], image.size["height"]
    ActionChains(browser).move_to_element_with_offset(image, -width // 4, -height // 4).click_and_hold() \
        .move_by_offset(width // 2, height // 2).release().perform()
    wait.until(lambda d: d.find_element(By.ID, "query-name").get_attribute("data-bbox"))
    wait.until(lambda d: "(region)" in d.find_element(By.ID, "status").text)
    bbox = browser.find_element(By.ID, "query-name").get_attribute("data-bbox")
    assert browser.find_element(By.ID, "box").is_displayed()
    with open(query, "rb") as handle:
        region = httpx.post(f"{server}/search", params={"k": K, "bbox": bbox}, files={"image": (query.name, handle)},
                            timeout=60).json()
    x1, y1, x2, y2 = (int(v) for v in bbox.split(","))
    assert 0 < x1 < x2 and 0 < y1 < y2 and region["ids"] != expected["ids"]
    assert results(browser) == region["ids"]

    clicked = results(browser)[3]
    browser.find_elements(By.CSS_SELECTOR, "#results li button")[3].click()
    wait.until(lambda d: d.find_element(By.ID, "query-name").text == clicked)
    wait.until(lambda d: results(d) and results(d)[0] == clicked)  # its own stored descriptor ranks first
    assert len(results(browser)) == K

    browser.find_element(By.ID, "attention").click()
    wait.until(lambda d: d.find_element(By.ID, "overlay").is_displayed())

    browser.find_element(By.ID, "file").send_keys(str(query))  # back to the photo for the picture
    wait.until(lambda d: d.find_element(By.ID, "query-name").text == query.name and results(d) == expected["ids"])
    wait.until(lambda d: d.find_element(By.ID, "overlay").is_displayed())
    wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
                             for img in d.find_elements(By.CSS_SELECTOR, "#results img")))
    screenshot = tmp_path / "serve.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    if os.environ.get("SIMRET_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["SIMRET_SCREENSHOT"])
