"""``python -m benchmarks.screenshots``: the console's screenshots in docs/console/, taken anew.

Starts the real center, simulated DTUs and a simulated meter
(tests/console_harness.py), lets them run for three minutes so the charts have
something to draw, signs in with headless Chromium and saves each main page
as a PNG, at desktop and phone width. docs/console.md shows them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.console_harness import METER, PATIENCE, chromium_available, console_fleet, wait_for

OUT = Path(__file__).resolve().parent.parent / "docs" / "console"
FIRST_PSN = 10001


def sign_in(driver: Any, url: str, token: str) -> None:
    driver.get(url)
    field = WebDriverWait(driver, PATIENCE).until(expected_conditions.element_to_be_clickable((By.ID, "token")))
    field.send_keys(token)
    driver.find_element(By.ID, "signin-button").click()
    WebDriverWait(driver, PATIENCE).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "nav")))


def show(driver: Any, page: str, ready: str) -> None:
    """Open ``page`` and wait until ``ready`` (a CSS selector) is on it."""
    driver.execute_script("window.location.hash = arguments[0]", page)
    WebDriverWait(driver, PATIENCE).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ready)))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.screenshots", description=__doc__)
    parser.add_argument("--warm-up", type=float, default=180.0, help="seconds of data before the shots (default 180)")
    args = parser.parse_args()
    missing = chromium_available()
    if missing:
        raise SystemExit(missing)
    OUT.mkdir(parents=True, exist_ok=True)
    with console_fleet() as (fleet, driver):
        fleet.start_dtus(FIRST_PSN, count=25, interval=2)
        fleet.start_meter()
        fleet.start_meter("864512034567891")  # unknown: waits on the Discovery page
        started = time.monotonic()
        sign_in(driver, fleet.url, fleet.token)
        # Let the charts fill: the center stores what the simulators send meanwhile.
        wait_for(lambda: time.monotonic() - started > args.warm_up, "the warm-up", timeout=args.warm_up + PATIENCE)
        shots = [
            ("overview", "#/overview", "[data-card=dtus] .value:not(:empty)"),
            ("dtus", "#/dtus", "tbody tr"),
            ("dtu", f"#/dtus/{FIRST_PSN}", ".chart canvas"),
            ("meter", f"#/meters/{METER}", ".chart canvas"),
            ("links", "#/links", "tbody tr"),
            ("discovery", "#/discovery", "tbody tr"),
        ]
        for width, height, suffix in ((1280, 900, ""), (390, 844, "-phone")):
            driver.set_window_size(width, height)
            for name, page, ready in shots:
                show(driver, page, ready)
                if name == "overview":  # the numbers come with the first summary
                    wait_for(lambda: "…" not in driver.find_element(By.CSS_SELECTOR, "[data-card=dtus] .value").text,
                             "the overview's numbers")
                if name in ("dtu", "meter"):  # the minutes the simulators have run, not an hour mostly empty
                    driver.find_element(By.CSS_SELECTOR, ".chart-section select option[value='300']").click()
                    wait_for(lambda: "samples in range" in driver.find_element(By.CSS_SELECTOR, ".chart-caption").text,
                             "the chart")
                # The page has drawn once its chart (or list) is there; the summary comes within one interval.
                wait_for(lambda: driver.execute_script("return document.readyState") == "complete", "the page")
                driver.execute_script("window.scrollTo(0, 0)")
                path = OUT / f"{name}{suffix}.png"
                if name in ("dtu", "meter") and not suffix:
                    height_needed = driver.execute_script("return document.body.scrollHeight")
                    driver.set_window_size(width, min(int(height_needed) + 100, 2400))
                driver.save_screenshot(str(path))
                driver.set_window_size(width, height)
                print(path.relative_to(OUT.parent.parent))
        # Last, the sign-in page, signed out.
        driver.find_element(By.ID, "signout").click()
        WebDriverWait(driver, PATIENCE).until(expected_conditions.presence_of_element_located((By.ID, "token")))
        driver.set_window_size(1280, 700)
        driver.save_screenshot(str(OUT / "signin.png"))
        print((OUT / "signin.png").relative_to(OUT.parent.parent))


if __name__ == "__main__":
    main()
