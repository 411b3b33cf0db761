"""Every listener's endpoint: the fleet-sized backlog, and the PROXY protocol behind a balancer.

A listener is an endpoint string (``tcp:20000``); :func:`listening_endpoint` builds it with
:data:`DEFAULT_LISTEN_BACKLOG` unless the string gives ``backlog=``, and
:func:`loopback_unless_named` keeps the listeners only the host should reach on loopback.

Behind a TCP load balancer every connection comes from the balancer, so a listener
described with Twisted's own prefix, ``haproxy:tcp:20000``, reads HAProxy's PROXY
protocol header (version 1, text, or 2, binary) first and hands the protocol behind it a
transport whose ``getPeer()`` is the client the balancer accepted. Twisted's own
wrapper does the same, but builds the protocol behind it (whose ``connectionMade``
reads the peer: the DTU session, the Modbus login, their throttles) before the header
has arrived, and closes a connection whose first read is shorter than a header's
start, which TCP is free to deliver. Here the protocol is built once the header is
read, from any number of reads. A connection without a valid header is closed, counted
per listener and summarised in the log at a bounded rate (:class:`ProblemSummary`); one
that closes without sending anything (a balancer's health check, a port scan) is not
a problem.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any, cast

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import _parse, serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    ILoggingContext,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from dtucenter.addresses import describe_peer
from dtucenter.junk import ProblemSummary
from dtucenter.transports import close_transport

log = Logger()

#: Connections the kernel may hold for a listener before the center accepts them. Twisted's default, 50,
#: overflowed when a whole fleet redialled at once (a power cut): 6-9% of 10,000 logins were lost.
#: The kernel silently caps it at ``net.core.somaxconn`` (docs/deployment.md).
DEFAULT_LISTEN_BACKLOG = 4096

#: The endpoint types whose string takes ``backlog=`` (Twisted's own; a plugin's may not).
_TAKES_BACKLOG = frozenset({"tcp", "tcp6", "ssl", "unix"})

#: The prefix that puts the PROXY protocol in front of the endpoint after it (Twisted's own name).
PROXY_PREFIX = "haproxy"

#: Seconds a connection to a PROXY listener has to send its header. A balancer sends it at once;
#: a client that reached the listener directly, or sends nothing, must not hold a socket for long.
HEADER_TIMEOUT = 10.0


def listening_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """The server endpoint for ``description``, with :data:`DEFAULT_LISTEN_BACKLOG` unless it gives ``backlog=``.

    ``haproxy:`` in front of any endpoint reads a PROXY protocol header on each connection
    (:class:`ProxyHeaderFactory`); the endpoint behind it gets the same backlog.
    """
    # Twisted's own tokenizer, so that escaped colons (tcp6 addresses) are read as Twisted reads them.
    args, kwargs = _parse(description)
    if args and str(args[0]).lower() == PROXY_PREFIX:
        inner = description.split(":", 1)[1] if ":" in description else ""
        return ProxyHeaderEndpoint(listening_endpoint(reactor, inner), reactor, inner)
    if args and str(args[0]).lower() in _TAKES_BACKLOG and "backlog" not in kwargs:
        description = f"{description.rstrip(':')}:backlog={DEFAULT_LISTEN_BACKLOG}"
    endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
    return endpoint


#: The loopback interface of each endpoint type that listens on every interface unless told otherwise,
#: as an endpoint string writes it (colons escaped).
LOOPBACK = {"tcp": "127.0.0.1", "tcp6": r"\:\:1"}


def loopback_unless_named(endpoint: str, log: Logger, what: str, advice: str) -> str:
    """``tcp:2222`` and ``tcp6:2222`` bound to loopback, for a listener only the host itself should reach.

    Twisted would bind those to every interface, so an endpoint that names no interface
    gets the loopback one. One that names an interface is kept as given, with a warning
    in ``log`` (``what`` listens on ..., ``advice``) if that interface is not loopback. Other endpoint
    types (``unix:``, say) are kept as given; ``haproxy:`` in front of one changes nothing.
    """
    # Twisted's own tokenizer, so that escaped colons (tcp6 addresses) are read as Twisted reads them.
    args, kwargs = _parse(endpoint)
    if args and str(args[0]).lower() == PROXY_PREFIX:  # behind a balancer: the endpoint after the prefix
        inner = endpoint.partition(":")[2]
        return f"{endpoint[:len(PROXY_PREFIX)]}:{loopback_unless_named(inner, log, what, advice)}"
    loopback = LOOPBACK.get(str(args[0]).lower()) if args else None
    if loopback is None:
        return endpoint
    interface = kwargs.get("interface")
    if interface is None:
        return f"{endpoint.rstrip(':')}:interface={loopback}"
    try:
        is_loopback = ipaddress.ip_address(interface).is_loopback
    except ValueError:
        is_loopback = interface == "localhost"
    if not is_loopback:
        log.warn(
            "{what} listens on {interface} ({endpoint}), not only on loopback: {advice}",
            what=what, interface=interface, endpoint=endpoint, advice=advice,
        )
    return endpoint


# -- the header, sans-IO ------------------------------------------------------------------------

V1_START = b"PROXY "
#: The longest version 1 line the specification allows, CRLF included.
V1_MAX = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Longest version 2 header taken: 16 bytes and the addresses, and room for the TLVs HAProxy
#: may add (unique id, authority, TLS details). The format allows 64 KiB; no balancer needs it.
V2_MAX = 16 + 4096

_V2_LOCAL, _V2_PROXY = 0x20, 0x21
_V2_TCP4, _V2_TCP6 = 0x11, 0x21


@attrs.frozen
class HeaderRead:
    """A whole header. ``source`` is the balancer's client as (host, port), or None when the
    connection is the balancer's own (v2 ``LOCAL``, v1 ``UNKNOWN``, a family without an IP)."""

    source: tuple[str, int] | None
    #: What followed the header in the same reads: the first bytes of the protocol behind it.
    rest: bytes


