"""The poller on a fake clock: the grid, backoff, partial failures, writes."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import pytest
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU, ModbusPDU
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersResponse,
    ReadInputRegistersResponse,
    WriteSingleRegisterResponse,
)
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from dtucenter.modbus.config import MeterSettings
from dtucenter.modbus.errors import LinkOffline, ModbusExceptionResponse, ModbusTimeout, ResponseMismatch
from dtucenter.modbus.framing import RtuFraming
from dtucenter.modbus.master import ModbusMaster
from dtucenter.modbus.points import Point, PointType, PointValueError, Table, WordOrder
from dtucenter.modbus.poller import Poller, UnknownMeter, UnknownPoint
from tests.modbus.modbus_helpers import holding_response, result_of, rtu


@attrs.define
class MemorySink:
    values: list[tuple[str, float, dict]] = attrs.Factory(list)
    failures: list[tuple[str, float, str]] = attrs.Factory(list)

    def record_values(self, meter, time, values):
        self.values.append((meter, time, dict(values)))

    def record_failure(self, meter, time, reason):
        self.failures.append((meter, time, reason))

    def times(self, meter: str = "m") -> list[float]:
        return [t for name, t, _ in self.values if name == meter]


Responder = Callable[[ModbusPDU], "ModbusPDU | Exception | defer.Deferred"]


class FakeChannel:
    """Answers each request through ``responder``: a PDU, an exception, or a Deferred to fire later."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.requests: list[ModbusPDU] = []

    def request(self, pdu: ModbusPDU) -> defer.Deferred:
        self.requests.append(pdu)
        outcome = self.responder(pdu)
        if isinstance(outcome, defer.Deferred):
            return outcome
        if isinstance(outcome, Exception):
            return defer.fail(outcome)
        return defer.succeed(outcome)


def registers_of(table: dict[int, int]) -> Responder:
    def respond(pdu):
        values = [table.get(a, 0) for a in range(pdu.address, pdu.address + pdu.count)]
        cls = ReadHoldingRegistersResponse if pdu.function_code == 3 else ReadInputRegistersResponse
        return cls(registers=values, dev_id=pdu.dev_id)

    return respond


def timing_out(pdu):
    return ModbusTimeout(pdu.dev_id, pdu.function_code, 2)


VOLTAGE = Point("voltage", Table.HOLDING, 0, PointType.UINT16, scale=0.1, unit="V")
ENERGY = Point("energy", Table.HOLDING, 1, PointType.FLOAT32, word_order=WordOrder.LITTLE)


def meter(
    name: str = "m", unit: int = 1, interval: float = 10.0, points=(VOLTAGE, ENERGY), link: str = "bus"
) -> MeterSettings:
    return MeterSettings(name=name, link=link, unit=unit, interval=interval, points=tuple(points))


def start(*meters: MeterSettings, channel, max_backoff: float = 80.0):
    clock, sink = Clock(), MemorySink()
    poller = Poller(meters, {"bus": channel}, sink, clock, max_backoff=max_backoff)
    poller.startService()
    return clock, sink, poller


def run(clock: Clock, until: float) -> None:
    """Advance to ``until``, stopping at every delayed call on the way so none runs late."""
    while True:
        due = min((call.getTime() for call in clock.getDelayedCalls()), default=until)
        if due > until:
            clock.advance(until - clock.seconds())
            return
        clock.advance(due - clock.seconds())


def stop(clock: Clock, poller: Poller) -> None:
    poller.stopService()
    assert clock.getDelayedCalls() == []


def test_values_land_scaled_with_the_poll_start_time() -> None:
    # float32 1.5 is 0x3FC0 0x0000, stored low word first.
    channel = FakeChannel(registers_of({0: 2301, 1: 0x0000, 2: 0x3FC0}))
    clock, sink, poller = start(meter(), channel=channel)
    clock.advance(0)
    assert sink.values == [("m", 0.0, {"voltage": 230.1, "energy": 1.5})]
    assert len(channel.requests) == 1, "neighbouring points are read together"
    assert channel.requests[0].dev_id == 1
    stop(clock, poller)


