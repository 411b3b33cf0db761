"""How the center starts the Modbus bridge: --modbus and the config tables, bad config, ports in use."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock

from dtucenter.tap import Options, makeService
from tests.support import run_twistd

LINK = """
[[link]]
name = "site-a"
registration = "DTU-0001"

[[meter]]
name = "m1"
link = "site-a"
unit = 1

[[meter.point]]
name = "voltage"
table = "holding"
address = 0
"""


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "center.toml"
    path.write_text(text)
    return str(path)


def options(tmp_path: Path, *args: str) -> Options:
    parsed = Options()
    parsed.parseOptions(["--db", f"sqlite:///{tmp_path / 'c.db'}", "--api", "off", *args])
    return parsed


def test_the_modbus_option_overrides_the_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[modbus]\nlisten = "tcp:20101"\nlogin_timeout = 7\n' + LINK)
    assert options(tmp_path, "--config", config).settings.modbus.listen == "tcp:20101"
    assert options(tmp_path, "--config", config, "--modbus", "tcp:20202").settings.modbus.listen == "tcp:20202"
    # --modbus also stands in for [modbus] listen where a shared link needs one.
    assert options(tmp_path, "--config", write_config(tmp_path, LINK), "--modbus", "tcp:0").settings.modbus.links


@pytest.mark.parametrize(
    ("modbus_table", "args", "expected"),
    [
        ("login_timeout = 7", [], 7),  # the bridge's own [modbus] login_timeout applies
        ("login_timeout = 7", ["--login-timeout", "9"], 9),  # the command line wins over the file
        ("", [], 5),  # the file's general login_timeout
    ],
)
def test_which_login_timeout_the_bridge_gets(
    tmp_path: Path, modbus_table: str, args: list[str], expected: float
) -> None:
    config = write_config(tmp_path, f'login_timeout = 5\n[modbus]\nlisten = "tcp:20101"\n{modbus_table}\n' + LINK)
    parsed = options(tmp_path, "--config", config, *args)
    assert parsed.settings.modbus.login_timeout == expected
    bridge = makeService(parsed, MemoryReactorClock()).getServiceNamed("modbus")
    assert bridge.login_timeout == expected


def test_the_bridge_is_in_the_tree_even_without_links_as_the_api_may_add_them(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    without = makeService(options(tmp_path), reactor)
    assert [s.name for s in without] == [
        "cluster-membership", "store", "center", "meter-recorder", "retention", "dtu-tcp", "control", "pending",
        "modbus", "cluster", "alarms",
    ]
    assert reactor.tcpServers == []  # and without [modbus] listen, nothing of it listens
    config = write_config(tmp_path, '[modbus]\nlisten = "tcp:20101"\n' + LINK)
    with_links = makeService(options(tmp_path, "--config", config), reactor)
    assert "modbus" in [s.name for s in with_links]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (LINK.replace('address = 0', 'address = 0\ntype = "uint15"'),
         'meter "m1": point "voltage": type: must be one of int16, uint16'),
        (LINK, 'link "site-a": waits for its DTU on the shared listener: set [modbus] listen (or --modbus)'),
        ('[modbus]\nlisten = "tcp:1"\n' + LINK.replace('"m1"', '"' + "m" * 101 + '"'),
         "meter[0]: name: at most 100 characters, got 101"),
        ('[modbus]\nlisten = "tcp:1"\nlisten_port = 3\n' + LINK, "modbus: listen_port: unknown key (a typo?)"),
    ],
)
def test_config_errors_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    config = write_config(tmp_path, text)
    with pytest.raises(SystemExit) as caught:
        options(tmp_path, "--config", config)
    assert str(caught.value).startswith(f"dtucenter: {config}: {message}")


def test_twistd_reports_a_config_error_in_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, LINK.replace("unit = 1", "unit = 300"))
    result = run_twistd(tmp_path, "--config", config, "--api", "off")
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert output == f'dtucenter: {config}: meter "m1": unit: must be between 0 and 255, got 300'


def test_twistd_refuses_a_bad_modbus_endpoint(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"^dtucenter: --modbus: not a usable server endpoint 'nonsense:1'"):
        options(tmp_path, "--modbus", "nonsense:1")
    config = write_config(tmp_path, '[modbus]\nlisten = "nonsense:1"\n')
    result = run_twistd(tmp_path, "--config", config, "--api", "off")
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert output.startswith(f"dtucenter: {config}: modbus: listen: not a usable server endpoint 'nonsense:1'"), output
    assert len(output.splitlines()) == 1


def test_twistd_stops_when_the_modbus_port_is_taken(tmp_path: Path) -> None:
    config = write_config(tmp_path, LINK)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_twistd(
            tmp_path, "--config", config, "--modbus", f"tcp:{port}:interface=127.0.0.1",
            "--dtu", "tcp:0:interface=127.0.0.1", "--api", "off", "--db", f"sqlite:///{tmp_path / 'c.db'}",
        )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"dtucenter: --modbus: Couldn't listen on 127.0.0.1:{port}: [Errno 98] Address already in use." in output
    assert "Traceback" not in output


@pytest.mark.expected_errors("Listener site-a cannot listen")
@pytest_twisted.ensureDeferred
async def test_a_link_port_in_use_stops_the_start_and_closes_what_was_bound(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        link = LINK.replace('registration = "DTU-0001"', f'listen = "tcp:{port}:interface=127.0.0.1"')
        config = write_config(tmp_path, link)
        service = makeService(options(tmp_path, "--config", config, "--dtu", "tcp:0:interface=127.0.0.1"), reactor)
        with pytest.raises(SystemExit) as caught:
            service.privilegedStartService()
    assert str(caught.value) == (
        f'dtucenter: {config}: link "site-a": listen: '
        f"Couldn't listen on 127.0.0.1:{port}: [Errno 98] Address already in use."
    )
    dtu_port = service.getServiceNamed("dtu-tcp")._waitingForPort.result
    await deferLater(reactor, 0, lambda: None)  # a port closes on the reactor's next turn
    assert not dtu_port.connected, "the DTU port that did bind was closed again"


@pytest.mark.expected_errors("Listener modbus-server cannot listen")
def test_a_scada_server_port_in_use_stops_the_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = makeService(options(
            tmp_path, "--dtu", "tcp:0:interface=127.0.0.1", "--modbus-server", f"tcp:{port}:interface=127.0.0.1",
        ), reactor)
        with pytest.raises(SystemExit) as caught:
            service.privilegedStartService()
    assert str(caught.value) == (
        f"dtucenter: --modbus-server: Couldn't listen on 127.0.0.1:{port}: [Errno 98] Address already in use."
    )
