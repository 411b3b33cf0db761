"""A Twisted Modbus master over any byte stream: accepted or outgoing TCP, or a serial port.

One request is in flight at a time (an RS-485 bus is half-duplex and a DTU
relays to one), the others wait in order. A raw exchange (:meth:`ModbusMaster.exchange`)
takes its turn in the same queue; while it runs, every byte received is its
answer's, none goes to the response reader. Each attempt has a timeout on the
injected clock; after a timeout the receive buffer is flushed and the line
is left quiet for a moment so a late answer drains instead of being taken
for the next one's.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Protocol as TypingProtocol

import attrs
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from dtucenter.junk import DEFAULT_JUNK_WINDOW, JunkWindow
from dtucenter.modbus.errors import (
    LinkDisconnected,
    LinkOffline,
    ModbusExceptionResponse,
    ModbusTimeout,
)
from dtucenter.modbus.filter import BoundaryNoise, Discarded, Response, ResponseReader, Stripped
from dtucenter.modbus.framing import Expectation, Framing
from dtucenter.modbus.raw import Expect, RawAnswer, RawCapture
from dtucenter.transports import close_transport, connected_transport

log = Logger()

#: A network connection is closed when, over JUNK_WINDOW seconds, it sent more junk
#: than this and more junk than anything else: Modbus answers are a few hundred bytes.
LINK_JUNK_LIMIT = 64 * 1024
#: Reads are looked at in slices this long, so a flood of junk is cut off within one.
_SLICE = 4096


@attrs.define
class LinkCounters:
    """Traffic of one link, across all the connections it had."""

    requests: int = 0  # frames sent, retries included
    responses: int = 0  # answers taken, exception responses included
    timeouts: int = 0  # attempts that got no answer in time
    errors: int = 0  # exception responses, and requests lost to a disconnect
    bytes_in: int = 0
    bytes_out: int = 0
    connects: int = 0
    heartbeats: int = 0  # DTU packets stripped from the stream
    discarded_bytes: int = 0  # junk, stray and late frames
    closed_for_junk: int = 0  # connections closed for sending mostly junk
    raw_exchanges: int = 0  # raw exchanges sent (the API's pass-through)

    def as_dict(self) -> dict[str, int]:
        return attrs.asdict(self)


class MasterObserver(TypingProtocol):
    """Told when the master's connection comes and goes (the link layer)."""

    def master_connected(self, master: ModbusMaster) -> None: ...

    def master_disconnected(self, master: ModbusMaster) -> None: ...


@attrs.define(eq=False)
class _Request:
    pdu: ModbusPDU
    frame: bytes
    expected: Expectation
    deferred: defer.Deferred[ModbusPDU] = attrs.field(init=False)
    attempts: int = 0


@attrs.define(eq=False)
class _RawExchange:
    data: bytes
    timeout: float
    capture: RawCapture
    deferred: defer.Deferred[RawAnswer] = attrs.field(init=False)
    started: float = 0.0


