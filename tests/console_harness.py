"""The real center, simulated DTUs and a meter, and headless Chromium: for the console's browser test and screenshots.

Everything runs as real processes: ``twistd dtucenter`` with a Modbus link and
meter in its config, ``dtucenter-sim dtu`` and ``dtucenter-sim modbus``, and
Debian's ``chromium`` driven through ``chromium-driver`` by selenium. Each is
started in a process group of its own and ended with its whole group when
the harness closes, pass or fail (tests/support.py).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.procs import free_port
from tests.support import end_process_group, start_process

VENV_BIN = Path(sys.executable).parent
#: Seconds the browser or the center may take for one step before the test fails rather than hangs: a hang,
#: not a slow machine.
PATIENCE = 120.0
#: The flags the issue names: no sandbox (root in CI), no GPU, nothing fetched or synced in the background.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
)

METER = "meter-1"
LINK = "site-a"
REGISTRATION = "DTU-0001"
CONFIG = f"""
[modbus]
listen = "tcp:{{modbus_port}}:interface=127.0.0.1"

[[link]]
name = "{LINK}"
registration = "{REGISTRATION}"
heartbeat = "HB"

[[meter]]
name = "{METER}"
link = "{LINK}"
unit = 1
interval = 2

[[meter.point]]
name = "voltage"
table = "holding"
address = 0
scale = 0.1
unit = "V"

[[meter.point]]
name = "setpoint"
table = "holding"
address = 10
"""


def chromium_available() -> str | None:
    """Why the browser cannot run here, or None if it can."""
    for program in ("chromium", "chromedriver"):
        if shutil.which(program) is None:
            return f"{program} is not installed (Debian: apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def wait_for(condition: Callable[[], Any], what: str, timeout: float = PATIENCE) -> Any:
    """``condition()`` until it is true (returns it); the harness's processes are polled, not slept on for a budget."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:.0f}s")
        time.sleep(0.1)


class Fleet:
    """The center and its simulators as processes, in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.api_port = free_port()
        self.dtu_port = free_port()
        self.modbus_port = free_port()
        self.processes: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self.token = ""
        self.url = ""

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            process = start_process(argv, cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT)
        self.processes.append((name, process, log))
        return process

    def log_tail(self) -> str:
        return "\n".join(f"--- {name}:\n" + log.read_text(errors="replace")[-3000:] for name, _, log in self.processes)

    def start_center(self) -> None:
        config = self.workdir / "center.toml"
        config.write_text(CONFIG.format(modbus_port=self.modbus_port))
        center = self._start("center", [
            str(VENV_BIN / "twistd"), "-n", "--pidfile=", "dtucenter", "--unknown-dtu", "accept",
            "--config", str(config), "--db", f"sqlite:///{self.workdir / 'dtucenter.db'}",
            "--dtu", f"tcp:{self.dtu_port}:interface=127.0.0.1", "--api", f"tcp:{self.api_port}:interface=127.0.0.1",
        ])
        token_file = self.workdir / "dtucenter.token"

        def listening() -> bool:
            if center.poll() is not None:
                raise AssertionError(f"the center exited with {center.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.api_port), timeout=1):
                return token_file.exists()
            return False

        wait_for(listening, "the center to listen")
        self.token = token_file.read_text().strip()
        # The URL a user is told to open: the one the center logs.
        log = self.workdir / "center.log"
        found = wait_for(lambda: re.search(r"Web console: (\S+)", log.read_text(errors="replace")), "the console's URL")
        self.url = found.group(1)

    def start_dtus(self, psn: int, count: int = 1, interval: float = 2.0) -> None:
        self._start(f"sim-dtu-{psn}", [
            str(VENV_BIN / "dtucenter-sim"), "dtu", "--server", f"127.0.0.1:{self.dtu_port}", "--count", str(count),
            "--psn", str(psn), "--values", "4", "--interval", str(interval), "--quiet",
        ])

    def start_meter(self, registration: str = REGISTRATION) -> None:
        self._start(f"sim-meter-{registration}", [
            str(VENV_BIN / "dtucenter-sim"), "modbus", "--server", f"127.0.0.1:{self.modbus_port}",
            "--registration", registration, "--heartbeat", "HB", "--units", "1", "--quiet",
        ])

    def close(self) -> None:
        for _, process, _ in reversed(self.processes):
            end_process_group(process)


def chromium(user_data: Path, width: int = 1280, height: int = 900) -> Any:
    """Headless Debian Chromium through its chromedriver, with a fresh profile in ``user_data``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data}")
    options.add_argument(f"--window-size={width},{height}")
    # chromedriver in a process group of its own (the browser is its child), ended with it.
    service = Service(shutil.which("chromedriver") or "chromedriver", popen_kw={"start_new_session": True})
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(PATIENCE)
    driver.set_script_timeout(PATIENCE)
    return driver


def quit_chromium(driver: Any) -> None:
    """Ends the browser and its driver, and whatever of their process group is left."""
    process = driver.service.process
    try:
        driver.quit()
    finally:
        if process is not None:
            end_process_group(process)


@contextlib.contextmanager
def console_fleet(workdir: Path | None = None, width: int = 1280, height: int = 900) -> Iterator[tuple[Fleet, Any]]:
    """A running center (no DTU yet) and a browser; everything ended afterwards, pass or fail."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dtucenter-console-")))
        fleet = Fleet(workdir)
        stack.callback(fleet.close)
        fleet.start_center()
        profile = workdir / "chromium-profile"
        profile.mkdir()
        driver = chromium(profile, width, height)
        stack.callback(quit_chromium, driver)
        yield fleet, driver
