"""The search page of `simret serve --support DIR` in a real browser (headless Chromium driven by Selenium, as in
tests/test_serve_browser.py): an uploaded image gets its predicted class under the query, as POST /classify
answers it; a result clicked (an indexed image, not an upload) shows none."""
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
def digits(tmp_path_factory):
    """``support/digit_{0..2}/`` (4 examples each) and ``queries/`` (the other 2 of each), also indexed."""
    from simret.data.samples import write_fewshot_sample

    root = tmp_path_factory.mktemp("digits")
    write_fewshot_sample(root / "all", splits={"train": [0, 1, 2]}, per_class=6, image_size=32)
    for folder in sorted((root / "all" / "train").iterdir()):
        for n, image in enumerate(sorted(folder.iterdir())):
            target = root / ("queries" if n >= 4 else "support") / folder.name / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, target)
    return root


@pytest.fixture(scope="module")
def server(digits, tmp_path_factory):
    """A live server with a support set on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    from simret.serve import create_app

    out = tmp_path_factory.mktemp("idx") / "idx"
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("ignore", RandomWeightsWarning)
        patch.setenv("SIMRET_CACHE", str(tmp_path_factory.mktemp("cache")))
        result = CliRunner().invoke(cli, ["index", str(digits / "queries"), "--out", str(out), "--model",
                                          "test_resnet", "--weights", "none", "--max-size", "64", "-j", "0"])
        assert result.exit_code == 0, result.output
        app = create_app(out, reload_interval=0, support=digits / "support")
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
