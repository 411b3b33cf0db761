"""``twistd dtucenter``: command-line options and the service tree."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from dtucenter.config import DEFAULT_API, DEFAULT_DB_URL, ConfigError, Settings, load_settings
from dtucenter.dtu.center import CenterSettings, DTUCenter
from dtucenter.dtu.control import Control
from dtucenter.dtu.session import DTUFactory
from dtucenter.dtu.udp import DTUDatagramProtocol, UDPListenerService
from dtucenter.modbus.config import ModbusConfigError, ModbusSettings, parse_modbus_settings
from dtucenter.modbus.service import SHARED_LISTENER, ModbusBridge, PortRecordingEndpoint
from dtucenter.store.db import DatabaseURLError, open_engine
from dtucenter.store.facade import Store
from dtucenter.store.recorder import MeterRecorder, check_storable
from dtucenter.store.schema import SchemaError
from dtucenter.web.auth import ENVIRONMENT_VARIABLE, TokenFileError, resolve_token
from dtucenter.web.meters import MeterApi
from dtucenter.web.site import build_site

log = Logger()


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Run the DTU data center. Command-line options override the --config file."

    # Defaults are None so that a value given in the config file is not
    # overridden by a default here; config.Settings holds the real defaults.
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
        ["dtu", None, None, "Endpoint for DTU TCP connections (default tcp:20000)."],
        ["dtu-udp", None, None, "UDP PORT or INTERFACE:PORT for DTUs over UDP (default off)."],
        ["db", None, None, f"SQLAlchemy database URL (default {DEFAULT_DB_URL})."],
        ["unknown-dtu", None, None, "reject (default) or accept (enrol) DTUs not in the database."],
        ["login-timeout", None, None, "Seconds a new connection has to log in (default 30)."],
        ["frame-head", None, None, "Frame head bytes in hex (default AA55)."],
        ["max-frame-length", None, None, "Largest accepted frame Length field (default 1024)."],
        ["manhole", None, None, "Endpoint for an SSH Python prompt into the running center (default off)."],
        ["manhole-keys", None, None, "authorized_keys file for the manhole (default ~/.ssh/authorized_keys)."],
        ["manhole-host-key", None, None, "Manhole SSH host key file, created if missing (default dtucenter_manhole_host_key)."],
        ["command-timeout", None, None, "Seconds a DTU has to answer a command (default 10)."],
        ["api", None, None, f"Endpoint for the HTTP JSON API, or off (default {DEFAULT_API})."],
        ["api-token", None, None,
         f"Bearer token for the API (else ${ENVIRONMENT_VARIABLE}, the config file, or dtucenter.token)."],
        ["modbus", None, None,
         "Endpoint where DTUs dial in with a registration packet for Modbus polling (config [modbus] listen)."],
    ]

    #: False with --no-upgrade: start only on a schema already at this release's head.
    upgrade_schema = True

    def opt_no_upgrade(self) -> None:
        """Refuse to start when the database schema is older, rather than upgrade it (dtucenter db upgrade)."""
        self.upgrade_schema = False

    settings: Settings
    modbus: ModbusSettings
    #: The Modbus registration timeout when it does not come from [modbus] login_timeout.
    modbus_login_timeout: float | None

    def postOptions(self) -> None:
        # --modbus belongs to the [modbus] table, read below with the rest of the bridge's settings.
        overrides = {
            key: self[key] for key in self.keys() if key not in ("config", "modbus") and self[key] is not None
        }
        if "api-token" not in overrides and os.environ.get(ENVIRONMENT_VARIABLE):
            overrides["api-token"] = os.environ[ENVIRONMENT_VARIABLE]
        try:
            self.settings = load_settings(self["config"], overrides)
        except ConfigError as e:
            # One line, not twistd's full usage text: the operator needs to see what is wrong.
            raise SystemExit(f"dtucenter: {e}") from None
        self.modbus = modbus_settings(self.settings, self["modbus"])
        self.modbus_login_timeout = modbus_login_timeout(
            self.settings, given_on_command_line=self["login-timeout"] is not None
        )


def modbus_settings(settings: Settings, listen: str | None = None) -> ModbusSettings:
    """The [modbus], [[link]] and [[meter]] tables of the config file, with --modbus for [modbus] listen."""
    document = dict(settings.extra)
    if listen is not None:
        server_endpoint(None, listen, "modbus")
        section = document.get("modbus", {})
        document["modbus"] = {**section, "listen": listen} if isinstance(section, Mapping) else section
    try:
        parsed = parse_modbus_settings(document)
        check_storable(parsed)
    except ModbusConfigError as e:
        raise SystemExit(f"dtucenter: {settings.source}: {e}") from None
    return parsed


def modbus_login_timeout(settings: Settings, given_on_command_line: bool) -> float | None:
    """--login-timeout on the command line wins; else [modbus] login_timeout; else the file's or default one."""
    section = settings.extra.get("modbus")
    if not given_on_command_line and isinstance(section, Mapping) and "login_timeout" in section:
        return None  # the bridge takes it from its own settings
    return settings.login_timeout


