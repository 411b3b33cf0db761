"""The Modbus bridge as one service: links, listeners, outgoing connections, serial ports, poller."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs
from twisted.application.internet import ClientService, StreamServerEndpointService, backoffPolicy
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dtucenter.discovery import PendingBook
from dtucenter.events import EventHub, MeterFailed, MeterRead
from dtucenter.isotime import utc_from_seconds
from dtucenter.listeners import listening_endpoint
from dtucenter.modbus.config import LinkSettings, MeterSettings, ModbusSettings
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
from dtucenter.modbus.master import LinkCounters
from dtucenter.modbus.points import Value
from dtucenter.modbus.poller import MeterSink, MeterStatus, Poller, Reading
from dtucenter.modbus.unknown import HeldLimits, UnknownRegistrations

SHARED_LISTENER = "modbus"
#: Link kinds the center reaches out on itself (an outgoing connection, a serial port), as opposed to waiting for.
DIALLED = ("connect", "serial")

log = Logger()


class LinkConflict(ValueError):
    """A link cannot be added as given: its name or registration is taken, or it needs a listener that is off."""


class UnknownLink(LookupError):
    """No link of that name."""


class ScadaUnitTaken(ValueError):
    """A meter cannot be added or changed as given: another meter answers SCADA under its ``scada_unit``."""


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


def _probe(settings: ModbusSettings) -> Probe | None:
    return Probe(settings.probe, settings.probe_after) if settings.probe is not None else None


def _fire(d: defer.Deferred[IListeningPort], outcome: IListeningPort | Failure) -> None:
    if isinstance(outcome, Failure):
        d.errback(outcome)
    else:
        d.callback(outcome)


def _add_counters(total: LinkCounters, more: LinkCounters) -> None:
    for field, value in more.as_dict().items():
        setattr(total, field, getattr(total, field) + value)


class PublishingSink:
    """A :class:`MeterSink` that also tells each poll's outcome to the event hub's listeners."""

    def __init__(self, sink: MeterSink, events: EventHub) -> None:
        self._sink = sink
        self._events = events

    def record_values(self, meter: str, time: float, values: Mapping[str, Value]) -> None:
        self._sink.record_values(meter, time, values)
        if self._events.listening:
            self._events.publish(MeterRead(meter, utc_from_seconds(time), dict(values)))

    def record_failure(self, meter: str, time: float, reason: str) -> None:
        self._sink.record_failure(meter, time, reason)
        if self._events.listening:
            self._events.publish(MeterFailed(meter, utc_from_seconds(time), reason))


class ModbusBridge(MultiService):
    """Everything of the Modbus bridge, built from parsed settings.

    ``reactor`` provides time, TCP and (for serial links) file descriptors; it is
    annotated with IReactorTime alone, as an annotation cannot require several zope
    interfaces at once and the endpoint parsers and serial ports take it untyped;
    ``sink`` receives the poll results; ``events`` hears them too, and links going on and offline.
    """

    def __init__(
        self,
        settings: ModbusSettings,
        reactor: IReactorTime,
        sink: MeterSink,
        *,
        open_serial: PortOpener = open_serial_port,
        max_backoff: float = 300.0,
        book: PendingBook | None = None,
        events: EventHub | None = None,
        claimed_links: bool = False,
    ) -> None:
        super().__init__()
        self.settings = settings
        #: On a cluster, a link the center dials (``connect``) or opens (``serial``) runs only
        #: once :meth:`hold_links` says this node holds it: one node at a time may.
        self.claimed_links = claimed_links
        self.events = events if events is not None else EventHub()
        self.login_timeout = settings.login_timeout
        self._reactor = reactor
        self._open_serial = open_serial
        self.links: dict[str, Link] = {}
        #: The traffic of links removed or replaced since the start, so that totals over links never go down.
        self.retired_counters = LinkCounters()
        #: Links removed whose connection is still closing: what it fails still counts on them.
        self._leaving: list[Link] = []
        self._endpoints: dict[str, PortRecordingEndpoint] = {}
        #: The service that owns each link's own listener, outgoing connection or serial port.
        self._link_services: dict[str, Service] = {}
        #: The shared listener's registration table: changed in place, so a new connection sees
        #: the links of the moment it registers.
        self._shared: dict[bytes, Link] = {}
        #: The shared listener's unknown registrations: rules, the policy, the held connections.
        self.unknown = UnknownRegistrations(
            settings.unknown_registration, settings.rules, book,
            HeldLimits(settings.held_connections, settings.held_connections_per_host), SHARED_LISTENER,
        )
        self._login_factory: LoginFactory | None = None
        if settings.listen is not None:
            # Listening even with no shared link yet: one may be added while the center runs.
            login_factory = LoginFactory(self._shared, reactor, self.login_timeout, probe=_probe(settings),
                                         unknown=self.unknown, window=settings.registration_window)
            login_factory.links = self._shared  # the factory copies what it is given; share the table instead
            self._login_factory = login_factory
            self._listen(SHARED_LISTENER, listening_endpoint(reactor, settings.listen), login_factory)

        # The poller reads self.links at each request, so links added later are its channels too.
        #: scada_unit -> the meter that answers under it (the file's are checked unique by the config).
        self._scada_units: dict[int, str] = {m.scada_unit: m.name for m in settings.meters if m.scada_unit is not None}
        self.poller = Poller(
            settings.meters, self.links, PublishingSink(sink, self.events), reactor, max_backoff=max_backoff
        )
        self.poller.setServiceParent(self)
        for link_settings in settings.links:
            self.add_link(link_settings)

    # -- links and meters changed while running --------------------------------

    def apply_settings(self, settings: ModbusSettings) -> None:
        """Take up the ``[modbus]`` settings a reload may change (``Reload.LIVE``): the registration
        timeout, the probe and the registration window for the shared listener's new connections
        and for links added from now on, the unknown-registration policy, rules and held-connection
        bounds for the next unknown DTU, and ``settings`` itself for what reads it.
        Its links and meters are not looked at: they change one by one (``add_link``...)."""
        self.settings = settings
        self.login_timeout = settings.login_timeout
        self.unknown.policy = settings.unknown_registration
        self.unknown.rules = settings.rules
        self.unknown.limits = HeldLimits(settings.held_connections, settings.held_connections_per_host)
        if self._login_factory is not None:
            self._login_factory.login_timeout = settings.login_timeout
            self._login_factory.probe = _probe(settings)
            self._login_factory.window = settings.registration_window

    def add_link(self, settings: LinkSettings) -> None:
        """Start serving a new link at once: its registration is accepted on the shared listener,
        or its own port listens, its outgoing connection dials, its serial port opens.

        Raises :class:`LinkConflict` for a name or registration already in use, or for a
        shared link when the bridge has no shared listener.
        """
        if settings.name in self.links:
            raise LinkConflict(f"a link named {settings.name!r} exists")
        self._check_shared(settings, None)
        link = Link(settings, self._reactor, events=self.events)
        self.links[link.name] = link
        reactor = self._reactor
        kind = settings.kind
        service: Service | None = None
        if kind == "shared":
            assert settings.registration is not None  # checked above
            self._shared[settings.registration] = link
            held = self.unknown.claim(settings.registration)
            if held is not None:  # a pending device adopted: its connection is the link's, no reconnect
                held.hand_to(link)
        elif kind == "listen":
            assert settings.listen is not None  # what makes its kind "listen"
            link_listener = listening_endpoint(reactor, settings.listen)
            service = self._listen(link.name, link_listener, link_factory(link, reactor, self.login_timeout))
        elif kind == "connect":
            service = ClientService(
                clientFromString(reactor, settings.connect),
                link_factory(link, reactor, self.login_timeout),
                retryPolicy=backoffPolicy(initialDelay=1.0, maxDelay=60.0),
                clock=reactor,
            )
        elif kind == "serial":
            service = SerialLinkService(link, reactor, open_port=self._open_serial)
        if kind in DIALLED:
            assert service is not None
            if self.claimed_links:
                self.poller.paused_links.add(link.name)  # until this node holds it
            else:
                service.setServiceParent(self)
        if service is not None:
            self._link_services[link.name] = service
        log.info("Link {link} added ({kind})", link=link.name, kind=kind)

    def remove_link(self, name: str, *, keep_meters: bool = False) -> defer.Deferred[None]:
        """Stop serving a link: its registration is refused, its own port or outgoing connection
        or serial port stops, its connection is closed, and (unless ``keep_meters``) its
        meters stop being polled. Fires once the connection is gone. Raises :class:`UnknownLink`.
        """
        link = self.links.pop(name, None)
        if link is None:
            raise UnknownLink(f"no link named {name!r}")
        if link.settings.registration is not None and self._shared.get(link.settings.registration) is link:
            del self._shared[link.settings.registration]
        if not keep_meters:
            for meter in [m for m in self.poller.meter_settings() if m.link == name]:
                self.remove_meter(meter.name)
        self._endpoints.pop(name, None)
        self.poller.link_stats.pop(name, None)
        waits: list[defer.Deferred[None]] = []
        self.poller.paused_links.discard(name)
        service = self._link_services.pop(name, None)
        if service is not None and service.parent is not None:
            stopped = service.disownServiceParent()
            waits.append(defer.maybeDeferred(lambda: stopped).addCallback(lambda _: None))
        self._leaving.append(link)
        waits.append(link.disconnect().addBoth(self._retire, link))
        log.info("Link {link} removed", link=name)
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    def update_link(self, settings: LinkSettings) -> defer.Deferred[None]:
        """Replace a link's settings: its connection is closed and it is served anew; its meters
        keep their schedules and use the new link from their next poll. Raises :class:`UnknownLink`.

        A link with its own port listens anew once its old port is closed (the new one is
        likely the same port); the Deferred fires then, or fails with :class:`LinkConflict`.
        """
        old = self.links.get(settings.name)
        if old is None:
            raise UnknownLink(f"no link named {settings.name!r}")
        self._check_shared(settings, old)
        gone = self.remove_link(settings.name, keep_meters=True)
        if old.settings.kind == "listen":
            return gone.addCallback(lambda _: self.add_link(settings))
        self.add_link(settings)
        return gone

    # -- a cluster's links: one node runs each dialled link ---------------------

    def dialled_links(self) -> list[str]:
        """The links this center would dial or open: on a cluster, each runs on one node only."""
        return [name for name, link in self.links.items() if link.settings.kind in DIALLED]

    def hold_links(self, held: set[str]) -> None:
        """Run the dialled links of ``held`` (this node holds them now) and stop the others'
        connections, their meters paused: another node runs them. Nothing to do unless
        ``claimed_links``: alone, the bridge runs every link it has."""
        if not self.claimed_links:
            return
        for name in self.dialled_links():
            service = self._link_services[name]
            running = service.parent is not None
            if name in held and not running:
                log.info("Link {link}: this node holds it now; starting it", link=name)
                self.poller.paused_links.discard(name)
                service.setServiceParent(self)
            elif name not in held and running:
                log.info("Link {link}: held by another node now; stopping it here", link=name)
                self.poller.paused_links.add(name)
                service.disownServiceParent()
                self.links[name].disconnect()
    def _retire(self, result: object, link: Link) -> object:
        """A removed link's connection is gone: its traffic joins the retired totals."""
        self._leaving.remove(link)
        _add_counters(self.retired_counters, link.counters)
        return result

    def total_counters(self) -> LinkCounters:
        """Every link's traffic since the start, of links removed or replaced too."""
        total = LinkCounters(**self.retired_counters.as_dict())
        for link in (*self.links.values(), *self._leaving):
            _add_counters(total, link.counters)
        return total

    def _check_shared(self, settings: LinkSettings, replaced: Link | None) -> None:
        """A shared link needs the shared listener and a registration no other link's can be taken for."""
        if settings.kind != "shared":
            return
        if self.settings.listen is None:
            raise LinkConflict(
                f"link {settings.name!r} has no listen, connect or serial, and the [modbus] listener is off"
            )
        registration = settings.registration
        assert registration is not None  # how a shared link is told apart; the config checks
        # On a byte stream "DTU-1" cannot be told apart from the start of "DTU-10".
        for taken, owner in self._shared.items():
            if owner is not replaced and (taken.startswith(registration) or registration.startswith(taken)):
                raise LinkConflict(
                    f"registration {registration!r} cannot be told apart from {taken!r} of link {owner.name!r}"
                )

    def set_meter(self, settings: MeterSettings) -> None:
        """Add a meter, or change one: polled from its next slot with its new points.
        Raises :class:`UnknownLink` when its link does not exist, :class:`ScadaUnitTaken`
        when another meter answers SCADA under its ``scada_unit``."""
        if settings.link not in self.links:
            raise UnknownLink(f"meter {settings.name!r}: no link named {settings.link!r}")
        unit = settings.scada_unit
        holder = None if unit is None else self._scada_units.get(unit)
        if holder is not None and holder != settings.name:
            raise ScadaUnitTaken(
                f"meter {settings.name!r}: scada_unit {unit} is already the scada_unit of meter {holder!r}"
            )
        self.poller.set_meter(settings)
        self._drop_scada_unit(settings.name)
        if unit is not None:
            self._scada_units[unit] = settings.name

    def set_meter_unserved_if_taken(self, settings: MeterSettings) -> ScadaUnitTaken | None:
        """:meth:`set_meter`, but a meter whose ``scada_unit`` another meter holds is polled all the
        same, only not served to SCADA: its data matters more. Returns the refusal, to be logged.

        For the meters a start or a reload sets from the database or the file: whichever meter
        held the unit first keeps it (at a start, the file's are set first)."""
        try:
            self.set_meter(settings)
        except ScadaUnitTaken as taken:
            self.set_meter(attrs.evolve(settings, scada_unit=None))
            return taken
        return None

    def remove_meter(self, name: str) -> None:
        """Stop polling a meter. Raises :class:`~dtucenter.modbus.poller.UnknownMeter`."""
        self.poller.remove_meter(name)
        self._drop_scada_unit(name)

    def _drop_scada_unit(self, name: str) -> None:
        for unit in [unit for unit, holder in self._scada_units.items() if holder == name]:
            del self._scada_units[unit]

    def _listen(self, name: str, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> Service:
        recording = PortRecordingEndpoint(endpoint, name)
        self._endpoints[name] = recording
        service = StreamServerEndpointService(recording, factory)
        service.setServiceParent(self)
        return service

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
        """For /api/status: links online, request timeouts, pending devices' held connections, and
        every poll's outcome and duration."""
        return {
            "links": len(self.links),
            "links_online": sum(link.online for link in self.links.values()),
            "request_timeouts": self.total_counters().timeouts,
            "held_connections": self.unknown.held,
            **self.poller.stats.as_json(),
        }

    def meter_statuses(self) -> list[MeterStatus]:
        return [self.poller.status(name) for name in self.poller.meter_names()]

    def meter_status(self, name: str) -> MeterStatus:
        return self.poller.status(name)

    def write(self, meter: str, point: str, value: object) -> defer.Deferred[None]:
        return self.poller.write(meter, point, value)

    # -- what the Modbus TCP server for SCADA needs (dtucenter/modbus/scada.py) -------------------

    def scada_meter(self, unit: int) -> MeterSettings | None:
        """The meter that answers SCADA under ``unit``, if one does."""
        name = self._scada_units.get(unit)
        return None if name is None else self.poller.settings_of(name)

    def latest_values(self, meter: str) -> Mapping[str, tuple[Value, float]]:
        return self.poller.latest_values(meter)

    def read_now(self, meter: str, points: Sequence[str] | None = None) -> defer.Deferred[Reading]:
        return self.poller.read_now(meter, points)
