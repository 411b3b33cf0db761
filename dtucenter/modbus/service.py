"""The Modbus bridge as one service: links, listeners, outgoing connections, serial ports, poller."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.application.internet import ClientService, StreamServerEndpointService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dtucenter.modbus.config import ModbusSettings
from dtucenter.modbus.links import (
    Link,
    LinkStatus,
    LoginFactory,
    PortOpener,
    Probe,
    SerialLinkService,
    link_factory,
    open_serial_port,
)
from dtucenter.modbus.poller import MeterSink, MeterStatus, Poller, Reading
from dtucenter.setting import listening_endpoint

SHARED_LISTENER = "modbus"

log = Logger()


@implementer(IStreamServerEndpoint)
class PortRecordingEndpoint:
    """Passes ``listen`` through and remembers the port, e.g. to learn what ``tcp:0`` bound.

    A failure to listen is logged in one line and kept for :meth:`when_listening`,
    whose caller decides what it means (the center refuses to run without its port).
    """

    def __init__(self, endpoint: IStreamServerEndpoint, name: str) -> None:
        self._endpoint = endpoint
        self._name = name
        self._outcome: IListeningPort | Failure | None = None  # the port, or the Failure to listen
        self._waiting: list[defer.Deferred[IListeningPort]] = []

    # IStreamServerEndpoint promises a port; after a failure this gives None instead, which is
    # what StreamServerEndpointService, the only caller, leaves there itself and takes as "no port to stop".
    def listen(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IListeningPort | None]:  # type: ignore[override]
        return self._endpoint.listen(protocolFactory).addBoth(self._record)

    def _record(self, outcome: IListeningPort | Failure) -> IListeningPort | None:
        self._outcome = outcome
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            _fire(d, outcome)
        if isinstance(outcome, Failure):
            log.error("Listener {name} cannot listen: {error}", name=self._name, error=outcome.getErrorMessage())
            return None  # told above and to when_listening; no traceback from the service
        return outcome

    def when_listening(self) -> defer.Deferred[IListeningPort]:
        d: defer.Deferred[IListeningPort] = defer.Deferred()
        if self._outcome is None:
            self._waiting.append(d)
        else:
            _fire(d, self._outcome)
        return d


def _fire(d: defer.Deferred[IListeningPort], outcome: IListeningPort | Failure) -> None:
    if isinstance(outcome, Failure):
        d.errback(outcome)
    else:
        d.callback(outcome)


class ModbusBridge(MultiService):
    """Everything of the Modbus bridge, built from parsed settings.

    ``reactor`` provides time, TCP and (for serial links) file descriptors; it is
    annotated with IReactorTime alone, as an annotation cannot require several zope
    interfaces at once and the endpoint parsers and serial ports take it untyped;
    ``sink`` receives the poll results.
    """

    def __init__(
        self,
        settings: ModbusSettings,
        reactor: IReactorTime,
        sink: MeterSink,
        *,
        open_serial: PortOpener = open_serial_port,
        max_backoff: float = 300.0,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.login_timeout = settings.login_timeout
        self.links: dict[str, Link] = {link.name: Link(link, reactor) for link in settings.links}
        self._endpoints: dict[str, PortRecordingEndpoint] = {}

        shared: dict[bytes, Link] = {}
        for link in self.links.values():
            if link.settings.kind == "shared":
                assert link.settings.registration is not None  # how a shared link is told apart; the config checks
                shared[link.settings.registration] = link
        if shared:
            assert settings.listen is not None  # the config refuses shared links without it
            probe = Probe(settings.probe, settings.probe_after) if settings.probe is not None else None
            login_factory = LoginFactory(shared, reactor, self.login_timeout, probe=probe)
            self._listen(SHARED_LISTENER, listening_endpoint(reactor, settings.listen), login_factory)

        for link in self.links.values():
            kind = link.settings.kind
            if kind == "listen":
                assert link.settings.listen is not None  # what makes its kind "listen"
                link_listener = listening_endpoint(reactor, link.settings.listen)
                self._listen(link.name, link_listener, link_factory(link, reactor, self.login_timeout))
            elif kind == "connect":
                client = ClientService(
                    clientFromString(reactor, link.settings.connect),
                    link_factory(link, reactor, self.login_timeout),
                    retryPolicy=backoffPolicy(initialDelay=1.0, maxDelay=60.0),
                    clock=reactor,
                )
                client.setServiceParent(self)
            elif kind == "serial":
                SerialLinkService(link, reactor, open_port=open_serial).setServiceParent(self)

        self.poller = Poller(settings.meters, self.links, sink, reactor, max_backoff=max_backoff)
        self.poller.setServiceParent(self)

    def _listen(self, name: str, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        recording = PortRecordingEndpoint(endpoint, name)
        self._endpoints[name] = recording
        StreamServerEndpointService(recording, factory).setServiceParent(self)

    def listening(self, name: str = SHARED_LISTENER) -> defer.Deferred[IListeningPort]:
        """Fires with the listening port of the shared listener or of a ``listen`` link, once bound."""
        return self._endpoints[name].when_listening()

    def stopService(self) -> defer.Deferred[None]:
        stopped = defer.maybeDeferred(super().stopService)
        # Listeners stop accepting, but accepted connections would live on.
        closed = [link.disconnect() for link in self.links.values()]
        return defer.gatherResults([stopped, *closed], consumeErrors=True).addCallback(lambda _: None)

    # -- what the store, the API and the CLI need ------------------------------

    def link_statuses(self) -> list[LinkStatus]:
        return [link.status() for link in self.links.values()]

    def polling_summary(self) -> dict[str, object]:
        """For /api/status: links online, request timeouts, and every poll's outcome and duration."""
        return {
            "links": len(self.links),
            "links_online": sum(link.online for link in self.links.values()),
            "request_timeouts": sum(link.counters.timeouts for link in self.links.values()),
            **self.poller.stats.as_json(),
        }

    def meter_statuses(self) -> list[MeterStatus]:
        return [self.poller.status(name) for name in self.poller.meter_names()]

    def meter_status(self, name: str) -> MeterStatus:
        return self.poller.status(name)

    def write(self, meter: str, point: str, value: object) -> defer.Deferred[None]:
        return self.poller.write(meter, point, value)

    def read_now(self, meter: str, points: Sequence[str] | None = None) -> defer.Deferred[Reading]:
        return self.poller.read_now(meter, points)
