"""Shared test helpers: the real center on loopback, and a DTU that talks to it over a socket."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.application.service import MultiService
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from dtucenter.dtu import wire
from dtucenter.dtu.center import DTUCenter
from dtucenter.store.facade import Store
from dtucenter.tap import ListeningService, Options, makeService

M = TypeVar("M")

#: Seconds an end-to-end step may take before the test fails rather than hangs.
STEP_TIMEOUT = 10.0


@attrs.define
class RunningCenter:
    service: MultiService
    options: Options
    tcp_port: int
    udp_port: int | None

    @property
    def center(self) -> DTUCenter:
        return self.service.getServiceNamed("center")  # type: ignore[return-value]

    @property
    def store(self) -> Store:
        return self.service.getServiceNamed("store")  # type: ignore[return-value]

    @property
    def db_url(self) -> str:
        return self.options.settings.db

    async def stop(self) -> None:
        await defer.maybeDeferred(self.service.stopService)


async def start_center(tmp_path: Path, *args: str, db_url: str | None = None) -> RunningCenter:
    """makeService with real options, DTUs on 127.0.0.1 port 0, SQLite in ``tmp_path`` unless ``db_url``."""
    options = Options()
    options.parseOptions(
        ["--dtu", "tcp:0:interface=127.0.0.1", "--db", db_url or f"sqlite:///{tmp_path / 'center.db'}", *args]
    )
    service = makeService(options, reactor)
    service.privilegedStartService()
    service.startService()
    listener: ListeningService = service.getServiceNamed("dtu-tcp")  # type: ignore[assignment]
    port = await listener.when_listening()
    udp_port = None
    if options.settings.dtu_udp is not None:
        udp_port = service.getServiceNamed("dtu-udp").port.getHost().port  # type: ignore[attr-defined]
    return RunningCenter(service, options, port.getHost().port, udp_port)


class DTUClient(Protocol):
    """A scripted DTU: send frames, await the center's answers."""

    def __init__(self) -> None:
        self.parser = wire.FrameParser()
        self.received: deque[Any] = deque()
        self._waiting: deque[defer.Deferred[Any]] = deque()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        for event in self.parser.feed(data):
            if self._waiting:
                self._waiting.popleft().callback(event)
            else:
                self.received.append(event)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(None)
        while self._waiting:
            self._waiting.popleft().errback(reason)

    def send(self, *messages: Any) -> None:
        self.transport.write(b"".join(wire.encode_frame(m) for m in messages))  # type: ignore[union-attr]

    def send_raw(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    async def next(self, kind: type[M] | None = None) -> M:
        if self.received:
            message = self.received.popleft()
        else:
            d: defer.Deferred[Any] = defer.Deferred()
            self._waiting.append(d)
            d.addTimeout(STEP_TIMEOUT, reactor)
            message = await d
        if kind is not None:
            assert isinstance(message, kind), f"expected {kind.__name__}, got {message!r}"
        return message

    async def closed(self) -> None:
        """Wait until the center closes the connection."""
        if not self.lost.called:
            await self.lost.addTimeout(STEP_TIMEOUT, reactor)

    async def login(self, psn: int, password: int = 0, **fields: Any) -> wire.LoginAck:
        self.send(wire.Login(psn, password, **fields))
        return await self.next(wire.LoginAck)

    def close(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]


async def connect_dtu(center: RunningCenter) -> DTUClient:
    client = DTUClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", center.tcp_port), client)
    return client


async def until(predicate: Any, timeout: float = STEP_TIMEOUT) -> None:
    """Poll ``predicate`` on the reactor (no sleeping thread) until it is true."""
    from twisted.internet.task import deferLater

    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await deferLater(reactor, 0.01, lambda: None)
        waited += 0.01