class ModbusMaster(Protocol):
    """Modbus master protocol; :meth:`request` returns a Deferred firing with the response PDU."""

    def __init__(
        self,
        name: str,
        framing: Framing,
        clock: IReactorTime,
        *,
        timeout: float,
        retries: int,
        noise: BoundaryNoise | None = None,
        counters: LinkCounters | None = None,
        silence: float = 0.0,
        idle_timeout: float | None = None,
        observer: MasterObserver | None = None,
        junk_limit: int | None = LINK_JUNK_LIMIT,
        junk_window: float = DEFAULT_JUNK_WINDOW,
    ) -> None:
        self.name = name
        self.counters = counters if counters is not None else LinkCounters()
        self._framing = framing
        self._clock = clock
        self._timeout = timeout
        self._retries = retries
        self._silence = silence
        self._idle_timeout = idle_timeout
        self._idle: IDelayedCall | None = None
        self._observer = observer
        self._reader = ResponseReader(framing, noise)
        self._queue: collections.deque[_Request | _RawExchange] = collections.deque()
        self._current: _Request | None = None
        self._raw: _RawExchange | None = None
        self._timer: IDelayedCall | None = None
        self._quiet: IDelayedCall | None = None
        self._connected = False
        self._transaction_id = 0
        #: None on a serial line: there junk means wrong settings, and closing would not help.
        self._junk = JunkWindow(clock, window=junk_window, limit=junk_limit) if junk_limit is not None else None
        self._closed_for_junk = False

    # -- API ------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests queued or in flight."""
        return len(self._queue) + (self._current is not None) + (self._raw is not None)

    def close(self) -> None:
        """Drop the connection at once."""
        close_transport(connected_transport(self))

    def request(self, pdu: ModbusPDU) -> defer.Deferred[ModbusPDU]:
        if not self._connected:
            return defer.fail(LinkOffline(self.name))
        self._transaction_id = self._transaction_id % 0xFFFF + 1
        try:
            frame = self._framing.encode(pdu, self._transaction_id)
        except (ValueError, TypeError) as exc:
            return defer.fail(exc)
        expected = Expectation(pdu.dev_id, pdu.function_code, self._transaction_id)
        request = _Request(pdu, frame, expected)
        request.deferred = defer.Deferred(lambda _: self._cancel(request))
        self._queue.append(request)
        self._pump()
        return request.deferred

    def exchange(self, data: bytes, *, timeout: float, expect: Expect, max_bytes: int) -> defer.Deferred[RawAnswer]:
        """Send ``data`` as it is, in turn with the requests, and collect the answer.

        Fires with a :class:`~dtucenter.modbus.raw.RawAnswer` when the answer is over (see
        :class:`~dtucenter.modbus.raw.RawCapture`) or after ``timeout`` seconds with what came.
        """
        if not self._connected:
            return defer.fail(LinkOffline(self.name))
        exchange = _RawExchange(data, timeout, RawCapture(expect, max_bytes))
        exchange.deferred = defer.Deferred(lambda _: self._cancel(exchange))
        self._queue.append(exchange)
        self._pump()
        return exchange.deferred

    # -- Protocol -------------------------------------------------------------

    def connectionMade(self) -> None:
        self._connected = True
        self.counters.connects += 1
        if self._idle_timeout is not None:
            self._idle = self._clock.callLater(self._idle_timeout, self._idle_too_long)
        if self._observer is not None:
            self._observer.master_connected(self)

    def dataReceived(self, data: bytes) -> None:
        if self._closed_for_junk:
            return
        self.counters.bytes_in += len(data)
        if self._idle is not None and self._idle.active() and self._idle_timeout is not None:
            self._idle.reset(self._idle_timeout)
        if self._raw is not None:
            data = self._raw.capture.feed(data)
            if self._raw.capture.done:
                self._finish_raw()
        for offset in range(0, len(data), _SLICE):
            piece = data[offset : offset + _SLICE] if len(data) > _SLICE else data
            junk = self._read(piece)
            if self._junk is not None:
                self._junk.add(junk, len(piece) - junk)
                if junk and self._junk.mostly_junk:
                    self._close_for_junk()
                    return

    def _read(self, data: bytes) -> int:
        """Handle what ``data`` completes; returns how many junk bytes it held."""
        junk = 0
        for event in self._reader.feed(data):
            if isinstance(event, Response):
                self._answered(event.pdu)
            elif isinstance(event, Stripped):
                # Counted, not logged: thousands of links each send one every few seconds, and a log
                # line costs more than the polls of the same connection (benchmarks/findings.md).
                self.counters.heartbeats += 1
            elif isinstance(event, Discarded):
                if event.reason == "junk":
                    junk += event.count
                self._discard(event.data, event.reason, event.count)
        return junk

    def _close_for_junk(self) -> None:
        assert self._junk is not None
        junk, valid = self._junk.totals()
        self._closed_for_junk = True
        self.counters.closed_for_junk += 1
        log.warn(
            "{link}: closing the connection: {junk} bytes of junk and {valid} other bytes in the last {window:g} s",
            link=self.name, junk=junk, valid=valid, window=self._junk.window,
        )
        self.close()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._connected = False
        self._cancel_timers()
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        lost: list[_Request | _RawExchange] = [r for r in (self._current, self._raw) if r is not None]
        lost += self._queue
        self._current = self._raw = None
        self._queue.clear()
        self._reader.expected = None
        self._reader.flush()
        for request in lost:
            self.counters.errors += 1
            request.deferred.errback(LinkDisconnected(self.name))
        if self._observer is not None:
            self._observer.master_disconnected(self)

    # -- the request cycle ----------------------------------------------------

    def _pump(self) -> None:
        if self._current is not None or self._raw is not None or self._quiet is not None or not self._connected:
            return
        if not self._queue:
            return
        head = self._queue.popleft()
        if isinstance(head, _RawExchange):
            self._start_raw(head)
        else:
            self._current = head
            self._send(head)

    def _send(self, request: _Request) -> None:
        request.attempts += 1
        self._reader.expected = request.expected
        self.counters.requests += 1
        self.counters.bytes_out += len(request.frame)
        self._timer = self._clock.callLater(self._timeout, self._timed_out)
        connected_transport(self).write(request.frame)

    def _start_raw(self, exchange: _RawExchange) -> None:
        self._raw = exchange
        self._reader.expected = None
        self._discard(self._reader.flush(), "before a raw exchange")
        exchange.started = self._clock.seconds()
        self.counters.raw_exchanges += 1
        self.counters.bytes_out += len(exchange.data)
        self._timer = self._clock.callLater(exchange.timeout, self._finish_raw)
        connected_transport(self).write(exchange.data)

    def _finish_raw(self) -> None:
        exchange = self._raw
        if exchange is None:  # cannot happen: the timer and the capture both belong to one
            return
        self._raw = None
        self._cancel_timer()
        capture = exchange.capture
        answer = RawAnswer(capture.received, capture.complete, capture.truncated,
                           self._clock.seconds() - exchange.started)
        # A late rest of the answer drains in the quiet period instead of reaching the next request.
        self._after_silence(self._pump)
        exchange.deferred.callback(answer)

    def _answered(self, pdu: ModbusPDU) -> None:
        request = self._current
        if request is None:  # cannot happen: the reader only answers an expectation
            return
        self._cancel_timers()
        self._current = None
        self.counters.responses += 1
        if isinstance(pdu, ExceptionResponse):
            self.counters.errors += 1
            error = ModbusExceptionResponse(request.expected.unit, request.pdu.function_code, pdu.exception_code)
            request.deferred.errback(error)
        else:
            request.deferred.callback(pdu)
        self._pump()

    def _timed_out(self) -> None:
        self._timer = None
        request = self._current
        self.counters.timeouts += 1
        self._reader.expected = None
        self._discard(self._reader.flush(), "unfinished frame")
        if request is None:
            return
        if request.attempts <= self._retries:
            log.debug(
                "{link}: unit {unit} did not answer, retrying ({attempt}/{retries})",
                link=self.name, unit=request.expected.unit, attempt=request.attempts, retries=self._retries,
            )
            self._after_silence(lambda: self._send(request))
            return
        self._current = None
        self._after_silence(self._pump)
        request.deferred.errback(ModbusTimeout(request.expected.unit, request.pdu.function_code, request.attempts))

    def _after_silence(self, then: Callable[[], None]) -> None:
        if self._silence <= 0:
            then()
            return

        def quiet_over() -> None:
            self._quiet = None
            if self._connected:
                then()

        self._quiet = self._clock.callLater(self._silence, quiet_over)

    def _cancel(self, request: _Request | _RawExchange) -> None:
        if request in self._queue:
            self._queue.remove(request)
            return
        if request is self._raw:
            self._cancel_timers()
            self._raw = None
            self._after_silence(self._pump)
            return
        if request is self._current:
            self._cancel_timers()  # also a quiet period that would resend it
            self._current = None
            self._reader.expected = None
            self._discard(self._reader.flush(), "unfinished frame")
            self._after_silence(self._pump)

    def _discard(self, data: bytes, reason: str, count: int | None = None) -> None:
        if data:
            count = len(data) if count is None else count
            self.counters.discarded_bytes += count
            log.debug("{link}: discarded {count} bytes ({reason}): {data}",
                      link=self.name, count=count, reason=reason, data=data[:64].hex(" "))

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _cancel_timers(self) -> None:
        self._cancel_timer()
        if self._quiet is not None and self._quiet.active():
            self._quiet.cancel()
        self._quiet = None

    def _idle_too_long(self) -> None:
        # A DTU that lost power leaves a socket that looks open for many
        # minutes; its missing heartbeats are the first sign.
        self._idle = None
        log.info("{link}: nothing received for {seconds:g} s, closing the connection",
                 link=self.name, seconds=self._idle_timeout)
        self.close()
