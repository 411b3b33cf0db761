"""One DTU connection: login, heartbeat, uploads; TCP protocol and factory.

``DTUSession`` holds the protocol rules and talks to its transport through
the small ``Link`` interface, so TCP connections and UDP source addresses
share it. Messages are handled one at a time, in order, except that the
uploads (SendTest) of one read go to the store together, as one batch, and are
acknowledged together once it is committed: while a batch or a login waits for
the store the next messages queue, and once ``INBOX_LIMIT`` are queued reading
from that DTU pauses, so nothing is acknowledged before it is stored and a
slow database slows DTUs down instead of losing data. (Pausing at every
upload cost two epoll_ctl calls per frame, a tenth of the reactor's time at
a few thousand frames a second: docs/performance.md.)
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, deque
from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import protocol, tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dtucenter.addresses import describe_peer
from dtucenter.dtu import wire
from dtucenter.dtu.center import DTUCenter, LoginDecision
from dtucenter.dtu.commands import CommandQueue
from dtucenter.isotime import utc_from_seconds
from dtucenter.junk import JunkWindow, ProblemSummary, describe_problems

log = Logger()

#: Messages queued behind the one being handled (a read's uploads count as one) before reading from the DTU pauses.
INBOX_LIMIT = 16
#: Problem kinds besides the parser's event names: bytes skipped, and frame heads
#: that could not start a frame (counted by the parser, not reported one by one).
_SKIPPED = "skipped_bytes"
_INVALID_HEAD = "InvalidHead"
#: Float rounding between a timer's due time and "last frame + limit": below this, it is due.
_TIMER_SLACK = 1e-6


class Link(TypingProtocol):
    """What a session needs from whatever carries its bytes."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None:
        """Close after what was written is sent."""

    def abort(self) -> None:
        """Drop at once: the peer may be gone and never read what is pending."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write``, but sent at once when nothing is queued before it.

    ``transport.write`` only queues: the reactor sends at its next turn, after
    registering for and being told of writability, two epoll_ctl calls and a
    dispatch through Twisted's per-event logging context per ack (benchmarks/findings.md,
    items 12 and 15, measure what that costs). Twisted has no public way to send at
    once: https://github.com/twisted/twisted/issues/5303 ("Default transport
    implementation doesn't write out bytes immediately", open since 2011) asks for
    one. So this reads the transport's private send buffer; if a Twisted release
    moves it, this falls back to ``transport.write`` and
    tests/sim/test_sim_center_fast_paths.py fails, so the loss is not silent.
    Only plain TCP (not TLS, not a test's transport), also behind the PROXY protocol; what the socket does not
    take at once goes the usual way, in order.
    """
    if type(transport) is not tcp.Server:
        # A connection to a PROXY listener (``haproxy:``) writes through to the socket's transport.
        transport = getattr(transport, "relays_to", transport)
    if type(transport) is tcp.Server and transport.connected and not transport.disconnecting:
        try:
            nothing_queued = not transport.dataBuffer and not transport._tempDataBuffer
        except AttributeError:  # a Twisted that keeps its send buffer elsewhere: the plain path
            nothing_queued = False
        if nothing_queued:
            sent = transport.writeSomeData(data)
            if sent == len(data):
                return
            if isinstance(sent, int):
                data = data[sent:]
    transport.write(data)


class _Gone:
    """The Link of a session whose connection is gone: nothing to send to, nothing to pause.

    A session drops its real link when the connection is lost: the link holds the
    session too, and that cycle would keep both alive until a full collection.
    """

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass


_GONE = _Gone()


