"""``GET /api/events``: what happens in the center, pushed to the console as Server-Sent Events.

One ``LiveFeed`` listens to the center's ``EventHub`` and fans each event
out to the open streams, each filtered to what its caller may see (an
admin sees everything; an account its own DTUs, meters and links, looked
up again every ``VISIBLE_REFRESH`` seconds). Status events (DTUs online and
offline, links up and down, failed polls) go to every stream; values (an
upload stored, a meter read) only to a stream that asked for that device
with ``watch=dtu:PSN,meter:NAME``, so an overview of thousands of DTUs is
not sent every upload.

Every stream also gets a ``summary`` (counts and rates of what its caller
sees) every ``SUMMARY_INTERVAL`` seconds and a comment every
``HEARTBEAT_INTERVAL`` seconds, so proxies keep an idle stream open.

Bounded: a stream writes at the pace its client reads (``streaming.Paced``);
while its client is behind, events wait in a queue of at most
``MAX_QUEUED``, and a client that falls further behind is disconnected. The
browser reconnects with ``Last-Event-ID``: the events it missed are
replayed from the last ``RING_SIZE`` kept here, or, if they are gone (or
the center restarted), it is told to ``resync`` (reload what it shows).
"""

from __future__ import annotations

import json
import secrets
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import attrs
from sqlalchemy.orm import Session
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web import server

from dtucenter.dtu.center import DTUCenter
from dtucenter.events import (
    AlarmCleared,
    AlarmRaised,
    DtuOffline,
    DtuOnline,
    Event,
    EventHub,
    LinkDown,
    LinkUp,
    MeterFailed,
    MeterRead,
    UploadStored,
)
from dtucenter.modbus.service import ModbusBridge
from dtucenter.store import links as device_links
from dtucenter.store import meters, queries
from dtucenter.store.facade import Store
from dtucenter.web.auth import Caller
from dtucenter.web.router import ApiError, Call, Router, Stream
from dtucenter.web.streaming import Paced

log = Logger()

#: Events kept for streams that reconnect with Last-Event-ID.
RING_SIZE = 2000
#: Status events a new stream starts with: the overview's "recent events".
RECENT = 50
#: Frames a stream holds for a client that is behind; one more and it is disconnected.
MAX_QUEUED = 500
#: Seconds between summaries, and between heartbeat comments.
SUMMARY_INTERVAL = 5.0
HEARTBEAT_INTERVAL = 15.0
#: Seconds between lookups of which DTUs, meters and links an account's stream may see.
VISIBLE_REFRESH = 60.0
#: Devices one stream may watch the values of, and open streams in all.
MAX_WATCHED = 50
MAX_STREAMS = 1000
#: How long the browser waits before reconnecting, in milliseconds (the SSE ``retry`` field).
RETRY_MS = 3000


@attrs.frozen
class LiveEvent:
    seq: int
    #: ``dtu:PSN``, ``meter:NAME`` or ``link:NAME``: what it is about, for filtering.
    key: str
    #: A value (upload, meter read), sent only to streams that watch ``key``; else a status event.
    value: bool
    name: str
    data: dict[str, Any]


def describe(event: Event) -> tuple[str, bool, str, dict[str, Any]]:
    """(key, value?, SSE event name, data) of a hub event."""
    time = event.time.isoformat()
    match event:
        case DtuOnline(psn=psn, peer=peer):
            return f"dtu:{psn}", False, "dtu_online", {"psn": psn, "peer": peer, "time": time}
        case DtuOffline(psn=psn, peer=peer):
            return f"dtu:{psn}", False, "dtu_offline", {"psn": psn, "peer": peer, "time": time}
        case UploadStored(psn=psn, values=values):
            return f"dtu:{psn}", True, "upload", {"psn": psn, "time": time, "values": list(values)}
        case MeterRead(meter=meter, values=values):
            return f"meter:{meter}", True, "meter_read", {"meter": meter, "time": time, "values": dict(values)}
        case MeterFailed(meter=meter, reason=reason):
            return f"meter:{meter}", False, "meter_failed", {"meter": meter, "time": time, "reason": reason}
        case LinkUp(link=link, remote=remote):
            return f"link:{link}", False, "link_up", {"link": link, "remote": remote, "time": time}
        case LinkDown(link=link):
            return f"link:{link}", False, "link_down", {"link": link, "time": time}
        case AlarmRaised() | AlarmCleared():
            # About a device: seen by whoever may see the device (the rule is its account's).
            name = "alarm_raised" if isinstance(event, AlarmRaised) else "alarm_cleared"
            return f"{event.device_kind}:{event.device}", False, name, {**attrs.asdict(event), "time": time}
    raise TypeError(f"not an event: {event!r}")  # pragma: no cover - the match is exhaustive


@attrs.frozen
class Visible:
    """What one caller's stream may see: every device (an admin), or these."""

    everything: bool
    dtus: frozenset[int] = frozenset()
    meters: frozenset[str] = frozenset()
    links: frozenset[str] = frozenset()
    dtus_total: int = 0

    def sees(self, key: str) -> bool:
        if self.everything:
            return True
        kind, _, name = key.partition(":")
        if kind == "dtu":
            return name.isascii() and name.isdigit() and int(name) in self.dtus
        return name in (self.meters if kind == "meter" else self.links)


