"""The README works as written: every command in it, in its order, against a center on loopback.

The README's code blocks are parsed, not copied, so an example that changes
is tested as it now reads. Fixed ports become the test's (port 0 where the
README says 20000, 20101 or 8080); ``twistd -n dtucenter ARGS`` (re)starts an
in-process center with ARGS in a scratch directory, which is also where the
``dtucenter`` commands run, so both use the README's default ``dtucenter.db``
and ``dtucenter.token``. A ``curl`` is sent with the real HTTP client and its
answer must have the shape of the JSON the README shows under it (the same
keys and kinds of values; times and readings differ). ``dtucenter-sim``
runs as a real process until what it plays is seen in the center. Only
``python3 -m venv``, ``pip``, ``pytest``, ``mypy`` and ``ruff`` (this test's own
environment and checks) and ``dtucenter-sim bridge`` (it needs a serial
device) are not run.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from zope.interface import provider

from dtucenter import cli
from tests.support import RunningCenter, end_process_group, eventually, start_center, start_process

README = Path(__file__).parent.parent / "README.md"
#: The README's ports and what they are.
DTU_PORT, MODBUS_PORT, API_PORT = "20000", "20101", "8080"


def readme_blocks() -> tuple[list[list[str]], str]:
    """The README's indented code blocks (continuation lines joined) and its TOML block."""
    text = README.read_text()
    toml = re.search(r"```toml\n(.*?)```", text, re.S)
    assert toml is not None
    blocks: list[list[str]] = []
    current: list[str] | None = None
    previous_blank = True
    for line in text.replace("\\\n", " ").split("\n"):
        if line.startswith("    ") and (current is not None or previous_blank):
            if current is None:
                current = []
                blocks.append(current)
            current.append(" ".join(line.split()))
        elif line.strip():
            current = None
        previous_blank = not line.strip()
    return blocks, toml.group(1)


def readme_steps() -> Iterator[tuple[str, list[str], str | None]]:
    """(kind, argv, the JSON shown after it) for each command, in the README's order."""
    blocks, _ = readme_blocks()
    for block in blocks:
        for index, line in enumerate(block):
            if line.startswith("{"):
                continue
            shown = block[index + 1] if index + 1 < len(block) and block[index + 1].startswith("{") else None
            for command in line.split(" && "):
                argv = shlex.split(command.replace("$(cat dtucenter.token)", "TOKEN"))
                program = Path(argv[0]).name
                if program in ("python3", "python", "pip", "mypy", "ruff"):  # the set-up's environment and checks
                    continue
                kind = {"twistd": "center", "dtucenter": "cli", "dtucenter-sim": "sim", "curl": "curl"}[program]
                yield kind, argv, shown


def test_the_readme_parses_into_the_commands_it_shows() -> None:
    """Guards the parser: a README whose examples the parser missed would make the test below pass vacuously."""
    kinds = [(kind, argv[1] if kind in ("cli", "sim") else "") for kind, argv, _ in readme_steps()]
    assert kinds.count(("center", "")) == 3 and kinds.count(("curl", "")) == 4
    assert ("sim", "dtu") in kinds and ("sim", "modbus") in kinds and kinds.count(("cli", "samples")) == 2
    assert all(shown is not None for kind, _, shown in readme_steps() if kind == "curl")


def same_shape(shown: Any, got: Any) -> bool:
    """``got`` has ``shown``'s keys and kinds of values; lists have its length unless ``shown`` has one item."""
    if isinstance(shown, dict):
        return isinstance(got, dict) and shown.keys() == got.keys() and all(
            same_shape(shown[k], got[k]) for k in shown)
    if isinstance(shown, list):
        return isinstance(got, list) and bool(got) and (len(shown) == 1 or len(got) == len(shown)) and all(
            same_shape(shown[0], item) for item in got)
    if isinstance(shown, bool) or shown is None:
        return isinstance(got, bool) or got is None
    if isinstance(shown, (int, float)):
        return isinstance(got, (int, float)) and not isinstance(got, bool)
    return isinstance(got, type(shown))


