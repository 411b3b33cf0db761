"""The Modbus TCP server for SCADA, the Twisted side: a listener, its clients and their transports.

Everything a request means is in :mod:`dtucenter.modbus.scada`; here a connection is
admitted (the allow-list, the most clients at once) and its bytes are passed on. A client
is read no further while its answers are not read (its transport's buffer is full) or
while :data:`~dtucenter.modbus.scada.DEFAULT_MAX_PENDING` of its requests are under way:
its memory is bounded whatever it sends.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import cast

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IListeningPort,
    IPushProducer,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dtucenter.addresses import describe_peer
from dtucenter.junk import ProblemSummary
from dtucenter.modbus.scada import DEFAULT_MAX_PENDING, BadHeader, ClientRequests, Gateway, Meters
from dtucenter.modbus.service import PortRecordingEndpoint
from dtucenter.transports import close_transport, connected_transport

log = Logger()

#: The listener's name in logs and in the service tree.
SCADA_LISTENER = "modbus-server"


def allowed(address: IAddress, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] | None) -> bool:
    """Whether a client's address is in one of ``networks`` (None: any address)."""
    if networks is None:
        return True
    try:
        host = ipaddress.ip_address(getattr(address, "host", ""))
    except ValueError:
        return False  # not an IP client (a UNIX socket): no allow-list admits it
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        host = host.ipv4_mapped
    return any(host in network for network in networks)


@implementer(IPushProducer)
class ScadaProtocol(Protocol):
    """One SCADA client: its bytes to :class:`ClientRequests`, the answers back."""

    def __init__(self, factory: ScadaFactory) -> None:
        self._factory = factory
        self._requests: ClientRequests | None = None
        self._reading = True
        self.peer = "?"

    def connectionMade(self) -> None:
        transport = connected_transport(self)
        self.peer = describe_peer(transport.getPeer())
        refusal = self._factory.admit(self, transport.getPeer())
        if refusal is not None:
            close_transport(transport)
            return
        self._requests = ClientRequests(
            self._factory.gateway, self._send, on_room=self._resume, problems=ProblemSummary(self._factory.clock),
            max_pending=self._factory.max_pending,
        )
        cast(IConsumer, transport).registerProducer(self, True)  # a TCP transport is a consumer and a producer
        log.info("SCADA client {peer} connected", peer=self.peer)

    def _send(self, frame: bytes) -> None:
        connected_transport(self).write(frame)
        if self._requests is not None and self._requests.problems.due:
            self._tell_problems(self._requests.problems)

    def _tell_problems(self, problems: ProblemSummary) -> None:
        """At most once a minute: a SCADA master configured for registers no point has shows up here."""
        counts, seconds, example = problems.take()
        told = ", ".join(f"{name} {count:,}" for name, count in sorted(counts.items()))
        log.info("SCADA client {peer}: exceptions answered in {seconds:.0f} s: {told}; e.g. {example}",
                 peer=self.peer, seconds=seconds, told=told, example=example)

    def dataReceived(self, data: bytes) -> None:
        if self._requests is not None:
            self._check(self._requests.data_received(data))

    def _resume(self) -> None:
        if self._requests is not None:
            self._check(self._requests.resume())

    def _check(self, bad: BadHeader | None) -> None:
        assert self._requests is not None
        transport = connected_transport(self)
        if bad is not None:
            log.warn("SCADA client {peer}: {reason}, starting {data}; closing the connection",
                     peer=self.peer, reason=bad.reason, data=bad.data.hex(" "))
            self._requests.close()
            close_transport(transport)
            return
        reading = not (self._requests.full or self._requests.paused)
        if reading != self._reading:
            self._reading = reading
            producer = cast(IPushProducer, transport)
            if reading:
                producer.resumeProducing()
            else:
                producer.pauseProducing()

    # IPushProducer: the transport says when the client stops (and starts) reading its answers.

    def pauseProducing(self) -> None:
        if self._requests is not None:
            self._requests.paused = True
            self._check(None)

    def resumeProducing(self) -> None:
        if self._requests is not None:
            self._requests.paused = False
            self._resume()

    def stopProducing(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._requests is None:
            return
        self._requests.close()
        self._factory.clients.discard(self)
        if self._requests.problems.untold:
            self._tell_problems(self._requests.problems)
        log.info("SCADA client {peer} disconnected after {answered} answers",
                 peer=self.peer, answered=self._requests.answered)


class ScadaFactory(Factory):
    def __init__(
        self, meters: Meters, clock: IReactorTime, *, allow: Sequence[str] | None = None, max_clients: int = 64,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        self.gateway = Gateway(meters, clock)
        self.clock = clock
        self.networks = None if allow is None else [ipaddress.ip_network(network) for network in allow]
        self.max_clients = max_clients
        self.max_pending = max_pending
        self.clients: set[ScadaProtocol] = set()
        self._refusals = ProblemSummary(clock)

    def buildProtocol(self, addr: IAddress | None) -> ScadaProtocol:
        return ScadaProtocol(self)

    def admit(self, client: ScadaProtocol, address: IAddress) -> str | None:
        """Count the client in, or say why it is refused (told in the log at a bounded rate)."""
        if not allowed(address, self.networks):
            refusal = "not in server_allow"
        elif len(self.clients) >= self.max_clients:
            refusal = f"{self.max_clients} clients connected already (server_max_clients)"
        else:
            self.clients.add(client)
            return None
        self._refusals.add(refusal, example=client.peer)
        if self._refusals.due:
            counts, seconds, example = self._refusals.take()
            told = ", ".join(f"{count} {why}" for why, count in counts.items())
            log.warn("SCADA clients refused in {seconds:.0f} s: {told} (e.g. {example})",
                     seconds=seconds, told=told, example=example)
        return refusal


class ScadaServer(StreamServerEndpointService):
    """The listener; stopping it also closes the clients it accepted."""

    def __init__(self, endpoint: IStreamServerEndpoint, factory: ScadaFactory) -> None:
        self._recording = PortRecordingEndpoint(endpoint, SCADA_LISTENER)
        super().__init__(self._recording, factory)
        self.scada = factory
        self.setName(SCADA_LISTENER)

    def when_listening(self) -> defer.Deferred[IListeningPort]:
        return self._recording.when_listening()

    def stopService(self) -> defer.Deferred[None]:
        stopped = defer.maybeDeferred(super().stopService)
        for client in list(self.scada.clients):
            if client.transport is not None:
                close_transport(client.transport)
        return stopped.addCallback(lambda _: None)
