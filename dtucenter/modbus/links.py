"""The link layer: which connection carries which link, and how connections are made.

A :class:`Link` outlives its connections. Whatever transport brings a
connection (the shared listener after a registration packet, a dedicated
port, an outgoing connection, a serial port), it ends up as a
:class:`~dtucenter.modbus.master.ModbusMaster` attached to its link; a newer
connection of the same link replaces the older one, which is closed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol as TypingProtocol

import attrs
from pymodbus.pdu import ModbusPDU
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocolFactory, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.serialport import SerialPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from dtucenter.addresses import describe_peer
from dtucenter.discovery import FIRST_BYTES
from dtucenter.events import EventHub, LinkDown, LinkUp
from dtucenter.isotime import utc_now
from dtucenter.modbus.config import LinkSettings, SerialSettings
from dtucenter.modbus.errors import LinkOffline
from dtucenter.modbus.filter import (
    BoundaryNoise,
    LoginMatched,
    LoginPending,
    LoginRejected,
    RegistrationReader,
)
from dtucenter.modbus.framing import framing_for
from dtucenter.modbus.master import LINK_JUNK_LIMIT, LinkCounters, ModbusMaster
from dtucenter.modbus.raw import Expect, RawAnswer
from dtucenter.modbus.unknown import UnknownRegistrations
from dtucenter.throttle import LoginThrottle
from dtucenter.transports import close_transport, connected_transport

log = Logger()

# After a timeout an RTU line stays quiet this long so that a late answer
# drains; in Modbus TCP the transaction id already tells answers apart.
RTU_SILENCE = 0.2


@attrs.frozen
class LinkStatus:
    name: str
    kind: str  # shared, listen, connect or serial
    protocol: str  # rtu or tcp
    online: bool
    remote: str | None
    connected_since: float | None
    last_disconnect: float | None
    pending: int
    counters: Mapping[str, int]

    def as_json(self) -> dict[str, object]:
        return {**attrs.asdict(self, recurse=False), "counters": dict(self.counters)}


class Link:
    """One configured link; :meth:`request` goes to whichever connection is attached."""

    def __init__(
        self, settings: LinkSettings, clock: IReactorTime, *, silence: float | None = None,
        events: EventHub | None = None,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.counters = LinkCounters()
        self._clock = clock
        self._events = events if events is not None else EventHub()
        self._silence = silence if silence is not None else (RTU_SILENCE if settings.protocol == "rtu" else 0.0)
        self._master: ModbusMaster | None = None
        self._remote: str | None = None
        self._connected_since: float | None = None
        self._last_disconnect: float | None = None
        self._lost_hooks: list[Callable[[], None]] = []
        self._waiting_for_close: list[defer.Deferred[None]] = []

    @property
    def online(self) -> bool:
        return self._master is not None

    def request(self, pdu: ModbusPDU) -> defer.Deferred[ModbusPDU]:
        if self._master is None:
            return defer.fail(LinkOffline(self.name))
        return self._master.request(pdu)

    def exchange(self, data: bytes, *, timeout: float, expect: Expect, max_bytes: int) -> defer.Deferred[RawAnswer]:
        """A raw exchange on the attached connection (:meth:`ModbusMaster.exchange`)."""
        if self._master is None:
            return defer.fail(LinkOffline(self.name))
        return self._master.exchange(data, timeout=timeout, expect=expect, max_bytes=max_bytes)

    def build_master(self) -> ModbusMaster:
        """A master for a new connection; it attaches itself once connected."""
        return ModbusMaster(
            self.name,
            framing_for(self.settings.protocol),
            self._clock,
            timeout=self.settings.timeout,
            retries=self.settings.retries,
            noise=BoundaryNoise.for_link(
                self.settings.registration, self.settings.registration_prefix, self.settings.heartbeat
            ),
            counters=self.counters,
            silence=self._silence,
            idle_timeout=self.settings.idle_timeout,
            observer=self,
            junk_limit=None if self.settings.serial is not None else LINK_JUNK_LIMIT,
        )

    def when_lost(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` whenever the attached connection goes away."""
        self._lost_hooks.append(hook)

    def disconnect(self) -> defer.Deferred[None]:
        """Close the attached connection; fires once it is gone."""
        if self._master is None:
            return defer.succeed(None)
        gone: defer.Deferred[None] = defer.Deferred()
        self._waiting_for_close.append(gone)
        self._master.close()
        return gone

    def status(self) -> LinkStatus:
        return LinkStatus(
            name=self.name,
            kind=self.settings.kind,
            protocol=self.settings.protocol,
            online=self.online,
            remote=self._remote,
            connected_since=self._connected_since,
            last_disconnect=self._last_disconnect,
            pending=self._master.pending if self._master is not None else 0,
            counters=self.counters.as_dict(),
        )

    # -- MasterObserver -------------------------------------------------------

    def master_connected(self, master: ModbusMaster) -> None:
        transport = connected_transport(master)
        remote = self.settings.serial.device if self.settings.serial is not None else describe_peer(transport.getPeer())
        if ITCPTransport.providedBy(transport):
            transport.setTcpKeepAlive(True)
        older, self._master = self._master, master
        if older is not None:
            log.info(
                "Link {link}: new connection from {remote} replaces the one from {older}",
                link=self.name, remote=remote, older=self._remote,
            )
            older.close()
        else:
            log.info("Link {link} online ({remote})", link=self.name, remote=remote)
        self._remote = remote
        self._connected_since = self._clock.seconds()
        if self._events.listening:
            self._events.publish(LinkUp(self.name, remote, utc_now(self._clock)))

    def master_disconnected(self, master: ModbusMaster) -> None:
        if master is not self._master:
            return  # a replaced connection closing late
        self._master = None
        self._last_disconnect = self._clock.seconds()
        log.info("Link {link} offline ({remote} disconnected)", link=self.name, remote=self._remote)
        if self._events.listening:
            self._events.publish(LinkDown(self.name, utc_now(self._clock)))
        for hook in list(self._lost_hooks):
            hook()
        waiting, self._waiting_for_close = self._waiting_for_close, []
        for gone in waiting:
            gone.callback(None)


