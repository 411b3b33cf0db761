"""Listeners hold a fleet's redial: the kernel's accept queue of each real listening socket.

With Twisted's default backlog of 50, a fleet that redialled at once lost 6-9% of its logins
(the kernel dropped the SYNs it had no room for).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import pytest_twisted

from dtucenter.listeners import DEFAULT_LISTEN_BACKLOG
from tests.support import start_center

SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


def listen_backlog(port: int) -> int:
    """The backlog of the socket listening on ``port``: ``ss`` shows it as Send-Q of a listening socket."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], check=True, capture_output=True, text=True
    ).stdout.split("\n")
    rows = [line.split() for line in out if line.strip()]
    assert len(rows) == 1, out
    state, _recv_q, send_q, *_ = rows[0]
    assert state == "LISTEN", rows
    return int(send_q)


def expected(backlog: int) -> int:
    """What the kernel keeps of a requested backlog: it silently caps it at net.core.somaxconn."""
    return min(backlog, int(SOMAXCONN.read_text()))


MODBUS_CONFIG = """
[[link]]
name = "site-a"
registration = "DTU-0001"

[[link]]
name = "yard"
listen = "tcp:0:interface=127.0.0.1"
"""


@pytest.fixture(autouse=True)
def _needs_room() -> None:
    if expected(DEFAULT_LISTEN_BACKLOG) <= 50:
        pytest.skip("net.core.somaxconn is at or below Twisted's default backlog: nothing to tell apart")


@pytest_twisted.ensureDeferred
async def test_every_listener_defaults_to_a_backlog_for_a_fleets_redial(tmp_path: Path) -> None:
    config = tmp_path / "center.toml"
    config.write_text(MODBUS_CONFIG)
    center = await start_center(
        tmp_path, "--config", str(config), "--modbus", "tcp:0:interface=127.0.0.1",
        "--modbus-server", "tcp:0:interface=127.0.0.1",
    )
    try:
        assert center.api_port is not None
        scada = center.service.getServiceNamed("modbus-server")
        ports = {
            "dtu": center.tcp_port, "api": center.api_port,
            "modbus": await center.modbus_port(), "modbus link": await center.modbus_port("yard"),
            "modbus server": (await scada.when_listening()).getHost().port,  # type: ignore[attr-defined]
        }
        backlogs = {name: listen_backlog(port) for name, port in ports.items()}
        assert backlogs == dict.fromkeys(ports, expected(DEFAULT_LISTEN_BACKLOG))
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_a_backlog_in_the_endpoint_string_is_kept(tmp_path: Path) -> None:
    center = await start_center(tmp_path, "--dtu", "tcp:0:interface=127.0.0.1:backlog=17")
    try:
        assert listen_backlog(center.tcp_port) == 17
    finally:
        await center.stop()
