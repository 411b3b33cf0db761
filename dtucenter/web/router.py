"""A small JSON router on twisted.web: routes, bearer auth, bounded bodies, JSON errors.

Handlers are ``async`` functions of a ``Call`` and the path parameters; they
return what becomes the JSON body (or a ``Reply`` for another status, or a
``TextReply`` for a body that is not JSON, such as /metrics) and raise
``ApiError`` for a client error. Whatever else they raise becomes a
logged 500 with a JSON body: a client never sees a traceback or HTML.
"""

from __future__ import annotations

import hmac
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from io import BytesIO
from typing import Any, NoReturn
from urllib.parse import unquote

import attrs
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource

from dtucenter.addresses import describe_peer
from dtucenter.store.console_sessions import SessionInfo
from dtucenter.web.auth import Caller
from dtucenter.web.callers import Authenticator

log = Logger()

JSON_TYPE = b"application/json; charset=utf-8"

#: Request bodies larger than this get 413; they are read and thrown away, never kept.
MAX_BODY = 1024 * 1024

Handler = Callable[..., Awaitable[object]]

#: The methods counted by name in :attr:`Router.requests`; any other is counted as "other",
#: so that a client inventing methods cannot grow the counters.
COUNTED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@attrs.frozen
class Reply:
    body: object
    status: int = 200
    #: Extra response headers (``Set-Cookie`` for the console's sign-in and sign-out).
    headers: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class Stream:
    """What a handler returns to answer with something other than one JSON body (events, CSV).

    ``start`` gets the request after the router checked who asks: it sets the
    status and headers, writes as it goes and finishes the request itself.
    """

    start: Callable[[server.Request], None]


#: The cookie that holds a console session's secret (web/console.py).
SESSION_COOKIE = b"dtucenter_session"
#: The header a state-changing request made with the session cookie carries the session's CSRF token in.
CSRF_HEADER = b"X-CSRF-Token"
#: Methods that change nothing: no CSRF token needed.
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})


@attrs.frozen
class TextReply:
    """A 200 whose body is not JSON."""

    body: bytes
    content_type: str


class BoundedRequest(server.Request):
    """Keeps at most MAX_BODY bytes of a body; past that it only notes that it was too large."""

    body_too_large = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY:
            self.body_too_large = True
            self.content = BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        assert self.content is not None  # gotLength made it before the first chunk
        if self.content.tell() + len(data) > MAX_BODY:
            self.body_too_large = True
            self.content = BytesIO()
            return
        super().handleContentChunk(data)


class JsonErrorChannel(http.HTTPChannel):
    """Twisted's HTTP connection, answering the requests it refuses itself in JSON too.

    twisted.web refuses a malformed request line or header, and headers past
    its limits (``totalHeadersSize`` bytes, ``maxHeaders`` lines), before any
    resource sees the request, with a bare ``400 Bad Request`` and no body
    (``_respondToBadRequestAndDisconnect``, the one place it does so), and
    drops a connection whose single header line passes ``MAX_LENGTH``
    without a word (``LineReceiver.lineLengthExceeded``). Both are
    overridden here; headers too large are a 431. Twisted has no public
    hook for this, so the private method is overridden: docs/api.md says so.
    """

    def _respondToBadRequestAndDisconnect(self) -> None:
        too_large = (
            getattr(self, "_receivedHeaderSize", 0) > self.totalHeadersSize
            or getattr(self, "_receivedHeaderCount", 0) > self.maxHeaders
        )
        if too_large:
            self._refuse(431, f"request line and headers over {self.totalHeadersSize} bytes or {self.maxHeaders} lines")
        else:
            self._refuse(400, "malformed HTTP request")

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(431, f"a request or header line over {self.MAX_LENGTH} bytes")

    def _refuse(self, status: int, message: str) -> None:
        assert self.transport is not None  # only called while receiving
        body = json.dumps({"error": message}).encode("utf-8") + b"\n"
        reason = http.RESPONSES.get(status, b"Bad Request")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Cache-Control: no-store\r\nConnection: close\r\n\r\n%s" % (status, reason, len(body), body)
        )
        self.loseConnection()


