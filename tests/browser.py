"""A real browser for the tests: headless Chromium driven by Selenium through ChromeDriver (Debian's
chromium and chromium-driver unless CHROMIUM and CHROMEDRIVER name others; `make browser`
installs them). It resolves no host name but 127.0.0.1, as on an air-gapped cluster: a page that
needs a CDN shows it here, as a blank chart or a missing icon, and in `internet_requests`."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
# Where the tests save what they saw (a screenshot per page), when set.
SCREENSHOTS = os.environ.get("FLYWHEEL_SCREENSHOTS")


@contextlib.contextmanager
def chromium() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f"no {' or '.join(missing)}: run `make browser` (or set CHROMIUM and CHROMEDRIVER)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace for Chromium's sandbox
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition: Callable, timeout: float = 30, what: str = "the page"):
    """Poll `condition(driver)` until it returns something truthy; fail with the page's text. An
    element the page replaced while `condition` read it (a React re-render) means: not yet."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while True:
        try:
            found = condition(driver)
        except StaleElementReferenceException:  # the page re-rendered what it was reading: again
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            text = driver.execute_script("return document.body ? document.body.innerText : ''")
            pytest.fail(f"{what} did not render within {timeout} s; it shows:\n{text[:2000]}")
        time.sleep(0.25)


def internet_requests(driver) -> list[str]:
    """What the page asked of hosts other than this one: resources it loaded or tried to, and
    the console's name-resolution errors (the only way those fail here)."""
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    outside = [url for url in loaded if url.startswith("http") and not url.startswith("http://127.0.0.1")]
    unresolved = [
        entry["message"] for entry in driver.get_log("browser") if "ERR_NAME_NOT_RESOLVED" in entry["message"]
    ]
    return outside + unresolved


def screenshot(driver, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SCREENSHOTS) / f"{name}.png"))
