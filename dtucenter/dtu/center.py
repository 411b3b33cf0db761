"""What the center knows across connections: who is online, what was stored.

Sessions (one per TCP connection or UDP source address) call in here for
everything that outlives them or touches the store.
"""

from __future__ import annotations

import datetime as dt
import functools
import heapq
import math
import struct
from collections import Counter
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dtucenter.discovery import DTU, PendingBook, PendingDevice
from dtucenter.dtu import wire
from dtucenter.dtu.ports import DtuRecords, LoginAttempt, LoginOutcome, SampleRow
from dtucenter.events import DtuOffline, DtuOnline, EventHub, UploadStored
from dtucenter.isotime import utc_from_millisecond, utc_from_seconds, utc_now
from dtucenter.junk import DEFAULT_JUNK_LIMIT, DEFAULT_JUNK_WINDOW, DEFAULT_REPORT_INTERVAL, ProblemSummary
from dtucenter.latency import Histogram
from dtucenter.throttle import LoginThrottle

if TYPE_CHECKING:
    from dtucenter.dtu.session import DTUSession

log = Logger()


@attrs.frozen
class CenterSettings:
    enroll_unknown: bool = False
    #: An unknown PSN's login is held unanswered as a pending device (the ``pending`` policy)
    #: until it is adopted (answered then, on the same connection) or dropped (refused).
    hold_unknown: bool = False
    #: Most unanswered logins held at once.
    max_held_logins: int = 1000
    login_timeout: float = 30.0
    dialect: wire.Dialect = wire.DEFAULT_DIALECT
    garbage_limit: int = wire.DEFAULT_GARBAGE_LIMIT
    #: The same before a login: a DTU's first frame is its Login (a registration packet in
    #: front is a few dozen bytes), and an unauthenticated peer gets bounded work.
    login_garbage_limit: int = wire.DEFAULT_LOGIN_GARBAGE_LIMIT
    #: A logged-in DTU is closed when, over junk_window seconds, it sent more than
    #: junk_limit bytes of junk and more junk than valid frames.
    junk_limit: int = DEFAULT_JUNK_LIMIT
    junk_window: float = DEFAULT_JUNK_WINDOW
    #: At most one line per connection per this many seconds summarises its bad frames.
    problem_report_interval: float = DEFAULT_REPORT_INTERVAL
    last_seen_interval: float = 15.0
    command_timeout: float = 10.0
    #: Uploads in a row that disagree with a DTU's stored register list before it is asked for its own.
    mismatches_before_asking: int = 3
    #: Seconds between two such questions to one DTU (a DTU that answers a list it does not upload
    #: with is not flooded), and between two log lines about its mismatched uploads.
    mismatch_interval: float = 600.0


class _LastUpload:
    """A DTU's last upload, to spot retransmissions; its callbacks finish the upload.

    A plain slotted class with methods rather than an attrs record and two
    closures per upload: at thousands of uploads a second that showed in
    the profile.
    """

    __slots__ = ("center", "committed", "count", "psn", "received", "test_code", "values", "waiting")

    def __init__(self, center: DTUCenter, psn: int, upload: wire.SendTest, received: dt.datetime) -> None:
        self.center = center
        self.psn = psn
        self.received = received
        self.test_code = upload.test_code
        self.values = upload.values
        self.committed = False
        #: Retransmissions that arrived before the commit.
        self.waiting: list[Deferred[None]] | None = None

    def repeated(self) -> Deferred[int]:
        if self.committed:
            return succeed(self.test_code)
        # The same frame is still on its way to the disk: acknowledge when it lands, store it once.
        landed: Deferred[None] = Deferred()
        if self.waiting is None:
            self.waiting = []
        self.waiting.append(landed)
        code = self.test_code
        return landed.addCallback(lambda _: code)

    def stored(self, _: None) -> int:
        self.committed = True
        center = self.center
        stats = center.stats
        stats["uploads_stored"] += 1
        stats["samples_stored"] += len(self.values)
        if center.events.listening:
            center.events.publish(UploadStored(self.psn, self.received, self.values))
        waiting, self.waiting = self.waiting, None
        for d in waiting or ():
            d.callback(None)
        return self.test_code

    def not_stored(self, failure: Failure) -> Failure:
        self.center.forget_upload(self)
        waiting, self.waiting = self.waiting, None
        for d in waiting or ():
            d.errback(failure)
        return failure


