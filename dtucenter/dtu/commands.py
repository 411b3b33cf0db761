"""Commands the center sends to a connected DTU, and the queue that matches their acks.

The protocol carries no request ids: an ack is known only by its type. So
each DTU has one command on the wire at a time, the rest wait in order, and
the ack of the type the current command expects is its answer. An ack
nobody waits for is logged and dropped.

A command that gets no ack within the timeout fails, and the next one goes
out. Should that late ack still arrive while a command of the same type is
on the wire, it cannot be told apart from the right one; the acks of
SaveSetup and SetControl echo what was sent, so their results say whether
they match (``confirmed``), and a ReadTest answered with the wrong number of
values fails.
"""

from __future__ import annotations

import datetime as dt
from collections import deque
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dtucenter.dtu import wire
from dtucenter.dtu.ports import CommandOwner
from dtucenter.isotime import utc_now

log = Logger()

#: Commands one DTU may have waiting behind the one on the wire.
QUEUE_LIMIT = 16

ACK_TYPES = (wire.SaveSetupAck, wire.ReadSetupAck, wire.ReadTestAck, wire.SetControlAck)


# -- outcomes ------------------------------------------------------------------------------


class CommandError(Exception):
    """A command that did not succeed; ``outcome`` is the word the audit trail records."""

    outcome: ClassVar[str] = "error"


class InvalidCommand(CommandError, ValueError):
    outcome = "invalid"


class DTUOffline(CommandError):
    outcome = "offline"


class QueueFull(CommandError):
    outcome = "busy"


class CommandTimeout(CommandError):
    outcome = "timeout"


class CommandRefused(CommandError):
    """The DTU answered Result = 0 (or anything but 1)."""

    outcome = "refused"


class CommandDisconnected(CommandError):
    outcome = "disconnected"


class BadAnswer(CommandError):
    """The DTU answered, but with something that cannot be the answer."""


class NotStored(CommandError):
    """The DTU took a setup, but the center could not store it."""


# -- what goes out and what comes back -----------------------------------------------------


def _registers_json(registers: Sequence[wire.Register]) -> list[dict[str, int]]:
    return [{"dev": r.dev, "addr": r.addr} for r in registers]


def _register_values_json(items: Sequence[wire.RegisterValue]) -> list[dict[str, int]]:
    return [{"dev": r.dev, "addr": r.addr, "value": r.value} for r in items]


@attrs.frozen
class Setup:
    """A DTU's upload interval and register list, as it reported them."""

    send_test_time: int
    registers: tuple[wire.Register, ...]
    #: For SaveSetup: whether the ack echoes what was sent; None when nothing was sent to compare.
    confirmed: bool | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "send_test_time": self.send_test_time,
            "registers": _registers_json(self.registers),
        }
        if self.confirmed is not None:
            body["confirmed"] = self.confirmed
        return body


@attrs.frozen
class Readings:
    values: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"values": list(self.values)}


@attrs.frozen
class Written:
    registers: tuple[wire.RegisterValue, ...]
    confirmed: bool

    def to_json(self) -> dict[str, Any]:
        return {"registers": _register_values_json(self.registers), "confirmed": self.confirmed}


def _check_count(count: int, per_item: int, fixed: int, dialect: wire.Dialect, allow_empty: bool) -> None:
    limit = wire.max_items(per_item, fixed, dialect)
    if count > limit:
        raise InvalidCommand(f"{count} registers do not fit one frame; at most {limit}")
    if not count and not allow_empty:
        raise InvalidCommand("registers must not be empty")


