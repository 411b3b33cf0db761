"""The manhole listens on loopback unless its endpoint names another interface."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted

from dtucenter.manhole import loopback_unless_named
from tests.support import Warnings, logged_warnings, start_center


@pytest.fixture
def warnings() -> Iterator[Warnings]:
    with logged_warnings("dtucenter.manhole") as observer:
        yield observer


async def manhole_host(tmp_path: Path, endpoint: str) -> str:
    keys = tmp_path / "authorized_keys"
    keys.touch()
    center = await start_center(
        tmp_path, "--manhole", endpoint, "--manhole-keys", str(keys), "--manhole-host-key", str(tmp_path / "host_key"),
    )
    try:
        port = await center.service.getServiceNamed("manhole").when_listening()  # type: ignore[attr-defined]
        host: str = port.getHost().host
        return host
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_a_manhole_without_an_interface_listens_on_loopback_only(tmp_path: Path, warnings: Warnings) -> None:
    assert await manhole_host(tmp_path, "tcp:0") == "127.0.0.1"
    assert warnings.texts == []


@pytest.mark.skipif(not socket.has_ipv6, reason="needs IPv6")
@pytest_twisted.ensureDeferred
async def test_an_ipv6_manhole_without_an_interface_listens_on_loopback_only(tmp_path: Path) -> None:
    assert await manhole_host(tmp_path, "tcp6:0") == "::1"


@pytest_twisted.ensureDeferred
async def test_a_manhole_on_a_named_interface_stays_there_with_a_warning(tmp_path: Path, warnings: Warnings) -> None:
    assert await manhole_host(tmp_path, "tcp:0:interface=0.0.0.0") == "0.0.0.0"
    assert len(warnings.texts) == 1 and "0.0.0.0" in warnings.texts[0]


@pytest.mark.parametrize(
    ("given", "used", "warned"),
    [
        ("tcp:2222", "tcp:2222:interface=127.0.0.1", False),
        ("TCP:port=2222:backlog=5", "TCP:port=2222:backlog=5:interface=127.0.0.1", False),
        ("tcp6:2222", r"tcp6:2222:interface=\:\:1", False),
        ("tcp:2222:interface=127.0.0.2", "tcp:2222:interface=127.0.0.2", False),
        (r"tcp6:2222:interface=\:\:1", r"tcp6:2222:interface=\:\:1", False),
        ("tcp:2222:interface=localhost", "tcp:2222:interface=localhost", False),
        ("tcp:2222:interface=192.0.2.7", "tcp:2222:interface=192.0.2.7", True),
        (r"tcp6:2222:interface=\:\:", r"tcp6:2222:interface=\:\:", True),
        ("unix:/run/dtucenter/manhole", "unix:/run/dtucenter/manhole", False),
        ("haproxy:tcp:2222", "haproxy:tcp:2222:interface=127.0.0.1", False),
        ("haproxy:tcp:2222:interface=192.0.2.7", "haproxy:tcp:2222:interface=192.0.2.7", True),
    ],
)
def test_loopback_unless_named(given: str, used: str, warned: bool, warnings: Warnings) -> None:
    assert loopback_unless_named(given) == used
    assert bool(warnings.texts) == warned