class Call:
    """One API request as a handler sees it: the request and who makes it."""

    def __init__(self, request: server.Request, caller: Caller, session: SessionInfo | None = None) -> None:
        self.request = request
        self.caller = caller
        #: The console session the request came with (its cookie), None for a bearer token.
        self.session = session

    @property
    def who(self) -> str:
        """Who asked, for the audit trails: the token's account and name."""
        return self.caller.who

    @property
    def peer(self) -> str:
        """The client's address, for log lines."""
        return describe_peer(self.request.getClientAddress())

    def require_admin(self) -> None:
        """403 unless the caller's account is an admin."""
        if not self.caller.admin:
            raise ApiError(403, "only an admin account may do this")

    def query(self, allowed: Iterable[str]) -> dict[str, str]:
        """The query parameters, each given at most once; a name not in ``allowed`` is a 400."""
        names = set(allowed)
        params: dict[str, str] = {}
        for raw_name, values in self.request.args.items():
            name = raw_name.decode("utf-8", "replace")
            if name not in names:
                expected = ", ".join(sorted(names)) or "none"
                raise ApiError(400, f"unknown query parameter {name!r} (expected: {expected})")
            if len(values) != 1:
                raise ApiError(400, f"query parameter {name!r} given {len(values)} times")
            try:
                params[name] = values[0].decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, f"query parameter {name!r} is not UTF-8") from None
            if "\0" in params[name]:
                # No name or time the API knows has one, and PostgreSQL cannot even compare text with one.
                raise ApiError(400, f"query parameter {name!r} contains a NUL character")
        return params

    def json_object(self) -> dict[str, Any]:
        content = self.request.content
        assert content is not None  # from the headers until the request is finished
        raw = content.read()
        if not raw.strip():
            raise ApiError(400, "expected a JSON object in the request body")
        try:
            body = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, f"malformed JSON: {e}") from None
        except RecursionError:
            raise ApiError(400, "malformed JSON: nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, "expected a JSON object in the request body")
        if _has_nul(body):
            raise ApiError(400, "text in the request body contains a NUL character (\\u0000)")
        return body


def _has_nul(value: object) -> bool:
    """Whether any string in a decoded JSON value, key or value, holds a NUL; without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\0" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


@attrs.frozen
class Route:
    method: str
    segments: tuple[str, ...]
    handler: Handler

    def match(self, segments: list[str]) -> dict[str, str] | None:
        if len(segments) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for pattern, segment in zip(self.segments, segments, strict=False):
            if pattern.startswith("{") and pattern.endswith("}"):
                params[pattern[1:-1]] = segment
            elif pattern != segment:
                return None
        return params


def _is_api(path: bytes) -> bool:
    return path == b"/api" or path.startswith(b"/api/")


def _segments(path: str) -> list[str]:
    return [unquote(part, errors="strict") for part in path.strip("/").split("/")]


class Router(Resource):
    """The whole API as one leaf resource; routes are added with ``add``."""

    isLeaf = True

    def __init__(self, authenticator: Authenticator) -> None:
        super().__init__()
        self._authenticator = authenticator
        self._routes: list[Route] = []
        #: Requests answered, by (method, status class such as "2xx"): for /metrics.
        self.requests: Counter[tuple[str, str]] = Counter()
        #: What answers the paths outside /api/ that no route takes (the web console); None: they are 404s.
        self.fallback: Resource | None = None

    @property
    def authenticator(self) -> Authenticator:
        return self._authenticator

    @property
    def routes(self) -> tuple[Route, ...]:
        """Every endpoint, as added: what a test walks so that none is forgotten."""
        return tuple(self._routes)

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        """``pattern`` like ``/api/dtus/{psn}``: ``{name}`` segments are passed as keyword arguments."""
        self._routes.append(Route(method, tuple(_segments(pattern)), handler))

    def render(self, request: server.Request) -> int:
        if self.fallback is not None and not _is_api(request.path) and not self._routed(request.path):
            return self.fallback.render(request)  # type: ignore[no-any-return]
        ensureDeferred(self._respond(request))
        return server.NOT_DONE_YET

    def _routed(self, path: bytes) -> bool:
        """Whether a route takes this path (a route outside /api/, such as /metrics, goes before the console)."""
        try:
            segments = _segments(path.decode("utf-8"))
        except UnicodeDecodeError:
            return False
        return any(route.match(segments) is not None for route in self._routes)

    async def _respond(self, request: server.Request) -> None:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        headers: dict[str, str] = {}
        extra: tuple[tuple[str, str], ...] = ()
        method = request.method.decode("ascii", "replace")
        counted = method if method in COUNTED_METHODS else "other"
        try:
            outcome = await self._dispatch(request)
            if isinstance(outcome, Stream):
                self.requests[counted, "2xx"] += 1  # the handler answers it from here on
                if not gone:
                    outcome.start(request)
                return
            status, body, extra = outcome
        except ApiError as e:
            status, body, headers = e.status, {"error": e.message}, e.headers
        except Exception:
            log.failure(
                "Unexpected error answering {method} {path}",
                method=request.method.decode("ascii", "replace"), path=request.path.decode("utf-8", "replace"),
            )
            status, body = 500, {"error": "internal error; the center's log has the details"}
        self.requests[counted, f"{status // 100}xx"] += 1
        if gone:
            return
        if isinstance(body, TextReply):
            data, content_type = body.body, body.content_type.encode("ascii")
        else:
            data, content_type = json.dumps(body, ensure_ascii=False).encode("utf-8") + b"\n", JSON_TYPE
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Cache-Control", b"no-store")
        for name, value in headers.items():
            request.setHeader(name.encode("ascii"), value.encode("ascii"))
        for name, value in extra:
            request.responseHeaders.addRawHeader(name.encode("ascii"), value.encode("ascii"))
        request.setHeader(b"Content-Length", str(len(data)).encode("ascii"))
        request.write(data)
        request.finish()

    async def _who(self, request: server.Request) -> tuple[Caller, SessionInfo | None]:
        """The caller, from the bearer token or else the console's session cookie (with its CSRF check)."""
        header = request.getHeader(b"Authorization")
        cookie = request.getCookie(SESSION_COOKIE)
        if header is None and cookie:
            try:
                found = await self._authenticator.session_caller(cookie.decode("ascii"))
            except UnicodeDecodeError:
                found = None
            if found is None:
                raise ApiError(401, "the console session ended or expired: sign in again",
                               {"WWW-Authenticate": 'Bearer realm="dtucenter"'})
            caller, session = found
            # The cookie goes with any request the browser makes, a forged one from another site included;
            # the CSRF token only with those the console's own script makes.
            given = request.getHeader(CSRF_HEADER) or b""
            if request.method not in SAFE_METHODS and not hmac.compare_digest(given, session.csrf.encode("ascii")):
                raise ApiError(403, f"missing or wrong {CSRF_HEADER.decode()} header for a request with the "
                                    "session cookie")
            return caller, session
        bearer = await self._authenticator.caller(header)
        if bearer is None:
            raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": 'Bearer realm="dtucenter"'})
        return bearer, None

    async def _dispatch(self, request: server.Request) -> tuple[int, object, tuple[tuple[str, str], ...]] | Stream:
        caller, session = await self._who(request)
        if getattr(request, "body_too_large", False):
            raise ApiError(413, f"request body over {MAX_BODY} bytes")
        method = request.method.decode("ascii", "replace")
        try:
            segments = _segments(request.path.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(404, "no such endpoint") from None
        if any("\0" in segment for segment in segments):
            raise ApiError(400, "the path contains a NUL character")
        allowed: set[str] = set()
        for route in self._routes:
            params = route.match(segments)
            if params is None:
                continue
            if route.method != method:
                allowed.add(route.method)
                continue
            result = await route.handler(Call(request, caller, session), **params)
            if isinstance(result, Stream):
                return result
            if isinstance(result, TextReply):
                return 200, result, ()
            if isinstance(result, Reply):
                return result.status, result.body, result.headers
            return 200, result, ()
        path = "/" + "/".join(segments)
        if allowed:
            methods = ", ".join(sorted(allowed))
            raise ApiError(405, f"{method} not allowed on {path}; use {methods}", {"Allow": methods})
        raise ApiError(404, f"no such endpoint: {path}")
