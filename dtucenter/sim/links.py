"""Carrying a virtual device's bytes: TCP through ClientService, or UDP datagrams.

Each device dials from one of several loopback source addresses: one
address has about 28,000 ephemeral ports (less whatever TIME_WAIT holds),
so thousands of DTUs are spread over 127.x.y.z addresses.
"""

from __future__ import annotations

import ipaddress
import math
import random
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IReactorUDP,
    IStreamClientEndpoint,
    IUDPTransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dtucenter.sim.stats import SimStats
from dtucenter.transports import close_transport, connected_transport

log = Logger()

#: Connections per source address; far below the ~28,000 ephemeral ports so reconnects and TIME_WAIT fit too.
CONNECTIONS_PER_SOURCE = 2500
FIRST_SOURCE = ipaddress.IPv4Address("127.1.0.1")


def spread_sources(devices: int, addresses: int | None = None) -> list[str]:
    """Loopback addresses to dial from (all of 127.0.0.0/8 is local on Linux).

    An empty list means "let the kernel choose", which is fine for a few
    thousand devices; ``addresses`` forces that many.
    """
    if addresses is None:
        if devices <= CONNECTIONS_PER_SOURCE:
            return []
        addresses = math.ceil(devices / CONNECTIONS_PER_SOURCE)
    return [str(FIRST_SOURCE + i) for i in range(addresses)]


def parse_server(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port) with a clear error."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port must be a number in {text!r}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1..65535, got {port}")
    return host.strip("[]"), port


class Link(TypingProtocol):
    """What a connector gives its device for the current connection."""

    def write(self, data: bytes) -> None: ...

    def drop(self) -> None:
        """Close this connection; the connector dials again after its backoff."""


class Device(TypingProtocol):
    """What a connector drives: the DTU state machine or a transparent DTU."""

    stats: SimStats

    def connection_made(self, link: Link) -> None: ...

    def data_received(self, data: bytes) -> None: ...

    def connection_lost(self) -> None: ...

    def stop(self) -> None: ...


class _StreamProtocol(protocol.Protocol):
    """Forwards a TCP connection's events to its device and serves as the device's Link."""

    def __init__(self, device: Device, built_by: _StreamFactory | None = None) -> None:
        self.device = device
        #: Told which connection is up (tests build the protocol bare).
        self.built_by = built_by

    def connectionMade(self) -> None:
        if self.built_by is not None:
            self.built_by.current = self
        self.device.connection_made(self)

    def dataReceived(self, data: bytes) -> None:
        self.device.data_received(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.built_by is not None and self.built_by.current is self:
            self.built_by.current = None
        self.device.connection_lost()

    def write(self, data: bytes) -> None:
        connected_transport(self).write(data)

    def drop(self) -> None:
        close_transport(connected_transport(self))


class _StreamFactory(protocol.Factory[_StreamProtocol]):
    def __init__(self, device: Device) -> None:
        self.device = device
        #: The connection up now, if any.
        self.current: _StreamProtocol | None = None

    def buildProtocol(self, addr: IAddress | None) -> _StreamProtocol:
        return _StreamProtocol(self.device, self)


class _Connector(Service):
    def __init__(
        self,
        reactor: IReactorTime,
        device: Device,
        server: tuple[str, int],
        source: str | None,
        rng: random.Random,
        max_delay: float = 30.0,
    ) -> None:
        self.reactor = reactor
        self.device = device
        self.server = server
        self.source = source
        # Jitter spreads a crowd of DTUs that lost the center at the same moment.
        self._policy = backoffPolicy(initialDelay=1.0, maxDelay=max_delay, factor=1.5, jitter=rng.random)

    def drop_connection(self) -> bool:
        """Closes the connection up now, as a network outage would; the device dials again after its backoff.
        False if there was none."""
        raise NotImplementedError


@implementer(IStreamClientEndpoint)
class _CountingEndpoint:
    """Counts failed connection attempts (ClientService retries them quietly)."""

    def __init__(self, endpoint: IStreamClientEndpoint, device: Device) -> None:
        self.endpoint = endpoint
        self.device = device

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def failed(failure: Failure) -> Failure:
            self.device.stats.error("connect_failed")
            return failure

        return self.endpoint.connect(protocolFactory).addErrback(failed)


class TCPConnector(_Connector):
    """Keeps one device connected to its server; a redirect moves it to another server."""

    _client: ClientService | None = None
    _factory: _StreamFactory | None = None

    def startService(self) -> None:
        super().startService()
        self._dial()

    def drop_connection(self) -> bool:
        current = self._factory.current if self._factory is not None else None
        if current is None:
            return False
        current.drop()
        return True

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self.device.stop()
        client, self._client = self._client, None
        return client.stopService() if client is not None else None

    def redirect(self, host: str, port: int) -> None:
        old, self._client = self._client, None
        self.server = (host, port)
        if old is not None:
            old.stopService()
        if self.running:
            self._dial()

    def _dial(self) -> None:
        host, port = self.server
        endpoint = TCP4ClientEndpoint(
            self.reactor, host, port, timeout=10,
            bindAddress=(self.source, 0) if self.source else None,
        )
        self._factory = _StreamFactory(self.device)
        self._client = ClientService(
            _CountingEndpoint(endpoint, self.device), self._factory,
            retryPolicy=self._policy, clock=self.reactor,
        )
        self._client.startService()


class _DatagramProtocol(protocol.DatagramProtocol):
    def __init__(self, connector: UDPConnector) -> None:
        self.connector = connector

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.connector.heard()
        self.connector.device.data_received(datagram)

    def connectionRefused(self) -> None:
        # ICMP port unreachable on a connected UDP socket: nobody listens there (yet).
        self.connector.lost()


class UDPConnector(_Connector):
    """One UDP socket per device, "connected" to the server; a drop waits out a backoff and starts over."""

    _attempts = 0
    _port: IUDPTransport | None = None
    _retry: IDelayedCall | None = None
    _up = False

    def startService(self) -> None:
        super().startService()
        self._open()

    def stopService(self) -> None:
        super().stopService()
        self.device.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._close_link()

    def redirect(self, host: str, port: int) -> None:
        self.server = (host, port)
        self._close_link()
        if self.running:
            self._open()

    # Link
    def write(self, data: bytes) -> None:
        if self._port is not None:
            self._port.write(data, None)  # connected: to the server

    def drop(self) -> None:
        self.lost()

    def drop_connection(self) -> bool:
        was_up = self._up
        self.lost()
        return was_up

    def heard(self) -> None:
        self._attempts = 0

    def lost(self) -> None:
        if not self._up:
            return
        self._close_link()
        self._attempts += 1
        if self.running:
            self._retry = self.reactor.callLater(self._policy(self._attempts), self._open)

    def _open(self) -> None:
        self._retry = None
        proto = _DatagramProtocol(self)
        # maxPacketSize is Twisted's default, spelled out because IReactorUDP declares no defaults.
        port = IReactorUDP(self.reactor).listenUDP(0, proto, interface=self.source or "", maxPacketSize=8192)
        self._port = IUDPTransport(port)
        self._port.connect(*self.server)
        self._up = True
        self.device.connection_made(self)

    def _close_link(self) -> None:
        if self._up:
            self._up = False
            self.device.connection_lost()
        if self._port is not None:
            port, self._port = self._port, None
            port.stopListening()
