"""The command queue of a DTU session, with StringTransport and task.Clock (no reactor, no sleeps)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from sqlalchemy.orm import Session
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from dtucenter.dtu import wire
from dtucenter.dtu.center import CenterSettings, DTUCenter
from dtucenter.dtu.commands import (
    QUEUE_LIMIT,
    BadAnswer,
    CommandDisconnected,
    CommandRefused,
    CommandTimeout,
    InvalidCommand,
    NotStored,
    QueueFull,
    Readings,
    Setup,
    Written,
)
from dtucenter.dtu.session import DTUProtocol
from dtucenter.store import queries
from dtucenter.store.db import open_engine
from dtucenter.store.dtus import DtuStore
from tests.stores import HeldStore

PSN = 4711
CREATED = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
TIMEOUT = 5.0
R1, R2 = wire.Register(1, 0), wire.Register(2, 0x1234)


@attrs.define
class Rig:
    clock: Clock
    store: HeldStore
    center: DTUCenter
    protocol: DTUProtocol
    transport: StringTransport

    @property
    def queue(self) -> Any:
        return self.protocol.session.commands

    def dtu_sends(self, *messages: Any) -> None:
        for byte in b"".join(wire.encode_frame(m) for m in messages):
            self.protocol.dataReceived(bytes([byte]))

    def center_sent(self) -> list[Any]:
        events = wire.FrameParser().feed(self.transport.value())
        self.transport.clear()
        return events

    def outcome(self, d: Deferred[Any]) -> Any:
        """What ``d`` fired with (a Failure for an error); fails the test if it has not fired."""
        results: list[Any] = []
        d.addBoth(results.append)
        assert results, "the command has not finished"
        return results[0]

    def stored(self) -> tuple[int, tuple[wire.Register, ...]]:
        with Session(self.store.engine) as session:
            info = queries.get_dtu(session, PSN)
            assert info is not None
            return info.send_test_time, tuple(wire.Register(*pair) for pair in queries.register_list(session, PSN))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    engine = open_engine(f"sqlite:///{tmp_path / 'unit.db'}")
    with Session(engine) as session, session.begin():
        queries.upsert_dtu(session, PSN, {"tick_time": 60}, CREATED)
    clock = Clock()
    store = HeldStore(engine)
    center = DTUCenter(DtuStore(store), clock, CenterSettings(command_timeout=TIMEOUT))  # type: ignore[arg-type]
    protocol = DTUProtocol(center, clock)
    transport = StringTransport()
    protocol.makeConnection(transport)
    rig = Rig(clock, store, center, protocol, transport)
    rig.dtu_sends(wire.Login(PSN, 99))
    [ack] = rig.center_sent()
    assert isinstance(ack, wire.LoginAck) and ack.accepted
    yield rig
    protocol.connectionLost(Failure(ConnectionError("test over")))
    assert clock.getDelayedCalls() == [], "a timer was left behind"
    engine.dispose()


def timers(rig: Rig) -> int:
    """Delayed calls besides the session's own idle timer."""
    return len(rig.clock.getDelayedCalls()) - 1


def test_one_command_on_the_wire_the_rest_in_order(rig: Rig) -> None:
    first = rig.queue.read_test([R1, R2])
    second = rig.queue.set_control([wire.RegisterValue(1, 7, -5)])
    third = rig.queue.read_setup()
    assert rig.center_sent() == [wire.ReadTest((R1, R2))]
    assert rig.queue.pending == 3 and timers(rig) == 1

    rig.dtu_sends(wire.ReadTestAck(1, (10, -20)))
    assert rig.outcome(first) == Readings((10, -20))
    assert rig.center_sent() == [wire.SetControl((wire.RegisterValue(1, 7, -5),))]
    assert not second.called and not third.called

    rig.dtu_sends(wire.SetControlAck(1, (wire.RegisterValue(1, 7, -5),)))
    assert rig.outcome(second) == Written((wire.RegisterValue(1, 7, -5),), confirmed=True)
    assert rig.center_sent() == [wire.ReadSetup()]

    rig.dtu_sends(wire.ReadSetupAck(5, (R2,)))
    assert rig.outcome(third) == Setup(5, (R2,))
    assert rig.queue.pending == 0 and timers(rig) == 0


def test_no_ack_in_time_fails_and_the_next_goes_out(rig: Rig) -> None:
    first = rig.queue.read_test([R1])
    second = rig.queue.read_test([R2])
    rig.center_sent()
    rig.clock.advance(TIMEOUT - 0.1)
    assert not first.called
    rig.dtu_sends(wire.SendTick())  # the DTU talking about something else does not help
    rig.clock.advance(0.1)
    failure = rig.outcome(first)
    assert failure.check(CommandTimeout) and "no ReadTestAck within 5s" in str(failure.value)
    assert rig.center_sent() == [wire.SendTickAck(), wire.ReadTest((R2,))]
    rig.dtu_sends(wire.ReadTestAck(1, (3,)))
    assert rig.outcome(second) == Readings((3,))
    assert timers(rig) == 0
    assert rig.center.stats["commands_timed_out"] == 1


