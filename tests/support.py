"""Shared test helpers: the real center on loopback, and a DTU that talks to it over a socket."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import treq
from twisted.application.service import MultiService
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool

from dtucenter.dtu import wire
from dtucenter.dtu.center import DTUCenter
from dtucenter.modbus.service import SHARED_LISTENER, ModbusBridge
from dtucenter.store.facade import Store
from dtucenter.tap import ListeningService, Options, makeService

M = TypeVar("M")

#: Seconds an end-to-end step may take before the test fails rather than hangs.
STEP_TIMEOUT = 10.0
#: Seconds a child process may go without writing anything before a test gives up on it: a hang, not a busy machine.
SILENCE_LIMIT = 300.0


@attrs.define
class RunningCenter:
    service: MultiService
    options: Options
    tcp_port: int
    udp_port: int | None
    api_port: int | None = None

    @property
    def center(self) -> DTUCenter:
        return self.service.getServiceNamed("center")  # type: ignore[return-value]

    @property
    def store(self) -> Store:
        return self.service.getServiceNamed("store")  # type: ignore[return-value]

    @property
    def bridge(self) -> ModbusBridge:
        return self.service.getServiceNamed("modbus")  # type: ignore[return-value]

    async def modbus_port(self, listener: str = SHARED_LISTENER) -> int:
        """The port the Modbus bridge's shared listener (or a ``listen`` link, by name) got."""
        return (await self.bridge.listening(listener)).getHost().port

    @property
    def api_token(self) -> str:
        resource = self.service.getServiceNamed("api").factory.resource  # type: ignore[attr-defined]
        return resource._authenticator._configured.decode("ascii")  # type: ignore[no-any-return]

    def api(self, token: str | None = None) -> ApiClient:
        """An HTTP client for the API, with the center's token unless another is given."""
        assert self.api_port is not None, "started with --api off"
        return ApiClient(f"http://127.0.0.1:{self.api_port}", self.api_token if token is None else token)

    @property
    def db_url(self) -> str:
        return self.options.settings.db

    async def stop(self) -> None:
        await defer.maybeDeferred(self.service.stopService)


async def start_center(tmp_path: Path, *args: str, db_url: str | None = None) -> RunningCenter:
    """makeService with real options, DTUs and the API on 127.0.0.1 port 0, SQLite in ``tmp_path`` unless ``db_url``."""
    url = db_url or f"sqlite:///{tmp_path / 'center.db'}"
    # Beside a non-SQLite database the token file would go to the working directory: not from a test.
    token = [] if url.startswith("sqlite") or "--api-token" in args else ["--api-token", secrets.token_urlsafe()]
    options = Options()
    options.parseOptions(
        ["--dtu", "tcp:0:interface=127.0.0.1", "--api", "tcp:0:interface=127.0.0.1", "--db", url, *token, *args]
    )
    service = makeService(options, reactor)
    service.privilegedStartService()
    service.startService()
    listener: ListeningService = service.getServiceNamed("dtu-tcp")  # type: ignore[assignment]
    port = await listener.when_listening()
    udp_port = None
    if options.settings.dtu_udp is not None:
        udp_port = service.getServiceNamed("dtu-udp").port.getHost().port  # type: ignore[attr-defined]
    api_port = None
    if options.settings.api != "off":
        api_listener: ListeningService = service.getServiceNamed("api")  # type: ignore[assignment]
        api_port = (await api_listener.when_listening()).getHost().port
    return RunningCenter(service, options, port.getHost().port, udp_port, api_port)


@attrs.frozen
class ApiResponse:
    status: int
    headers: Mapping[str, str]
    body: Any

    @property
    def error(self) -> str:
        assert isinstance(self.body, dict) and set(self.body) == {"error"}, self.body
        return self.body["error"]