# -- accepted connections -----------------------------------------------------


@attrs.frozen
class Probe:
    """Sent as-is to a new connection on the shared listener that has not registered within
    ``after`` seconds: a request every data-mode DTU behind the listener relays to its bus,
    so that its answer comes back behind the DTU's registration and names the link."""

    request: bytes
    after: float


#: Bytes of what a connection sent that key the throttle, at most: a registration's worth, bounded.
MAX_THROTTLE_KEY_BYTES = 64


class LoginProtocol(Protocol):
    """Reads the registration packet, then hands the connection to its link's master.

    Failed logins are throttled per source host *and* what the connection sent where a
    registration belongs (:meth:`_throttle_key`), not per host: thousands of DTUs may share
    one carrier NAT address, and one misconfigured DTU redialling must not lock them out.
    So the throttle is consulted once the registration has been read, not at connect.
    """

    def __init__(
        self, links: Mapping[bytes, Link], clock: IReactorTime, login_timeout: float, throttle: LoginThrottle,
        probe: Probe | None = None, unknown: UnknownRegistrations | None = None, window: float = 0.5,
    ) -> None:
        self._links = links
        self._unknown = unknown if unknown is not None and unknown.considered else None
        self._window = window
        self._window_call: IDelayedCall | None = None
        #: What the connection sent, bounded: an unknown registration is read from it.
        self._received = b""
        #: The reader found no known registration; the rest of the window is read before deciding.
        self._unknown_read = False
        #: Kept open as a pending (or being adopted) device, what it sends dropped.
        self._held = False
        self.dropped = 0
        self._clock = clock
        self._login_timeout = login_timeout
        self._throttle = throttle
        self._probe = probe
        self._probe_call: IDelayedCall | None = None
        self._reader = self._new_reader()
        self._key_length = min(max(map(len, links), default=0), MAX_THROTTLE_KEY_BYTES)
        #: The start of what the connection sent, up to a registration's length.
        self._head = b""
        self._master: ModbusMaster | None = None
        self._deadline: IDelayedCall | None = None
        self.host = "?"
        self.peer = "?"

    def _new_reader(self) -> RegistrationReader:
        """A reader of the registrations of the moment (the bridge adds and removes links live)."""
        links = self._links
        heartbeats = (link.settings.heartbeat for link in links.values() if link.settings.heartbeat is not None)
        return RegistrationReader(links, heartbeats)

    def connectionMade(self) -> None:
        peer = connected_transport(self).getPeer()
        self.host = getattr(peer, "host", str(peer))
        self.peer = describe_peer(peer)
        self._deadline = self._clock.callLater(self._login_timeout, self._login_timed_out)
        if self._probe is not None:
            self._probe_call = self._clock.callLater(self._probe.after, self._send_probe)

    def _send_probe(self) -> None:
        """Make a DTU that registers only in front of data (mode ``data``) send something."""
        self._probe_call = None
        assert self._probe is not None  # only scheduled with one
        log.debug("Probing {peer}: no registration after {seconds:g} s", peer=self.peer, seconds=self._probe.after)
        connected_transport(self).write(self._probe.request)

    def dataReceived(self, data: bytes) -> None:
        if self._master is not None:
            self._master.dataReceived(data)
            return
        if self._held:
            self.dropped += len(data)  # a pending device's heartbeats and data: nobody to take them yet
            return
        if self._deadline is None:
            return  # refused or already given up; the close is under way
        if len(self._head) < self._key_length:
            self._head += data[: self._key_length - len(self._head)]
        if self._unknown is not None:
            if not self._received and data:
                self._window_call = self._clock.callLater(self._window, self._window_over)
            self._received += data[: FIRST_BYTES - len(self._received)]
            if self._unknown_read:
                return
        result = self._reader.feed(data)
        if isinstance(result, LoginPending):
            return
        if isinstance(result, LoginRejected) and self._unknown is not None:
            self._unknown_read = True
            if self._window_call is None:  # the window is over already
                self._settle_unknown()
            return
        self._cancel_timers()
        if isinstance(result, LoginMatched):
            self._matched(result)
            return
        self._reject(f"unknown registration {result.received[:64]!r}")

    def _matched(self, result: LoginMatched) -> None:
        self._throttle.succeeded(self._throttle_key())
        link = self._links[result.registration]
        link.counters.bytes_in += len(result.registration) + sum(map(len, result.heartbeats))
        link.counters.heartbeats += len(result.heartbeats)
        self._master = link.build_master()
        self._master.makeConnection(connected_transport(self))
        if result.rest:
            self._master.dataReceived(result.rest)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancel_timers()
        if self._held and self._unknown is not None:
            self._held = False
            self._unknown.release(self)
        if self._master is not None:
            self._master.connectionLost(reason)

    def _login_timed_out(self) -> None:
        self._deadline = None
        if self._unknown is not None and self._received:
            # Still the start of a known registration, or read to the end of the window: decide now.
            self._settle_unknown()
            return
        self._reject(f"no registration within {self._login_timeout:g} s")

    def _window_over(self) -> None:
        self._window_call = None
        if self._unknown_read:
            self._settle_unknown()

    def _settle_unknown(self) -> None:
        """No link takes what the connection sent: a rule or the policy says whether it is held."""
        assert self._unknown is not None  # only read to its end with one
        self._cancel_timers()
        self._deadline = None
        again = self._new_reader().feed(self._received)
        if isinstance(again, LoginMatched):  # its link was added while the window ran
            self._matched(again)
            return
        if self._unknown.decide(self._received, self):
            self._held = True
            transport = connected_transport(self)
            if ITCPTransport.providedBy(transport):
                transport.setTcpKeepAlive(True)  # a held DTU gone silently (NAT timeout) is noticed
            return
        if self._unknown.policy.action == "pending":
            # Refused by the pending devices' bounds: the book sums refusals up in the log.
            close_transport(connected_transport(self))
            return
        self._reject(f"unknown registration {self._received[:64]!r}")

    # -- Holdable -----------------------------------------------------------------

    def hand_to(self, link: Link) -> None:
        """Serve this held connection as ``link``'s, with no reconnect."""
        self._held = False
        link.counters.bytes_in += self.dropped
        self._master = link.build_master()
        self._master.makeConnection(connected_transport(self))

    def close(self) -> None:
        self._held = False
        close_transport(connected_transport(self))

    def _throttle_key(self) -> str:
        """The host and the bytes where a registration belongs: a DTU sending an unknown
        registration (or none) is told apart from the good DTUs behind the same address."""
        return f"{self.host}/{self._head.hex()}"

    def _reject(self, why: str) -> None:
        key = self._throttle_key()
        if self._throttle.blocked(key):
            log.debug("Closed {peer}: {why}; too many failed logins", peer=self.peer, why=why)
        else:
            refused_for = self._throttle.failed(key)
            if refused_for:
                log.warn("Closed {peer}: {why}; not logging it again for {seconds:g} s",
                         peer=self.peer, why=why, seconds=refused_for)
            else:
                log.warn("Closed {peer}: {why}", peer=self.peer, why=why)
        close_transport(connected_transport(self))

    def _cancel_timers(self) -> None:
        for call in (self._deadline, self._probe_call, self._window_call):
            if call is not None and call.active():
                call.cancel()
        self._deadline = self._probe_call = self._window_call = None


