"""The console in a real browser: Debian's headless Chromium driven through its WebDriver
(chromium-driver, installed by scripts/test.sh; nothing is downloaded).

Each page is screenshotted, on a laptop-sized and a phone-sized window, into
``$TENSAFE_TEST_ARTIFACTS/console`` (else a pytest temporary folder, printed).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tensafe.client.demo import TenantCredentials
from tests.console.conftest import BASE_MODEL, Stack, step

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_SECONDS = 60


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = os.environ.get("TENSAFE_TEST_ARTIFACTS")
    folder = Path(root) / "console" if root else tmp_path_factory.mktemp("console-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"console screenshots: {folder}")
    return folder


@pytest.fixture
def driver() -> Iterator[WebDriver]:
    assert shutil.which("chromium") and Path(CHROMEDRIVER).exists(), (
        "run scripts/test.sh (it installs Debian's chromium and chromium-driver)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield browser
    finally:
        browser.quit()


def wait(driver: WebDriver) -> WebDriverWait[WebDriver]:
    return WebDriverWait(driver, WAIT_SECONDS, poll_frequency=0.1)


def sign_in(driver: WebDriver, stack: Stack, api_key: str) -> None:
    """Type the key into the sign-in form, as a user does."""
    driver.get(stack.console_url + "/login")
    field = driver.find_element(By.ID, "api_key")
    assert driver.find_element(By.CSS_SELECTOR, "label[for=api_key]").text == "API key"
    field.send_keys(api_key)
    field.submit()
    wait(driver).until(lambda d: d.current_url.endswith("/runs"))


def shoot(driver: WebDriver, folder: Path, name: str) -> None:
    """A laptop-sized and a phone-sized screenshot of the current page."""
    driver.set_window_size(1280, 900)
    assert driver.save_screenshot(str(folder / f"{name}.png"))
    driver.set_window_size(390, 844)
    assert driver.save_screenshot(str(folder / f"{name}-phone.png"))
    # On a phone the page must not scroll sideways (tables scroll in their own box).
    overflow = driver.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 1, f"{name}: {overflow}px of sideways scrolling on a phone"
    driver.set_window_size(1280, 900)


def points(driver: WebDriver) -> int:
    return int(driver.find_element(By.ID, "chart").get_attribute("data-points") or 0)


def test_a_tenant_watches_a_run_and_opens_its_package(
    stack: Stack, trained: dict[str, Any], driver: WebDriver, screenshots: Path
) -> None:
    sign_in(driver, stack, stack.tenant.api_key)
    table = driver.find_element(By.TAG_NAME, "table").text
    assert trained["client_id"] in table and "tiny-llama" in table
    assert driver.find_element(By.CSS_SELECTOR, "meter").get_attribute("aria-label")
    shoot(driver, screenshots, "runs")

    with stack.service(stack.tenant) as service:
        client = service.create_lora_training_client(
            base_model=BASE_MODEL, rank=4, seed=2, target_epsilon=4.0, planned_steps=20
        )
        driver.get(f"{stack.console_url}/runs/{client.model_id}")
        wait(driver).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chart canvas"))
        assert points(driver) == 0  # no step yet

        # Each optimizer step shows up as a new point while the page stays open.
        for number in (1, 2, 3):
            step(client, 1)
            wait(driver).until(lambda d, n=number: points(d) == n)
        assert driver.find_element(By.ID, "step-count").text == "3"
        status = driver.find_element(By.ID, "chart-status").text
        epsilon = client.get_privacy_spent().epsilon
        assert f"ε {epsilon:.3f}" in status, status
        bar = driver.find_element(By.CSS_SELECTOR, "#privacy-bar .bar-text").text
        assert bar == f"ε {epsilon:.3f} / 4.000", bar  # the budget bar followed the run
        assert driver.find_element(By.ID, "dp-steps").text == "3"
        shoot(driver, screenshots, "run")

        # A reopened page draws the whole run at once, from the trainer's history.
        driver.get(f"{stack.console_url}/runs/{client.model_id}")
        wait(driver).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chart canvas"))
        assert points(driver) == 3

    driver.get(f"{stack.console_url}/registry")
    assert trained["adapter"] in driver.find_element(By.TAG_NAME, "table").text
    shoot(driver, screenshots, "registry")
    driver.find_element(By.LINK_TEXT, trained["adapter"]).click()
    shoot(driver, screenshots, "adapter")
    driver.find_element(By.LINK_TEXT, f"v{trained['version']}").click()
    assert driver.find_element(By.ID, "verification").text.endswith("signature OK")
    certificate = driver.find_element(By.ID, "certificate-epsilon").text
    assert certificate.startswith(f"ε = {trained['epsilon']:.3f}"), certificate
    shoot(driver, screenshots, "package")

    for path, name in (("/datasets", "datasets"), ("/privacy-audits", "privacy-audits")):
        driver.get(stack.console_url + path)
        assert driver.find_element(By.TAG_NAME, "h1").text
        shoot(driver, screenshots, name)

    # Keyboard: the first Tab lands on the skip link, which leads to the content.
    driver.find_element(By.TAG_NAME, "body").send_keys("\ue004")
    assert driver.switch_to.active_element.text == "Skip to content"

    driver.find_element(By.CSS_SELECTOR, "form.logout button").click()
    wait(driver).until(lambda d: d.current_url.endswith("/login"))
    driver.get(f"{stack.console_url}/runs")
    assert driver.current_url.endswith("/login")


def test_another_tenants_run_is_not_found(
    stack: Stack, trained: dict[str, Any], driver: WebDriver, screenshots: Path
) -> None:
    other: TenantCredentials = stack.other_tenant
    sign_in(driver, stack, other.api_key)
    assert trained["client_id"] not in driver.page_source
    driver.get(f"{stack.console_url}/runs/{trained['client_id']}")
    assert driver.find_element(By.TAG_NAME, "h1").text == "Not found"
    shoot(driver, screenshots, "not-found")


def test_the_admin_verifies_the_chain_and_forged_forms_are_refused(
    stack: Stack, trained: dict[str, Any], driver: WebDriver, screenshots: Path
) -> None:
    sign_in(driver, stack, str(stack.connection["api_key"]))  # the platform admin
    driver.get(f"{stack.console_url}/audit")
    assert "token.issued" in driver.find_element(By.TAG_NAME, "table").text
    driver.find_element(By.ID, "verify-chain").click()
    verdict = wait(driver).until(lambda d: d.find_elements(By.ID, "verdict"))[0]
    assert verdict.text.startswith("✔ Chain verified:") or verdict.text.startswith(
        "Chain verified:"
    ), verdict.text
    assert driver.current_url.endswith("/audit")  # htmx swapped the verdict in place
    shoot(driver, screenshots, "audit")

    # A forged token in the form, then none at all: both refused with 403.
    for script in (
        "document.querySelector('form[action=\"/audit/verify\"] input[name=csrf_token]')"
        ".value = 'forged';",
        "document.querySelector('form[action=\"/audit/verify\"] input[name=csrf_token]').remove();",
    ):
        driver.get(f"{stack.console_url}/audit")
        driver.execute_script(script)
        # Submit as a plain form (no htmx) so the 403 page itself is shown.
        driver.execute_script(
            "HTMLFormElement.prototype.submit.call("
            "document.querySelector('form[action=\"/audit/verify\"]'));"
        )
        wait(driver).until(lambda d: d.find_element(By.TAG_NAME, "h1").text == "Forbidden")
        assert "CSRF token is missing or wrong" in driver.page_source
    shoot(driver, screenshots, "csrf-refused")
