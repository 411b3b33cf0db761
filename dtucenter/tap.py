"""``twistd dtucenter``: command-line options and the service tree."""

from __future__ import annotations

import gc
import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar

import attrs
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from dtucenter.adoption import Adopter
from dtucenter.alarms.service import AlarmService
from dtucenter.cluster import ClusterNode, generated_node_id, join
from dtucenter.config import (
    Settings,
    UsageError,
    command_line_options,
    load_settings,
    read_link_definition,
    read_meter_definition,
)
from dtucenter.discovery import PendingBook, PendingLimits, PendingService
from dtucenter.dtu.center import CenterSettings, DTUCenter
from dtucenter.dtu.control import Control
from dtucenter.dtu.session import DTUFactory
from dtucenter.dtu.udp import DTUDatagramProtocol, UDPListenerService
from dtucenter.events import EventHub
from dtucenter.isotime import utc_now
from dtucenter.listeners import listening_endpoint, loopback_unless_named
from dtucenter.modbus.scada_server import ScadaFactory, ScadaServer
from dtucenter.modbus.service import SHARED_LISTENER, ModbusBridge, PortRecordingEndpoint
from dtucenter.modbus.templates import TemplateCatalog, read_template
from dtucenter.process import OwnProcess, bounded_log_file
from dtucenter.reload import Reloader
from dtucenter.store import accounts, nodes, queries
from dtucenter.store import links as device_links
from dtucenter.store import meters as device_meters
from dtucenter.store import templates as device_templates
from dtucenter.store.db import DatabaseURLError, open_engine
from dtucenter.store.dtus import DtuStore
from dtucenter.store.facade import Store
from dtucenter.store.pending import PendingDeviceStore
from dtucenter.store.recorder import MeterRecorder
from dtucenter.store.retention import RetentionJob, RetentionPolicy
from dtucenter.store.schema import SchemaError
from dtucenter.web.alarms import AlarmApi
from dtucenter.web.auth import TokenFileError, resolve_token
from dtucenter.web.charts import ChartApi
from dtucenter.web.console_site import console_url
from dtucenter.web.definitions import DefinitionApi
from dtucenter.web.live import LiveFeed
from dtucenter.web.meters import MeterApi
from dtucenter.web.metrics import MetricsApi, MetricsSources, metrics_registry, metrics_site
from dtucenter.web.peers import Peers
from dtucenter.web.pending import PendingApi
from dtucenter.web.router import Router
from dtucenter.web.site import build_site
from dtucenter.web.templates import TemplateApi

if TYPE_CHECKING:
    from dtucenter.mqtt.publisher import MqttPublisher

log = Logger()

#: Every option but --config comes from the settings' declarations (dtucenter/config.py).
OPTIONS = command_line_options()


@contextmanager
def exit_on_usage_error() -> Iterator[None]:
    """The one place a :class:`UsageError` ends the process: with one line and a non-zero status.

    Not ``usage.UsageError``: twistd would print its whole usage text above the one line that matters.
    """
    try:
        yield
    except UsageError as e:
        raise SystemExit(f"dtucenter: {e}") from None


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Run the DTU data center. Command-line options override the --config file."

    # Defaults are None so that a value given in the config file is not
    # overridden by a default here; config.Settings holds the real defaults.
    optParameters: ClassVar[list[list[Any]]] = [
        ["config", "c", None, "TOML configuration file."],
        *([option.name, None, None, option.doc] for option in OPTIONS if not option.flag),
    ]
    optFlags: ClassVar[list[list[Any]]] = [[option.name, None, option.doc] for option in OPTIONS if option.flag]

    settings: Settings

    def postOptions(self) -> None:
        with exit_on_usage_error():
            self.settings = self.read_settings()

    def read_settings(self) -> Settings:
        """The settings from the config file as it is now, with these options on top: at start,
        and again at each reload. Raises :class:`UsageError`."""
        # A flag not given is 0 here; the settings take only what was given.
        given = {
            option.name: (bool(self[option.name]) or None) if option.flag else self[option.name] for option in OPTIONS
        }
        return load_settings(self["config"], given, os.environ)