@attrs.frozen
class HeaderRefused:
    reason: str


class ProxyHeaderParser:
    """Reads one PROXY protocol header, v1 or v2, from any number of reads.

    :meth:`feed` returns None until the header is whole or refused; it never raises and
    holds at most :data:`V2_MAX` bytes. Bytes that cannot begin a header are refused at once.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> HeaderRead | HeaderRefused | None:
        self._buffer += data
        head = self._buffer
        # Each read is checked against the start of both signatures: junk is refused at its first byte.
        if head[:12] == V2_SIGNATURE[: len(head[:12])]:
            return self._v2()
        if head[:6] == V1_START[: len(head[:6])]:
            return self._v1()
        return HeaderRefused(f"not a PROXY header: {head[:16]!r}")

    def _v1(self) -> HeaderRead | HeaderRefused | None:
        end = self._buffer.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if len(self._buffer) >= V1_MAX:
                return HeaderRefused(f"v1 header longer than {V1_MAX} bytes")
            return None
        line, rest = self._buffer[:end], self._buffer[end + 2:]
        self._buffer = b""
        fields = line.split(b" ")
        if len(fields) >= 2 and fields[1] == b"UNKNOWN":
            return HeaderRead(None, rest)
        if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
            return HeaderRefused(f"malformed v1 header: {line[:V1_MAX]!r}")
        try:
            source = ipaddress.ip_address(fields[2].decode("ascii"))
            ipaddress.ip_address(fields[3].decode("ascii"))
            port = _v1_port(fields[4])
            _v1_port(fields[5])
        except ValueError:
            return HeaderRefused(f"malformed v1 header: {line!r}")
        if source.version != (4 if fields[1] == b"TCP4" else 6):
            return HeaderRefused(f"v1 header's address is not {fields[1].decode()}: {line!r}")
        return HeaderRead((str(source), port), rest)

    def _v2(self) -> HeaderRead | HeaderRefused | None:
        if len(self._buffer) < 16:
            return None
        command, family, length = struct.unpack("!BBH", self._buffer[12:16])
        if command not in (_V2_LOCAL, _V2_PROXY):
            return HeaderRefused(f"v2 header with version and command {command:#04x}")
        if 16 + length > V2_MAX:
            return HeaderRefused(f"v2 header of {16 + length} bytes, more than {V2_MAX}")
        if len(self._buffer) < 16 + length:
            return None
        body, rest = self._buffer[16:16 + length], self._buffer[16 + length:]
        self._buffer = b""
        if command == _V2_LOCAL:
            return HeaderRead(None, rest)
        if family == _V2_TCP4 and length >= 12:
            host, _, port, _ = struct.unpack("!4s4sHH", body[:12])
            return HeaderRead((str(ipaddress.IPv4Address(host)), port), rest)
        if family == _V2_TCP6 and length >= 36:
            host, _, port, _ = struct.unpack("!16s16sHH", body[:36])
            return HeaderRead((str(ipaddress.IPv6Address(host)), port), rest)
        if family in (_V2_TCP4, _V2_TCP6):
            return HeaderRefused(f"v2 header too short for its addresses: {length} bytes")
        # UNSPEC or UNIX: there is no IP address to give; the connection stands for the balancer's.
        return HeaderRead(None, rest)


def _v1_port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0"):
        raise ValueError(text)
    port = int(text)
    if port > 65535:
        raise ValueError(text)
    return port


# -- the listener -------------------------------------------------------------------------------


class ProxyHeaderProtocol(ProtocolWrapper):
    """One connection to a PROXY listener: reads the header, then builds and serves the protocol
    behind it with itself as its transport, whose ``getPeer()`` is the balancer's client."""

    def __init__(self, factory: ProxyHeaderFactory) -> None:
        self.factory = factory
        self.proxy_factory = factory
        #: The protocol behind the header, built once the header is read.
        self.behind: IProtocol | None = None
        self._parser: ProxyHeaderParser | None = ProxyHeaderParser()
        self._source: IAddress | None = None
        self._received = False
        self._deadline: IDelayedCall | None = None

    def logPrefix(self) -> str:
        logging_context = ILoggingContext(self.behind, None)
        return logging_context.logPrefix() if logging_context is not None else self.__class__.__name__

    def makeConnection(self, transport: Any) -> None:
        # Provide what the transport provides (ITCPTransport...), as Twisted's wrappers do.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        self._deadline = self.proxy_factory.clock.callLater(HEADER_TIMEOUT, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self.behind is not None:
            self.behind.dataReceived(data)
            return
        if self._parser is None:
            return  # refused; the close is under way
        self._received = True
        result = self._parser.feed(data)
        if result is None:
            return
        self._parser = None
        self._cancel_deadline()
        if isinstance(result, HeaderRefused):
            self._refuse(result.reason)
            return
        if result.source is not None:
            host, port = result.source
            self._source = (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)
        behind = self.proxy_factory.wrappedFactory.buildProtocol(self.getPeer())
        if behind is None:
            self.loseConnection()
            return
        self.behind = behind
        behind.makeConnection(cast(ITransport, self))  # it relays ITransport to the socket's
        if result.rest and self.behind is not None and self.connected:
            self.behind.dataReceived(result.rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        self._cancel_deadline()
        if self.behind is not None:
            self.behind.connectionLost(reason)
            self.behind = None  # the two refer to each other
        elif self._received and self._parser is not None:
            self.proxy_factory.refused("closed in the middle of its header", self._balancer())

    @property
    def relays_to(self) -> ITransport | None:
        """The socket's transport, which writes go to (the DTU half's ``write_now`` sends on it at once)."""
        return self.transport

    def getPeer(self) -> IAddress:
        if self._source is not None:
            return self._source
        return self._balancer_address()

    def _balancer_address(self) -> IAddress:
        assert self.transport is not None
        address: IAddress = self.transport.getPeer()
        return address

    def _balancer(self) -> str:
        return describe_peer(self._balancer_address())

    def _timed_out(self) -> None:
        self._deadline = None
        self._parser = None
        self._refuse(f"no header within {HEADER_TIMEOUT:g} s")

    def _refuse(self, reason: str) -> None:
        self.proxy_factory.refused(reason, self._balancer())
        assert self.transport is not None
        close_transport(self.transport)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None


class ProxyHeaderFactory(Factory):
    """Wraps a listener's factory: each connection reads a PROXY header before the factory's
    protocol is built, for the peer the header names. Refused connections are summarised."""

    def __init__(self, wrapped: IProtocolFactory, clock: IReactorTime, listener: str) -> None:
        self.wrappedFactory = wrapped
        self.clock = clock
        self.listener = listener
        self.problems = ProblemSummary(clock)

    def buildProtocol(self, addr: IAddress | None) -> ProxyHeaderProtocol:
        return ProxyHeaderProtocol(self)

    def logPrefix(self) -> str:
        wrapped = self.wrappedFactory
        prefix = wrapped.logPrefix() if ILoggingContext.providedBy(wrapped) else wrapped.__class__.__name__
        return f"{prefix} (PROXY)"

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()
        if self.problems.untold:
            self._tell()

    def refused(self, reason: str, balancer: str) -> None:
        self.problems.add(reason.partition(":")[0], example=f"{balancer}: {reason}")
        if self.problems.due:
            self._tell()

    def _tell(self) -> None:
        counts, seconds, example = self.problems.take()
        total = sum(counts.values())
        log.warn(
            "PROXY listener {listener}: closed {count} connection(s) without a valid PROXY header "
            "in {seconds:.0f} s ({kinds}); for example {example}",
            listener=self.listener, count=total, seconds=seconds, example=example,
            kinds=", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())),
        )


@implementer(IStreamServerEndpoint)
class ProxyHeaderEndpoint:
    """An endpoint whose connections begin with a PROXY header (``haproxy:`` in front of it)."""

    def __init__(self, inner: IStreamServerEndpoint, clock: IReactorTime, description: str) -> None:
        self._inner = inner
        self._clock = clock
        self._description = description

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        factory = ProxyHeaderFactory(protocolFactory, self._clock, self._description)
        listening: Deferred[IListeningPort] = self._inner.listen(factory)
        return listening
