"""The search page in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by
Selenium against a live uvicorn server on a loopback port. Upload a photo, wait for the grid, check the number
of results and the top id, click a result and check that the query changed, toggle the attention overlay,
save a screenshot (SIMRET_SCREENSHOT=path copies it there, e.g. docs/serve-screenshot.png)."""
import os
import shutil
import socket
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from simret.cli import cli
from simret.models import RandomWeightsWarning

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
K = 12


def _browser_missing():
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return f"no {path}: install Chromium with apt-get install chromium chromium-driver (.ci/run does)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))]


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
    import uvicorn

    from simret.serve import create_app

    out = tmp_path_factory.mktemp("idx") / "idx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        result = CliRunner().invoke(cli, ["index", str(photos), "--out", str(out), "--model", "test_resnet",
                                          "--weights", "none", "--max-size", "64", "-j", "0"])
        assert result.exit_code == 0, result.output
        app = create_app(out, reload_interval=0)
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(30)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="simret-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,860"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


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