class CenterService(MultiService):
    """The whole center. It refuses to run without a port it was told to listen on:
    a DTU or meter that cannot reach the center is worse than a center that does not start."""

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self._reactor = reactor
        #: What happens in the center, for the integrations and the console (dtucenter/events.py).
        self.events = EventHub()
        self._listeners: list[tuple[str, Callable[[], Deferred[IListeningPort]]]] = []
        #: Reads the config file again and applies what changed (SIGHUP, the manhole).
        self.reloader: Reloader

    def require_listening(self, what: str, when_listening: Callable[[], Deferred[IListeningPort]]) -> None:
        """``what`` names the option or key for the error message."""
        self._listeners.append((what, when_listening))

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failed_now: list[str] = []
        bound: list[IListeningPort] = []
        starting = True

        def check(outcome: object, what: str) -> None:
            if not isinstance(outcome, Failure):
                bound.append(outcome)  # type: ignore[arg-type]
                return
            message = f"{what}: {outcome.getErrorMessage()}"
            if starting:
                failed_now.append(message)
            else:  # an endpoint that listens asynchronously: the reactor already runs
                log.critical("dtucenter: {message}; stopping", message=message)
                self._reactor.stop()

        for what, when_listening in self._listeners:
            when_listening().addBoth(check, what)
        starting = False
        if failed_now:
            # Nothing else has started yet; leave no port open behind the exit either.
            for port in bound:
                port.stopListening()
            with exit_on_usage_error():
                raise UsageError(failed_now[0])


class ListeningService(StreamServerEndpointService):
    """A listener that can tell which port it got (tests and logs ask for port 0)."""

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, name: str) -> None:
        self._recording = PortRecordingEndpoint(endpoint, name)
        super().__init__(self._recording, factory)
        self.setName(name)

    def when_listening(self) -> Deferred[IListeningPort]:
        """Fires with the port once bound, or fails with why it could not listen."""
        return self._recording.when_listening()


#: CPython collects its youngest generation after 700 net new container objects by default.
GC_YOUNG_THRESHOLD = 20_000