class LoginFactory(Factory[LoginProtocol]):
    """For a listener whose DTUs identify themselves by registration packet."""

    noisy = False  # links log what matters; "Starting factory" at every redial does not

    def __init__(self, links: Mapping[bytes, Link], clock: IReactorTime, login_timeout: float,
                 throttle: LoginThrottle | None = None, probe: Probe | None = None,
                 unknown: UnknownRegistrations | None = None, window: float = 0.5) -> None:
        self.links = dict(links)
        self.clock = clock
        self.login_timeout = login_timeout
        self.throttle = throttle or LoginThrottle(clock)
        self.probe = probe
        self.unknown = unknown
        self.window = window

    def buildProtocol(self, addr: IAddress | None) -> LoginProtocol:
        return LoginProtocol(
            self.links, self.clock, self.login_timeout, self.throttle, self.probe, self.unknown, self.window
        )


class MasterFactory(Factory[ModbusMaster]):
    """For a dedicated port or an outgoing connection: every connection is the link's."""

    noisy = False

    def __init__(self, link: Link) -> None:
        self.link = link

    def buildProtocol(self, addr: IAddress | None) -> ModbusMaster:
        return self.link.build_master()


def link_factory(link: Link, clock: IReactorTime, login_timeout: float) -> IProtocolFactory:
    """The factory for a link with its own endpoint (``listen`` or ``connect``).

    The port names the link. A DTU that opens with its registration (modes ``connect`` and
    ``both``) has it checked first; one that sends it only in front of data (mode ``data``)
    says nothing until polled, so its connection is the link's at once and the prefix is
    stripped from every packet.
    """
    if link.settings.sends_registration_on_connect:
        assert link.settings.registration is not None  # what sends_registration_on_connect says
        return LoginFactory({link.settings.registration: link}, clock, login_timeout)
    return MasterFactory(link)