def _check_range(value: int, low: int, high: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidCommand(f"{name} must be a whole number {low}..{high}, got {value!r}")


def _check_registers(registers: Sequence[wire.Register | wire.RegisterValue]) -> None:
    for i, r in enumerate(registers):
        _check_range(r.dev, 0, 0xFF, f"registers[{i}].dev")
        _check_range(r.addr, 0, 0xFFFF, f"registers[{i}].addr")
        if isinstance(r, wire.RegisterValue):
            _check_range(r.value, -0x8000, 0x7FFF, f"registers[{i}].value")


def _refused(ack: wire.SaveSetupAck | wire.ReadTestAck | wire.SetControlAck, what: str) -> CommandRefused:
    return CommandRefused(f"the DTU answered {what} with Result {ack.result}: it did not carry it out")


class Command(Protocol):
    KIND: ClassVar[str]
    ACK: ClassVar[type]

    def check(self, dialect: wire.Dialect) -> None:
        """Raise InvalidCommand unless this can go out as one frame of ``dialect``."""

    def message(self) -> wire.AnyMessage: ...

    def result_of(self, ack: Any) -> Any:
        """The result for the ack of this command, or raise CommandError."""

    def to_json(self) -> dict[str, Any]: ...


@attrs.frozen
class SaveSetupCommand:
    KIND: ClassVar[str] = "save_setup"
    ACK: ClassVar[type] = wire.SaveSetupAck

    send_test_time: int
    registers: tuple[wire.Register, ...]

    def check(self, dialect: wire.Dialect) -> None:
        _check_range(self.send_test_time, 0, 0xFF, "send_test_time")
        _check_count(len(self.registers), 3, 1, dialect, allow_empty=True)
        _check_registers(self.registers)

    def message(self) -> wire.SaveSetup:
        return wire.SaveSetup(self.send_test_time, self.registers)

    def result_of(self, ack: wire.SaveSetupAck) -> Setup:
        if not ack.ok:
            raise _refused(ack, "SaveSetup")
        confirmed = (ack.send_test_time, ack.registers) == (self.send_test_time, self.registers)
        return Setup(ack.send_test_time, ack.registers, confirmed)

    def to_json(self) -> dict[str, Any]:
        return {"send_test_time": self.send_test_time, "registers": _registers_json(self.registers)}


@attrs.frozen
class ReadSetupCommand:
    KIND: ClassVar[str] = "read_setup"
    ACK: ClassVar[type] = wire.ReadSetupAck

    def check(self, dialect: wire.Dialect) -> None:
        pass

    def message(self) -> wire.ReadSetup:
        return wire.ReadSetup()

    def result_of(self, ack: wire.ReadSetupAck) -> Setup:
        return Setup(ack.send_test_time, ack.registers)

    def to_json(self) -> dict[str, Any]:
        return {}


@attrs.frozen
class ReadTestCommand:
    KIND: ClassVar[str] = "read_test"
    ACK: ClassVar[type] = wire.ReadTestAck

    registers: tuple[wire.Register, ...]

    def check(self, dialect: wire.Dialect) -> None:
        _check_count(len(self.registers), 3, 0, dialect, allow_empty=False)
        _check_registers(self.registers)

    def message(self) -> wire.ReadTest:
        return wire.ReadTest(self.registers)

    def result_of(self, ack: wire.ReadTestAck) -> Readings:
        if not ack.ok:
            raise _refused(ack, "ReadTest")
        if len(ack.values) != len(self.registers):
            raise BadAnswer(
                f"the DTU answered {len(ack.values)} values for {len(self.registers)} registers"
            )
        return Readings(ack.values)

    def to_json(self) -> dict[str, Any]:
        return {"registers": _registers_json(self.registers)}


@attrs.frozen
class SetControlCommand:
    KIND: ClassVar[str] = "set_control"
    ACK: ClassVar[type] = wire.SetControlAck

    registers: tuple[wire.RegisterValue, ...]

    def check(self, dialect: wire.Dialect) -> None:
        _check_count(len(self.registers), 5, 0, dialect, allow_empty=False)
        _check_registers(self.registers)

    def message(self) -> wire.SetControl:
        return wire.SetControl(self.registers)

    def result_of(self, ack: wire.SetControlAck) -> Written:
        if not ack.ok:
            raise _refused(ack, "SetControl")
        return Written(ack.registers, ack.registers == self.registers)

    def to_json(self) -> dict[str, Any]:
        return {"registers": _register_values_json(self.registers)}


# -- the queue -------------------------------------------------------------------------------


@attrs.define(eq=False)
class Ticket:
    """One submitted command: its result Deferred and when it went out and ended."""

    command: Command
    queued: dt.datetime
    result: Deferred[Any]
    sent: dt.datetime | None = None
    finished: dt.datetime | None = None


class CommandQueue:
    """The commands of one DTU session: one on the wire, the rest waiting in order."""

    def __init__(self, session: CommandOwner) -> None:
        #: Dropped at close: the session holds this queue, and a cycle between them would keep
        #: both (and the connection behind them) alive until a full collection, which the
        #: center's GC tuning makes rare (tap.tune_garbage_collector).
        self._owner: CommandOwner | None = session
        self._clock = session.clock
        self._dialect = session.dialect
        self._waiting: deque[Ticket] = deque()
        self._current: Ticket | None = None
        self._timer: IDelayedCall | None = None
        self._closed = False

    @property
    def _session(self) -> CommandOwner:
        """The session; only while open (a closed queue sends nothing and hears nothing)."""
        if self._owner is None:
            raise RuntimeError("the command queue is closed")
        return self._owner

    @property
    def _timeout(self) -> float:
        return self._session.command_timeout

    @property
    def pending(self) -> int:
        """Commands on the wire or waiting."""
        return len(self._waiting) + (self._current is not None)

    # -- submitting -------------------------------------------------------------------------

    def save_setup(self, send_test_time: int, registers: Sequence[wire.Register]) -> Deferred[Setup]:
        return self.submit(SaveSetupCommand(send_test_time, tuple(registers))).result

    def read_setup(self) -> Deferred[Setup]:
        return self.submit(ReadSetupCommand()).result

    def read_test(self, registers: Sequence[wire.Register]) -> Deferred[Readings]:
        return self.submit(ReadTestCommand(tuple(registers))).result

    def set_control(self, registers: Sequence[wire.RegisterValue]) -> Deferred[Written]:
        return self.submit(SetControlCommand(tuple(registers))).result

    def submit(self, command: Command) -> Ticket:
        """Queue ``command``; its Deferred fails with a CommandError when it does not succeed."""
        ticket = Ticket(command, self._now(), Deferred(self._cancel))
        try:
            command.check(self._dialect)
        except InvalidCommand as e:
            self._end(ticket, e)
            return ticket
        if self._closed:
            self._end(ticket, CommandDisconnected("the DTU is disconnected"))
        elif len(self._waiting) >= QUEUE_LIMIT:
            self._end(ticket, QueueFull(f"{self.pending} commands are already pending for this DTU"))
        else:
            self._waiting.append(ticket)
            self._send_next()
        return ticket

    def _cancel(self, result: Deferred[Any]) -> None:
        # Only a command that has not gone out can be taken back; one on the wire
        # keeps its place so that its ack is not taken for the next command's.
        for ticket in self._waiting:
            if ticket.result is result:
                self._waiting.remove(ticket)
                return

    # -- the wire ------------------------------------------------------------------------------

    def _send_next(self) -> None:
        while self._current is None and self._waiting and not self._closed:
            ticket = self._waiting.popleft()
            message = ticket.command.message()
            try:
                frame = wire.encode_frame(message, self._dialect)
            except wire.WireError as e:  # check() should have caught it; never send half a command
                self._end(ticket, InvalidCommand(str(e)))
                continue
            self._current = ticket
            ticket.sent = self._now()
            self._session.stats["commands_sent"] += 1
            log.info(
                "Sending {type} to DTU {psn} at {peer}",
                type=type(message).__name__, psn=self._session.psn, peer=self._session.peer,
            )
            self._session.send_frame(frame)
            self._timer = self._clock.callLater(self._timeout, self._timed_out)

    def received(self, message: wire.AnyMessage) -> bool:
        """Called by the session for every frame; True when it was an ack (taken or dropped)."""
        if not isinstance(message, ACK_TYPES):
            return False
        ticket = self._current
        if ticket is None or not isinstance(message, ticket.command.ACK):
            self._session.stats["acks_stray"] += 1
            log.warn(
                "DTU {psn} at {peer} sent {type} but no command waits for it; ignored",
                psn=self._session.psn, peer=self._session.peer, type=type(message).__name__,
            )
            return True
        self._cancel_timer()
        self._current = None
        try:
            result = ticket.command.result_of(message)
        except CommandError as e:
            self._end(ticket, e)
        else:
            if isinstance(result, Setup):
                self._store_setup(ticket, result)
            else:
                self._end(ticket, result)
        self._send_next()
        return True

    def _timed_out(self) -> None:
        self._timer = None
        if self._session.reading_paused:
            # The session stopped reading while the store is busy; the ack may be waiting in line.
            self._timer = self._clock.callLater(self._timeout, self._timed_out)
            return
        ticket, self._current = self._current, None
        assert ticket is not None
        self._session.stats["commands_timed_out"] += 1
        log.warn(
            "DTU {psn} at {peer} did not answer {kind} within {timeout}s",
            psn=self._session.psn, peer=self._session.peer, kind=ticket.command.KIND, timeout=self._timeout,
        )
        self._end(ticket, CommandTimeout(f"no {ticket.command.ACK.__name__} within {self._timeout:g}s"))
        self._send_next()

    def close(self) -> None:
        """The session is gone: fail every pending command at once."""
        if self._closed:
            return
        self._closed = True
        self._owner = None
        self._cancel_timer()
        pending = ([self._current] if self._current is not None else []) + list(self._waiting)
        self._current = None
        self._waiting.clear()
        for ticket in pending:
            self._end(ticket, CommandDisconnected("the DTU disconnected before answering"))

    # -- results -------------------------------------------------------------------------------

    def _store_setup(self, ticket: Ticket, setup: Setup) -> None:
        """The DTU's own word on its setup replaces the stored one and names later uploads."""
        psn = self._session.psn

        def stored(_: None) -> None:
            self._end(ticket, setup)

        def not_stored(failure: Failure) -> None:
            log.failure("Could not store the setup DTU {psn} reported", failure, psn=psn)
            self._end(ticket, NotStored(f"the DTU reported its setup but storing it failed: {failure.value}"))

        self._session.setup_reported(setup.send_test_time, setup.registers).addCallbacks(stored, not_stored)

    def _end(self, ticket: Ticket, outcome: Any) -> None:
        ticket.finished = self._now()
        if ticket.result.called:  # cancelled by its caller
            return
        if isinstance(outcome, Exception):
            ticket.result.errback(Failure(outcome))
        else:
            ticket.result.callback(outcome)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _now(self) -> dt.datetime:
        return utc_now(self._clock)
