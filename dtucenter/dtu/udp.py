"""DTUs over UDP: the same frames in datagrams, one session per source address."""

from __future__ import annotations

from collections import deque

from twisted.application.service import Service
from twisted.internet.interfaces import IListeningPort, IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from dtucenter.addresses import describe_peer
from dtucenter.dtu.center import DTUCenter
from dtucenter.dtu.session import DTUSession

log = Logger()

Address = tuple[str, int]

#: Datagrams kept for a session that is waiting for the store; UDP has no
#: flow control, so past this the DTU's retransmission has to do.
BACKLOG_LIMIT = 32
#: Bytes read per datagram: Twisted's default (IReactorUDP's signature names no default).
MAX_DATAGRAM = 8192


class _DatagramLink:
    """A session's Link over a shared UDP socket."""

    def __init__(self, owner: DTUDatagramProtocol, address: Address) -> None:
        self.owner = owner
        self.address = address
        self.session: DTUSession | None = None
        self.paused = False
        self.backlog: deque[bytes] = deque()

    def write(self, data: bytes) -> None:
        if self.owner.transport is not None:
            self.owner.transport.write(data, self.address)

    def close(self) -> None:
        self.owner.forget(self.address)

    abort = close

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        while self.backlog and not self.paused and self.session is not None:
            self.session.data_received(self.backlog.popleft())


class DTUDatagramProtocol(DatagramProtocol):
    def __init__(self, center: DTUCenter, clock: IReactorTime) -> None:
        self.center = center
        self.clock = clock
        self.links: dict[Address, _DatagramLink] = {}

    def datagramReceived(self, datagram: bytes, addr: Address) -> None:
        link = self.links.get(addr)
        if link is None:
            link = _DatagramLink(self, addr)
            self.links[addr] = link
            link.session = DTUSession(self.center, link, describe_peer(addr), self.clock)
            link.session.start()
        if link.paused:
            if len(link.backlog) >= BACKLOG_LIMIT:
                self.center.stats["udp_datagrams_dropped"] += 1
                return
            link.backlog.append(datagram)
            return
        assert link.session is not None
        link.session.data_received(datagram)

    def forget(self, address: Address) -> None:
        link = self.links.pop(address, None)
        if link is not None and link.session is not None:
            link.session.connection_lost()

    def stopProtocol(self) -> None:
        for address in list(self.links):
            self.forget(address)


class UDPListenerService(Service):
    def __init__(self, reactor: IReactorUDP, interface: str, port: int, protocol: DTUDatagramProtocol) -> None:
        self.reactor = reactor
        self.interface = interface
        self.port_number = port
        self.protocol = protocol
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.port = self.reactor.listenUDP(
            self.port_number, self.protocol, interface=self.interface, maxPacketSize=MAX_DATAGRAM
        )

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self.privilegedStartService()

    def stopService(self) -> object:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None
