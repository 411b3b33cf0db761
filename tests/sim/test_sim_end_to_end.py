"""Virtual DTUs against the real center on loopback: their uploads must land in the store."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path
from typing import Any

import pytest_twisted
from simtools import wait_for
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from dtucenter.sim.dtu import DTUSettings, VirtualDTU
from dtucenter.sim.links import TCPConnector, UDPConnector
from dtucenter.sim.stats import SimStats
from dtucenter.store import queries
from tests.support import start_center


@pytest_twisted.inlineCallbacks
def test_virtual_dtus_uploads_are_stored(tmp_path: Path) -> Any:
    center = yield Deferred.fromCoroutine(
        start_center(tmp_path, "--unknown-dtu", "accept", "--dtu-udp", "127.0.0.1:0")
    )
    connectors: list[Any] = []
    try:
        stats = SimStats()
        for i, (kind, server_port) in enumerate(
            [(TCPConnector, center.tcp_port), (TCPConnector, center.tcp_port), (UDPConnector, center.udp_port)]
        ):
            rng = random.Random(i)
            dtu = VirtualDTU(DTUSettings(psn=500 + i, password=9, values=4, interval=0.2), reactor, stats, rng)
            connector = kind(reactor, dtu, ("127.0.0.1", server_port), None, rng)
            dtu.server = connector.server
            connector.startService()
            connectors.append(connector)
        yield wait_for(lambda: stats.counts["acked"] >= 9, "nine acknowledged uploads")
        assert stats.logged_in == 3
        assert stats.counts["errors"] == 0
        for psn in (500, 501, 502):
            samples = yield center.store.read(partial(queries.query_samples, psn=psn))
            assert len(samples) >= 4 and len(samples) % 4 == 0
            assert [s.position for s in samples[:4]] == [0, 1, 2, 3]
    finally:
        for connector in connectors:
            yield connector.stopService()
        yield Deferred.fromCoroutine(center.stop())


@pytest_twisted.inlineCallbacks
def test_a_fleet_drops_every_connection_at_once_and_redials(tmp_path: Path) -> Any:
    from dtucenter.sim.fleet import Fleet

    center = yield Deferred.fromCoroutine(
        start_center(tmp_path, "--unknown-dtu", "accept", "--dtu-udp", "127.0.0.1:0")
    )
    stats = SimStats()
    fleet = Fleet(reactor, stats, connect_rate=1000)
    try:
        for i, (kind, server_port) in enumerate(
            [(TCPConnector, center.tcp_port), (TCPConnector, center.tcp_port), (UDPConnector, center.udp_port)]
        ):
            rng = random.Random(i)
            dtu = VirtualDTU(DTUSettings(psn=600 + i, password=9, values=1, interval=60.0), reactor, stats, rng)
            fleet.add(kind(reactor, dtu, ("127.0.0.1", server_port), None, rng))
        fleet.startService()
        yield wait_for(lambda: stats.logged_in == 3, "three logins")
        assert fleet.drop_all() == 3
        assert stats.logged_in == 0 or stats.counts["logins"] == 3  # TCP closes complete on the reactor
        yield wait_for(lambda: stats.counts["logins"] == 6 and stats.logged_in == 3, "three logins again")
        assert (stats.counts["drop_all"], stats.counts["dropped"], stats.counts["errors"]) == (1, 3, 0)
    finally:
        yield fleet.stopService()
        yield Deferred.fromCoroutine(center.stop())