class Readme:
    """Runs the steps; holds the center and the simulators they started."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.center: RunningCenter | None = None
        self.sims: list[subprocess.Popen[bytes]] = []
        _, toml = readme_blocks()
        # The README's fixed Modbus port becomes a free one on loopback.
        (tmp_path / "center.toml").write_text(
            toml.replace(f'"tcp:{MODBUS_PORT}"', '"tcp:0:interface=127.0.0.1"'))

    async def start_center(self, args: list[str]) -> None:
        await self.stop()
        self.center = await start_center(self.dir, *args, db_url=f"sqlite:///{self.dir / 'dtucenter.db'}")

    async def stop(self) -> None:
        for sim in self.sims:
            end_process_group(sim)
        self.sims.clear()
        if self.center is not None:
            await self.center.stop()
            self.center = None

    def token(self) -> str:
        return (self.dir / "dtucenter.token").read_text().strip()

    async def port_for(self, readme_port: str) -> int:
        assert self.center is not None
        if readme_port == DTU_PORT:
            return self.center.tcp_port
        if readme_port == MODBUS_PORT:
            return await self.center.modbus_port()
        assert readme_port == API_PORT and self.center.api_port is not None
        return self.center.api_port

    async def curl(self, argv: list[str], shown: str) -> None:
        assert self.center is not None
        method, body, url = "GET", None, ""
        rest = iter(argv[1:])
        for arg in rest:
            if arg == "-X":
                method = next(rest)
            elif arg == "-d":
                body = json.loads(next(rest))
            elif arg == "-H":
                assert next(rest) == "Authorization: Bearer TOKEN"
            elif arg.startswith("http://"):
                url = arg
        assert self.center.api_token == self.token()
        path = url.removeprefix(f"http://127.0.0.1:{API_PORT}")
        expected = json.loads(shown)
        response = await self.center.api(token=self.token()).call(method, path, body)
        assert response.status == 200, (url, response.body)
        assert same_shape(expected, response.body), (url, shown, response.body)

    async def sim(self, argv: list[str]) -> None:
        assert self.center is not None
        for index, arg in enumerate(argv):
            if arg == "--server":
                host, port = argv[index + 1].rsplit(":", 1)
                argv[index + 1] = f"{host}:{await self.port_for(port)}"
        script = Path(sys.executable).parent / "dtucenter-sim"
        self.sims.append(start_process([str(script), *argv[1:], "--quiet"], cwd=self.dir,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        api = self.center.api(token=self.token())
        if argv[1] == "dtu":
            count = int(argv[argv.index("--count") + 1])

            async def all_online() -> bool:
                dtus = (await api.get("/api/dtus")).body["dtus"]
                uploaded = (await api.get(f"/api/dtus/{argv[argv.index('--psn') + 1]}/latest")).body["samples"]
                return sum(d["online"] for d in dtus) == count and bool(uploaded)

            await eventually(all_online, f"{count} simulated DTUs online and uploading", timeout=120)
            counters = (await api.get("/api/status")).body["counters"]
            assert counters.get("logins_refused", 0) == 0, counters
        else:
            async def meters_stored() -> bool:
                listing = (await api.get("/api/meters")).body["meters"]
                for meter in listing:
                    if not (await api.get(f"/api/meters/{meter['name']}/latest")).body["samples"]:
                        return False
                return bool(listing)

            await eventually(meters_stored, "a stored value of every meter", timeout=120)


@pytest_twisted.ensureDeferred
async def test_every_readme_command_works_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # where the README's commands find dtucenter.db and dtucenter.token
    monkeypatch.delenv("DTUCENTER_API_TOKEN", raising=False)
    complaints: list[str] = []

    @provider(ILogObserver)
    def warnings(event: LogEvent) -> None:
        if event.get("log_level", LogLevel.debug) >= LogLevel.warn:
            complaints.append(formatEvent(event))

    readme = Readme(tmp_path)
    printed = ""
    globalLogPublisher.addObserver(warnings)
    try:
        for kind, argv, shown in readme_steps():
            if kind == "center":
                await readme.start_center(argv[argv.index("dtucenter") + 1:])
            elif kind == "cli":
                assert cli.main(argv[1:]) == 0, argv
                printed, errors = capsys.readouterr()
                assert errors == ""
            elif kind == "curl":
                assert shown is not None
                await readme.curl(argv, shown)
            elif argv[1] == "bridge":
                continue  # needs a serial device
            else:
                await readme.sim(argv)
        # The last CLI command printed the simulated meter's voltages.
        lines = printed.splitlines()
        assert lines[0] == "time,meter,point,value" and lines[-1].split(",")[1:3] == ["meter-1", "voltage"]
    finally:
        globalLogPublisher.removeObserver(warnings)
        await readme.stop()
    # Nothing refused, locked out or otherwise worth a warning, but the meter's first polls before its DTU dialed in.
    assert [c for c in complaints if c != "Meter meter-1: link site-a is offline"] == []