def tune_garbage_collector() -> None:
    """For the center's own process, once its services are built.

    At ingest rates the default thresholds ran the cyclic collector ~130 times a
    second and a full collection of ~120,000 objects about once a second, 50-60 ms
    each with the GIL held: about a tenth of the reactor thread, and ack latency
    spikes (benchmarks/findings.md). Objects made at start-up (modules, the
    schema, the services) live as long as the process, so they are frozen out of
    every collection, and the youngest generation is collected less often: most
    per-frame objects are freed by reference counting long before.
    """
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """``twistd dtucenter`` calls this without a reactor: the process is the center's own,
    so the garbage collector is tuned for it. Tests pass their reactor and keep theirs."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        with exit_on_usage_error():
            center = build_service(options.settings, global_reactor, options.read_settings)
        tune_garbage_collector()
        return own_process(center, options, global_reactor)
    with exit_on_usage_error():
        return build_service(options.settings, reactor, options.read_settings)


def own_process(center: CenterService, options: Options, reactor: Any) -> OwnProcess:
    """The center as twistd runs it: its log file bounded, its signals handled (dtucenter/process.py)."""
    settings = options.settings
    twistd_options = getattr(options, "parent", None) or {}  # twistd's own options, when twistd parsed ours
    log_file = bounded_log_file(twistd_options, settings.log_rotate_size, settings.log_keep)
    process = OwnProcess(center, reactor, log_file, center.reloader.reload)
    center.reloader.on_reload(process.apply_log_settings)
    return process


def build_service(
    settings: Settings, reactor: Any, reread: Callable[[], Settings] | None = None
) -> CenterService:
    """The service tree; raises :class:`UsageError` for what the settings could not show before.

    ``reread`` reads the settings again for a reload (:class:`~dtucenter.reload.Reloader`);
    without it a reload finds nothing changed."""
    try:
        engine = open_engine(settings.db, upgrade=not settings.no_upgrade)
    except (DatabaseURLError, SchemaError) as e:
        raise UsageError(f"{settings.where('db')}: {e}") from None
    report_missing_adoption_accounts(engine, settings)
    top = CenterService(reactor)
    node = settings.node_id or generated_node_id()
    membership = ClusterMembership(settings, engine, node, reactor)
    membership.setName("cluster-membership")
    membership.setServiceParent(top)
    store = Store(engine, reactor)
    store.setName("store")
    store.setServiceParent(top)
    dtu_store = DtuStore(store, node)
    book = PendingBook(
        reactor, PendingLimits(settings.pending_per_host, settings.pending_total, settings.pending_expire),
        PendingDeviceStore(store),
    )
    center = DTUCenter(
        dtu_store,
        reactor,
        CenterSettings(
            dialect=settings.dialect, last_seen_interval=settings.last_seen_interval, **live_center_settings(settings)
        ),
        events=top.events,
        book=book,
    )
    center.setName("center")
    center.setServiceParent(top)
    # Always, even without meters: its start-up sync marks meters that left the config.
    recorder = MeterRecorder(store, reactor, settings.modbus, settings.last_seen_interval, stats=center.stats)
    recorder.setName("meter-recorder")
    recorder.setServiceParent(top)
    if settings.retention.job:
        # After the store: stopped before it, so that a step under way ends on a running store.
        policy = attrs.asdict(settings.retention, filter=lambda field, _: field.name != "job")
        retention = RetentionJob(store, reactor, RetentionPolicy(**policy))
        retention.setName("retention")
        retention.setServiceParent(top)
    dtu_listener = ListeningService(listening_endpoint(reactor, settings.dtu), DTUFactory(center, reactor), "dtu-tcp")
    dtu_listener.setServiceParent(top)
    top.require_listening(settings.where("dtu"), dtu_listener.when_listening)
    control = Control(center, dtu_store)
    control.setName("control")
    control.setServiceParent(top)
    udp = settings.udp_interface_and_port
    if udp is not None:
        interface, port = udp
        udp_protocol = DTUDatagramProtocol(center, reactor, settings.dtu_udp_pending)
        udp_service = UDPListenerService(reactor, interface, port, udp_protocol)
        udp_service.setName("dtu-udp")
        udp_service.setServiceParent(top)
    pending = PendingService(book)
    pending.setName("pending")
    pending.setServiceParent(top)
    templates = TemplateCatalog()
    shared = engine.dialect.name != "sqlite"
    bridge, starting = add_modbus(top, settings, recorder, templates, reactor, book, claimed_links=shared)
    cluster = ClusterNode(node, store, reactor, settings.node_lease, center, bridge, shared=shared,
                          url=settings.node_url)
    cluster.setName("cluster")
    cluster.setServiceParent(top)
    adopter = Adopter(
        store, bridge, book, center.now, read_link_definition, read_meter_definition, recorder.synced, templates,
        enrol_dtu=queries.enrol_adopted_dtu, release_dtu=center.release_held,
    )
    bridge.unknown.adopter = adopter
    alarms = add_alarms(top, settings, center, bridge, store, reactor)
    reloader = top.reloader = Reloader(settings, reread or (lambda: settings), recorder, bridge, reactor)
    reloader.hold_until(starting)
    reloader.on_reload(lambda new: alarms.set_file_rules(new.alarms))
    reloader.on_reload(partial(apply_center_settings, center))
    reloader.on_reload(lambda new: bridge.apply_settings(new.modbus))
    if udp is not None:
        reloader.on_reload(lambda new: setattr(udp_protocol, "max_pending", new.dtu_udp_pending))
    mqtt = add_mqtt(top, settings, store, recorder, reactor) if settings.mqtt.url is not None else None
    if settings.manhole is not None:
        add_manhole(top, settings, settings.manhole, center, bridge, reactor)
    api = None
    if settings.api != "off":
        api = add_api(
            top, settings, center, control, store, recorder, bridge, templates, alarms, reactor, cluster, book.count
        )
        PendingApi(book, adopter).install(api)
    add_metrics(top, settings, MetricsSources(
        center, store, bridge, api, pending_devices=book.count, per_link=settings.metrics_per_link, mqtt=mqtt
    ), reactor)
    return top


def add_alarms(
    top: CenterService, settings: Settings, center: DTUCenter, bridge: ModbusBridge, store: Store, reactor: Any
) -> AlarmService:
    """Alarm rules evaluated on the center's events (dtucenter/alarms/)."""

    def online(kind: str, device: str) -> bool:
        if kind == "dtu":
            return int(device) in center.sessions
        return any(link.name == device and link.online for link in bridge.link_statuses())

    alarms = AlarmService(store, top.events, reactor, center.now, online, settings.alarms)
    alarms.setName("alarms")
    alarms.setServiceParent(top)
    return alarms


