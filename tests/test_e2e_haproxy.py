"""The center behind a real HAProxy speaking the PROXY protocol (v1: ``send-proxy``, v2: ``send-proxy-v2``).

Every listener of the center is ``haproxy:tcp:...``; HAProxy forwards the DTU port, the Modbus
shared listener, a Modbus ``listen`` link's port and the API, with health checks on. Clients
connect from 127.0.0.2 so that their address differs from HAProxy's (127.0.0.1) in host and port:
the center must see and store the client's, not HAProxy's.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol

from tests.support import (
    ApiClient,
    DTUClient,
    RunningCenter,
    Warnings,
    end_process_group,
    eventually,
    logged_warnings,
    start_center,
    start_process,
    until,
)
from tests.test_listen_backlog import MODBUS_CONFIG as PLAIN_MODBUS_CONFIG

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs HAProxy (Debian package haproxy)")

#: The clients' source address: a loopback address that is not HAProxy's.
CLIENT_HOST = "127.0.0.2"

#: A registering link on the shared listener, and one with its own port, behind the PROXY protocol.
MODBUS_CONFIG = PLAIN_MODBUS_CONFIG.replace('listen = "tcp:', 'listen = "haproxy:tcp:')


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@attrs.frozen
class Balancer:
    """HAProxy's frontend port for each of the center's listeners, by name."""

    ports: dict[str, int]


def haproxy_config(backends: dict[str, int], frontends: dict[str, int], send_proxy: str, stats: Path) -> str:
    """Health checks as docs/deployment.md configures them: TCP for the DTU and Modbus ports, an HTTP
    request answered 401 (no token) for the API."""
    sections = [
        f"global\n    maxconn 1000\n    stats socket {stats} level admin\n",
        ("defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n"
         "    timeout check 5s\n"),
    ]
    for name, backend in backends.items():
        http_check = "    option httpchk GET /api/status\n    http-check expect status 401\n" if name == "api" else ""
        sections.append(
            f"frontend {name}\n    bind 127.0.0.1:{frontends[name]}\n    default_backend {name}\n"
            f"backend {name}\n{http_check}    server center 127.0.0.1:{backend} {send_proxy} check inter 200ms\n"
        )
    return "\n".join(sections)


def health_checks(stats: Path) -> dict[str, tuple[str, str]]:
    """Each backend's server: HAProxy's status and the result of its last health check."""
    with socket.socket(socket.AF_UNIX) as connection:
        connection.connect(str(stats))
        connection.sendall(b"show stat\n")
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    rows = [line.split(",") for line in answer.decode().splitlines() if line and not line.startswith("#")]
    # pxname, svname, ..., status (17), ..., check_status (36)
    return {row[0]: (row[17], row[36]) for row in rows if row[1] == "center"}


async def start_balancer(
    tmp_path: Path, center: RunningCenter, send_proxy: str,
) -> tuple[Balancer, subprocess.Popen[bytes]]:
    backends = {
        "dtu": center.tcp_port, "api": center.api_port or 0,
        "modbus": await center.modbus_port(), "yard": await center.modbus_port("yard"),
    }
    frontends = {name: free_port() for name in backends}
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config(backends, frontends, send_proxy, tmp_path / "haproxy.sock"))
    log = (tmp_path / "haproxy.log").open("wb")
    process = start_process(["haproxy", "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return Balancer(frontends), process


class Raw(Protocol):
    def __init__(self) -> None:
        self.lost = False

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


async def connect_from_client_host(port: int, protocol: Protocol) -> None:
    """Connect to HAProxy from CLIENT_HOST, trying again while HAProxy is starting."""

    async def attempt() -> bool:
        try:
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(CLIENT_HOST, 0))
            await connectProtocol(endpoint, protocol)
        except ConnectError:
            return False
        return True

    await eventually(attempt, f"HAProxy listening on port {port}")


def client_address(protocol: Protocol) -> str:
    assert protocol.transport is not None
    return f"{CLIENT_HOST}:{protocol.transport.getHost().port}"


@pytest.fixture
def warnings() -> Iterator[Warnings]:
    with logged_warnings() as observer:
        yield observer


async def start_proxied_center(tmp_path: Path) -> RunningCenter:
    """The center with every listener behind the PROXY protocol."""
    config = tmp_path / "center.toml"
    config.write_text(MODBUS_CONFIG)
    return await start_center(
        tmp_path, "--config", str(config),
        "--dtu", "haproxy:tcp:0:interface=127.0.0.1", "--api", "haproxy:tcp:0:interface=127.0.0.1",
        "--modbus", "haproxy:tcp:0:interface=127.0.0.1", "--unknown-dtu", "accept",
    )


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
@pytest_twisted.ensureDeferred
async def test_through_haproxy_the_center_sees_each_clients_real_address(
    tmp_path: Path, send_proxy: str, warnings: Warnings,
) -> None:
    center = await start_proxied_center(tmp_path)
    dtu = DTUClient()
    modbus_dtu, yard_dtu = Raw(), Raw()
    haproxy = None
    try:
        balancer, haproxy = await start_balancer(tmp_path, center, send_proxy)
        # A DTU logs in through HAProxy; the API (through HAProxy too) shows the DTU's own address.
        await connect_from_client_host(balancer.ports["dtu"], dtu)
        ack = await dtu.login(1001, 4242)
        assert ack.accepted
        api = ApiClient(f"http://127.0.0.1:{balancer.ports['api']}", center.api_token)
        answer = await api.get("/api/dtus/1001")
        assert answer.status == 200, answer.body
        assert answer.body["remote"] == client_address(dtu)

        # A Modbus DTU registers on the shared listener; another dials the yard link's own port.
        await connect_from_client_host(balancer.ports["modbus"], modbus_dtu)
        assert modbus_dtu.transport is not None
        modbus_dtu.transport.write(b"DTU-0001")
        await connect_from_client_host(balancer.ports["yard"], yard_dtu)

        def remotes() -> dict[str, str | None]:
            return {status.name: status.remote for status in center.bridge.link_statuses() if status.online}

        await until(lambda: len(remotes()) == 2)
        assert remotes() == {"site-a": client_address(modbus_dtu), "yard": client_address(yard_dtu)}

        # HAProxy's health checks pass through the PROXY listeners, and are no problem to log.
        async def checked() -> bool:
            return all(check[1] in ("L4OK", "L7OK") for check in health_checks(tmp_path / "haproxy.sock").values())

        await eventually(checked, "HAProxy's health checks of every listener")
        assert health_checks(tmp_path / "haproxy.sock") == {
            "dtu": ("UP", "L4OK"), "modbus": ("UP", "L4OK"), "yard": ("UP", "L4OK"), "api": ("UP", "L7OK"),
        }
        assert not [text for text in warnings.texts if "PROXY" in text], warnings.texts
    finally:
        for client in (dtu, modbus_dtu, yard_dtu):
            if client.transport is not None:
                client.transport.abortConnection()  # type: ignore[attr-defined]
        if haproxy is not None:
            end_process_group(haproxy)
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_a_client_that_bypasses_the_balancer_is_closed_and_summarised(
    tmp_path: Path, warnings: Warnings,
) -> None:
    """A PROXY listener trusts the header: one reached directly must not be served."""
    center = await start_proxied_center(tmp_path)
    try:
        await bypass_the_balancer(center, warnings)
    finally:
        await center.stop()


async def bypass_the_balancer(proxied_center: RunningCenter, warnings: Warnings) -> None:
    for _ in range(3):
        direct = DTUClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxied_center.tcp_port), direct)
        direct.send_raw(b"\x02" + b"not a header")
        await direct.closed()
    refusals = [text for text in warnings.texts if "PROXY header" in text]
    assert len(refusals) == 1, refusals
    assert "not a PROXY header" in refusals[0]
    # A header that claims any address is believed: the listener must be reachable only by the balancer.
    believed = DTUClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxied_center.tcp_port), believed)
    believed.send_raw(b"PROXY TCP4 198.51.100.9 192.0.2.1 4000 20000\r\n")
    assert (await believed.login(1002)).accepted
    assert proxied_center.center.sessions[1002].peer == "198.51.100.9:4000"
    believed.close()