def test_polls_sit_on_a_grid_however_long_answers_take() -> None:
    def slow(pdu):
        d = defer.Deferred()
        clock.callLater(3.7, d.callback, registers_of({})(pdu))
        return d

    channel = FakeChannel(slow)
    clock, sink, poller = start(meter(), channel=channel)
    run(clock, 45)
    assert sink.times() == [0.0, 10.0, 20.0, 30.0, 40.0]
    stop(clock, poller)


def test_poll_stats_count_outcomes_and_measure_each_poll_from_start_to_end() -> None:
    answers = {"m": 0.25, "dead": None, "late": 3.0}

    def respond(pdu):
        delay = {1: answers["m"], 2: answers["dead"], 3: answers["late"]}[pdu.dev_id]
        d = defer.Deferred()
        if delay is None:
            clock.callLater(1.5, d.errback, ModbusTimeout(pdu.dev_id, pdu.function_code, 2))
        else:
            clock.callLater(delay, d.callback, registers_of({})(pdu))
        return d

    channel = FakeChannel(respond)
    clock, _sink, poller = start(meter("m", 1), meter("dead", 2), meter("late", 3), channel=channel)
    run(clock, 5)  # m and late poll at 0 and every 10 s; dead polls at 0, then backs off
    stats = poller.stats.as_json()
    assert (stats["polls"], stats["failed"], stats["timed_out"]) == (3, 1, 1)
    assert sum(stats["duration_histogram"].values()) == 3
    # Durations 0.25 s, 1.5 s (the timeout) and 3.0 s; each percentile is its bucket's upper bound.
    assert 1.5 <= stats["duration_p50_s"] < 1.5 * 1.02
    assert 3.0 <= stats["duration_p99_s"] < 3.0 * 1.02
    stop(clock, poller)


def test_a_slot_that_comes_while_the_poll_still_runs_is_skipped() -> None:
    pending: list[defer.Deferred] = []

    def hanging(pdu):
        pending.append(defer.Deferred())
        return pending[-1]

    channel = FakeChannel(hanging)
    clock, sink, poller = start(meter(), channel=channel)
    run(clock, 25)
    assert len(pending) == 1
    assert poller.stats.skipped == 2  # the slots at 10 and 20 s
    pending[0].callback(registers_of({})(channel.requests[0]))
    run(clock, 30)
    assert len(pending) == 2
    assert sink.times() == [0.0]
    assert poller.stats.as_json()["skipped"] == 2  # the slot at 30 s polled again
    stop(clock, poller)


def test_a_unit_that_keeps_timing_out_is_polled_less_and_less_until_it_answers() -> None:
    alive = {"now": False}
    channel = FakeChannel(lambda pdu: registers_of({})(pdu) if alive["now"] else timing_out(pdu))
    clock, sink, poller = start(meter(), channel=channel, max_backoff=80.0)
    run(clock, 300)
    poll_times = [t for _, t, _ in sink.failures]
    # Every 2**n slots after n timeouts in a row, at most every 80 s.
    assert poll_times == [0.0, 20.0, 60.0, 140.0, 220.0, 300.0]
    assert poller.status("m").timeouts_in_a_row == 6
    alive["now"] = True
    run(clock, 380)
    assert sink.times() == [380.0]
    run(clock, 400)
    assert sink.times() == [380.0, 390.0, 400.0], "back on every slot after the first answer"
    assert poller.status("m").timeouts_in_a_row == 0
    stop(clock, poller)


def test_the_first_failing_block_of_a_dead_unit_ends_its_poll() -> None:
    far = Point("far", Table.INPUT, 500, PointType.UINT16)
    channel = FakeChannel(timing_out)
    clock, sink, poller = start(meter(points=(VOLTAGE, far)), channel=channel)
    clock.advance(0)
    assert len(channel.requests) == 1
    assert sink.failures == [("m", 0.0, "unit 1 did not answer function 3 (2 attempts)")]
    stop(clock, poller)