# -- serial lines -------------------------------------------------------------


class OpenPort(TypingProtocol):
    """An open serial port, as far as its service needs it."""

    def loseConnection(self) -> object: ...


#: Opens a serial port for a protocol; raises OSError or ValueError when it cannot.
PortOpener = Callable[[Protocol, SerialSettings, IReactorTime], OpenPort]


def open_serial_port(protocol: Protocol, settings: SerialSettings, reactor: IReactorTime) -> SerialPort:
    return SerialPort(
        protocol, settings.device, reactor, baudrate=settings.baudrate,
        bytesize=settings.bytesize, parity=settings.parity, stopbits=settings.stopbits,
    )


class SerialLinkService(Service):
    """Keeps a serial link's port open, reopening it (with backoff) when it fails or vanishes."""

    def __init__(
        self, link: Link, reactor: IReactorTime, *, open_port: PortOpener = open_serial_port,
        initial_delay: float = 1.0, max_delay: float = 60.0,
    ) -> None:
        assert link.settings.serial is not None
        self.link = link
        self._serial = link.settings.serial
        self._reactor = reactor
        self._open_port = open_port
        self._initial_delay = initial_delay
        self._max_delay = max_delay
        self._delay = initial_delay
        self._retry: IDelayedCall | None = None
        self._port: OpenPort | None = None
        link.when_lost(self._lost)

    def startService(self) -> None:
        super().startService()
        self._open()

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        port, self._port = self._port, None
        if port is not None:
            port.loseConnection()
        return None

    def _open(self) -> None:
        self._retry = None
        serial = self._serial
        try:
            self._port = self._open_port(self.link.build_master(), serial, self._reactor)
        except (OSError, ValueError) as exc:
            log.warn("Link {link}: cannot open {device} ({error}); retrying in {delay:g} s",
                     link=self.link.name, device=serial.device, error=exc, delay=self._delay)
            self._schedule_reopen()
            return
        self._delay = self._initial_delay

    def _lost(self) -> None:
        self._port = None
        if self.running:
            self._schedule_reopen()

    def _schedule_reopen(self) -> None:
        if self._retry is None:
            self._retry = self._reactor.callLater(self._delay, self._open)
            self._delay = min(self._delay * 2, self._max_delay)