@attrs.define
class _Mismatch:
    """A DTU whose uploads disagree with its stored register list, until one agrees again."""

    #: Mismatched uploads since it was last asked for its list (or since the first).
    in_a_row: int = 0
    total: int = 0
    #: Clock seconds it was last asked for its list, and its mismatch last logged.
    asked_at: float | None = None
    logged_at: float | None = None


#: PSNs listed by ``DTUCenter.mismatched_psns`` at most: the status must stay small in a bad fleet.
MISMATCHED_PSNS_SHOWN = 100

#: Logins (or offline marks) in one store call at most: each locks its DTU's row until the commit, which
#: the other nodes of a cluster may wait for (the store's MAX_BATCH_JOBS says the same of jobs).
MAX_LOGINS_PER_CALL = 1000


@attrs.frozen
class LoginDecision:
    """The center's answer to a login: the LoginAck to send, and what the session goes on with."""

    accepted: bool
    reason: str
    ack: wire.LoginAck
    registers: tuple[wire.Register, ...] = ()
    enrolled: bool = False

    @classmethod
    def of(cls, outcome: LoginOutcome) -> LoginDecision:
        """The store's decision in wire terms."""
        p = outcome.record
        if not outcome.accepted or p is None:
            return cls(False, outcome.reason, REFUSED)
        ack = wire.LoginAck(
            right=wire.LOGIN_ACCEPTED, fota_flag=p.fota_flag, tick_time=p.tick_time,
            send_test_mode=p.send_test_mode, send_test_time=p.send_test_time,
            new_ver=p.new_ver, new_port=p.new_port, new_ip=p.new_ip,
        )
        registers = tuple(wire.Register(dev, addr) for dev, addr in outcome.registers)
        return cls(True, outcome.reason, ack, registers, outcome.enrolled)


#: A refused DTU learns nothing but the refusal: every field but Right is 0 (docs/protocol.md),
#: not the LoginAck defaults (TickTime 60, SendTestMode 255) an accepted DTU would act on.
REFUSED = wire.LoginAck(
    right=wire.LOGIN_REFUSED, fota_flag=0, tick_time=0, send_test_mode=0, send_test_time=0,
    new_ver=0, new_port=0, new_ip="0.0.0.0",
)
THROTTLED = LoginDecision(False, "too many failed logins; try later", REFUSED)
#: The store's reason for a PSN it has no record of (dtu/ports.py LoginOutcome).
UNKNOWN_PSN = "unknown PSN"
REFUSED_DECISION = LoginDecision(False, UNKNOWN_PSN, REFUSED)


def _throttle_key(session: DTUSession, login: wire.Login) -> str:
    # Per source host and PSN, not per host: thousands of DTUs may share one
    # carrier NAT address, and one misconfigured DTU must not lock them out.
    key = f"{session.peer.rpartition(':')[0]}/{login.psn}"
    if session.spoofable:
        # A UDP source address can be forged, so failures "from" a DTU's address may be
        # anyone's: with the PASS in the key they block only that wrong PASS, never the
        # right one (docs/protocol.md, "Login").
        key += f"/{login.password}"
    return key


_REGISTER = struct.Struct(">BH")


def upload_row(psn: int, when: dt.datetime, upload: wire.SendTest, registers: Sequence[wire.Register]) -> SampleRow:
    """The stored row of one SendTest; (dev, addr) come from the register list when it matches."""
    values = upload.values
    packed = struct.pack(f">{len(values)}h", *values)
    named = _pack_registers(tuple(registers)) if registers and len(registers) == len(values) else None
    return (psn, when, upload.net_state, packed, named)


@functools.lru_cache(maxsize=4096)
def _pack_registers(registers: tuple[wire.Register, ...]) -> bytes:
    # A DTU uploads with the same register list for days: pack it once.
    return b"".join(_REGISTER.pack(r.dev, r.addr) for r in registers)