def test_an_exception_for_one_block_keeps_the_values_of_the_others() -> None:
    far = Point("far", Table.INPUT, 500, PointType.UINT16)

    def respond(pdu):
        if pdu.function_code == 4:
            return ModbusExceptionResponse(pdu.dev_id, 4, 2)
        return registers_of({0: 10})(pdu)

    clock, sink, poller = start(meter(points=(VOLTAGE, far)), channel=FakeChannel(respond))
    clock.advance(0)
    assert sink.values == [("m", 0.0, {"voltage": 1.0})]
    assert sink.failures == [
        ("m", 0.0, "input 500+1: unit 1 answered function 4 with exception 2 (illegal data address)"),
    ]
    status = poller.status("m")
    assert (status.failing, status.timeouts_in_a_row, status.last_success) == (True, 0, 0.0)
    clock.advance(10)
    assert sink.times() == [0.0, 10.0], "an answering unit is not backed off"
    stop(clock, poller)


def test_an_offline_link_is_recorded_but_not_backed_off() -> None:
    clock, sink, poller = start(meter(), channel=FakeChannel(lambda pdu: LinkOffline("bus")))
    run(clock, 20)
    assert sink.failures == [("m", t, "link bus is offline") for t in (0.0, 10.0, 20.0)]
    status = poller.status("m")
    assert (status.last_error, status.last_error_time, status.next_poll) == ("link bus is offline", 20.0, 30.0)
    stop(clock, poller)


def test_a_mismatched_response_is_a_failure() -> None:
    channel = FakeChannel(lambda pdu: ReadHoldingRegistersResponse(registers=[1], dev_id=1))
    clock, sink, poller = start(meter(), channel=channel)
    clock.advance(0)
    assert sink.failures == [("m", 0.0, "holding 0+3: asked for 3 registers at 0, got 1")]
    stop(clock, poller)


@pytest.mark.expected_errors("Meter a: reading holding 0+3 crashed", error=TypeError)
@pytest.mark.expected_errors("Meter b: reading holding 0+3 crashed", error=TypeError)
@pytest.mark.expected_errors("the sink refused a poll result", error=RuntimeError)
def test_neither_a_broken_sink_nor_a_crashing_channel_stops_polling() -> None:
    class BrokenSink(MemorySink):
        def record_values(self, meter, time, values):
            super().record_values(meter, time, values)
            raise RuntimeError("disk full")

    def crash(pdu):
        raise TypeError("bug")

    clock, sink = Clock(), BrokenSink()
    channel = FakeChannel(registers_of({}))
    poller = Poller([meter("a"), meter("b")], {"bus": channel}, sink, clock)
    poller.startService()
    run(clock, 10)
    assert sink.times("a") == [0.0, 10.0]
    channel.responder = crash
    run(clock, 20)
    channel.responder = registers_of({})
    run(clock, 30)
    assert sink.times("a") == [0.0, 10.0, 30.0]
    assert ("a", 20.0, "holding 0+3: internal error (see the log)") in sink.failures
    stop(clock, poller)


def test_results_arriving_after_stop_are_not_recorded() -> None:
    pending: list[defer.Deferred] = []
    channel = FakeChannel(lambda pdu: pending.append(defer.Deferred()) or pending[-1])
    clock, sink, poller = start(meter(), channel=channel)
    clock.advance(0)
    stop(clock, poller)
    pending[0].errback(LinkOffline("bus"))
    assert sink.failures == [] and sink.values == []


def test_status_reports_the_schedule_and_last_poll() -> None:
    clock, _sink, poller = start(meter(interval=15), channel=FakeChannel(registers_of({})))
    clock.advance(0)
    status = poller.status("m")
    assert (status.last_poll, status.next_poll, status.polls, status.failing) == (0.0, 15.0, 1, False)
    assert status.as_json()["link"] == "bus"
    with pytest.raises(UnknownMeter):
        poller.status("nope")
    stop(clock, poller)


# -- writes ------------------------------------------------------------------------------


