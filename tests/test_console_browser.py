"""The web console in a real browser: headless Chromium against the real center, simulated DTUs and a meter.

Signs in with the token the center wrote, watches a DTU come online on the
overview without reloading, opens its page and sees its values in the chart,
sends a ReadTest and sees the answer, writes a meter point and sees it read
back by the next poll, and signs out. Processes: tests/console_harness.py.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.console_harness import METER, PATIENCE, chromium_available, console_fleet

PSN = 10001
missing = chromium_available()
if missing and os.environ.get("CI"):
    pytest.fail(f"CI must run the browser test: {missing}", pytrace=False)
pytestmark = pytest.mark.skipif(missing is not None, reason=missing or "")


def wait(driver: Any) -> WebDriverWait[Any]:
    """A page re-rendered by a live event replaces elements: an element gone stale is looked for again."""
    return WebDriverWait(driver, PATIENCE, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,))


def text_of(driver: Any, selector: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return " ".join(element.text for element in found)


def session_status(driver: Any) -> int:
    """What the API answers this browser's cookie now (200 signed in, 401 not)."""
    return int(driver.execute_async_script(
        "const done = arguments[0]; fetch('/api/session', {credentials: 'same-origin'}).then(r => done(r.status));"
    ))


def script_errors(driver: Any) -> list[dict[str, Any]]:
    """The pages' script errors (not failed requests: the test makes a 401 on purpose, and a center without
    discovery answers /api/pending 404)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and e["source"] != "network"]


def test_sign_in_watch_live_chart_command_write_and_sign_out(tmp_path: Path) -> None:
    with console_fleet(tmp_path) as (fleet, driver):
        fleet.start_meter()

        # Signed out, the center answers only the sign-in page; a wrong token is refused with a message.
        driver.get(fleet.url)
        token = wait(driver).until(ec.element_to_be_clickable((By.ID, "token")))
        assert not driver.find_elements(By.CSS_SELECTOR, "nav")
        token.send_keys("not-the-token")
        driver.find_element(By.ID, "signin-button").click()
        wait(driver).until(ec.visibility_of_element_located((By.ID, "signin-error")))
        assert "not valid" in driver.find_element(By.ID, "signin-error").text
        token.clear()
        token.send_keys(fleet.token)
        driver.find_element(By.ID, "signin-button").click()
        wait(driver).until(ec.text_to_be_present_in_element((By.ID, "who"), "admin"))
        wait(driver).until(ec.text_to_be_present_in_element((By.ID, "live"), "live"))
        cookie = driver.get_cookie("dtucenter_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie

        # A DTU dials in: the overview shows it without a reload (the marker set on this page stays).
        wait(driver).until(lambda d: re.fullmatch(r"0 / \d+", text_of(d, "[data-card=dtus] .value")))
        driver.execute_script("window.stillThisPage = true")
        fleet.start_dtus(PSN)
        wait(driver).until(lambda d: f"DTU {PSN} came online" in text_of(d, ".events"))
        wait(driver).until(lambda d: text_of(d, "[data-card=dtus] .value").startswith("1 / "))
        assert driver.execute_script("return window.stillThisPage") is True

        # Its page, from the DTU list: its values in the chart.
        driver.find_element(By.CSS_SELECTOR, "nav a[data-page=dtus]").click()
        wait(driver).until(ec.element_to_be_clickable((By.LINK_TEXT, str(PSN)))).click()
        wait(driver).until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "h1"), f"DTU {PSN}"))
        chart = driver.find_element(By.CSS_SELECTOR, ".chart")
        wait(driver).until(lambda d: int(chart.get_attribute("data-samples") or 0) > 0)
        assert driver.find_elements(By.CSS_SELECTOR, ".chart canvas")
        assert re.search(r"\d+ samples in range", text_of(driver, ".chart-caption"))
        # The simulator's register (1, 0) starts at 1000 and drifts a little: so do the latest values shown.
        wait(driver).until(lambda d: re.search(r"\b(9\d\d|10\d\d)\b", text_of(d, "h2 + div table")))

        # ReadTest: the DTU's answer under the form, and the command in the audit trail.
        form = driver.find_element(By.XPATH, "//form[h3[text()='ReadTest']]")
        form.find_element(By.TAG_NAME, "textarea").send_keys("1, 0")
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        answer = form.find_element(By.CSS_SELECTOR, "output")
        wait(driver).until(lambda d: answer.text.startswith("{"))
        values = json.loads(answer.text)["values"]
        assert len(values) == 1 and 900 <= values[0] <= 1100, answer.text
        wait(driver).until(lambda d: "read_test" in text_of(d, "table"))

        # A meter point written, and read back by the next poll (pushed live to the page).
        driver.find_element(By.CSS_SELECTOR, "nav a[data-page=meters]").click()
        wait(driver).until(ec.element_to_be_clickable((By.LINK_TEXT, METER))).click()
        write = wait(driver).until(ec.presence_of_element_located((By.XPATH, "//form[h3[text()='Write a point']]")))
        write.find_element(By.CSS_SELECTOR, "select option[value=setpoint]").click()
        write.find_element(By.CSS_SELECTOR, "input").send_keys("1234")
        write.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        written = write.find_element(By.CSS_SELECTOR, "output")
        wait(driver).until(lambda d: written.text.startswith("{"))
        assert "error" not in written.text.lower(), written.text
        wait(driver).until(lambda d: text_of(d, "td[data-point=setpoint]") == "1234")
        wait(driver).until(lambda d: "1234" in text_of(d, "table"))  # the write's audit trail

        # Signing out ends the session: the browser is back at the sign-in page and its cookie is refused.
        driver.find_element(By.ID, "signout").click()
        wait(driver).until(ec.element_to_be_clickable((By.ID, "token")))
        assert session_status(driver) == 401
        driver.get(fleet.url + "#/dtus")
        wait(driver).until(ec.presence_of_element_located((By.ID, "token")))
        assert not driver.find_elements(By.CSS_SELECTOR, "nav")
        assert not script_errors(driver)


def test_a_pending_device_is_found_and_adopted(tmp_path: Path) -> None:
    with console_fleet(tmp_path) as (fleet, driver):
        fleet.start_meter("864512034567891")  # a registration the center does not know: held as pending
        driver.get(fleet.url)
        wait(driver).until(ec.element_to_be_clickable((By.ID, "token"))).send_keys(fleet.token)
        driver.find_element(By.ID, "signin-button").click()
        wait(driver).until(ec.text_to_be_present_in_element((By.ID, "who"), "admin"))
        driver.find_element(By.CSS_SELECTOR, "nav a[data-page=discovery]").click()
        wait(driver).until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "h1"), "Discovery"))

        def pending_row(d: Any) -> Any:
            """The device's row once the center holds it; until then "Find" asks the center again."""
            rows = d.find_elements(By.XPATH, "//tr[td[text()='864512034567891']]")
            if not rows:
                d.find_element(By.XPATH, "//button[text()='Find']").click()
            return rows[0] if rows else None

        row = wait(driver).until(pending_row)
        row.find_element(By.CSS_SELECTOR, "select option[value='eastron-sdm120']").click()
        row.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        answer = row.find_element(By.CSS_SELECTOR, "output")
        wait(driver).until(lambda d: answer.text.startswith("{"))
        assert json.loads(answer.text)["meter"] == "864512034567891", answer.text
        # Served at once: its link is up on the links page, without the device dialling again.
        driver.find_element(By.CSS_SELECTOR, "nav a[data-page=links]").click()
        wait(driver).until(lambda d: "864512034567891" in text_of(d, "table") and "online" in text_of(d, "table"))
        assert not script_errors(driver)
