"""The HTTP JSON API as one twisted.web Site, with the web console's files at ``/`` (web/console_site.py).

Other parts of the center add their endpoints to the same router:
``api_service.factory.resource.add("GET", "/api/meters", handler)``.
"""

from __future__ import annotations

from twisted.web import http, server

from dtucenter.dtu.center import DTUCenter
from dtucenter.dtu.control import Control
from dtucenter.modbus.service import ModbusBridge
from dtucenter.store.facade import Store
from dtucenter.web.accounts import AccountApi
from dtucenter.web.callers import Authenticator
from dtucenter.web.console_site import ConsoleFiles, SessionApi
from dtucenter.web.dtus import DtuApi
from dtucenter.web.peers import Peers
from dtucenter.web.router import BoundedRequest, JsonErrorChannel, Router
from dtucenter.web.status import StatusApi


def build_site(
    center: DTUCenter, control: Control, store: Store, token: str, bridge: ModbusBridge | None = None,
    peers: Peers | None = None,
) -> server.Site:
    authenticator = Authenticator(token, store, center.now)
    router = Router(authenticator)
    SessionApi(authenticator).install(router)
    router.fallback = ConsoleFiles(authenticator)
    AccountApi(store, center.now).install(router)
    DtuApi(center, control, store, peers).install(router)
    StatusApi(center, store, bridge, peers.node if peers is not None else None).install(router)
    site = ApiSite(router)
    site.requestFactory = BoundedRequest
    site.displayTracebacks = False
    return site


class ApiSite(server.Site):
    """A Site whose connections answer what twisted.web refuses itself in JSON (``JsonErrorChannel``)."""

    def protocol(self) -> http._GenericHTTPChannelProtocol:
        # As twisted.web's own factory does (the wrapper switches to HTTP/2 when TLS negotiates it).
        return http._GenericHTTPChannelProtocol(JsonErrorChannel())