def test_write_scales_encodes_and_checks_the_echo() -> None:
    def echo(pdu):
        return WriteSingleRegisterResponse(address=pdu.address, registers=pdu.registers)

    channel = FakeChannel(echo)
    poller = Poller([meter()], {"bus": channel}, MemorySink(), Clock())
    d = poller.write("m", "voltage", 231.5)
    assert result_of(d) is None
    (request,) = channel.requests
    assert (request.function_code, request.address, request.registers, request.dev_id) == (6, 0, [2315], 1)

    channel.responder = lambda pdu: WriteSingleRegisterResponse(address=7, registers=[1])
    assert result_of(poller.write("m", "voltage", 1)).check(ResponseMismatch)


def test_bad_writes_are_refused_before_anything_is_sent() -> None:
    channel = FakeChannel(registers_of({}))
    poller = Poller([meter()], {"bus": channel}, MemorySink(), Clock())
    with pytest.raises(UnknownMeter):
        poller.write("nope", "voltage", 1)
    with pytest.raises(UnknownPoint):
        poller.write("m", "current", 1)
    with pytest.raises(PointValueError):
        poller.write("m", "voltage", 10_000)
    assert channel.requests == []


# -- with a real master on a shared bus ---------------------------------------------------


class Bus(StringTransport):
    """An RS-485 bus on which only some units answer, 50 ms after each request."""

    def __init__(self, clock: Clock, alive: set[int]) -> None:
        super().__init__()
        self.clock = clock
        self.alive = alive
        self.master: ModbusMaster | None = None
        self.asked: dict[int, int] = {}
        self._decoder = FramerRTU(DecodePDU(is_server=True))

    def write(self, data: bytes) -> None:
        super().write(data)
        _, request = self._decoder.handleFrame(data, 0, 0)
        self.asked[request.dev_id] = self.asked.get(request.dev_id, 0) + 1
        if request.dev_id in self.alive:
            answer = rtu(holding_response(request.dev_id, [7] * request.count))
            self.clock.callLater(0.05, self.master.dataReceived, answer)


def test_a_dead_unit_cannot_starve_a_healthy_one_on_the_same_bus() -> None:
    clock, sink = Clock(), MemorySink()
    bus = Bus(clock, alive={1})
    bus.master = ModbusMaster("bus", RtuFraming(), clock, timeout=3.0, retries=1, silence=0.2)
    bus.master.makeConnection(bus)
    healthy, dead = meter("healthy", unit=1, interval=5.0), meter("dead", unit=2, interval=5.0)
    poller = Poller([dead, healthy], {"bus": bus.master}, sink, clock, max_backoff=120.0)
    poller.startService()
    run(clock, 600.5)  # slots 0, 5, .., 600 and the last answer
    dead_polls = [t for name, t, _ in sink.failures if name == "dead"]
    assert len(dead_polls) <= 10, "polled every slot it would hold the bus for 6.4 s of each 5"
    assert bus.asked[2] == 2 * len(dead_polls)
    # Each dead poll holds the bus past one of the healthy meter's slots, no more.
    assert len(sink.times("healthy")) >= 121 - len(dead_polls)
    stop(clock, poller)


# -- reads on demand -----------------------------------------------------------------------------------


def test_read_now_reads_at_once_stores_like_a_poll_and_leaves_the_schedule_alone() -> None:
    channel = FakeChannel(registers_of({0: 2301, 1: 0x0000, 2: 0x3FC0}))
    clock, sink, poller = start(meter(), channel=channel)
    clock.advance(0)  # the first poll, at 0
    clock.advance(3)
    before = poller.status("m")
    reading = result_of(poller.read_now("m"))
    assert reading.time == 3 and reading.values == {"voltage": pytest.approx(230.1), "energy": 1.5}
    assert reading.errors == () and reading.stopped_by is None
    assert sink.times() == [0, 3]
    after = poller.status("m")
    assert (after.polls, after.next_poll, after.last_poll) == (before.polls, before.next_poll, before.last_poll)
    assert poller.stats.polls == 1
    stop(clock, poller)