class ClusterMembership(Service):
    """Joins the cluster as the center starts, before anything touches the database (not when the
    service tree is built, which tests and checks do without starting it): takes the SQLite file's
    lock, then registers the node. Refused with one line when another center runs on the same
    SQLite file or a live node has the id given."""

    def __init__(self, settings: Settings, engine: Engine, node: str, clock: Any) -> None:
        self._settings = settings
        self._engine = engine
        self._node = node
        self._clock = clock
        self._held: IO[bytes] | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        settings = self._settings
        with exit_on_usage_error():
            try:
                self._held = nodes.hold_sqlite_file(self._engine)
                join(self._engine, self._node, settings.node_url, settings.node_lease, utc_now(self._clock),
                     alone=self._held is not None)
            except nodes.DatabaseInUse as e:
                raise UsageError(f"{settings.where('db')}: {e}") from None
            except nodes.NodeConflict as e:
                raise UsageError(f"{settings.where('node_id')}: {e}") from None
        log.info(
            "This center is node {node}{generated}", node=self._node,
            generated="" if settings.node_id else " (a generated id: --node-id gives one of your choice)",
        )

    def stopService(self) -> None:
        super().stopService()
        if self._held is not None:
            self._held.close()


def report_missing_adoption_accounts(engine: Engine, settings: Settings) -> None:
    """An account that ``adopt:`` or a rule names but the database lacks: said at start, in one line
    each, as adoptions into it fail until it is made (through the API or ``dtucenter account add``)."""
    modbus = settings.modbus
    named = {(rule.account, f"rule {rule.match.written}") for rule in modbus.rules if rule.account is not None}
    adoption = modbus.unknown_registration.adoption
    if adoption is not None and adoption.account is not None:
        named.add((adoption.account, f"{settings.where('modbus.unknown_registration')}"))
    with Session(engine) as session:
        for account, where in sorted(named):
            try:
                accounts.account_id(session, account)
            except accounts.AccountError:
                log.warn("{where}: no account {account!r} yet: adoptions into it fail until it is made",
                         where=where, account=account)


def live_center_settings(settings: Settings) -> dict[str, Any]:
    """The DTU side's settings that a reload changes (``Reload.LIVE``), as ``CenterSettings`` takes them:
    read by each new connection and each decision, so they apply to what comes next."""
    return {
        "enroll_unknown": settings.unknown_dtu == "accept",
        "hold_unknown": settings.unknown_dtu == "pending",
        "login_timeout": settings.login_timeout,
        "command_timeout": settings.command_timeout,
    }


def apply_center_settings(center: DTUCenter, settings: Settings) -> None:
    center.settings = attrs.evolve(center.settings, **live_center_settings(settings))


