"""The web console: its sign-in sessions (``/api/session``) and its files, served on the API's listener at ``/``.

The files are package data (``dtucenter/web/console/``), read once at start:
``pip install .`` is the whole install, and nothing is built. ``GET /``
answers the console to a browser with a live session and the sign-in page
to any other, so a signed-out browser sees nothing else; the data itself is
only ever behind the API's own checks (``Caller`` scoping).

A session is opened with an API token (``POST /api/session`` with the
token as a bearer token, as any API client sends it) and kept server-side
(``store/console_sessions.py``): the cookie holds only a random secret and
is ``HttpOnly``, ``SameSite=Strict``, expires, and is ``Secure`` over TLS;
sign-out deletes the row, and revoking the token ends its sessions.
State-changing requests made with the cookie carry the session's CSRF
token in ``X-CSRF-Token`` (router.py checks it); bearer-token clients are
unaffected.
"""

from __future__ import annotations

import datetime as dt
from importlib import resources
from typing import Any

import attrs
from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from dtucenter.web.callers import Authenticator
from dtucenter.web.router import SESSION_COOKIE, ApiError, Call, Reply, Router

log = Logger()

#: How long a console session lasts from sign-in; then the browser signs in again.
SESSION_LIFETIME = dt.timedelta(hours=12)

#: The console's files by URL path: (package file, content type). Nothing else under / is served.
FILES: dict[str, tuple[str, str]] = {
    "/console/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/console/signin.js": ("signin.js", "text/javascript; charset=utf-8"),
    "/console/style.css": ("style.css", "text/css; charset=utf-8"),
    "/console/vendor/uPlot.iife.min.js": ("vendor/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "/console/vendor/uPlot.min.css": ("vendor/uPlot.min.css", "text/css; charset=utf-8"),
    "/console/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
#: What ``GET /`` answers: the console with a live session, the sign-in page without.
CONSOLE_PAGE = "index.html"
SIGN_IN_PAGE = "signin.html"

#: Every answer of the console's: no other origin frames it or runs script in it.
SECURITY_HEADERS = {
    b"Content-Security-Policy": b"default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    b"X-Frame-Options": b"DENY",
}


def console_url(address: IAddress, tls: bool) -> str:
    """The URL a browser on this machine opens the console at, for the start-up log."""
    host = getattr(address, "host", "127.0.0.1")
    port = getattr(address, "port", None)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # listening on every interface: this machine's own address works
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if tls else "http"
    return f"{scheme}://{host}/" if port is None else f"{scheme}://{host}:{port}/"


def session_cookie(value: str, max_age: int, secure: bool) -> str:
    """The ``Set-Cookie`` value for the session's secret (``max_age`` 0 clears it)."""
    cookie = f"{SESSION_COOKIE.decode()}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict"
    return cookie + "; Secure" if secure else cookie


class SessionApi:
    """``/api/session``: sign in (POST with a bearer token), who am I (GET), sign out (DELETE)."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    def install(self, router: Router) -> None:
        router.add("GET", "/api/session", self.get_session)
        router.add("POST", "/api/session", self.sign_in)
        router.add("DELETE", "/api/session", self.sign_out)

    @staticmethod
    def _who(call: Call) -> dict[str, Any]:
        caller = call.caller
        return {"account": caller.account, "token": caller.token_name, "admin": caller.admin}

    async def get_session(self, call: Call) -> Any:
        call.query(())
        body = self._who(call)
        if call.session is not None:
            body.update(csrf=call.session.csrf, expires=call.session.expires.isoformat())
        return body

    async def sign_in(self, call: Call) -> Any:
        call.query(())
        if call.session is not None:
            raise ApiError(400, "sign in with an API token as the bearer token, not with a session")
        opened = await self.authenticator.open_session(call.request.getHeader(b"Authorization"), SESSION_LIFETIME)
        cookie = session_cookie(opened.secret, int(SESSION_LIFETIME.total_seconds()), call.request.isSecure())
        log.info("Console: {who} signed in from {peer}", who=call.who, peer=call.peer)
        body = {**self._who(call), "csrf": opened.csrf, "expires": opened.expires.isoformat()}
        return Reply(body, 201, (("Set-Cookie", cookie),))

    async def sign_out(self, call: Call) -> Any:
        call.query(())
        ended = call.session is not None and await self.authenticator.end_session(call.session.id)
        if ended:
            log.info("Console: {who} signed out from {peer}", who=call.who, peer=call.peer)
        return Reply({"signed_out": ended}, 200, (("Set-Cookie", session_cookie("", 0, call.request.isSecure())),))


@attrs.frozen
class _File:
    body: bytes
    content_type: str


def _read(name: str) -> bytes:
    return resources.files("dtucenter.web").joinpath("console", name).read_bytes()


class ConsoleFiles(Resource):
    """The console's pages and files, from the package, read once; the router's fallback for paths outside /api/."""

    isLeaf = True

    def __init__(self, authenticator: Authenticator) -> None:
        super().__init__()
        self._authenticator = authenticator
        self._files = {path: _File(_read(name), kind) for path, (name, kind) in FILES.items()}
        self._pages = {name: _read(name) for name in (CONSOLE_PAGE, SIGN_IN_PAGE)}

    def render(self, request: server.Request) -> int | bytes:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"Allow", b"GET, HEAD")
            return self._text(request, b"Method not allowed\n")
        path = request.path.decode("utf-8", "replace")
        if path in ("/", "/index.html"):
            ensureDeferred(self._page(request))
            return server.NOT_DONE_YET
        found = self._files.get(path)
        if found is None:
            request.setResponseCode(404)
            return self._text(request, b"Not found: the console is at /, the API under /api/\n")
        request.setHeader(b"Content-Type", found.content_type.encode("ascii"))
        # Small files, revalidated each time: an upgraded center is never mixed with a cached older script.
        request.setHeader(b"Cache-Control", b"no-cache")
        return found.body

    @staticmethod
    def _text(request: server.Request, body: bytes) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return body

    async def _page(self, request: server.Request) -> None:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        signed_in = False
        cookie = request.getCookie(SESSION_COOKIE)
        if cookie:
            try:
                signed_in = await self._authenticator.session_caller(cookie.decode("ascii")) is not None
            except UnicodeDecodeError:
                signed_in = False
            except Exception:
                log.failure("Could not look up a console session")
        if gone:
            return
        body = self._pages[CONSOLE_PAGE if signed_in else SIGN_IN_PAGE]
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
        if request.method != b"HEAD":
            request.write(body)
        request.finish()
