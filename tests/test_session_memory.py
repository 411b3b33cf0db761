"""A closed session is freed by reference counting alone, not left for a full collection.

The center freezes its start-up heap and collects the young generation only every
20,000 allocations (tap.tune_garbage_collector), so an object kept alive by a
reference cycle lives on until a rare full collection: under redial storms that
showed as RSS climbing by tens of MiB. These tests run with the collector off and
check that the protocol, the session and its command queue are gone once the
connection is, whichever end closed it.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from dtucenter.dtu import wire
from dtucenter.dtu.commands import CommandError
from dtucenter.dtu.session import DTUProtocol, DTUSession
from dtucenter.dtu.udp import DTUDatagramProtocol
from tests.support import connect_dtu, start_center, until
from tests.test_session import Harness
from tests.test_udp import SentDatagrams

Refs = dict[str, "weakref.ref[Any]"]


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.store.engine.dispose()


@contextmanager
def collector_off() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.collect()  # what earlier tests left must not be collected in the middle of this one
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def watch(session: DTUSession, link: object) -> Refs:
    return {
        "link": weakref.ref(link), "session": weakref.ref(session), "command queue": weakref.ref(session.commands),
    }


def alive(refs: Refs) -> list[str]:
    return [name for name, ref in refs.items() if ref() is not None]


def busy_session(h: Harness) -> tuple[DTUProtocol, Refs, list[Any]]:
    """A logged-in TCP session that has uploaded and has a command answered and one on the wire."""
    protocol, transport = h.logged_in(psn=1, password=7)
    h.feed(protocol, wire.SendTest(20, 5, (1, 2)))
    outcomes: list[Any] = []
    protocol.session.commands.read_setup().addBoth(outcomes.append)
    h.feed(protocol, wire.ReadSetupAck(30, (wire.Register(1, 2),)))
    protocol.session.commands.read_test([wire.Register(1, 2)]).addBoth(outcomes.append)
    assert [type(m) for m in h.replies(transport)] == [wire.SendTestAck, wire.ReadSetup, wire.ReadTest]
    return protocol, watch(protocol.session, protocol), outcomes


def closed_by_the_dtu(h: Harness, protocol: DTUProtocol) -> None:
    h.lose(protocol)


def replaced_by_a_newer_login(h: Harness, protocol: DTUProtocol) -> None:
    newer, _transport = h.connect()
    h.feed(newer, wire.Login(1, 7))
    assert protocol.transport.disconnecting  # type: ignore[union-attr]
    h.lose(protocol)
    h.lose(newer)


def idle_timeout(h: Harness, protocol: DTUProtocol) -> None:
    h.clock.advance(10_000)
    assert protocol.transport.disconnecting  # type: ignore[union-attr]
    h.lose(protocol)


@pytest.mark.parametrize("close", [closed_by_the_dtu, replaced_by_a_newer_login, idle_timeout])
def test_a_closed_tcp_session_is_freed_without_the_collector(
    h: Harness, close: Callable[[Harness, DTUProtocol], None]
) -> None:
    with collector_off():
        protocol, refs, outcomes = busy_session(h)
        close(h, protocol)
        assert len(outcomes) == 2 and outcomes[-1].check(CommandError)  # timed out or disconnected
        del protocol, outcomes
        assert alive(refs) == []
    assert h.clock.getDelayedCalls() == []


def test_a_session_that_never_logged_in_is_freed_without_the_collector(h: Harness) -> None:
    with collector_off():
        protocol, transport = h.connect()
        refs = watch(protocol.session, protocol)
        h.clock.advance(h.center.settings.login_timeout)
        assert transport.disconnecting
        h.lose(protocol)
        del protocol
        assert alive(refs) == []


def test_a_session_closed_with_an_upload_in_flight_is_freed_once_the_store_answers(h: Harness) -> None:
    with collector_off():
        protocol, _transport = h.logged_in()
        refs = watch(protocol.session, protocol)
        h.store.hold = True
        h.feed(protocol, wire.SendTest(20, 5, (1, 2)))
        h.lose(protocol)
        del protocol
        h.store.release()
        assert alive(refs) == []


def test_a_closed_udp_session_is_freed_without_the_collector(h: Harness) -> None:
    protocol = DTUDatagramProtocol(h.center, h.clock)
    protocol.transport = SentDatagrams()  # type: ignore[assignment]
    h.store.add_dtu(1, password=7, tick_time=10)
    address = ("10.0.0.1", 4000)
    with collector_off():
        login_and_upload = wire.encode_frame(wire.Login(1, 7)) + wire.encode_frame(wire.SendTest(20, 5, (1,)))
        protocol.datagramReceived(login_and_upload, address)
        link = protocol.links[address]
        assert link.session is not None
        refs = watch(link.session, link)
        del link
        h.clock.advance(20)  # silent for 2 x TickTime: the center closes it
        assert protocol.links == {}
        assert alive(refs) == []


@pytest_twisted.ensureDeferred
async def test_a_closed_loopback_connection_is_freed_without_the_collector(tmp_path: Path) -> None:
    center = await start_center(tmp_path, "--unknown-dtu", "accept")
    try:
        with collector_off():
            dtu = await connect_dtu(center)
            assert (await dtu.login(77, 1)).accepted
            dtu.send(wire.SendTest(20, 5, (1, 2)))
            await dtu.next(wire.SendTestAck)
            session = center.center.sessions[77]
            command: Deferred[Any] = session.commands.read_setup()
            outcomes: list[Any] = []
            command.addBoth(outcomes.append)
            await dtu.next(wire.ReadSetup)
            refs = watch(session, session.link)
            del session, command
            dtu.close()
            await dtu.lost
            await until(lambda: 77 not in center.center.sessions)
            await center.store.when_idle()
            assert outcomes[0].value.outcome == "disconnected"
            assert alive(refs) == []
    finally:
        await center.stop()