def test_read_now_reads_only_the_named_points() -> None:
    channel = FakeChannel(registers_of({0: 2301}))
    clock, _, poller = start(meter(), channel=channel)
    clock.advance(0)
    channel.requests.clear()
    reading = result_of(poller.read_now("m", ["voltage", "voltage"]))
    assert reading.values == {"voltage": pytest.approx(230.1)}
    assert [(r.address, r.count) for r in channel.requests] == [(0, 1)]
    stop(clock, poller)


def test_read_now_refuses_unknown_names_and_reports_a_dead_unit() -> None:
    clock, sink, poller = start(meter(), channel=FakeChannel(timing_out))
    with pytest.raises(UnknownMeter):
        poller.read_now("nope")
    with pytest.raises(UnknownPoint):
        poller.read_now("m", ["voltage", "frequency"])
    reading = result_of(poller.read_now("m"))
    assert reading.values == {} and isinstance(reading.stopped_by, ModbusTimeout)
    assert len(reading.errors) == 1 and sink.values == [] and sink.failures == []
    stop(clock, poller)


def test_the_latest_value_of_each_point_is_kept_and_forgotten_when_its_read_fails() -> None:
    far = Point("far", Table.INPUT, 500, PointType.UINT16)
    refuse_input = False

    def respond(pdu):
        if pdu.function_code == 4:
            return ModbusExceptionResponse(pdu.dev_id, 4, 2) if refuse_input else ReadInputRegistersResponse(
                registers=[42], dev_id=pdu.dev_id)
        return registers_of({0: 2301, 1: 0x0000, 2: 0x3FC0})(pdu)

    clock, _, poller = start(meter(points=(VOLTAGE, ENERGY, far)), channel=FakeChannel(respond))
    clock.advance(0)
    assert poller.latest_values("m") == {"voltage": (230.1, 0.0), "energy": (1.5, 0.0), "far": (42, 0.0)}
    refuse_input = True
    clock.advance(10)
    assert poller.latest_values("m") == {"voltage": (230.1, 10.0), "energy": (1.5, 10.0)}, "far's read failed"
    poller.set_meter(meter(points=(Point("voltage", Table.HOLDING, 0, PointType.INT16), ENERGY, far)))
    assert poller.latest_values("m") == {"energy": (1.5, 10.0)}, "a value read under another definition is dropped"
    poller.set_meter(meter(points=(VOLTAGE, ENERGY, far), interval=20.0))
    assert poller.latest_values("m") == {"energy": (1.5, 10.0)}
    stop(clock, poller)


def test_a_dead_unit_has_no_latest_values() -> None:
    answer = True

    def respond(pdu):
        return registers_of({0: 2301})(pdu) if answer else timing_out(pdu)

    clock, _, poller = start(meter(), channel=FakeChannel(respond))
    clock.advance(0)
    assert set(poller.latest_values("m")) == {"voltage", "energy"}
    answer = False
    clock.advance(10)
    assert poller.latest_values("m") == {}
    stop(clock, poller)


def test_read_now_keeps_its_values_as_the_latest_unless_a_newer_poll_did() -> None:
    pending: list[tuple[defer.Deferred, ModbusPDU]] = []

    def later(pdu):
        d = defer.Deferred()
        pending.append((d, pdu))
        return d

    clock, _, poller = start(meter(points=(VOLTAGE,)), channel=FakeChannel(later))
    clock.advance(0)
    first, first_pdu = pending.pop()
    first.callback(registers_of({0: 10})(first_pdu))
    assert poller.latest_values("m") == {"voltage": (1.0, 0.0)}
    clock.advance(5)
    now = poller.read_now("m")
    clock.advance(5)  # the 10 s poll starts while the read-now waits
    poll_d, poll_pdu = pending.pop()
    read_d, read_pdu = pending.pop()
    poll_d.callback(registers_of({0: 30})(poll_pdu))
    read_d.callback(registers_of({0: 20})(read_pdu))
    assert result_of(now).values == {"voltage": 2.0}
    assert poller.latest_values("m") == {"voltage": (3.0, 10.0)}, "the older read-now does not overwrite it"
    stop(clock, poller)
