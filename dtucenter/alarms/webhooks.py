"""Webhooks: each alarm raised or cleared POSTed as JSON, retried with backoff, in order per URL.

:meth:`WebhookSender.send` only appends to the URL's queue: ingest and the engine never
wait on a webhook. One request per URL is in flight at a time, so a receiver gets a
URL's alarms in the order they happened; a failure (no connection, a timeout, a status
other than 2xx) is retried after ``first_retry`` seconds, doubling up to
``max_retry``, for as long as it takes, the later ones waiting behind it. What is
queued is bounded (``max_queued`` over all URLs): past it the oldest waiting delivery of
the URL is dropped, counted and logged. Queues live in memory: deliveries waiting when
the center stops are lost (the alarms themselves are stored, and listed by the API).

A delivery that reached the receiver but whose answer was lost is sent again: each
carries the header ``X-Dtucenter-Delivery`` (``ALARM-raised`` or ``ALARM-cleared``),
the same on every attempt, for the receiver to drop a repeat.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from dtucenter.events import AlarmCleared, AlarmRaised

log = Logger()

MAX_QUEUED = 10_000
FIRST_RETRY = 1.0
MAX_RETRY = 300.0
#: Seconds a receiver has to answer one POST.
TIMEOUT = 15.0


def alarm_payload(event: AlarmRaised | AlarmCleared) -> dict[str, Any]:
    """What a webhook receives (and the API's ``/api/alarms`` names the same)."""
    raised = isinstance(event, AlarmRaised)
    return {
        "event": "raised" if raised else "cleared",
        "alarm": event.alarm,
        "account": event.account,
        "rule": event.rule,
        "device_kind": event.device_kind,
        "device": event.device,
        "point": event.point,
        "value": event.value,
        "limit": event.limit if isinstance(event, AlarmRaised) else None,
        "message": event.message,
        "time": event.time.isoformat(),
    }


@attrs.frozen
class Delivery:
    key: str
    body: bytes


@attrs.define
class _Queue:
    waiting: deque[Delivery] = attrs.Factory(deque)
    busy: bool = False
    failures: int = 0
    retry: IDelayedCall | None = None
    in_flight: Deferred[Any] | None = None


@attrs.define
class WebhookStats:
    delivered: int = 0
    failed_attempts: int = 0
    dropped: int = 0


class WebhookSender:
    def __init__(
        self, reactor: Any, clock: IReactorTime | None = None, *, agent: IAgent | None = None,
        max_queued: int = MAX_QUEUED, first_retry: float = FIRST_RETRY, max_retry: float = MAX_RETRY,
        timeout: float = TIMEOUT,
    ) -> None:
        self._clock: IReactorTime = clock or reactor
        if agent is None:
            pool = HTTPConnectionPool(reactor, persistent=True)
            pool.maxPersistentPerHost = 1
            self._pool: HTTPConnectionPool | None = pool
            agent = Agent(reactor, connectTimeout=timeout, pool=pool)
        else:
            self._pool = None
        self._agent = agent
        self._max_queued = max_queued
        self._first_retry = first_retry
        self._max_retry = max_retry
        self._timeout = timeout
        self._queues: dict[str, _Queue] = {}
        self._queued = 0
        self._stopped = False
        self.stats = WebhookStats()

    @property
    def queued(self) -> int:
        return self._queued

    def send_alarm(self, url: str, event: AlarmRaised | AlarmCleared) -> None:
        payload = alarm_payload(event)
        self.send(url, Delivery(f"{event.alarm}-{payload['event']}", json.dumps(payload).encode("utf-8")))

    def send(self, url: str, delivery: Delivery) -> None:
        if self._stopped:
            return
        queue = self._queues.get(url)
        if queue is None:
            queue = self._queues[url] = _Queue()
        if self._queued >= self._max_queued and self._drop_oldest(queue, url):
            self._queued -= 1
        queue.waiting.append(delivery)
        self._queued += 1
        if not queue.busy:
            self._attempt(url, queue)

    def _drop_oldest(self, queue: _Queue, url: str) -> bool:
        # The head may be in flight: the one behind it goes instead.
        index = 1 if queue.busy else 0
        if len(queue.waiting) <= index:
            return False
        dropped = queue.waiting[index]
        del queue.waiting[index]
        self.stats.dropped += 1
        log.warn("Webhook {url}: queue full ({limit}), delivery {key} dropped ({dropped} so far)",
                 url=url, limit=self._max_queued, key=dropped.key, dropped=self.stats.dropped)
        return True

    def _attempt(self, url: str, queue: _Queue) -> None:
        queue.retry = None
        if self._stopped or not queue.waiting:
            queue.busy = False
            return
        queue.busy = True
        delivery = queue.waiting[0]
        headers = Headers({
            b"Content-Type": [b"application/json"],
            b"User-Agent": [b"dtucenter"],
            b"X-Dtucenter-Delivery": [delivery.key.encode("ascii")],
        })
        d: Deferred[Any] = self._agent.request(
            b"POST", url.encode("utf-8"), headers, _Body(delivery.body)
        )
        queue.in_flight = d
        d.addCallback(self._answered)
        d.addTimeout(self._timeout, self._clock)
        d.addBoth(self._landed, queue)
        d.addCallbacks(
            lambda _: self._delivered(url, queue, delivery),
            lambda failure: self._failed(url, queue, failure.getErrorMessage()),
        )

    def _answered(self, response: IResponse) -> Deferred[None]:
        # The answer's body is read and thrown away, so that the connection can be used again.
        read: Deferred[None] = Deferred()
        response.deliverBody(_Discard(read))
        if 200 <= response.code < 300:
            return read
        read.addBoth(lambda _: None)
        raise _Refused(f"answered {response.code}")

    @staticmethod
    def _landed(result: object, queue: _Queue) -> object:
        queue.in_flight = None
        return result

    def _delivered(self, url: str, queue: _Queue, delivery: Delivery) -> None:
        if queue.waiting and queue.waiting[0] is delivery:
            queue.waiting.popleft()
            self._queued -= 1
        self.stats.delivered += 1
        if queue.failures:
            log.info("Webhook {url} accepts deliveries again after {failures} failed attempts",
                     url=url, failures=queue.failures)
        queue.failures = 0
        self._attempt(url, queue)

    def _failed(self, url: str, queue: _Queue, why: str) -> None:
        self.stats.failed_attempts += 1
        queue.failures += 1
        delay = min(self._first_retry * 2 ** (queue.failures - 1), self._max_retry)
        if queue.failures == 1 or (delay >= self._max_retry and queue.failures % 10 == 0):
            log.warn("Webhook {url} failed ({why}); {waiting} waiting, retrying in {delay:g} s",
                     url=url, why=why, waiting=len(queue.waiting), delay=delay, failures=queue.failures)
        if self._stopped:
            queue.busy = False
            return
        queue.retry = self._clock.callLater(delay, self._attempt, url, queue)

    def stop(self) -> None:
        """Cancel the retries and drop what waits (the center stops)."""
        self._stopped = True
        for queue in self._queues.values():
            if queue.retry is not None and queue.retry.active():
                queue.retry.cancel()
            queue.retry = None
            if queue.in_flight is not None:
                queue.in_flight.cancel()
        if self._pool is not None:
            self._pool.closeCachedConnections()


class _Refused(Exception):
    pass


class _Discard(Protocol):
    """Reads a response's body without keeping it (a receiver's answer may be of any size)."""

    def __init__(self, done: Deferred[None]) -> None:
        self._done = done

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # ResponseDone, or the end of a body without a length: either way it was all read.
        if reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(None)
        else:
            self._done.errback(reason)


@implementer(IBodyProducer)
class _Body:
    """A request body that is all there at once."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