class ApiClient:
    """A real HTTP client (treq) with a fresh connection per request, so no socket outlives a test."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.token = token
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    async def call(
        self, method: str, path: str, body: Any = None, raw: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """``body`` is sent as JSON, ``raw`` (bytes or a body producer) as is. The answer must be JSON."""
        sent = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        response = await treq.request(
            method, self.base + path, data=data, headers=sent, pool=self.pool, timeout=STEP_TIMEOUT
        )
        content = await treq.content(response)
        content_type = response.headers.getRawHeaders("Content-Type", [""])[0]
        assert content_type.startswith("application/json"), (response.code, content_type, content[:200])
        received = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
        return ApiResponse(response.code, received, json.loads(content))

    async def get(self, path: str) -> ApiResponse:
        return await self.call("GET", path)

    async def post(self, path: str, body: Any) -> ApiResponse:
        return await self.call("POST", path, body)


async def make_account(admin: ApiClient, name: str, token_name: str = "ops") -> ApiClient:
    """A new account that is not an admin, made through the API, and a client with a token of its own."""
    made = await admin.post("/api/accounts", {"name": name})
    assert made.status == 201, made.body
    token = await admin.post(f"/api/accounts/{name}/tokens", {"name": token_name})
    assert token.status == 201, token.body
    assert set(token.body) == {"account", "name", "token"}
    return ApiClient(admin.base, token.body["token"])


class DTUClient(Protocol):
    """A scripted DTU: send frames, await the center's answers."""

    def __init__(self) -> None:
        self.parser = wire.FrameParser()
        #: Every byte the center sent, for tests that check the wire itself.
        self.raw = bytearray()
        self.received: deque[Any] = deque()
        self._waiting: deque[defer.Deferred[Any]] = deque()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        for event in self.parser.feed(data):
            if self._waiting:
                self._waiting.popleft().callback(event)
            else:
                self.received.append(event)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(None)
        while self._waiting:
            self._waiting.popleft().errback(reason)

    def send(self, *messages: Any) -> None:
        self.transport.write(b"".join(wire.encode_frame(m) for m in messages))  # type: ignore[union-attr]

    def send_raw(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    async def next(self, kind: type[M] | None = None) -> M:
        if self.received:
            message = self.received.popleft()
        else:
            d: defer.Deferred[Any] = defer.Deferred()
            self._waiting.append(d)
            d.addTimeout(STEP_TIMEOUT, reactor)
            message = await d
        if kind is not None:
            assert isinstance(message, kind), f"expected {kind.__name__}, got {message!r}"
        return message

    async def closed(self) -> None:
        """Wait until the center closes the connection."""
        if not self.lost.called:
            await self.lost.addTimeout(STEP_TIMEOUT, reactor)

    async def login(self, psn: int, password: int = 0, **fields: Any) -> wire.LoginAck:
        self.send(wire.Login(psn, password, **fields))
        return await self.next(wire.LoginAck)

    def close(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]


class UDPDTU(DatagramProtocol):
    """A DTU over UDP: collects what the center sends."""

    def __init__(self) -> None:
        self.parser = wire.FrameParser()
        self.events: list[object] = []

    def datagramReceived(self, datagram: bytes, addr: object) -> None:
        self.events.extend(self.parser.feed(datagram))


async def connect_dtu(center: RunningCenter) -> DTUClient:
    client = DTUClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", center.tcp_port), client)
    return client


class Warnings:
    """The warnings logged, as text: of one namespace (a module's logger), or all."""

    def __init__(self, namespace: str | None = None) -> None:
        self.namespace = namespace
        self.texts: list[str] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_level") == LogLevel.warn and self.namespace in (None, event.get("log_namespace")):
            self.texts.append(formatEvent(event))


@contextlib.contextmanager
def logged_warnings(namespace: str | None = None) -> Iterator[Warnings]:
    """The warnings logged while the block runs."""
    observer = Warnings(namespace)
    globalLogPublisher.addObserver(observer)
    try:
        yield observer
    finally:
        globalLogPublisher.removeObserver(observer)


async def until(predicate: Any, timeout: float = STEP_TIMEOUT) -> None:
    """Poll ``predicate`` on the reactor (no sleeping thread) until it is true."""
    from twisted.internet.task import deferLater

    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


def run_twistd(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``twistd -n dtucenter ARGS`` in a real process, for what only a real start shows (exit status, stderr)."""
    return run_process([str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=", "dtucenter", *args], cwd=cwd)


def start_process(argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """A child in a process group of its own, for ``end_process_group`` to end with everything it started."""
    return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, start_new_session=True, **popen)


def end_process_group(process: subprocess.Popen[Any], grace: float = STEP_TIMEOUT) -> None:
    """SIGTERM to the child's whole group, SIGKILL to what is left after ``grace`` seconds; then reap the child."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
        os.killpg(process.pid, signal.SIGKILL)  # a descendant that outlived the child still has its group
    process.wait()


def run_process(
    argv: Sequence[str], *, cwd: Path, env: Mapping[str, str] | None = None, silence_limit: float = SILENCE_LIMIT,
) -> subprocess.CompletedProcess[str]:
    """Runs ``argv`` to its end, capturing its output, and ends its whole process group whatever happens.

    No time budget: it gives up only if the child writes nothing at all for ``silence_limit`` seconds.
    """
    process = start_process(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    captured = {process.stdout: bytearray(), process.stderr: bytearray()}
    try:
        with selectors.DefaultSelector() as selector:
            for pipe in captured:
                selector.register(pipe, selectors.EVENT_READ)  # type: ignore[arg-type]
            while selector.get_map():
                ready = selector.select(silence_limit)
                if not ready:
                    raise AssertionError(
                        f"{argv[0]} wrote nothing for {silence_limit:.0f}s; its stderr so far:\n"
                        + captured[process.stderr][-3000:].decode(errors="replace")
                    )
                for key, _ in ready:
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        captured[key.fileobj] += chunk  # type: ignore[index]
                    else:
                        selector.unregister(key.fileobj)
        returncode = process.wait(silence_limit)
    finally:
        end_process_group(process, grace=0)
        for pipe in captured:
            pipe.close()  # type: ignore[union-attr]
    stdout, stderr = (bytes(output).decode(errors="replace") for output in captured.values())
    return subprocess.CompletedProcess(list(argv), returncode, stdout, stderr)


async def eventually(check: Any, what: str, timeout: float = STEP_TIMEOUT) -> Any:
    """Await ``check()`` (a coroutine function) on the reactor until it returns something true; returns that."""
    from twisted.internet.task import deferLater

    waited = 0.0
    while not (result := await check()):
        if waited >= timeout:
            raise AssertionError(f"gave up waiting for {what} after {timeout}s")
        await deferLater(reactor, 0.05, lambda: None)
        waited += 0.05
    return result


class EventStream(Protocol):
    """A raw HTTP client of ``GET /api/events``: what the center sends, as text, for as long as it is open."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = bytearray()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self._waiting: list[tuple[Any, defer.Deferred[None]]] = []

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._check()

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(None)
        self._check()

    def _check(self) -> None:
        for entry in list(self._waiting):
            predicate, waiter = entry
            if predicate(self.text):
                self._waiting.remove(entry)
                waiter.callback(None)

    async def until(self, predicate: Any) -> None:
        """Wait until ``predicate(text so far)`` is true."""
        if predicate(self.text):
            return
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((predicate, waiter))
        await waiter.addTimeout(STEP_TIMEOUT, reactor)

    def events(self) -> list[tuple[str | None, str, Any]]:
        """(id, event name, data) of each whole event received so far."""
        found = []
        for block in self.text.split("\r\n\r\n", 1)[-1].split("\n\n"):
            lines = [line for line in block.split("\n") if ": " in line and not line.startswith(":")]
            fields = dict(line.split(": ", 1) for line in lines)
            if "event" in fields:
                found.append((fields.get("id"), fields["event"], json.loads(fields["data"])))
        return found

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


async def open_events(
    center: RunningCenter, token: str | None = None, watch: str = "", cookie: str | None = None,
    last_id: str | None = None,
) -> EventStream:
    """An event stream from the center's API, with a bearer token (the center's by default) or a session cookie."""
    # HTTP/1.0: the answer comes unchunked, as the browser would see the events after decoding.
    headers = [f"GET /api/events{'?watch=' + watch if watch else ''} HTTP/1.0", "Host: 127.0.0.1"]
    if cookie is not None:
        headers.append(f"Cookie: {cookie}")
    else:
        headers.append(f"Authorization: Bearer {center.api_token if token is None else token}")
    if last_id is not None:
        headers.append(f"Last-Event-ID: {last_id}")
    stream = EventStream(("\r\n".join(headers) + "\r\n\r\n").encode())
    assert center.api_port is not None
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", center.api_port), stream)
    await stream.until(lambda text: "\r\n\r\n" in text)
    return stream