def add_modbus(
    top: CenterService, settings: Settings, recorder: MeterRecorder, templates: TemplateCatalog, reactor: Any,
    book: PendingBook | None = None,
    claimed_links: bool = False,
) -> tuple[ModbusBridge, Deferred[None]]:
    """The Modbus bridge: the file's links and meters at once, the database's (those the API
    made, and the accounts' templates they may be made from) once the file's have been
    imported into it. Returns the bridge, and a Deferred that
    fires (with None, even after a failure: logged here) once the database's have started."""
    modbus = settings.modbus
    bridge = ModbusBridge(
        modbus, reactor, recorder, events=top.events, book=book, claimed_links=claimed_links
    )
    bridge.setName("modbus")
    bridge.setServiceParent(top)
    if modbus.listen is not None:
        top.require_listening(settings.where("modbus.listen"), partial(bridge.listening, SHARED_LISTENER))
    for link in modbus.links:
        if link.kind == "listen":
            top.require_listening(settings.where_link(link, "listen"), partial(bridge.listening, link.name))
    if modbus.server is not None:
        factory = ScadaFactory(bridge, reactor, allow=modbus.server_allow, max_clients=modbus.server_max_clients)
        scada = ScadaServer(listening_endpoint(reactor, modbus.server), factory)
        scada.setServiceParent(top)
        top.require_listening(settings.where("modbus.server"), scada.when_listening)
    starting = recorder.synced().addCallback(
        lambda _: ensureDeferred(start_database_devices(recorder.store, bridge, templates))
    )
    starting.addErrback(
        lambda f: log.failure("Could not start the links and meters of the database", f)
    )
    return bridge, starting


async def start_database_devices(store: Store, bridge: ModbusBridge, templates: TemplateCatalog) -> None:
    """Load the accounts' templates into ``templates``, serve the links and poll the meters the
    API made (the file's are served already), each meter's template resolved for its account.

    One that cannot be read or served is logged and skipped: the others still start.
    ``templates`` is marked loaded only once all of it is done, loaded or not: the API's
    writers wait for that, so that a link or meter written in the first moments neither
    misses a stored template nor is served twice (once by the API, once from the row it
    wrote, read here).
    """
    try:
        for row in await store.read(device_templates.list_templates):
            source = f"database: template {row.name!r} of account {row.account!r}"
            try:
                templates.put(row.account_id, read_template(json.loads(row.document), source))
            except ValueError as e:  # a ConfigError, bad JSON, a shipped name
                log.error("{source}: not loaded: {error}", source=source, error=e)
        for name, definition in await store.read(device_links.api_link_definitions):
            source = f"database: link {name!r}"
            try:
                bridge.add_link(read_link_definition(json.loads(definition), source))
            except (ValueError, UsageError) as e:  # a ConfigError, a LinkConflict, bad JSON
                log.error("{source}: not served: {error}", source=source, error=e)
        for name, account, definition in await store.read(device_meters.api_meter_definitions):
            source = f"database: meter {name!r}"
            try:
                meter = read_meter_definition(json.loads(definition), source, templates.finder(account))
                taken = bridge.set_meter_unserved_if_taken(meter)  # the file's meter took it since
                if taken is not None:
                    log.error("{source}: polled, but not served to SCADA: {error}", source=source, error=taken)
            except (ValueError, LookupError, UsageError) as e:  # a ConfigError, an UnknownLink, bad JSON
                log.error("{source}: not polled: {error}", source=source, error=e)
    finally:
        templates.finish_loading()


def add_mqtt(
    top: CenterService, settings: Settings, store: Store, recorder: MeterRecorder, reactor: Any
) -> MqttPublisher:
    """Publishing to the broker: a service that hears the event hub, keeping its backlog in the store."""
    from dtucenter.isotime import utc_now
    from dtucenter.mqtt.client import BrokerConnection
    from dtucenter.mqtt.messages import Composer
    from dtucenter.mqtt.publisher import MqttPublisher
    from dtucenter.store.outbox import MqttOutbox

    mqtt = settings.mqtt
    broker = mqtt.broker
    assert broker is not None
    composer = Composer(mqtt)
    connection = BrokerConnection(
        mqtt, broker, reactor,
        center_status=lambda online: composer.center_status(online, utc_now(reactor).isoformat()),
        last_will=composer.center_status(False, None),
    )
    publisher = MqttPublisher(
        mqtt, top.events, MqttOutbox(store), connection, composer, reactor, devices_known=recorder.synced
    )
    publisher.setName("mqtt")
    publisher.setServiceParent(top)
    return publisher