def test_disconnect_fails_everything_pending_at_once(rig: Rig) -> None:
    pending = [rig.queue.read_test([R1]), rig.queue.read_setup(), rig.queue.save_setup(1, [R1])]
    rig.protocol.connectionLost(Failure(ConnectionError("cable cut")))
    for d in pending:
        assert rig.outcome(d).check(CommandDisconnected)
    assert rig.clock.getDelayedCalls() == []
    later = rig.queue.read_setup()
    assert rig.outcome(later).check(CommandDisconnected)
    assert rig.center_sent() == [wire.ReadTest((R1,))]  # only the first ever went out


def test_result_zero_fails_with_a_clear_reason(rig: Rig) -> None:
    read = rig.queue.read_test([R1])
    rig.dtu_sends(wire.ReadTestAck(0))
    failure = rig.outcome(read)
    assert failure.check(CommandRefused)
    assert "ReadTest with Result 0" in str(failure.value)
    write = rig.queue.set_control([wire.RegisterValue(1, 1, 1)])
    rig.dtu_sends(wire.SetControlAck(0))
    assert rig.outcome(write).check(CommandRefused)
    save = rig.queue.save_setup(3, [R1])
    rig.dtu_sends(wire.SaveSetupAck(0))
    assert rig.outcome(save).check(CommandRefused)
    assert rig.stored() == (0, ())  # a refused setup changes nothing
    assert timers(rig) == 0


def test_stray_and_wrong_type_acks_are_ignored(rig: Rig) -> None:
    rig.dtu_sends(wire.SetControlAck(1, ()))
    assert rig.center.stats["acks_stray"] == 1
    read = rig.queue.read_test([R1])
    rig.center_sent()
    rig.dtu_sends(wire.SaveSetupAck(1, 3, (R1,)))  # not what ReadTest waits for
    assert not read.called and rig.center.stats["acks_stray"] == 2
    assert rig.stored() == (0, ())  # a stray setup ack is not taken as the DTU's setup
    rig.dtu_sends(wire.ReadTestAck(1, (42,)), wire.SendTick())
    assert rig.outcome(read) == Readings((42,))
    assert rig.center_sent() == [wire.SendTickAck()]  # the session is fine
    assert rig.protocol.session.state == "online"


def test_save_setup_ack_replaces_the_register_list(rig: Rig) -> None:
    save = rig.queue.save_setup(10, [R1, R2])
    assert rig.center_sent() == [wire.SaveSetup(10, (R1, R2))]
    rig.dtu_sends(wire.SaveSetupAck(1, 10, (R1, R2)))
    assert rig.outcome(save) == Setup(10, (R1, R2), confirmed=True)
    assert rig.stored() == (10, (R1, R2))
    assert rig.protocol.session.registers == (R1, R2)
    # Uploads are now named and counted by the new list.
    rig.dtu_sends(wire.SendTest(20, 1, (5,)))
    assert rig.center_sent() == [wire.SendTestAck(0)]  # wrong count: TestCode - 1, resend
    rig.dtu_sends(wire.SendTest(20, 2, (5, 6)))
    assert rig.center_sent() == [wire.SendTestAck(2)]
    with Session(rig.store.engine) as session:
        assert [(s.dev, s.addr, s.value) for s in queries.query_samples(session, PSN)] == [
            (1, 0, 5), (2, 0x1234, 6),
        ]


def test_setup_is_what_the_dtu_reported_not_what_was_asked(rig: Rig) -> None:
    save = rig.queue.save_setup(10, [R1, R2])
    rig.dtu_sends(wire.SaveSetupAck(1, 9, (R2,)))
    assert rig.outcome(save) == Setup(9, (R2,), confirmed=False)
    assert rig.stored() == (9, (R2,))
    read = rig.queue.read_setup()
    rig.dtu_sends(wire.ReadSetupAck(7, (R1,)))
    assert rig.outcome(read) == Setup(7, (R1,))
    assert rig.stored() == (7, (R1,))
    assert rig.protocol.session.registers == (R1,)


@pytest.mark.expected_errors("Could not store the setup DTU 4711 reported", error=RuntimeError)
def test_a_setup_waits_for_the_store_and_reports_a_failure(rig: Rig) -> None:
    rig.store.hold = True
    save = rig.queue.save_setup(4, [R1])
    rig.dtu_sends(wire.SaveSetupAck(1, 4, (R1,)))
    assert not save.called  # acknowledged by the DTU, not yet stored
    assert rig.protocol.session.registers == (R1,)  # but uploads already use it
    rig.store.release()
    assert rig.outcome(save) == Setup(4, (R1,), confirmed=True)

    rig.store.broken = True
    again = rig.queue.read_setup()
    rig.dtu_sends(wire.ReadSetupAck(4, (R2,)))
    failure = rig.outcome(again)
    assert failure.check(NotStored) and "disk on fire" in str(failure.value)
    rig.store.broken = False


