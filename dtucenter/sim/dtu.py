"""One virtual DTU speaking the DTU protocol: the state machine, with no sockets.

The connector (``dtucenter.sim.links``) gives it a ``Link`` when a
connection is up and tells it when the connection is gone; everything else
(login, heartbeats, uploads and their TestCode rules, answering the
center's commands) happens here on the clock it is given.

TestCode, as the protocol seed describes it: every new upload takes the
next TestCode (255 + 1 = 0). The center echoes it once the values are
stored. An ack of TestCode - 1 means "not accepted, send again", and so
does no ack within ``ack_timeout``: the same frame goes out again. One
upload is outstanding at a time; an upload that falls due meanwhile is
sent as soon as the outstanding one is acknowledged (counted as ``late``),
which is how a saturated center shows up in the numbers.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from dtucenter.dtu import wire
from dtucenter.sim.links import Link
from dtucenter.sim.registers import RegisterTable, default_register_list
from dtucenter.sim.stats import SimStats

#: SendTestMode values (the seed): 0 uploads on any change, 255 on the clock
#: only, 1..254 at once when one of the first x values changes, else on the clock.
MODE_ON_ANY_CHANGE = 0
MODE_PERIODIC = 255


@attrs.frozen
class DTUSettings:
    psn: int
    password: int = 0
    #: Number of values per upload (registers 0..values-1 of slave 1) until a SaveSetup says otherwise.
    values: int = 8
    #: Upload interval in seconds, used unless the center sends a non-zero SendTestTime.
    interval: float = 10.0
    #: SendTestMode to use whatever LoginAck says (None: obey LoginAck).
    mode: int | None = None
    #: Seconds between value changes in the on-change modes; in mode 255 values move at each upload.
    drift_interval: float = 1.0
    #: Chance that a given register moves at a drift step.
    drift_probability: float = 0.3
    ack_timeout: float = 10.0
    #: As long as the center gives a connection to log in: a shorter wait turns a busy center's
    #: queue of logins into a storm of reconnects that never completes.
    login_timeout: float = 30.0
    #: Resends of one upload answered with TestCode - 1 before it is given up.
    max_resends: int = 3
    #: Uploads in a row with no ack at all before the link is taken for dead and dialled again.
    silent_acks_limit: int = 3
    pname: str = "SIMDTU"
    version: int = 1
    dialect: wire.Dialect = wire.DEFAULT_DIALECT


@attrs.define
class _Upload:
    test_code: int
    frame: bytes
    sent_at: float = 0.0
    nacks: int = 0


class VirtualDTU:
    OFFLINE = "offline"
    LOGGING_IN = "logging-in"
    ONLINE = "online"
    REFUSED = "refused"

    def __init__(
        self,
        settings: DTUSettings,
        clock: IReactorTime,
        stats: SimStats,
        rng: random.Random | None = None,
        on_redirect: Callable[[str, int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.stats = stats
        self.rng = rng or random.Random(settings.psn)
        self.on_redirect = on_redirect
        self.table = RegisterTable(self.rng)
        self.registers = default_register_list(settings.values)
        self.state = self.OFFLINE
        self.link: Link | None = None
        self.test_code = self.rng.randrange(256)
        self.tick_time = 60
        self.send_test_mode = MODE_PERIODIC
        #: SendTestTime the center set (LoginAck or SaveSetup); 0 means the DTU's own interval.
        self.send_test_time = 0
        #: Where the center told us to go (NewIP/NewPort), if it did.
        self.server: tuple[str, int] | None = None
        self._parser = wire.FrameParser(settings.dialect)
        self._outstanding: _Upload | None = None
        self._upload_due = False
        self._silent_acks = 0
        self._last_upload_at: float | None = None
        #: What the last upload carried: the on-change modes compare against it.
        self._last_values: tuple[int, ...] = ()
        self._timers: dict[str, IDelayedCall] = {}

    # -- what the connector tells us ---------------------------------------------------

    def connection_made(self, link: Link) -> None:
        self.link = link
        self.stats.connected += 1
        self._parser = wire.FrameParser(self.settings.dialect)
        self.state = self.LOGGING_IN
        self._send(wire.Login(
            psn=self.settings.psn,
            password=self.settings.password,
            pname=self.settings.pname,
            cur_ver=self.settings.version,
            ccid=f"{self.settings.psn:020d}"[-20:],
        ))
        self._arm("login", self.settings.login_timeout, self._login_timed_out)

    def connection_lost(self) -> None:
        if self.link is None:
            return
        self.link = None
        self.stats.connected -= 1
        if self.state == self.ONLINE:
            self.stats.logged_in -= 1
        self.state = self.OFFLINE
        self._cancel_all()

    def data_received(self, data: bytes) -> None:
        for event in self._parser.feed(data):
            if isinstance(event, wire.Skipped):
                self.stats.count("bytes_skipped", event.count)
            elif isinstance(event, wire.PROBLEM_TYPES):
                self.stats.error("bad_frame")
            elif self.link is not None:
                self._handle(event)

    def stop(self) -> None:
        """Shutting down: no timer may outlive the run."""
        self._cancel_all()

    @property
    def interval(self) -> float:
        return float(self.send_test_time) if self.send_test_time else self.settings.interval

    # -- incoming frames ----------------------------------------------------------------------

    def _handle(self, message: wire.AnyMessage) -> None:
        self._silent_acks = 0
        if isinstance(message, wire.LoginAck):
            self._login_answered(message)
        elif self.state != self.ONLINE:
            self.stats.error("frame_before_login_ack")
        elif isinstance(message, wire.SendTestAck):
            self._upload_answered(message.test_code)
        elif isinstance(message, wire.SendTickAck):
            self.stats.count("tick_acks")
        elif isinstance(message, wire.SaveSetup):
            self._save_setup(message)
        elif isinstance(message, wire.ReadSetup):
            self._command_answer(wire.ReadSetupAck(self._reported_send_test_time(), self.registers))
        elif isinstance(message, wire.ReadTest):
            self._read_test(message)
        elif isinstance(message, wire.SetControl):
            self._set_control(message)
        else:
            self.stats.error("unexpected_frame")

    def _login_answered(self, ack: wire.LoginAck) -> None:
        if self.state != self.LOGGING_IN:
            self.stats.error("unexpected_login_ack")
            return
        self._cancel("login")
        if not ack.accepted:
            self.state = self.REFUSED
            self.stats.error("login_refused")
            self._drop()
            return
        target = self._redirect_target(ack)
        if target is not None:
            self.server = target
            self.stats.count("redirects")
            self._drop()
            if self.on_redirect is not None:
                self.on_redirect(*target)
            return
        self.state = self.ONLINE
        self.stats.logged_in += 1
        self.stats.count("logins")
        self.tick_time = max(ack.tick_time, 1)
        self.send_test_mode = ack.send_test_mode if self.settings.mode is None else self.settings.mode
        self.send_test_time = ack.send_test_time
        self._arm("tick", self.tick_time, self._tick)
        if self._outstanding is not None:
            # Unacknowledged before the link dropped: the center may not have it.
            self._transmit(self._outstanding, resend=True)
        self._schedule_uploads(first=True)

    def _redirect_target(self, ack: wire.LoginAck) -> tuple[str, int] | None:
        if ack.new_port == 0 and ack.new_ip == "0.0.0.0":
            return None
        host, port = self.server or (None, None)
        new_host = host if ack.new_ip == "0.0.0.0" else ack.new_ip
        new_port = port if ack.new_port == 0 else ack.new_port
        if new_host is None or new_port is None:
            # We do not know where we are (tests without a connector); take what is given.
            new_host = new_host or ack.new_ip
            new_port = new_port or ack.new_port
        if (new_host, new_port) == self.server:
            return None
        return new_host, new_port

    def _upload_answered(self, test_code: int) -> None:
        upload = self._outstanding
        if upload is None:
            self.stats.count("stray_acks")
            return
        if test_code == upload.test_code:
            # The ack deadline stays armed and is moved by the next upload: cheaper than
            # cancelling and scheduling a timer per frame; it does nothing if it fires idle.
            self.stats.record_latency("acked", self.clock.seconds() - upload.sent_at)
            self._outstanding = None
            if self._upload_due:
                self._upload_due = False
                self.stats.count("late")
                self._new_upload()
        elif test_code == (upload.test_code - 1) & 0xFF:
            self.stats.count("nacked")
            upload.nacks += 1
            if upload.nacks > self.settings.max_resends:
                self._cancel("ack")
                self._outstanding = None
                self.stats.error("upload_refused")
                return
            self._transmit(upload, resend=True)
        else:
            self.stats.count("stray_acks")

    # -- commands from the center ----------------------------------------------------------------

    def _save_setup(self, command: wire.SaveSetup) -> None:
        if len(command.registers) > wire.max_items(2, fixed=2, dialect=self.settings.dialect):
            self._command_answer(wire.SaveSetupAck(0))
            return
        self.registers = command.registers
        if command.send_test_time:
            self.send_test_time = command.send_test_time
        self._command_answer(wire.SaveSetupAck(1, self._reported_send_test_time(), self.registers))
        self._schedule_uploads(first=False)

    def _read_test(self, command: wire.ReadTest) -> None:
        if len(command.registers) > wire.max_items(2, fixed=1, dialect=self.settings.dialect):
            self._command_answer(wire.ReadTestAck(0))
            return
        self._command_answer(wire.ReadTestAck(1, self.table.read(command.registers)))

    def _set_control(self, command: wire.SetControl) -> None:
        for item in command.registers:
            self.table.set(item.dev, item.addr, item.value)
        self._command_answer(wire.SetControlAck(1, command.registers))

    def _command_answer(self, ack: wire.Message) -> None:
        self.stats.count("commands")
        self._send(ack)

    def _reported_send_test_time(self) -> int:
        if self.send_test_time:
            return self.send_test_time
        return min(255, max(0, round(self.settings.interval)))

    # -- uploads --------------------------------------------------------------------------------------

    def _schedule_uploads(self, first: bool) -> None:
        interval = self.interval
        if self.send_test_mode != MODE_ON_ANY_CHANGE:
            # Spread the first upload over one interval so a thousand DTUs do not send in step.
            delay = self.rng.uniform(0, interval) if first else interval
            self._arm("periodic", delay, self._periodic_upload)
        else:
            self._cancel("periodic")
        if self.send_test_mode != MODE_PERIODIC:
            self._arm("drift", self.settings.drift_interval, self._drift)
        else:
            self._cancel("drift")

    def _periodic_upload(self) -> None:
        self._timers.pop("periodic", None)
        if self.send_test_mode == MODE_PERIODIC:
            self.table.nudge(self.registers, self.settings.drift_probability)
        self._upload_now()
        self._arm("periodic", self.interval, self._periodic_upload)

    def _drift(self) -> None:
        """On-change modes: values move, and a change since the last upload may send one now."""
        self._timers.pop("drift", None)
        self.table.drift(self.registers, self.settings.drift_probability)
        self._arm("drift", self.settings.drift_interval, self._drift)
        current = self.table.read(self.registers)
        mode = self.send_test_mode
        watched = len(current) if mode == MODE_ON_ANY_CHANGE else mode
        if current[:watched] == self._last_values[:watched]:
            return
        if mode == MODE_ON_ANY_CHANGE:
            self._upload_on_change()
        else:
            self._upload_now()
            # The clock restarts from this upload: the next periodic one is an interval away.
            self._arm("periodic", self.interval, self._periodic_upload)

    def _upload_on_change(self) -> None:
        """Mode 0: at once, but never faster than one upload per interval."""
        now = self.clock.seconds()
        if self._last_upload_at is None or now - self._last_upload_at >= self.interval:
            self._upload_now()
        elif "change" not in self._timers:
            self._arm("change", self._last_upload_at + self.interval - now, self._rate_limited_upload)

    def _rate_limited_upload(self) -> None:
        self._timers.pop("change", None)
        self._upload_now()

    def _upload_now(self) -> None:
        if self._outstanding is not None:
            self._upload_due = True
            return
        self._new_upload()

    def _new_upload(self) -> None:
        self.test_code = (self.test_code + 1) & 0xFF
        self._last_values = self.table.read(self.registers)
        message = wire.SendTest(self._net_state(), self.test_code, self._last_values)
        upload = _Upload(self.test_code, wire.encode_frame(message, self.settings.dialect))
        self._outstanding = upload
        self.stats.count("uploads")
        self._transmit(upload, resend=False)

    def _transmit(self, upload: _Upload, resend: bool) -> None:
        if resend:
            self.stats.count("resent")
        upload.sent_at = self.clock.seconds()
        self._last_upload_at = upload.sent_at
        self._write(upload.frame)
        self._arm("ack", self.settings.ack_timeout, self._ack_timed_out)

    def _ack_timed_out(self) -> None:
        self._timers.pop("ack", None)
        if self._outstanding is None:
            return
        self.stats.count("ack_timeouts")
        self._silent_acks += 1
        if self._silent_acks >= self.settings.silent_acks_limit:
            self.stats.error("link_silent")
            self._drop()
            return
        self._transmit(self._outstanding, resend=True)

    def _net_state(self) -> int:
        # CSQ 0..31 as a modem reports it; a decent signal that wobbles.
        return 20 + self.test_code % 8

    # -- heartbeat and login deadline --------------------------------------------------------------

    def _tick(self) -> None:
        self._timers.pop("tick", None)
        self.stats.count("ticks")
        self._send(wire.SendTick())

    def _login_timed_out(self) -> None:
        self._timers.pop("login", None)
        self.stats.error("login_timeout")
        self._drop()

    # -- plumbing -------------------------------------------------------------------------------------

    def _send(self, message: wire.Message) -> None:
        self._write(wire.encode_frame(message, self.settings.dialect))

    def _write(self, frame: bytes) -> None:
        if self.link is None:
            return
        self.link.write(frame)
        if self.state == self.ONLINE:
            # Any uplink frame keeps the connection alive; a heartbeat is due TickTime after the last.
            self._arm("tick", self.tick_time, self._tick)

    def _drop(self) -> None:
        link = self.link
        if link is not None:
            self.connection_lost()
            link.drop()

    def _arm(self, name: str, seconds: float, action: Callable[[], None]) -> None:
        timer = self._timers.get(name)
        if timer is not None and timer.active():
            timer.reset(seconds)
            return
        self._timers[name] = self.clock.callLater(seconds, action)

    def _cancel(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _cancel_all(self) -> None:
        for name in list(self._timers):
            self._cancel(name)
