"""The page `finetune serve` shows at /: served without the API key, self-contained, and driven in headless chromium.

The browser test needs Debian's chromium and chromium-driver (.ci/run installs them) and selenium (the test
extra); it is skipped only when chromium or its driver is absent. Selenium is given both paths, so its
Selenium Manager never downloads anything.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest
from conftest import make_model_dir
from serve_helpers import ServerProcess

KEY = "page-key"
PROMPT = "Title: Lemon"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = make_model_dir(tmp_path_factory.mktemp("serve-page") / "tiny-page", dropout=False)
    process = ServerProcess("--model", model, "--api-key", KEY, "--max-batch-size", "2")
    yield process
    assert process.stop() == 0, process.log
    assert "Traceback" not in process.log, process.log


def test_the_page_is_served_without_the_key_and_loads_nothing_from_elsewhere(server):
    response = httpx.get(f"{server.url}/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in response.headers["content-security-policy"]
    page = response.text
    assert "<textarea" in page and "v1/completions" in page and "getReader" in page
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page), "the page must not load anything from outside"
    assert "EventSource" not in page
    assert httpx.get(f"{server.url}/v1/models").status_code == 401  # the API stays behind the key


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def text_of(driver, element_id: str) -> str:
    """The element's textContent exactly (WebElement.text would fold whitespace); "" while it is absent."""
    return driver.execute_script(f"const e = document.getElementById('{element_id}'); return e ? e.textContent : '';")


@needs_chromium
def test_the_page_streams_the_greedy_completion_in_a_real_browser(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    expected = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ).json()["choices"][0]["text"]
    wait = WebDriverWait(browser, 20)

    browser.get(f"{server.url}/")
    # Without the key the page says so, from the OpenAI error body; with it, it shows the model's name.
    wait.until(lambda d: "401: missing or wrong API key" in text_of(d, "error"))
    browser.find_element(By.ID, "api_key").send_keys(KEY, Keys.TAB)
    wait.until(lambda d: text_of(d, "model") == "tiny-page")
    assert text_of(browser, "error") == ""

    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    for field, value in (("max_tokens", "12"), ("temperature", "0")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: text_of(d, "completion") != "")  # streamed text appears
    wait.until(lambda d: text_of(d, "status").startswith("finish_reason: length,"))
    assert text_of(browser, "completion") == expected
    assert text_of(browser, "error") == ""

    # A refusal mid-use shows in the page too: a wrong key, then the OpenAI error message.
    key = browser.find_element(By.ID, "api_key")
    key.clear()
    key.send_keys("wrong")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: "401: missing or wrong API key" in text_of(d, "error"))
