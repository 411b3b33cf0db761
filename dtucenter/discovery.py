"""Pending devices: DTUs that dialled in with a registration (Modbus) or PSN (binary protocol)
the center does not know, kept so that an operator or an account can adopt them.

The :class:`PendingBook` is the running center's list, in memory on the reactor thread:
it decides at once whether a new unknown device is kept (its bounds), and the database
is its durable copy, written in coalesced batches (:meth:`PendingBook.flush`, every
``flush_interval`` seconds): a DTU that redials every minute costs one row update in the
next batch, not a transaction per redial. What the book holds:

- at most ``per_host`` devices from one source host: a flood of random registrations
  from one address fills that address's share and is then refused (summarised in the
  log once per expiry round, never a line per connection); it never pushes out another
  address's devices, as nothing is evicted to make room;
- at most ``total`` devices in all, refused likewise once full;
- a device not seen for ``expire_after`` seconds is dropped by a periodic job.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import attrs
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

MODBUS = "modbus"
DTU = "dtu"
#: The first bytes of a pending connection kept, to show what it sent.
FIRST_BYTES = 64


def pending_id() -> str:
    """An opaque id that cannot be guessed: an account must not reach another's device by trying ids."""
    return secrets.token_urlsafe(16)


def utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


@attrs.define
class PendingDevice:
    """One unknown device; times are the clock's seconds since the epoch."""

    id: str
    kind: str  # MODBUS or DTU
    registration: bytes  # the registration packet, or the PSN as decimal text
    host: str  # the source host, which the bounds count by
    peer: str  # host:port of the latest connection
    listener: str
    first_bytes: bytes
    first_seen: float
    last_seen: float
    times_seen: int = 1


@attrs.frozen
class PendingLimits:
    per_host: int = 20
    total: int = 10_000
    expire_after: float = 7 * 24 * 3600.0
    flush_interval: float = 1.0


class PendingStore(Protocol):
    """The durable copy of the book, which the store implements."""

    def load_pending(self) -> defer.Deferred[list[PendingDevice]]: ...

    def save_pending(
        self, saved: Sequence[PendingDevice], removed: Sequence[str], expired_before: float
    ) -> defer.Deferred[None]: ...