class CenterService(MultiService):
    """The whole center. It refuses to run without a port it was told to listen on:
    a DTU or meter that cannot reach the center is worse than a center that does not start."""

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self._reactor = reactor
        self._listeners: list[tuple[str, Callable[[], Deferred[IListeningPort]]]] = []

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
            message = f"dtucenter: {what}: {outcome.getErrorMessage()}"
            if starting:
                failed_now.append(message)
            else:  # an endpoint that listens asynchronously: the reactor already runs
                log.critical("{message}; stopping", message=message)
                self._reactor.stop()

        for what, when_listening in self._listeners:
            when_listening().addBoth(check, what)
        starting = False
        if failed_now:
            # Nothing else has started yet; leave no port open behind the exit either.
            for port in bound:
                port.stopListening()
            raise SystemExit(failed_now[0])


class ListeningService(StreamServerEndpointService):
    """A listener that can tell which port it got (tests and logs ask for port 0)."""

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Factory, name: str) -> None:
        self._recording = PortRecordingEndpoint(endpoint, name)
        super().__init__(self._recording, factory)
        self.setName(name)

    def when_listening(self) -> Deferred[IListeningPort]:
        """Fires with the port once bound, or fails with why it could not listen."""
        return self._recording.when_listening()


def server_endpoint(reactor: Any, description: str, option: str) -> IStreamServerEndpoint:
    """An endpoint from an option's string, or a one-line exit naming the option."""
    try:
        return serverFromString(reactor, description)
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"dtucenter: --{option}: not a usable endpoint {description!r}: {e}") from None


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


