"""DTUs over UDP: the same frames in datagrams, one session per source address.

A datagram's source address is not proof of anything: anyone can send one
"from" any address. So what an address that has not logged in can make the
center keep is bounded: at most ``max_pending`` such sessions (the oldest is
dropped first), and while one waits for the store to check its Login its
further datagrams are dropped rather than kept (a DTU waits for its
LoginAck, and sends the Login again if none comes).
"""

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
#: Source addresses kept at most while they have not logged in (the ``dtu_udp_pending`` setting's default).
DEFAULT_MAX_PENDING = 10_000
#: Seconds between log lines about dropped not-logged-in addresses: one per flood, not one per address.
EVICTION_LOG_INTERVAL = 60.0


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
    def __init__(self, center: DTUCenter, clock: IReactorTime, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.center = center
        self.clock = clock
        self.max_pending = max_pending
        self.links: dict[Address, _DatagramLink] = {}
        #: Links not logged in (yet), oldest first; one that has logged in may linger until it is looked at.
        self._pending: dict[Address, _DatagramLink] = {}
        self._evicted_unlogged = 0
        self._next_eviction_log = 0.0

    def datagramReceived(self, datagram: bytes, addr: Address) -> None:
        link = self.links.get(addr)
        if link is None:
            self._make_room()
            link = _DatagramLink(self, addr)
            self.links[addr] = link
            self._pending[addr] = link
            link.session = DTUSession(self.center, link, describe_peer(addr), self.clock, spoofable=True)
            link.session.start()
        session = link.session
        assert session is not None
        if session.psn is None:
            if session.state == DTUSession.AUTHENTICATING:
                # Its Login is with the store: nothing else is due before the LoginAck, keep nothing.
                self.center.stats["udp_datagrams_dropped"] += 1
                return
        elif addr in self._pending:
            del self._pending[addr]
        if link.paused:
            if len(link.backlog) >= BACKLOG_LIMIT:
                self.center.stats["udp_datagrams_dropped"] += 1
                return
            link.backlog.append(datagram)
            return
        session.data_received(datagram)

    def _make_room(self) -> None:
        """Drop the oldest sessions that have not logged in until a new one fits under the cap."""
        while len(self._pending) >= self.max_pending:
            address = next(iter(self._pending))
            link = self._pending.pop(address)
            if link.session is not None and link.session.psn is not None:
                continue  # logged in since: not pending any more
            self.center.stats["udp_pending_dropped"] += 1
            self._evicted_unlogged += 1
            self.forget(address)
        if self._evicted_unlogged and self.clock.seconds() >= self._next_eviction_log:
            log.warn(
                "UDP: dropped {count} source addresses that had not logged in, oldest first, to stay at"
                " {limit} (dtu_udp_pending); a flood of datagrams from forged addresses looks like this",
                count=self._evicted_unlogged, limit=self.max_pending,
            )
            self._evicted_unlogged = 0
            self._next_eviction_log = self.clock.seconds() + EVICTION_LOG_INTERVAL

    @property
    def pending(self) -> int:
        """Sessions that have not logged in."""
        return sum(1 for link in self._pending.values() if link.session is not None and link.session.psn is None)

    def forget(self, address: Address) -> None:
        self._pending.pop(address, None)
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