class DTUCenter(Service):
    def __init__(
        self, records: DtuRecords, clock: IReactorTime, settings: CenterSettings = CenterSettings(),
        events: EventHub | None = None,
        book: PendingBook | None = None,
    ) -> None:
        self.records = records
        #: Where logins, disconnections and stored uploads are told as they happen.
        self.events = events if events is not None else EventHub()
        self.book = book
        #: PSN -> a pending DTU's unanswered login: its session, the Login, the decision to fire.
        self._held: dict[int, tuple[DTUSession, wire.Login, Deferred[LoginDecision]]] = {}
        if book is not None:
            book.when_forgotten(self._forgotten)
        #: Taken once: the upload path is hot.
        self._add_samples = records.add_samples
        self.clock = clock
        self.settings = settings
        #: PSN -> the session that is logged in for it now.
        self.sessions: dict[int, DTUSession] = {}
        self.login_throttle = LoginThrottle(clock)
        #: Refused logins, told in full at most once per report interval and counted in between:
        #: a fleet with a wrong PASS, or forged UDP logins with a new PSN each, must not write a line each.
        self._refusals = ProblemSummary(clock, interval=settings.problem_report_interval)
        self.stats: Counter[str] = Counter()
        #: Seconds from an upload's handling to its acknowledgement, for uploads that waited for the store.
        self.ack_latency = Histogram()
        #: Connections closed for junk before they logged in: summarised here, not one line each,
        #: since a junk source may open thousands of them.
        self.junk_closures = ProblemSummary(clock, interval=settings.problem_report_interval)
        self._last_upload: dict[int, _LastUpload] = {}
        #: PSN -> its uploads' disagreement with its stored register list (bounded by the fleet).
        self._mismatched: dict[int, _Mismatch] = {}
        #: PSN -> clock seconds of its last frame, written to the store every last_seen_interval.
        self._seen: dict[int, float] = {}
        self._seen_writer = LoopingCall(self._write_last_seen)
        self._seen_writer.clock = clock
        #: Logins and offline marks waiting for the store call in flight (one at a time): what arrives
        #: meanwhile goes in the next one, so a storm of logins costs a few store calls, not one each.
        self._logins_queued: list[tuple[LoginAttempt, Deferred[LoginOutcome]]] = []
        self._offline_queued: dict[int, dt.datetime] = {}
        self._logins_in_flight = False
        self._offline_calls_in_flight = 0
        self.started: dt.datetime | None = None
        #: Encoded once: at thousands of acks a second, encoding each showed in the profile.
        self.ack_frames = wire.send_test_ack_frames(settings.dialect)
        self._stamp_millisecond = -1
        self._stamp = utc_from_millisecond(0)

    def now(self) -> dt.datetime:
        return utc_now(self.clock)

    def received_at(self, seconds: float) -> dt.datetime:
        """Clock ``seconds`` as the UTC time stored with an upload, to the millisecond.

        One datetime per millisecond, shared by every upload received in it: making one
        per upload cost a few percent of the reactor at ingest rates, and the store binds
        a shared datetime once (docs/performance.md).
        """
        millisecond = math.floor(seconds * 1000)
        if millisecond != self._stamp_millisecond:
            self._stamp_millisecond = millisecond
            self._stamp = utc_from_millisecond(millisecond)
        return self._stamp

    # -- lifecycle -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.started = self.now()

        def reset(count: int) -> None:
            if count:
                log.info("Marked {count} DTUs offline left over from the last run", count=count)

        d = self.records.mark_left_over_offline(self.started)
        d.addCallbacks(reset, lambda f: log.failure("Could not reset online flags", f))
        self._seen_writer.start(self.settings.last_seen_interval, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._seen_writer.running:
            self._seen_writer.stop()
        self._write_last_seen()
        for session in list(self.sessions.values()):
            session.abort("center stopping")
        return self.records.mark_own_offline().addCallbacks(
            lambda _: None, lambda f: log.failure("Could not mark DTUs offline at shutdown", f)
        )

    # -- login ---------------------------------------------------------------------

    def authenticate(self, session: DTUSession, login: wire.Login) -> Deferred[LoginDecision]:
        if self.login_throttle.blocked(_throttle_key(session, login)):
            # A DTU with a wrong PASS, or a PSN nobody knows, retrying in a loop
            # must not cost a database job every few seconds.
            self.stats["logins_throttled"] += 1
            return succeed(THROTTLED)
        outcome = self._login_outcome(session, login, self.settings.enroll_unknown)
        return Deferred.fromCoroutine(self._decided(outcome, session, login))

    # -- the store's side of logins: batched -------------------------------------------

    def _login_outcome(self, session: DTUSession, login: wire.Login, enroll_unknown: bool) -> Deferred[LoginOutcome]:
        """The store's decision on ``login``, in the next store call for logins."""
        decided: Deferred[LoginOutcome] = Deferred()
        attempt = (login.psn, login.password, login.pname, login.cur_ver, login.ccid, session.peer, enroll_unknown)
        self._logins_queued.append((attempt, decided))
        self._send_logins()
        return decided

    def _mark_offline(self, psn: int, last_seen: dt.datetime) -> None:
        self._offline_queued[psn] = last_seen
        self._send_logins()

    def _send_logins(self) -> None:
        """The queued logins in one store call, unless one is in flight (its end sends the next); likewise
        the queued offline marks.

        Offline marks queued before a login go to the store before it, also when another call of
        marks is still in flight: a mark is the DTU's older connection's, and must not undo the
        newer login's online flag.
        """
        logins_now = bool(self._logins_queued) and not self._logins_in_flight
        if self._offline_queued and (logins_now or not self._offline_calls_in_flight):
            queued, self._offline_queued = list(self._offline_queued.items()), {}
            for start in range(0, len(queued), MAX_LOGINS_PER_CALL):
                marks = dict(queued[start : start + MAX_LOGINS_PER_CALL])
                self._offline_calls_in_flight += 1
                self.records.mark_offline_many(marks).addErrback(
                    self._not_marked_offline, len(marks)).addBoth(self._offline_sent)
        if logins_now:
            batch = self._logins_queued[:MAX_LOGINS_PER_CALL]
            del self._logins_queued[:MAX_LOGINS_PER_CALL]
            self._logins_in_flight = True
            Deferred.fromCoroutine(self._decide_logins(batch)).addBoth(self._logins_sent)

    @staticmethod
    def _not_marked_offline(failure: Failure, count: int) -> None:
        log.failure("Could not mark {count} DTUs offline", failure, count=count)

    def _offline_sent(self, _: object) -> None:
        self._offline_calls_in_flight -= 1
        self._send_logins()

    def _logins_sent(self, _: object) -> None:
        self._logins_in_flight = False
        self._send_logins()

    async def _decide_logins(self, batch: list[tuple[LoginAttempt, Deferred[LoginOutcome]]]) -> None:
        """Each login of ``batch`` gets its outcome, in order; if the store call fails, each is
        decided again alone, so that one bad login fails only its own DTU."""
        try:
            outcomes = await self.records.authenticate_many([attempt for attempt, _ in batch], self.now())
        except Exception:
            failure = Failure()
            if len(batch) == 1:
                batch[0][1].errback(failure)
                return
            log.info("Could not decide {count} logins together ({error}); deciding each alone",
                     count=len(batch), error=failure.getErrorMessage())
            for attempt, decided in batch:
                Deferred.fromCoroutine(self._decide_logins([(attempt, decided)]))
            return
        for (_, decided), outcome in zip(batch, outcomes, strict=True):
            decided.callback(outcome)

    async def _decided(
        self, outcome: Awaitable[LoginOutcome], session: DTUSession, login: wire.Login
    ) -> LoginDecision:
        decision = LoginDecision.of(await outcome)
        if not decision.accepted and decision.reason == UNKNOWN_PSN and self._can_hold(session, login):
            return await self._hold(session, login)
        if not decision.accepted:
            self.stats["logins_refused"] += 1
            blocked_for = self.login_throttle.failed(_throttle_key(session, login))
            self._refusals.add(decision.reason)
            if self._refusals.due:
                refused, seconds, _ = self._refusals.take()
                others = refused.total() - 1
                log.warn(
                    "DTU {psn} refused from {peer}: {reason}{blocked}{others}",
                    psn=login.psn, peer=session.peer, reason=decision.reason,
                    blocked=f"; further logins from there refused for {blocked_for:g}s" if blocked_for else "",
                    others=(
                        f" ({others:,} other logins refused in the last {seconds:.0f}s, not logged one by one: "
                        + ", ".join(f"{reason} {count:,}" for reason, count in sorted(refused.items())) + ")"
                    ) if others else "",
                )
            return decision
        self.login_throttle.succeeded(_throttle_key(session, login))
        if session.closed:
            # Its connection died while the store decided: it cannot take over from the
            # DTU's live session (a stray half-open dial must not cut a working link).
            self.stats["logins_abandoned"] += 1
            log.info(
                "DTU {psn} at {peer} went away before its login was answered", psn=login.psn, peer=session.peer
            )
            if login.psn not in self.sessions:  # the store marked it online; nothing is
                self._mark_offline(login.psn, session.last_seen)
            return decision
        self.stats["logins"] += 1
        if decision.enrolled:
            log.info("DTU {psn} enrolled from {peer}", psn=login.psn, peer=session.peer)
        older = self.sessions.get(login.psn)
        self.sessions[login.psn] = session
        if older is not None and older is not session:
            self.stats["sessions_replaced"] += 1
            log.info(
                "DTU {psn} logged in again from {peer}; dropping its older connection from {old}",
                psn=login.psn, peer=session.peer, old=older.peer,
            )
            older.abort("replaced by a newer login")
        log.info("DTU {psn} logged in from {peer}", psn=login.psn, peer=session.peer)
        if self.events.listening:
            self.events.publish(DtuOnline(login.psn, session.peer, self.now()))
        return decision

    # -- pending DTUs: unknown PSNs held for adoption ---------------------------------------

    def _can_hold(self, session: DTUSession, login: wire.Login) -> bool:
        # A UDP source address can be forged: a pending UDP DTU is recorded elsewhere, never held.
        return self.settings.hold_unknown and self.book is not None and not session.spoofable and not session.closed

    async def _hold(self, session: DTUSession, login: wire.Login) -> LoginDecision:
        """Record the DTU as pending and leave its login unanswered until it is adopted or dropped."""
        assert self.book is not None  # what _can_hold checked
        host = session.peer.rpartition(":")[0]
        device = self.book.sighted(
            DTU, str(login.psn).encode(), host=host, peer=session.peer, listener="dtu", first_bytes=b"",
        )
        older = self._held.pop(login.psn, None)
        if older is not None:
            older[2].callback(REFUSED_DECISION)  # a redial replaces the older connection
        if len(self._held) >= self.settings.max_held_logins:
            self._held = {psn: held for psn, held in self._held.items() if not held[0].closed}
        if device is None or len(self._held) >= self.settings.max_held_logins:
            self.stats["logins_refused"] += 1
            return REFUSED_DECISION
        self.stats["logins_held"] += 1
        decided: Deferred[LoginDecision] = Deferred()
        self._held[login.psn] = (session, login, decided)
        return await decided

    def release_held(self, psn: int) -> None:
        """An adopted DTU's held login is decided again (now it has a record) and answered."""
        held = self._held.pop(psn, None)
        if held is None:
            return
        session, login, decided = held
        outcome = self._login_outcome(session, login, enroll_unknown=False)
        Deferred.fromCoroutine(self._decided(outcome, session, login)).chainDeferred(decided)

    def _forgotten(self, device: PendingDevice) -> None:
        """A pending DTU dropped or expired: its held login is refused."""
        if device.kind == DTU:
            held = self._held.pop(int(device.registration), None)
            if held is not None:
                held[2].callback(REFUSED_DECISION)

    def session_lost(self, session: DTUSession) -> None:
        psn = session.psn
        if psn is None or self.sessions.get(psn) is not session:
            return
        del self.sessions[psn]
        self._seen.pop(psn, None)
        log.info("DTU {psn} offline ({peer})", psn=psn, peer=session.peer)
        self._mark_offline(psn, session.last_seen)
        if self.events.listening:
            self.events.publish(DtuOffline(psn, session.peer, self.now()))

    def let_go(self, psn: int, reason: str) -> None:
        """The cluster says this DTU is not this node's any more (it logged in on another node):
        its connection here goes."""
        session = self.sessions.get(psn)
        if session is None:
            return
        self.stats["sessions_replaced"] += 1
        session.abort(reason)

    def seen(self, psn: int, when: float) -> None:
        self._seen[psn] = when

    def _write_last_seen(self) -> None:
        if not self._seen:
            return
        seen = {psn: utc_from_seconds(when) for psn, when in self._seen.items()}
        self._seen = {}
        self.records.record_last_seen(seen).addErrback(
            lambda f: log.failure("Could not record last-seen times of {count} DTUs", f, count=len(seen))
        )

    # -- uploads -------------------------------------------------------------------

    def upload(self, session: DTUSession, upload: wire.SendTest) -> Deferred[int]:
        """Store a SendTest; fires with the TestCode to acknowledge once it is safe to."""
        psn = session.psn
        assert psn is not None
        registers = session.registers
        if registers and len(upload.values) != len(registers):
            self._upload_mismatched(session, psn, len(upload.values), len(registers))
            return succeed((upload.test_code - 1) & 0xFF)
        if self._mismatched:
            self._upload_matched(psn)
        last = self._last_upload.get(psn)
        if last is not None and last.test_code == upload.test_code and last.values == upload.values:
            self.stats["uploads_repeated"] += 1
            return last.repeated()
        received = self.received_at(session.last_seen_at)
        row = upload_row(psn, received, upload, registers)
        record = self._last_upload[psn] = _LastUpload(self, psn, upload, received)
        return self._add_samples([row]).addCallbacks(record.stored, record.not_stored)

    def forget_upload(self, record: _LastUpload) -> None:
        """An upload was not stored: a resend of it must be stored, not taken for a repeat."""
        if self._last_upload.get(record.psn) is record:
            del self._last_upload[record.psn]

    def _upload_mismatched(self, session: DTUSession, psn: int, count: int, expected: int) -> None:
        """Refused (TestCode - 1 makes the DTU resend); if it keeps on, ask the DTU for its list.

        A register list stored from a SaveSetup the DTU did not keep (or changed on the DTU
        since) would otherwise refuse its uploads for ever. The DTU's own answer is stored by
        the command queue and names the next uploads.
        """
        self.stats["uploads_mismatched"] += 1
        mismatch = self._mismatched.get(psn)
        if mismatch is None:
            mismatch = self._mismatched[psn] = _Mismatch()
        mismatch.in_a_row += 1
        mismatch.total += 1
        now = self.clock.seconds()
        interval = self.settings.mismatch_interval
        if mismatch.logged_at is None or now - mismatch.logged_at >= interval:
            mismatch.logged_at = now
            log.warn(
                "DTU {psn} sent {count} values but its register list has {expected}; asking it to resend"
                " ({total} such uploads so far; logged again in {interval:g}s at the earliest)",
                psn=psn, count=count, expected=expected, total=mismatch.total, interval=interval,
            )
        if mismatch.in_a_row < self.settings.mismatches_before_asking:
            return
        if mismatch.asked_at is not None and now - mismatch.asked_at < interval:
            return
        mismatch.asked_at = now
        mismatch.in_a_row = 0
        self.stats["register_lists_asked"] += 1
        log.info(
            "Asking DTU {psn} for its register list: {count} uploads in a row disagreed with the stored one",
            psn=psn, count=self.settings.mismatches_before_asking,
        )
        session.commands.read_setup().addErrback(self._register_list_not_read, psn)

    @staticmethod
    def _register_list_not_read(failure: Failure, psn: int) -> None:
        # The command queue has logged why (timeout, disconnect, store); it is asked again later.
        log.info("DTU {psn} did not tell its register list: {why}", psn=psn, why=failure.getErrorMessage())

    def _upload_matched(self, psn: int) -> None:
        mismatch = self._mismatched.pop(psn, None)
        if mismatch is not None:
            log.info(
                "DTU {psn}'s uploads match its register list again, after {total} that did not",
                psn=psn, total=mismatch.total,
            )

    def mismatched_psns(self, limit: int = MISMATCHED_PSNS_SHOWN) -> tuple[int, list[int]]:
        """How many DTUs' uploads disagree with their stored register list now, and the lowest ``limit`` PSNs."""
        return len(self._mismatched), heapq.nsmallest(limit, self._mismatched)

    # -- setups ----------------------------------------------------------------------

    def setup_reported(self, psn: int, send_test_time: int, registers: tuple[wire.Register, ...]) -> Deferred[None]:
        """A DTU told its setup (a command's ack): store it; fires once stored.

        Its register list names later uploads, also those of a newer login of the
        same PSN, which read the old list when it logged in.
        """

        def stored(_: None) -> None:
            live = self.sessions.get(psn)
            if live is not None:
                live.registers = registers

        pairs = tuple((r.dev, r.addr) for r in registers)
        return self.records.replace_register_list(psn, send_test_time, pairs).addCallback(stored)
