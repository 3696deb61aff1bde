"""The demo page in a real headless browser (Debian's chromium + chromium-driver, through Selenium):
it loads, shows the security mode, streams the tokens of a prompt (the CLI's tokens for the full
cache, the API's for the chosen policy) and draws the cost chart. A screenshot is saved to
``tests/artifacts/server_page.png`` (``MPCACHE_UPDATE_SCREENSHOT=1`` also copies it to
``docs/server.png``, the README's picture)."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from tests.mpcache.server_helpers import N_NEW, PROMPT, cli_result, post, shared_server

pytestmark = pytest.mark.mpc
ROOT = Path(__file__).resolve().parents[2]
ARTIFACT = ROOT / "tests" / "artifacts" / "server_page.png"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", "/usr/bin/chromedriver"
BROWSER_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--no-default-browser-check", "--window-size=1200,1500"]


def _missing() -> str | None:
    if not (os.access(CHROMEDRIVER, os.X_OK) and os.access(CHROMIUM, os.X_OK)):
        return (f"BROWSER TEST SKIPPED: {CHROMEDRIVER} / {CHROMIUM} missing — `make test` installs Debian's "
                "chromium + chromium-driver (apt-get install -y chromium chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "BROWSER TEST SKIPPED: selenium is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _missing()
    if reason:
        warnings.warn(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix="mpcache-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in [*BROWSER_FLAGS, f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _wait(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_page_streams_tokens_and_draws_the_cost_chart(browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    server = shared_server()
    cli = cli_result()
    body = {"prompt": PROMPT, "raw": True, "max_new_tokens": N_NEW, "kv_policy": "h2o", "budget": 0.5}
    api = post(server, body)
    assert api.status_code == 200, api.text

    browser.get(server.url + "/")
    el = lambda i: browser.find_element(By.ID, i)  # noqa: E731
    _wait(lambda: el("policy").find_elements(By.TAG_NAME, "option"), 30, "the policies from /v1/config")
    assert "NOT SECURE: dealer inside party 0 (TFP)" in el("security").text
    assert "insecure" in el("security").get_attribute("class")
    assert "tiny-llama" in el("model").text
    el("prompt").send_keys(PROMPT)
    el("raw").click()
    Select(el("policy")).select_by_value("h2o")
    el("budget").send_keys("0.5")
    el("max-new").clear()
    el("max-new").send_keys(str(N_NEW))
    el("compare").click()
    el("generate").click()
    # tokens stream in: the first one shows while the request is still running
    _wait(lambda: el("tokens").get_attribute("data-ids") != "[]", 300, "the first streamed token")
    assert el("status").get_attribute("data-state") in ("running", "done")
    state = _wait(lambda: (s := el("status").get_attribute("data-state")) in ("done", "error", "cancelled") and s,
                  400, "the end of the generation")
    assert state == "done", el("status").text
    import json
    assert json.loads(el("tokens").get_attribute("data-ids")) == api.json()["tokens"]
    assert json.loads(el("full-tokens").get_attribute("data-ids")) == cli["tokens"]  # full cache = the CLI's run
    assert el("text").text.strip() == api.json()["text"].strip()
    # the chart: one bar per token and run, in both series' colours
    assert el("chart").get_attribute("data-bars") == str(2 * N_NEW)
    colours = browser.execute_script("""
        const c = document.getElementById('chart'), g = c.getContext('2d');
        const d = g.getImageData(0, 0, c.width, c.height).data; let blue = 0, orange = 0;
        for (let i = 0; i < d.length; i += 4) {
          if (d[i] < 80 && d[i + 1] > 90 && d[i + 1] < 130 && d[i + 2] > 190) blue++;
          if (d[i] > 200 && d[i + 1] > 120 && d[i + 1] < 160 && d[i + 2] < 60) orange++;
        }
        return [blue, orange];""")
    assert colours[0] > 200 and colours[1] > 200, colours
    rows = browser.find_elements(By.CSS_SELECTOR, "#costs tbody tr")
    assert len(rows) == 2 * N_NEW
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(ARTIFACT)) and ARTIFACT.stat().st_size > 10_000
    if os.environ.get("MPCACHE_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(ARTIFACT, ROOT / "docs" / "server.png")