def makeService(options: Options | dict[str, Any], reactor: Any = None) -> MultiService:
    """``twistd dtucenter`` calls this without a reactor: the process is the center's own,
    so the garbage collector is tuned for it. Tests pass their reactor and keep theirs."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        service = makeService(options, global_reactor)
        tune_garbage_collector()
        return service
    if isinstance(options, Options):
        settings, modbus = options.settings, options.modbus
        modbus_timeout, modbus_given = options.modbus_login_timeout, options["modbus"] is not None
    else:
        settings = options["settings"]
        modbus, modbus_timeout, modbus_given = modbus_settings(settings), modbus_login_timeout(settings, False), False
    try:
        engine = open_engine(settings.db, upgrade=getattr(options, "upgrade_schema", True))
    except (DatabaseURLError, SchemaError) as e:
        raise SystemExit(f"dtucenter: --db: {e}") from None
    top = CenterService(reactor)
    store = Store(engine, reactor)
    store.setName("store")
    store.setServiceParent(top)
    center = DTUCenter(
        store,
        reactor,
        CenterSettings(
            enroll_unknown=settings.unknown_dtu == "accept",
            login_timeout=settings.login_timeout,
            dialect=settings.dialect,
            last_seen_interval=settings.last_seen_interval,
            command_timeout=settings.command_timeout,
        ),
    )
    center.setName("center")
    center.setServiceParent(top)
    # Always, even without meters: its start-up sync marks meters that left the config.
    recorder = MeterRecorder(store, reactor, modbus, settings.last_seen_interval, stats=center.stats)
    recorder.setName("meter-recorder")
    recorder.setServiceParent(top)
    endpoint = server_endpoint(reactor, settings.dtu, "dtu")
    dtu_listener = ListeningService(endpoint, DTUFactory(center, reactor), "dtu-tcp")
    dtu_listener.setServiceParent(top)
    top.require_listening("--dtu", dtu_listener.when_listening)
    control = Control(center)
    control.setName("control")
    control.setServiceParent(top)
    udp = settings.udp_interface_and_port
    if udp is not None:
        interface, port = udp
        udp_service = UDPListenerService(reactor, interface, port, DTUDatagramProtocol(center, reactor))
        udp_service.setName("dtu-udp")
        udp_service.setServiceParent(top)
    bridge = add_modbus(top, settings, modbus, modbus_timeout, modbus_given, recorder, reactor)
    if settings.manhole is not None:
        add_manhole(top, settings, bridge, reactor)
    if settings.api != "off":
        add_api(top, settings, center, control, recorder, bridge, reactor)
    return top


def add_modbus(
    top: CenterService, settings: Settings, modbus: ModbusSettings, login_timeout: float | None,
    listen_given: bool, recorder: MeterRecorder, reactor: Any,
) -> ModbusBridge | None:
    """The Modbus bridge, when the config has links for it."""
    if not modbus.links:
        if modbus.listen is not None:
            log.warn("Modbus: no [[link]] is configured, so nothing listens on {listen}", listen=modbus.listen)
        return None
    bridge = ModbusBridge(modbus, reactor, recorder, login_timeout=login_timeout)
    bridge.setName("modbus")
    bridge.setServiceParent(top)
    if any(link.kind == "shared" for link in modbus.links):
        what = "--modbus" if listen_given else f"{settings.source}: modbus.listen"
        top.require_listening(what, partial(bridge.listening, SHARED_LISTENER))
    for index, link in enumerate(modbus.links):
        if link.kind == "listen":
            top.require_listening(f"{settings.source}: link[{index}].listen", partial(bridge.listening, link.name))
    return bridge


def add_api(
    top: CenterService, settings: Settings, center: DTUCenter, control: Control, recorder: MeterRecorder,
    bridge: ModbusBridge | None, reactor: Any,
) -> None:
    endpoint = server_endpoint(reactor, settings.api, "api")
    try:
        token = resolve_token(settings.api_token, settings.db)
    except TokenFileError as e:
        raise SystemExit(f"dtucenter: {e}") from None
    site = build_site(center, control, token, bridge)
    MeterApi(recorder, bridge, center.now).install(site.resource)
    listener = ListeningService(endpoint, site, "api")
    listener.setServiceParent(top)
    top.require_listening("--api", listener.when_listening)


def add_manhole(top: CenterService, settings: Settings, bridge: ModbusBridge | None, reactor: Any) -> None:
    from dtucenter.manhole import ManholeError, manhole_factory

    center = top.getServiceNamed("center")
    namespace = {
        "service": top,
        "center": center,
        "sessions": center.sessions,  # type: ignore[attr-defined]
        "stats": center.stats,  # type: ignore[attr-defined]
        "store": top.getServiceNamed("store"),
        "bridge": bridge,
        "reactor": reactor,
    }
    endpoint = server_endpoint(reactor, settings.manhole, "manhole")
    try:
        factory = manhole_factory(
            namespace,
            Path(settings.manhole_keys).expanduser(),
            Path(settings.manhole_host_key).expanduser(),
        )
    except ManholeError as e:
        raise SystemExit(f"dtucenter: {e}") from None
    listener = ListeningService(endpoint, factory, "manhole")
    listener.setServiceParent(top)
    top.require_listening("--manhole", listener.when_listening)
