"""A small JSON router on twisted.web: routes, bearer auth, bounded bodies, JSON errors.

Handlers are ``async`` functions of a ``Call`` and the path parameters; they
return what becomes the JSON body (or a ``Reply`` for another status) and
raise ``ApiError`` for a client error. Whatever else they raise becomes a
logged 500 with a JSON body: a client never sees a traceback or HTML.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from io import BytesIO
from typing import Any, NoReturn
from urllib.parse import unquote

import attrs
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from dtucenter.addresses import describe_peer
from dtucenter.web.auth import bearer_matches

log = Logger()

#: Request bodies larger than this get 413; they are read and thrown away, never kept.
MAX_BODY = 1024 * 1024

Handler = Callable[..., Awaitable[object]]


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


class Call:
    """One API request as a handler sees it."""

    def __init__(self, request: server.Request) -> None:
        self.request = request

    @property
    def who(self) -> str:
        """The client, for the audit trail."""
        return describe_peer(self.request.getClientAddress())

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
        if not isinstance(body, dict):
            raise ApiError(400, "expected a JSON object in the request body")
        return body


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


def _segments(path: str) -> list[str]:
    return [unquote(part, errors="strict") for part in path.strip("/").split("/")]


class Router(Resource):
    """The whole API as one leaf resource; routes are added with ``add``."""

    isLeaf = True

    def __init__(self, token: str) -> None:
        super().__init__()
        self._token = token
        self._routes: list[Route] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        """``pattern`` like ``/api/dtus/{psn}``: ``{name}`` segments are passed as keyword arguments."""
        self._routes.append(Route(method, tuple(_segments(pattern)), handler))

    def render(self, request: server.Request) -> int:
        ensureDeferred(self._respond(request))
        return server.NOT_DONE_YET

    async def _respond(self, request: server.Request) -> None:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        headers: dict[str, str] = {}
        try:
            status, body = await self._dispatch(request)
        except ApiError as e:
            status, body, headers = e.status, {"error": e.message}, e.headers
        except Exception:
            log.failure(
                "Unexpected error answering {method} {path}",
                method=request.method.decode("ascii", "replace"), path=request.path.decode("utf-8", "replace"),
            )
            status, body = 500, {"error": "internal error; the center's log has the details"}
        if gone:
            return
        data = json.dumps(body, ensure_ascii=False).encode("utf-8") + b"\n"
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        for name, value in headers.items():
            request.setHeader(name.encode("ascii"), value.encode("ascii"))
        request.setHeader(b"Content-Length", str(len(data)).encode("ascii"))
        request.write(data)
        request.finish()

    async def _dispatch(self, request: server.Request) -> tuple[int, object]:
        if not bearer_matches(request.getHeader(b"Authorization"), self._token):
            raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": 'Bearer realm="dtucenter"'})
        if getattr(request, "body_too_large", False):
            raise ApiError(413, f"request body over {MAX_BODY} bytes")
        method = request.method.decode("ascii", "replace")
        try:
            segments = _segments(request.path.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(404, "no such endpoint") from None
        allowed: set[str] = set()
        for route in self._routes:
            params = route.match(segments)
            if params is None:
                continue
            if route.method != method:
                allowed.add(route.method)
                continue
            result = await route.handler(Call(request), **params)
            if isinstance(result, Reply):
                return result.status, result.body
            return 200, result
        path = "/" + "/".join(segments)
        if allowed:
            methods = ", ".join(sorted(allowed))
            raise ApiError(405, f"{method} not allowed on {path}; use {methods}", {"Allow": methods})
        raise ApiError(404, f"no such endpoint: {path}")
