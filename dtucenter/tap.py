"""``twistd dtucenter``: command-line options and the service tree."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.python import usage

from dtucenter.config import DEFAULT_API, DEFAULT_DB_URL, ConfigError, Settings, load_settings
from dtucenter.dtu.center import CenterSettings, DTUCenter
from dtucenter.dtu.control import Control
from dtucenter.dtu.session import DTUFactory
from dtucenter.dtu.udp import DTUDatagramProtocol, UDPListenerService
from dtucenter.store.db import DatabaseURLError, open_engine
from dtucenter.store.facade import Store
from dtucenter.web.auth import ENVIRONMENT_VARIABLE, TokenFileError, resolve_token
from dtucenter.web.site import build_site


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
    ]

    settings: Settings

    def postOptions(self) -> None:
        overrides = {
            key: self[key] for key in self.keys() if key != "config" and self[key] is not None
        }
        if "api-token" not in overrides and os.environ.get(ENVIRONMENT_VARIABLE):
            overrides["api-token"] = os.environ[ENVIRONMENT_VARIABLE]
        try:
            self.settings = load_settings(self["config"], overrides)
        except ConfigError as e:
            # One line, not twistd's full usage text: the operator needs to see what is wrong.
            raise SystemExit(f"dtucenter: {e}") from None


class ListeningService(StreamServerEndpointService):
    """A listener that can tell which port it got (tests and logs ask for port 0)."""

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Factory, name: str) -> None:
        super().__init__(endpoint, factory)
        self.setName(name)
        self._port_waiters: list[Deferred[IListeningPort]] = []
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._listening)  # type: ignore[union-attr]

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        waiters, self._port_waiters = self._port_waiters, []
        for d in waiters:
            d.callback(port)
        return port

    def when_listening(self) -> Deferred[IListeningPort]:
        d: Deferred[IListeningPort] = Deferred()
        if self.port is not None:
            d.callback(self.port)
        else:
            self._port_waiters.append(d)
        return d


def server_endpoint(reactor: Any, description: str, option: str) -> IStreamServerEndpoint:
    """An endpoint from an option's string, or a one-line exit naming the option."""
    try:
        return serverFromString(reactor, description)
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"dtucenter: --{option}: not a usable endpoint {description!r}: {e}") from None


def makeService(options: Options | dict[str, Any], reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    settings = options.settings if isinstance(options, Options) else options["settings"]
    try:
        engine = open_engine(settings.db)
    except DatabaseURLError as e:
        raise SystemExit(f"dtucenter: --db: {e}") from None
    top = MultiService()
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
    endpoint = server_endpoint(reactor, settings.dtu, "dtu")
    ListeningService(endpoint, DTUFactory(center, reactor), "dtu-tcp").setServiceParent(top)
    control = Control(center)
    control.setName("control")
    control.setServiceParent(top)
    udp = settings.udp_interface_and_port
    if udp is not None:
        interface, port = udp
        udp_service = UDPListenerService(reactor, interface, port, DTUDatagramProtocol(center, reactor))
        udp_service.setName("dtu-udp")
        udp_service.setServiceParent(top)
    if settings.manhole is not None:
        add_manhole(top, settings, reactor)
    if settings.api != "off":
        add_api(top, settings, center, control, reactor)
    return top


def add_api(top: MultiService, settings: Settings, center: DTUCenter, control: Control, reactor: Any) -> None:
    endpoint = server_endpoint(reactor, settings.api, "api")
    try:
        token = resolve_token(settings.api_token, settings.db)
    except TokenFileError as e:
        raise SystemExit(f"dtucenter: {e}") from None
    ListeningService(endpoint, build_site(center, control, token), "api").setServiceParent(top)


def add_manhole(top: MultiService, settings: Settings, reactor: Any) -> None:
    from dtucenter.manhole import ManholeError, manhole_factory

    center = top.getServiceNamed("center")
    namespace = {
        "service": top,
        "center": center,
        "sessions": center.sessions,  # type: ignore[attr-defined]
        "stats": center.stats,  # type: ignore[attr-defined]
        "store": top.getServiceNamed("store"),
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
    ListeningService(endpoint, factory, "manhole").setServiceParent(top)