def add_api(
    top: CenterService, settings: Settings, center: DTUCenter, control: Control, store: Store,
    recorder: MeterRecorder, bridge: ModbusBridge | None, templates: TemplateCatalog, alarms: AlarmService,
    reactor: Any, cluster: ClusterNode, pending_count: Callable[[], int] | None = None,
) -> Router:
    """The API's listener; returns its router, where other parts add their endpoints."""
    try:
        token = resolve_token(settings.api_token, settings.db)
    except TokenFileError as e:
        raise UsageError(str(e)) from None
    peers = Peers(reactor, cluster.node, store)
    site = build_site(center, control, store, token, bridge, peers)
    MeterApi(recorder, bridge, center.now, peers).install(site.resource)
    DefinitionApi(
        recorder, bridge, settings.source, center.now, read_link_definition, read_meter_definition, templates
    ).install(site.resource)
    TemplateApi(recorder, bridge, templates, read_meter_definition, center.now).install(site.resource)
    AlarmApi(alarms, recorder, center.now).install(site.resource)
    ChartApi(store, recorder, center.now).install(site.resource)
    live = LiveFeed(top.events, center, store, bridge, reactor, pending_count)
    live.setName("live")
    live.setServiceParent(top)
    live.install(site.resource)
    listener = ListeningService(listening_endpoint(reactor, settings.api), site, "api")
    listener.setServiceParent(top)
    top.require_listening(settings.where("api"), listener.when_listening)
    # Where to point a browser, once known; a listener that failed is reported by require_listening.
    listener.when_listening().addCallbacks(
        lambda port: log.info("Web console: {url} (sign in with an API token)",
                              url=console_url(port.getHost(), tls=settings.api.startswith(("ssl:", "tls:")))),
        lambda _: None,
    )
    if cluster.url is None:
        listening = listener.when_listening().addCallback(lambda port: setattr(cluster, "url", api_url(port)))
        listening.addErrback(lambda _: None)  # a port that will not bind stops the start: require_listening says why
    router: Router = site.resource
    return router


def api_url(port: IListeningPort) -> str:
    """How the other nodes reach this API by default: the address it listens on, or, listening
    on every address, this host's name."""
    address = port.getHost()
    host = getattr(address, "host", "")
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{getattr(address, 'port', 0)}"


def add_metrics(top: CenterService, settings: Settings, sources: MetricsSources, reactor: Any) -> None:
    """/metrics on the API (with its token), and on a listener of its own without one if ``--metrics`` asks."""
    registry = metrics_registry(sources)
    if sources.api is not None:
        MetricsApi(registry).install(sources.api)
    if settings.metrics is None:
        return
    endpoint = loopback_unless_named(
        settings.metrics, log, "The metrics listener",
        "anyone who can reach it reads the center's metrics without a token; prefer /metrics on the API",
    )
    listener = ListeningService(listening_endpoint(reactor, endpoint), metrics_site(registry), "metrics")
    listener.setServiceParent(top)
    top.require_listening(settings.where("metrics"), listener.when_listening)


def add_manhole(
    top: CenterService, settings: Settings, endpoint: str, center: DTUCenter, bridge: ModbusBridge | None,
    reactor: Any,
) -> None:
    from dtucenter.manhole import ManholeError, loopback_unless_named, manhole_factory

    namespace = {
        "service": top,
        "center": center,
        "sessions": center.sessions,
        "stats": center.stats,
        "store": top.getServiceNamed("store"),
        "bridge": bridge,
        "reloader": top.reloader,
        "reactor": reactor,
    }
    try:
        factory = manhole_factory(
            namespace,
            Path(settings.manhole_keys).expanduser(),
            Path(settings.manhole_host_key).expanduser(),
        )
    except ManholeError as e:
        raise UsageError(str(e)) from None
    listener = ListeningService(listening_endpoint(reactor, loopback_unless_named(endpoint)), factory, "manhole")
    listener.setServiceParent(top)
    top.require_listening(settings.where("manhole"), listener.when_listening)
