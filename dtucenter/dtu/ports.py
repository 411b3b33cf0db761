"""What the DTU half needs from outside itself: the store, and a command queue's session.

The DTU code defines these small interfaces and speaks only to them;
``dtucenter.store.dtus.DtuStore`` implements the store's, without importing
anything from ``dtucenter.dtu`` (tests/test_layering.py holds that). So what
crosses is plain types: ints, strings, datetimes, tuples of (dev, addr)
pairs, and records of those. Wire messages are built on this side.

All store calls are made in the reactor thread and return Deferreds that
fire once the work is committed (writes) or read.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from dtucenter.dtu.wire import Dialect, Register

#: One stored upload, in the order of the store's sample columns: PSN, time received,
#: NetState, the values packed as on the wire (big-endian int16 each), and the
#: (Dev u8, Addr u16) of each position packed the same way, or None when unknown.
SampleRow = tuple[int, dt.datetime, int, bytes, "bytes | None"]

#: A register list as stored: (dev, addr) per position.
DevAddrPairs = tuple[tuple[int, int], ...]

#: One login for the store to decide: PSN, PASS, PName, CurVer, CCID, the peer it came from,
#: and whether an unknown PSN is enrolled.
LoginAttempt = tuple[int, int, str, int, str, str, bool]


class LoginParameters(Protocol):
    """What the LoginAck of an accepted DTU tells it: part of its record."""

    @property
    def fota_flag(self) -> int: ...
    @property
    def tick_time(self) -> int: ...
    @property
    def send_test_mode(self) -> int: ...
    @property
    def send_test_time(self) -> int: ...
    @property
    def new_ver(self) -> int: ...
    @property
    def new_port(self) -> int: ...
    @property
    def new_ip(self) -> str: ...


class LoginOutcome(Protocol):
    """The store's decision on a login."""

    @property
    def accepted(self) -> bool: ...
    @property
    def reason(self) -> str: ...
    @property
    def record(self) -> LoginParameters | None:
        """The DTU's record as the login left it, when accepted."""
    @property
    def registers(self) -> DevAddrPairs:
        """The DTU's stored register list, when accepted."""
    @property
    def enrolled(self) -> bool:
        """The PSN was unknown and a record was made for it."""


class DtuRecords(Protocol):
    """The store as the center and the command queues use it."""

    def authenticate_many(
        self, attempts: Sequence[LoginAttempt], now: dt.datetime
    ) -> Awaitable[Sequence[LoginOutcome]]:
        """Check logins, in order, in one store call (enrolling an unknown PSN if its attempt says so);
        when accepted, record each and mark its DTU online. Fires with one outcome per attempt.

        A Deferred in fact; Awaitable because it is covariant, so that the store's own record type
        (which has these fields but cannot name this module) satisfies the return type.
        """

    def add_samples(self, rows: list[SampleRow]) -> Deferred[None]:
        """Store uploads; the hot path, so the center takes this bound method once."""

    def replace_register_list(self, psn: int, send_test_time: int, registers: DevAddrPairs) -> Deferred[None]: ...

    def mark_offline_many(self, last_seen: Mapping[int, dt.datetime]) -> Deferred[None]:
        """These DTUs' connections went away, each last seen at its time: one store call for them all."""

    def mark_left_over_offline(self, now: dt.datetime) -> Deferred[int]:
        """At start: no connection survives a restart, so the DTUs this center's last run left
        marked online (and those of centers of the cluster that are gone) are offline; fires with
        how many. Those other running centers hold stay as they are."""

    def mark_own_offline(self) -> Deferred[int]:
        """At stop: the DTUs this center holds are offline; fires with how many."""

    def record_last_seen(self, seen: Mapping[int, dt.datetime]) -> Deferred[None]:
        """Last-seen times of many DTUs at once; a PSN without a record is skipped."""

    def dtu_exists(self, psn: int) -> Deferred[bool]: ...


class CommandTrail(Protocol):
    """The audit trail of operator commands (``dtu.control.Control`` writes it)."""

    def record_command(
        self, psn: int, kind: str, request: dict[str, Any], who: str, queued: dt.datetime,
        outcome: str | None = None, finished: dt.datetime | None = None, error: str | None = None,
    ) -> Deferred[int]:
        """Add a record (pending unless ``outcome`` is given); fires with its id for ``finish_command``."""

    def finish_command(
        self, record_id: int, sent: dt.datetime | None, finished: dt.datetime, outcome: str,
        result: Any = None, error: str | None = None,
    ) -> Deferred[None]: ...

    def interrupt_pending(self, now: dt.datetime) -> Deferred[int]:
        """At start-up: records still pending were cut short by the last stop; fires with how many."""


class CommandOwner(Protocol):
    """What a ``commands.CommandQueue`` needs from the session it belongs to."""

    @property
    def clock(self) -> IReactorTime: ...
    @property
    def dialect(self) -> Dialect: ...
    @property
    def command_timeout(self) -> float: ...
    @property
    def stats(self) -> Counter[str]:
        """The center's counters."""
    @property
    def psn(self) -> int | None: ...
    @property
    def peer(self) -> str: ...
    @property
    def reading_paused(self) -> bool:
        """Frames the DTU sent may be waiting unread (an ack among them)."""

    def send_frame(self, frame: bytes) -> None: ...

    def setup_reported(self, send_test_time: int, registers: tuple[Register, ...]) -> Deferred[None]:
        """The DTU told its setup: it names later uploads; fires once it is stored."""