class PendingBook:
    """The running center's pending devices (see the module's docstring)."""

    def __init__(self, clock: IReactorTime, limits: PendingLimits, store: PendingStore | None = None) -> None:
        self._clock = clock
        self.limits = limits
        self._store = store
        self._by_key: dict[tuple[str, bytes], PendingDevice] = {}
        self._by_id: dict[str, PendingDevice] = {}
        self._per_host: Counter[str] = Counter()
        self._dirty: set[str] = set()
        self._removed: set[str] = set()
        #: New devices refused since the last summary, by host.
        self._refused: Counter[str] = Counter()
        self._forgotten_hooks: list[Callable[[PendingDevice], None]] = []
        self._flushing: defer.Deferred[None] | None = None
        self._flush_loop: task.LoopingCall | None = None
        self._expire_loop: task.LoopingCall | None = None

    # -- what the listeners ask --------------------------------------------------------------

    def sighted(
        self, kind: str, registration: bytes, *, host: str, peer: str, listener: str, first_bytes: bytes
    ) -> PendingDevice | None:
        """A connection with an unknown ``registration``: the device it is now, or None when the
        bounds refuse a new one (its host has its share, or the book is full)."""
        now = self._clock.seconds()
        device = self._by_key.get((kind, registration))
        if device is not None:
            device.last_seen, device.peer, device.times_seen = now, peer, device.times_seen + 1
            if device.host != host:
                self._per_host[device.host] -= 1
                self._per_host[host] += 1
                device.host = host
            self._dirty.add(device.id)
            return device
        if self._per_host[host] >= self.limits.per_host or len(self._by_id) >= self.limits.total:
            self._refused[host] += 1
            return None
        device = PendingDevice(
            pending_id(), kind, registration, host, peer, listener, first_bytes[:FIRST_BYTES], now, now
        )
        self._add(device)
        self._dirty.add(device.id)
        log.info("Pending {kind} device {registration!r} from {peer} (id {id})",
                 kind=kind, registration=registration, peer=peer, id=device.id)
        return device

    def when_forgotten(self, hook: Callable[[PendingDevice], None]) -> None:
        """Call ``hook`` for each device that leaves the book (adopted, dropped or expired)."""
        self._forgotten_hooks.append(hook)

    # -- what the API, the adoption and the expiry do ------------------------------------------

    def devices(self) -> list[PendingDevice]:
        return sorted(self._by_id.values(), key=lambda d: (d.first_seen, d.id))

    def count(self) -> int:
        """How many devices wait to be adopted (for the metrics: no list is made)."""
        return len(self._by_id)

    def get(self, device_id: str) -> PendingDevice | None:
        return self._by_id.get(device_id)

    def find(self, kind: str, registration: bytes) -> PendingDevice | None:
        return self._by_key.get((kind, registration))

    def rewrite(self, device_id: str) -> None:
        """Write a device again at the next flush (an adoption that deleted its row was undone)."""
        if device_id in self._by_id:
            self._dirty.add(device_id)

    def forget(self, device_id: str) -> PendingDevice | None:
        """Take a device out of the book (and, at the next flush, out of the database)."""
        device = self._by_id.pop(device_id, None)
        if device is None:
            return None
        del self._by_key[(device.kind, device.registration)]
        self._per_host[device.host] -= 1
        if not self._per_host[device.host]:
            del self._per_host[device.host]
        self._dirty.discard(device_id)
        self._removed.add(device_id)
        for hook in list(self._forgotten_hooks):
            hook(device)
        return device

    def expire(self) -> list[PendingDevice]:
        """Forget the devices not seen for ``expire_after`` seconds; log the refusals since last time."""
        cutoff = self._clock.seconds() - self.limits.expire_after
        expired = [device for device in self._by_id.values() if device.last_seen < cutoff]
        for device in expired:
            self.forget(device.id)
        if expired:
            log.info("{count} pending device(s) expired, not seen for {seconds:g} s",
                     count=len(expired), seconds=self.limits.expire_after)
        self._summarise_refusals()
        return expired

    def _summarise_refusals(self) -> None:
        refused, self._refused = self._refused, Counter()
        for host, count in refused.most_common(10):
            log.warn(
                "Refused {count} new unknown device(s) from {host}: it has {held} pending (at most {per_host}),"
                " {total} pending in all (at most {limit})",
                count=count, host=host, held=self._per_host[host], per_host=self.limits.per_host,
                total=len(self._by_id), limit=self.limits.total,
            )
        if len(refused) > 10:
            log.warn("... and from {hosts} more hosts", hosts=len(refused) - 10)

    def _add(self, device: PendingDevice) -> None:
        self._by_key[(device.kind, device.registration)] = device
        self._by_id[device.id] = device
        self._per_host[device.host] += 1

    # -- the durable copy ----------------------------------------------------------------------

    def load(self, devices: Iterable[PendingDevice]) -> None:
        """Take in what the database held at start (within the bounds; the rest is left to expire)."""
        for device in devices:
            key = (device.kind, device.registration)
            if key in self._by_key or self._per_host[device.host] >= self.limits.per_host:
                continue
            if len(self._by_id) >= self.limits.total:
                break
            self._add(device)

    def flush(self) -> defer.Deferred[None]:
        """Write what changed since the last flush, in one transaction; fires once it is durable.
        Another flush under way is waited for first, so that they commit in order."""
        if self._store is None:
            return defer.succeed(None)
        before = self._flushing if self._flushing is not None else defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()

        def write(_: object) -> defer.Deferred[None]:
            saved = [attrs.evolve(self._by_id[i]) for i in self._dirty if i in self._by_id]
            removed = sorted(self._removed)
            self._dirty, self._removed = set(), set()
            cutoff = self._clock.seconds() - self.limits.expire_after
            assert self._store is not None
            if not saved and not removed:
                return defer.succeed(None)

            def failed(failure: Failure) -> Failure:
                # Written again at the next flush, unless changed since.
                self._dirty.update(d.id for d in saved if d.id in self._by_id)
                self._removed.update(i for i in removed if i not in self._by_id)
                return failure

            return self._store.save_pending(saved, removed, cutoff).addErrback(failed)

        chained = before.addBoth(lambda _: None).addCallback(write)
        self._flushing = chained

        def finished(result: object) -> object:
            if self._flushing is chained:
                self._flushing = None
            done.callback(None) if not isinstance(result, Failure) else done.errback(result)
            return None

        chained.addBoth(finished)
        return done

    def start(self) -> defer.Deferred[None]:
        """Load the database's devices, then flush and expire periodically."""
        loaded = self._store.load_pending() if self._store is not None else defer.succeed([])

        def begin(devices: list[PendingDevice]) -> None:
            self.load(devices)
            self._flush_loop = task.LoopingCall(self._flush_logged)
            self._flush_loop.clock = self._clock
            self._flush_loop.start(self.limits.flush_interval, now=False)
            self._expire_loop = task.LoopingCall(self._expire_logged)
            self._expire_loop.clock = self._clock
            self._expire_loop.start(min(self.limits.expire_after / 10, 60.0), now=True)

        return loaded.addCallback(begin)

    def stop(self) -> defer.Deferred[None]:
        for loop in (self._flush_loop, self._expire_loop):
            if loop is not None and loop.running:
                loop.stop()
        self._flush_loop = self._expire_loop = None
        return self.flush().addErrback(lambda f: log.failure("Could not store the pending devices", f))

    def _flush_logged(self) -> defer.Deferred[None]:
        # Logged here and swallowed: a failed write is retried at the next round, and the loop goes on.
        return self.flush().addErrback(lambda f: log.failure("Could not store the pending devices", f))

    def _expire_logged(self) -> None:
        try:
            self.expire()
        except Exception:
            log.failure("Could not expire the pending devices")


class PendingService(Service):
    """Runs a book's load, flushes and expiry with the center."""

    def __init__(self, book: PendingBook) -> None:
        self.book = book

    def startService(self) -> None:
        super().startService()
        self.book.start().addErrback(lambda f: log.failure("Could not load the pending devices", f))

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self.book.stop()