def test_a_read_answered_with_the_wrong_number_of_values_fails(rig: Rig) -> None:
    read = rig.queue.read_test([R1, R2])
    rig.dtu_sends(wire.ReadTestAck(1, (1,)))
    failure = rig.outcome(read)
    assert failure.check(BadAnswer) and "1 values for 2 registers" in str(failure.value)


@pytest.mark.parametrize(
    ("submit", "message"),
    [
        (lambda q: q.read_test([wire.Register(256, 0)]), "registers[0].dev must be a whole number 0..255"),
        (lambda q: q.read_test([R1, wire.Register(1, 65536)]), "registers[1].addr must be a whole number 0..65535"),
        (lambda q: q.read_test([wire.Register(1, -1)]), "registers[0].addr"),
        (lambda q: q.set_control([wire.RegisterValue(1, 1, 32768)]), "value must be a whole number -32768..32767"),
        (lambda q: q.set_control([wire.RegisterValue(1, 1, -32769)]), "value"),
        (lambda q: q.save_setup(256, [R1]), "send_test_time must be a whole number 0..255"),
        (lambda q: q.read_test([]), "registers must not be empty"),
        (lambda q: q.set_control([]), "registers must not be empty"),
        (lambda q: q.read_test([R1] * 342), "342 registers do not fit one frame; at most 341"),
        (lambda q: q.save_setup(1, [R1] * 341), "341 registers do not fit one frame; at most 340"),
        (lambda q: q.set_control([wire.RegisterValue(1, 1, 1)] * 205), "at most 204"),
    ],
)
def test_values_are_checked_before_anything_is_sent(rig: Rig, submit: Any, message: str) -> None:
    failure = rig.outcome(submit(rig.queue))
    assert failure.check(InvalidCommand) and message in str(failure.value)
    assert rig.center_sent() == [] and timers(rig) == 0


def test_the_largest_lists_that_fit_do_go_out(rig: Rig) -> None:
    rig.queue.read_test([R1] * 341)
    [sent] = rig.center_sent()
    assert len(sent.registers) == 341
    rig.dtu_sends(wire.ReadTestAck(1, (0,) * 341))
    save = rig.queue.save_setup(0, [R1] * 340)
    assert len(rig.center_sent()[0].registers) == 340
    rig.dtu_sends(wire.SaveSetupAck(1, 0, (R1,) * 340))
    assert rig.outcome(save) == Setup(0, (R1,) * 340, confirmed=True)


def test_the_queue_is_bounded(rig: Rig) -> None:
    pending = [rig.queue.read_setup() for _ in range(QUEUE_LIMIT + 1)]  # one on the wire, the rest waiting
    extra = rig.queue.read_setup()
    assert rig.outcome(extra).check(QueueFull)
    rig.protocol.connectionLost(Failure(ConnectionError("bye")))
    assert all(rig.outcome(d).check(CommandDisconnected) for d in pending)


def test_a_waiting_command_can_be_cancelled_one_on_the_wire_keeps_its_place(rig: Rig) -> None:
    on_wire = rig.queue.read_test([R1])
    waiting = rig.queue.read_test([R2])
    waiting.cancel()
    on_wire.cancel()
    rig.outcome(waiting)
    rig.outcome(on_wire)
    assert rig.queue.pending == 1  # the ReadTest on the wire still owns the next ReadTestAck
    rig.dtu_sends(wire.ReadTestAck(1, (1,)))
    assert rig.queue.pending == 0
    assert rig.center_sent() == [wire.ReadTest((R1,))]  # the cancelled one never went out
    assert timers(rig) == 0


def test_the_timeout_waits_while_the_session_waits_for_the_store(rig: Rig) -> None:
    read = rig.queue.read_test([R1])
    rig.center_sent()
    rig.store.hold = True
    # An upload holds the session; the ack behind it is not read until the store is done.
    rig.dtu_sends(wire.SendTest(1, 1, (9,)), wire.ReadTestAck(1, (8,)))
    rig.clock.advance(TIMEOUT * 3)
    assert not read.called
    rig.store.release()
    assert rig.outcome(read) == Readings((8,))
    assert rig.center_sent() == [wire.SendTestAck(1)]
    assert timers(rig) == 0


def test_a_replaced_session_fails_its_commands(rig: Rig) -> None:
    read = rig.queue.read_test([R1])
    rig.protocol.session.abort("replaced by a newer login")
    assert rig.outcome(read).check(CommandDisconnected)
    assert rig.transport.disconnecting or rig.transport.disconnected