class DTUSession:
    AWAITING_LOGIN = "awaiting-login"
    AUTHENTICATING = "authenticating"
    ONLINE = "online"
    CLOSED = "closed"

    def __init__(
        self, center: DTUCenter, link: Link, peer: str, clock: IReactorTime, *, spoofable: bool = False
    ) -> None:
        self.center = center
        self.link = link
        self.peer = peer
        self.clock = clock
        #: The peer's address may be forged (UDP): what arrives from it may be anyone's.
        self.spoofable = spoofable
        self.state = self.AWAITING_LOGIN
        self.psn: int | None = None
        self.registers: tuple[wire.Register, ...] = ()
        self.tick_time = 0
        #: When the DTU last sent a frame, as the clock's seconds (a datetime per frame was measurable).
        self.last_seen_at: float = clock.seconds()
        self._parser = wire.FrameParser(center.settings.dialect)
        self.dialect = center.settings.dialect
        self.command_timeout = center.settings.command_timeout
        #: The center's counters.
        self.stats: Counter[str] = center.stats
        #: Messages to handle, in order; the uploads of one read as one list.
        self._inbox: deque[wire.AnyMessage | list[wire.SendTest]] = deque()
        self._working = False
        self._paused = False
        self._timer: IDelayedCall | None = None
        #: The timer runs _idle_timed_out (it is checked per frame, so a flag, not a comparison).
        self._watching_idle = False
        self._lost = False
        self.commands = CommandQueue(self)
        settings = center.settings
        self._junk = JunkWindow(clock, window=settings.junk_window, limit=settings.junk_limit)
        self._problems = ProblemSummary(clock, interval=settings.problem_report_interval)

    # -- events from the link --------------------------------------------------------

    def start(self) -> None:
        self._arm(self.center.settings.login_timeout, self._login_timed_out)

    def data_received(self, data: bytes) -> None:
        if self.state == self.CLOSED:
            return
        settings = self.center.settings
        limit = settings.garbage_limit if self.psn is not None else settings.login_garbage_limit
        offset = 0
        while offset < len(data):
            # Parse no more than would take the bytes since the last valid frame over the
            # limit: a read of junk costs at most the limit, however large it is.
            budget = limit + 1 - self._parser.garbage
            chunk = data if not offset and budget >= len(data) else data[offset : offset + budget]
            offset += len(chunk)
            self._parse(chunk)
            if self._parser.garbage > limit:
                self._close_for_junk("closed_for_garbage", f"{self._parser.garbage} bytes without a valid frame")
            if self.state == self.CLOSED:
                return
        if self._problems.due and self.psn is not None:
            self._report_problems()
        self._process()
        if self._working and len(self._inbox) >= INBOX_LIMIT and not self._paused:
            self._paused = True
            self.link.pause()

    def _parse(self, data: bytes) -> None:
        skipped = 0
        inbox = self._inbox
        #: The uploads of this read since its last other message: they go to the store as one batch.
        uploads: list[wire.SendTest] | None = None
        for event in self._parser.feed(data):
            if type(event) is wire.SendTest:
                if uploads is None:
                    uploads = []
                    inbox.append(uploads)
                uploads.append(event)
            elif isinstance(event, wire.PROBLEM_TYPES):
                if isinstance(event, wire.Skipped):
                    skipped += event.count
                self._problem(event)
            else:
                uploads = None
                inbox.append(event)
        self._junk.add(skipped, len(data) - skipped)
        if skipped and self.state == self.ONLINE and self._junk.mostly_junk:
            junk, valid = self._junk.totals()
            self._close_for_junk(
                "closed_for_junk",
                f"{junk} bytes of junk and {valid} bytes of frames in the last {self._junk.window:g} s",
            )

    def _close_for_junk(self, kind: str, why: str) -> None:
        """Close, counted as ``kind``, in one log line that also tells the untold problems.

        Connections that never logged in are told of together, at most once per interval:
        a junk source may open thousands of them.
        """
        self.stats[kind] += 1
        if self.psn is None:
            closures = self.center.junk_closures
            closures.add(kind, 1, f"{self.peer}: {why}")
            if closures.due:
                counts, seconds, first = closures.take()
                log.warn(
                    "Closed {count} connections for junk before a login in the last {seconds:.0f} s (first: {first})",
                    count=sum(counts.values()), seconds=seconds, first=first,
                )
        else:
            problems = ""
            if self._problems.untold:
                counts, seconds, _example = self._problems.take()
                problems = f"; {describe_problems(counts, _SKIPPED)} in the last {seconds:.0f} s"
            log.warn("Closing DTU {psn} at {peer}: {why}{problems}",
                     psn=self.psn, peer=self.peer, why=why, problems=problems)
        self._close(abort=True)

    def connection_lost(self) -> None:
        if self._lost:
            return
        self._lost = True
        self.state = self.CLOSED
        if self.psn is not None:
            self._report_problems()
        self._cancel_timer()
        self.commands.close()
        self._inbox.clear()
        self.link = _GONE
        self.center.session_lost(self)

    def abort(self, reason: str) -> None:
        """Called by the center: this session must go (replaced, shutting down)."""
        log.info("Dropping DTU {psn} at {peer}: {reason}", psn=self.psn, peer=self.peer, reason=reason)
        self._close(abort=True)

    # -- the message loop -------------------------------------------------------------

    def _process(self) -> None:
        while self._inbox and not self._working and self.state != self.CLOSED:
            message = self._inbox.popleft()
            if isinstance(message, list):
                if self.state == self.ONLINE:
                    self.stats["frames_in"] += len(message)
                    self._seen()
                    self._upload(message)
                else:  # not logged in (yet): each is judged as any other frame
                    self._inbox.extendleft(reversed(message))
                continue
            pending = self._handle(message)
            if pending is not None and not pending.called:
                self._working = True
                pending.addBoth(self._finished_working)

    def _finished_working(self, result: Any) -> None:
        self._working = False
        if isinstance(result, Failure):
            log.failure("Unexpected error handling a frame from {peer}", result, peer=self.peer)
            self._close(abort=True)
            return
        if self.state != self.CLOSED:
            self._process()
            if self._paused and len(self._inbox) < INBOX_LIMIT:
                self._paused = False
                self.link.resume()

    def _handle(self, message: wire.AnyMessage) -> Deferred[Any] | None:
        self.stats["frames_in"] += 1
        if self.state == self.AWAITING_LOGIN:
            if isinstance(message, wire.Login):
                return self._login(message)
            self.stats["frames_before_login"] += 1
            log.warn(
                "Closing {peer}: {type} before Login", peer=self.peer, type=type(message).__name__
            )
            self._close()
            return None
        self._seen()
        if isinstance(message, wire.SendTick):
            self._send(wire.SendTickAck())
        elif isinstance(message, wire.SendTest):
            self._upload([message])
        elif isinstance(message, wire.Login):
            # Some DTUs log in again on the same link after a modem reset; treat it as a fresh login.
            return self._login(message)
        else:
            return self._other(message)
        return None

    @property
    def closed(self) -> bool:
        """Closed by either end: it can neither send nor take over its DTU."""
        return self.state == self.CLOSED

    @property
    def reading_paused(self) -> bool:
        """Waiting for the store: frames the DTU sent may be waiting unread."""
        return self._working

    def _other(self, message: wire.AnyMessage) -> Deferred[Any] | None:
        """Messages beyond login, heartbeat and upload: acks go to the command queue."""
        if self.commands.received(message):
            return None
        self.stats["frames_unexpected"] += 1
        log.warn(
            "DTU {psn} at {peer} sent an unexpected {type}",
            psn=self.psn, peer=self.peer, type=type(message).__name__,
        )
        return None

    # -- login ---------------------------------------------------------------------------

    def _login(self, login: wire.Login) -> Deferred[Any]:
        self.state = self.AUTHENTICATING
        d = self.center.authenticate(self, login)
        d.addCallbacks(self._logged_in, self._login_failed, callbackArgs=(login,))
        return d

    def _logged_in(self, decision: LoginDecision, login: wire.Login) -> None:
        if self.state == self.CLOSED:
            return  # gone while the store was deciding: the center did not take it (DTUCenter._decided)
        if not decision.accepted:
            if self.spoofable and self.psn is not None:
                # Anyone can send a Login "from" a logged-in DTU's UDP address: a refused one
                # must not end that DTU's session, nor be answered (the DTU would take it as its own).
                self.state = self.ONLINE
                self.stats["udp_logins_refused_while_online"] += 1
                return
            self._send(decision.ack)
            self._close()
            return
        self._send(decision.ack)
        self.state = self.ONLINE
        self.psn = login.psn
        self.registers = decision.registers
        self.tick_time = decision.ack.tick_time
        self._cancel_timer()  # a login again on this link may have changed TickTime: a fresh deadline
        self._seen()

    def _login_failed(self, failure: Failure) -> None:
        # A store error, not a refusal: say nothing to the DTU; it will log in again.
        log.failure("Could not authenticate a DTU at {peer}", failure, peer=self.peer)
        self._close(abort=True)

    def _login_timed_out(self) -> None:
        self._timer = None
        if self.state == self.AUTHENTICATING:
            # The store is slow, not the DTU: give it the time again.
            self._arm(self.center.settings.login_timeout, self._login_timed_out)
            return
        self.stats["login_timeouts"] += 1
        # Over UDP every forged source address ends here: counted, not logged one by one.
        (log.debug if self.spoofable else log.warn)("Closing {peer}: no valid Login in time", peer=self.peer)
        self._close(abort=True)

    # -- liveness ---------------------------------------------------------------------------

    @property
    def last_seen(self) -> dt.datetime:
        return utc_from_seconds(self.last_seen_at)

    def _seen(self) -> None:
        """A frame arrived: it moves the idle deadline, lazily.

        Resetting the timer at every frame cost more than the frame's own handling
        at ingest rates (docs/performance.md); instead the timer, when it fires,
        checks the last frame's time and sleeps again for what is left.
        """
        self.last_seen_at = self.clock.seconds()
        if self.psn is not None:
            self.center.seen(self.psn, self.last_seen_at)
            if not self._watching_idle:
                self._watch_idle(self._idle_limit())

    def _idle_limit(self) -> float:
        return 2 * max(self.tick_time, 1)

    def _watch_idle(self, seconds: float) -> None:
        self._arm(seconds, self._idle_timed_out)
        self._watching_idle = True

    def _idle_timed_out(self) -> None:
        self._timer = None
        self._watching_idle = False
        deadline = self.last_seen_at + self._idle_limit()
        now = self.clock.seconds()
        if now < deadline - _TIMER_SLACK:
            self._watch_idle(deadline - now)  # frames came since the timer was set
            return
        if self._working:
            # We stopped reading, not the DTU: wait for the store before judging it.
            self._watch_idle(self._idle_limit())
            return
        self.stats["idle_timeouts"] += 1
        log.info("DTU {psn} at {peer} silent for 2 x TickTime; disconnecting", psn=self.psn, peer=self.peer)
        self._close(abort=True)

    # -- uploads ---------------------------------------------------------------------------------

    def _upload(self, uploads: list[wire.SendTest]) -> None:
        """Store them as one batch and acknowledge them in order once committed (or at once if none needs it)."""
        batch = self.center.store_uploads(self, uploads)
        taken = len(batch.codes)
        if taken < len(uploads):
            # One repeats an upload another connection's commit carries: it waits for that commit, next
            # (and is counted again then).
            rest = uploads[taken:]
            self.stats["frames_in"] -= len(rest)
            self._inbox.appendleft(rest)
        if batch.pending:
            self._working = True
            batch.submit()
        else:
            self._acknowledge(batch.codes)

    def uploads_stored(self, codes: list[int]) -> None:
        """The store committed a batch of this connection's uploads: acknowledge them and go on."""
        # From the batch's handling (no other frame is handled while it waits) to its acks.
        self.center.ack_latency.record(self.clock.seconds() - self.last_seen_at, len(codes))
        try:
            self._acknowledge(codes)
        except Exception:
            self._finished_working(Failure())
        else:
            self._finished_working(None)

    def _acknowledge(self, codes: list[int]) -> None:
        if self.state != self.CLOSED:
            frames = self.center.ack_frames
            # One write for the batch: one send, not one per upload.
            self.link.write(frames[codes[0]] if len(codes) == 1 else b"".join([frames[code] for code in codes]))

    def uploads_not_stored(self, codes: list[int], failure: Failure) -> None:
        # Never acknowledge what is not stored; the DTU resends on its next connection.
        log.failure(
            "Upload {code} of DTU {psn} could not be stored ({count} of this read); "
            "dropping the connection unacknowledged",
            failure, code=codes[0], count=len(codes), psn=self.psn,
        )
        self._close(abort=True)
        self._working = False

    # -- plumbing ---------------------------------------------------------------------------------

    def _send(self, message: wire.AnyMessage) -> None:
        self.link.write(wire.encode_frame(message, self.dialect))

    # -- for the command queue (ports.CommandOwner) ------------------------------------------------

    def send_frame(self, frame: bytes) -> None:
        self.link.write(frame)

    def setup_reported(self, send_test_time: int, registers: tuple[wire.Register, ...]) -> Deferred[None]:
        assert self.psn is not None
        self.registers = registers
        return self.center.setup_reported(self.psn, send_test_time, registers)

    def _problem(self, problem: wire.ParseProblem) -> None:
        """Count it; :meth:`_report_problems` tells of it, at most once per interval."""
        if isinstance(problem, wire.Skipped):
            self.stats["bytes_skipped"] += problem.count
            self._problems.add(_SKIPPED, problem.count)
            if problem.heads:
                self.stats[f"dropped_{_INVALID_HEAD}"] += problem.heads
                self._problems.add(_INVALID_HEAD, problem.heads)
        else:
            kind = type(problem).__name__
            self.stats[f"dropped_{kind}"] += 1
            self._problems.add(kind, 1, problem)

    def _report_problems(self) -> None:
        """Tell the untold problems of a logged-in DTU in one line (those of a connection
        that never logs in are only counted: it may be one of thousands)."""
        if not self._problems.untold:
            return
        counts, seconds, example = self._problems.take()
        log.warn(
            "DTU {psn} at {peer}: {problems} in the last {seconds:.0f} s (first: {example})",
            psn=self.psn, peer=self.peer, problems=describe_problems(counts, _SKIPPED),
            seconds=seconds, example=example or "junk",
        )

    @property
    def problems(self) -> Counter[str]:
        """Parse problems of this connection, per kind ("skipped_bytes" counts bytes)."""
        return self._problems.totals

    def _arm(self, seconds: float, action: Callable[[], None]) -> None:
        """One timer per session: login deadline first, then the idle deadline."""
        self._cancel_timer()
        self._timer = self.clock.callLater(seconds, action)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._watching_idle = False

    def _close(self, abort: bool = False) -> None:
        if self.state == self.CLOSED:
            return
        self.state = self.CLOSED
        self._cancel_timer()
        self._inbox.clear()
        self.commands.close()
        if abort:
            self.link.abort()
        else:
            self.link.close()


class DTUProtocol(protocol.Protocol):
    """TCP: forwards bytes and connection events to a DTUSession."""

    session: DTUSession

    def __init__(self, center: DTUCenter, clock: IReactorTime) -> None:
        self._center = center
        self._clock = clock

    def connectionMade(self) -> None:
        self._center.stats["connections"] += 1
        peer = describe_peer(self.transport.getPeer())  # type: ignore[union-attr]
        self.session = DTUSession(self._center, self, peer, self._clock)
        self.session.start()

    def dataReceived(self, data: bytes) -> None:
        self.session.data_received(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._center.stats["connections_closed"] += 1
        self.session.connection_lost()

    # Link
    def write(self, data: bytes) -> None:
        write_now(self.transport, data)

    def close(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def abort(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]

    def pause(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resume(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]


class DTUFactory(protocol.Factory):
    def __init__(self, center: DTUCenter, clock: IReactorTime) -> None:
        self.center = center
        self.clock = clock

    def buildProtocol(self, addr: IAddress | None) -> DTUProtocol:
        return DTUProtocol(self.center, self.clock)
