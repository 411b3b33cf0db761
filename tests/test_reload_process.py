"""SIGHUP to a real ``twistd dtucenter`` process, on SQLite and PostgreSQL: the edited file's new
link accepts its DTU, the removed link's connection is closed, a meter's new points are used
from its next poll, a restart-only change is logged, and a file that does not read leaves the
center running as it was."""

from __future__ import annotations

import re
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest_twisted
from pymodbus.framer import FramerType
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol

from tests.modbus.interop_support import FakeDtu, PymodbusServer
from tests.modbus.test_e2e_center import latest_poll
from tests.modbus.test_templates import SDM120_VALUES, sdm120
from tests.support import ApiClient, end_process_group, eventually, start_process
from tests.test_reload import TEMPLATE_METER, VOLTS_METER, config_text, link

TWISTD = str(Path(sys.executable).parent / "twistd")

#: Each step waits this long at most: a real process on a busy machine, not a budget.
WAIT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LogFile:
    def __init__(self, path: Path, process: subprocess.Popen[bytes]) -> None:
        self.path = path
        self.process = process

    def text(self) -> str:
        return self.path.read_text(errors="replace") if self.path.exists() else ""

    async def wait_for(self, pattern: str, after: int = 0) -> re.Match[str]:
        """``pattern`` in the log past character ``after``; fails at once should the process end."""

        async def found() -> re.Match[str] | None:
            assert self.process.poll() is None, f"the center exited:\n{self.text()[-3000:]}"
            return re.search(pattern, self.text()[after:])

        match: re.Match[str] = await eventually(found, f"{pattern!r} in the log", timeout=WAIT)
        return match


@pytest_twisted.ensureDeferred
async def test_sighup_applies_the_edited_file_to_the_running_process(tmp_path: Path, db_url: str) -> None:
    bus = PymodbusServer([sdm120(1)], framer=FramerType.RTU).start()
    modbus_port, api_port, token = free_port(), free_port(), secrets.token_urlsafe()
    config = tmp_path / "center.toml"
    listen = f"tcp:{modbus_port}:interface=127.0.0.1"
    config.write_text(config_text(listen, link("site-a", "DTU-A") + link("site-b", "DTU-B"), TEMPLATE_METER))
    log_path = tmp_path / "center.log"
    with (tmp_path / "stderr.txt").open("wb") as err:
        process = start_process(
            [TWISTD, "-n", "--pidfile=", f"--logfile={log_path}", "dtucenter", "--config", str(config),
             "--dtu", "tcp:0:interface=127.0.0.1", "--api", f"tcp:{api_port}:interface=127.0.0.1",
             "--api-token", token, "--db", db_url],
            cwd=tmp_path, stdout=err, stderr=err,
        )
    log = LogFile(log_path, process)
    dtus = {name: FakeDtu(registration=name.encode()) for name in ("DTU-A", "DTU-B", "DTU-C")}
    try:
        await log.wait_for(r"Link site-b added")  # logged as the bridge is built, before its listener is bound:
        await eventually(lambda: accepting(modbus_port), "the shared listener accepting", timeout=WAIT)
        api = ApiClient(f"http://127.0.0.1:{api_port}", token)
        for name in ("DTU-A", "DTU-B"):
            await dtus[name].start(modbus_port, bus.port)
        stored = await eventually(lambda: latest_poll(api, "m1"), "m1 polled", timeout=WAIT)
        assert stored == SDM120_VALUES

        # site-b gone, site-c new, m1's points changed, and a setting that needs a restart.
        mark = len(log.text())
        config.write_text(config_text(
            listen, link("site-a", "DTU-A") + link("site-c", "DTU-C"), VOLTS_METER, "max_frame_length = 2048"
        ))
        process.send_signal(signal.SIGHUP)
        await log.wait_for(r"Reloaded .*center\.toml: links 1 added, 0 changed, 1 removed; meters 0 added, "
                           r"1 changed, 0 removed; settings applied: none; waiting for a restart: max_frame_length",
                           after=mark)
        await log.wait_for(r"center\.toml: max_frame_length changed; it takes effect at the next restart", after=mark)
        closed = dtus["DTU-B"].center
        assert closed is not None
        await closed.lost  # the removed link's connection is closed by the center
        await dtus["DTU-C"].start(modbus_port, bus.port)

        async def site_c_online() -> bool:
            return bool((await api.get("/api/links/site-c")).body.get("online"))

        await eventually(site_c_online, "the new link's DTU accepted", timeout=WAIT)
        volts = {"volts": SDM120_VALUES["voltage"]}

        async def new_points_polled() -> bool:
            return await latest_poll(api, "m1") == volts

        await eventually(new_points_polled, "m1 polled with its new points", timeout=WAIT)
        assert (await api.get("/api/links/site-b")).status == 404

        # A file that does not read: one line naming the file, table and key; nothing changes.
        mark = len(log.text())
        broken = VOLTS_METER.replace("unit = 1", "unit = 0")
        config.write_text(config_text(listen, link("site-a", "DTU-A"), broken))
        process.send_signal(signal.SIGHUP)
        await log.wait_for(r"Reload not applied, the center runs on as it was: .*center\.toml: "
                           r"meter \"m1\": unit: an rtu unit id is 1\.\.247, got 0", after=mark)
        assert "Reloaded" not in log.text()[mark:]
        assert (await api.get("/api/links/site-c")).body["online"] is True
        polls = len((await api.get("/api/meters/m1/samples?limit=100000")).body["samples"])

        async def still_polling() -> bool:
            return len((await api.get("/api/meters/m1/samples?limit=100000")).body["samples"]) > polls

        await eventually(still_polling, "m1 still polled after the broken file", timeout=WAIT)
        assert process.poll() is None
    finally:
        for dtu in dtus.values():
            await dtu.stop()
        end_process_group(process)
        bus.stop()


async def accepting(port: int) -> bool:
    """Whether a TCP connection to ``port`` on loopback is accepted (then closed at once)."""
    try:
        connected = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol())
    except ConnectionRefusedError:
        return False
    connected.transport.loseConnection()
    return True