def visible_to(session: Session, caller: Caller) -> Visible:
    if caller.scope is None:
        return Visible(True, dtus_total=queries.count_dtus(session))
    dtus = queries.dtu_psns(session, caller.scope)
    return Visible(
        False, dtus, frozenset(m.name for m in meters.list_meters(session, caller.scope)),
        frozenset(row.name for row in device_links.list_links(session, caller.scope)), len(dtus),
    )


def frame(name: str, data: Any, event_id: str | None = None) -> bytes:
    """One Server-Sent Event; JSON has no raw newlines, so ``data`` is one line."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def parse_watch(text: str | None) -> frozenset[str]:
    if not text:
        return frozenset()
    keys = frozenset(key for key in text.split(",") if key)
    if len(keys) > MAX_WATCHED:
        raise ApiError(400, f"watch at most {MAX_WATCHED} devices, got {len(keys)}")
    for key in keys:
        kind, _, name = key.partition(":")
        if kind not in ("dtu", "meter", "link") or not name:
            raise ApiError(400, f"watch takes dtu:PSN, meter:NAME or link:NAME separated by commas, got {key!r}")
    return keys


class LiveStream:
    """One open event stream: its filter, its counters for the summary, and its queue while its client is behind."""

    def __init__(self, feed: LiveFeed, request: server.Request, caller: Caller, visible: Visible,
                 watch: frozenset[str]) -> None:
        self.feed = feed
        self.caller = caller
        self.visible = visible
        self.watch = watch
        self.paced = Paced(request, self.flush)
        self.queue: deque[bytes] = deque()
        self.uploads = 0
        self.reads = 0
        self.closed = False
        self.paced.request.notifyFinish().addBoth(lambda _: self._gone())

    def offer(self, event: LiveEvent, replay: bool = False) -> None:
        if not self.visible.sees(event.key):
            return
        if not replay:
            if event.name == "upload":
                self.uploads += 1
            elif event.name == "meter_read":
                self.reads += 1
        if event.value and event.key not in self.watch:
            return
        self.send(frame(event.name, event.data, f"{self.feed.epoch}-{event.seq}"))

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.paced.paused and not self.queue:
            self.paced.request.write(data)
            return
        self.queue.append(data)
        if len(self.queue) > MAX_QUEUED:
            log.info("Console: a live stream of {who} fell {n} events behind; disconnected it to resume later",
                     who=self.caller.who, n=len(self.queue))
            self.drop()
            return
        if not self.paced.paused:
            self.flush()

    def flush(self) -> None:
        while self.queue and not self.paced.paused and not self.closed:
            self.paced.request.write(self.queue.popleft())

    def drop(self) -> None:
        """Disconnects a client that cannot keep up: its browser reconnects and resumes or resyncs."""
        self.queue.clear()
        self._gone()
        transport = self.paced.request.channel.transport
        if transport is not None:
            # TCP and TLS transports can abort: a client that does not read would never take a graceful close.
            cast(ITCPTransport, transport).abortConnection()

    def finish(self) -> None:
        self._gone()
        self.paced.finish()

    def _gone(self) -> None:
        if not self.closed:
            self.closed = True
            self.feed.streams.discard(self)


class LiveFeed(Service):
    """The center's events, as Server-Sent Events to each console (``GET /api/events``)."""

    def __init__(self, hub: EventHub, center: DTUCenter, store: Store, bridge: ModbusBridge | None,
                 clock: IReactorTime, pending_count: Callable[[], int] | None = None) -> None:
        self.hub = hub
        self.center = center
        #: How many devices wait to be adopted: in an admin's summary (others find theirs by registration).
        self.pending_count = pending_count
        self.store = store
        self.bridge = bridge
        self.clock = clock
        #: Changes at every start: an id from before a restart cannot resume.
        self.epoch = secrets.token_hex(4)
        self.seq = 0
        self.ring: deque[LiveEvent] = deque(maxlen=RING_SIZE)
        self.streams: set[LiveStream] = set()
        self._unsubscribe: Callable[[], None] | None = None
        self._summaries = LoopingCall(self._summarize)
        self._summaries.clock = clock
        self._heartbeats = LoopingCall(self._heartbeat)
        self._heartbeats.clock = clock
        self._refreshes = LoopingCall(self._refresh)
        self._refreshes.clock = clock
        self._last_summary = 0.0
        self._devices_changed = False

    def install(self, router: Router) -> None:
        router.add("GET", "/api/events", self.events)

    def startService(self) -> None:
        super().startService()
        self._unsubscribe = self.hub.subscribe(self._hear)
        self._last_summary = self.clock.seconds()
        for loop, interval in ((self._summaries, SUMMARY_INTERVAL), (self._heartbeats, HEARTBEAT_INTERVAL),
                               (self._refreshes, VISIBLE_REFRESH)):
            loop.start(interval, now=False).addErrback(
                lambda f: log.failure("The console's live feed stopped a periodic job", f)
            )

    def stopService(self) -> Any:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for loop in (self._summaries, self._heartbeats, self._refreshes):
            if loop.running:
                loop.stop()
        for stream in list(self.streams):
            stream.finish()
        return super().stopService()

    def _hear(self, event: Event) -> None:
        if not self.streams and isinstance(event, UploadStored | MeterRead):
            return  # values are only for streams watching; status events are kept for the next one's "recent"
        if isinstance(event, DtuOnline):
            self._devices_changed = True  # perhaps enrolled just now: the totals are counted again
        key, value, name, data = describe(event)
        self.seq += 1
        live = LiveEvent(self.seq, key, value, name, data)
        self.ring.append(live)
        for stream in list(self.streams):
            stream.offer(live)

    # -- the endpoint ------------------------------------------------------------------------------

    async def events(self, call: Call) -> Stream:
        params = call.query(("watch",))
        watch = parse_watch(params.get("watch"))
        if len(self.streams) >= MAX_STREAMS:
            raise ApiError(503, f"{MAX_STREAMS} live streams are open already; try again later")
        visible = await self.store.read(partial(visible_to, caller=call.caller))
        last_id = (call.request.getHeader(b"Last-Event-ID") or b"").decode("ascii", "replace")
        return Stream(partial(self._open, caller=call.caller, visible=visible, watch=watch, last_id=last_id))

    def _open(self, request: server.Request, caller: Caller, visible: Visible, watch: frozenset[str],
              last_id: str) -> None:
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Accel-Buffering", b"no")  # nginx: pass events through as they come
        stream = LiveStream(self, request, caller, visible, watch)
        self.streams.add(stream)
        stream.send(f"retry: {RETRY_MS}\n\n".encode())
        stream.send(frame("hello", {"account": caller.account, "admin": caller.admin}))
        self._replay(stream, last_id)
        stream.send(frame("summary", self.summary(stream, 0.0)))

    def _replay(self, stream: LiveStream, last_id: str) -> None:
        """What a reconnecting stream missed, or the recent status events for a new one."""
        if not last_id:
            recent = [e for e in self.ring if not e.value and stream.visible.sees(e.key)][-RECENT:]
            for event in recent:
                stream.offer(event, replay=True)
            return
        epoch, _, number = last_id.partition("-")
        oldest = self.ring[0].seq if self.ring else self.seq + 1
        known = epoch == self.epoch and number.isascii() and number.isdigit()
        if not known or not oldest - 1 <= int(number) <= self.seq:
            stream.send(frame("resync", {"reason": "the events since your last one are no longer kept"}))
            return
        for event in self.ring:
            if event.seq > int(number):
                stream.offer(event, replay=True)

    # -- periodic --------------------------------------------------------------------------------

    def summary(self, stream: LiveStream, elapsed: float) -> dict[str, Any]:
        """The overview's numbers, of what the stream's caller sees."""
        visible, sessions = stream.visible, self.center.sessions
        online = len(sessions) if visible.everything else sum(1 for psn in visible.dtus if psn in sessions)
        body: dict[str, Any] = {"dtus_online": online, "dtus_total": visible.dtus_total}
        if self.bridge is not None:
            statuses = [s for s in self.bridge.meter_statuses() if visible.sees(f"meter:{s.name}")]
            links = [s for s in self.bridge.link_statuses() if visible.sees(f"link:{s.name}")]
            body.update(meters=len(statuses), meters_failing=sum(s.failing for s in statuses),
                        links=len(links), links_up=sum(s.online for s in links))
        else:
            body.update(meters=0, meters_failing=0, links=0, links_up=0)
        body["uploads_per_s"] = round(stream.uploads / elapsed, 2) if elapsed > 0 else None
        body["reads_per_s"] = round(stream.reads / elapsed, 2) if elapsed > 0 else None
        body["store"] = {"healthy": self.store.healthy}
        if stream.caller.admin:
            body["store"]["backlog_rows"] = self.store.backlog
            if self.pending_count is not None:
                body["pending"] = self.pending_count()
        return body

    def _summarize(self) -> Deferred[None] | None:
        refreshed = None
        if self._devices_changed:
            self._devices_changed = False
            refreshed = self._refresh()
        now = self.clock.seconds()
        elapsed, self._last_summary = now - self._last_summary, now
        for stream in list(self.streams):
            data = frame("summary", self.summary(stream, elapsed))
            stream.uploads = stream.reads = 0
            stream.send(data)
        return refreshed

    def _heartbeat(self) -> None:
        for stream in list(self.streams):
            stream.send(b": keep-alive\n\n")

    async def _refresh_visible(self) -> None:
        for stream in list(self.streams):
            try:
                visible = await self.store.read(partial(visible_to, caller=stream.caller))
            except Exception:
                log.failure("Console: could not look up what {who} may see", who=stream.caller.who)
                return
            stream.visible = visible

    def _refresh(self) -> Deferred[None]:
        return ensureDeferred(self._refresh_visible())
