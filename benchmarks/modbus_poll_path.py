"""The Modbus poll path's own cost, in one process, without sockets: CPU microseconds per poll.

    python -m benchmarks.modbus_poll_path [--meters 2000] [--per-link 10] [--rounds 20]

The center's poller, masters (RTU framing, heartbeat filter) and meter recorder run as in the
center, on a ``task.Clock``; each master's transport hands its request to a simulated meter
(dtucenter/sim) whose answer is fed back to the master, and the recorder's store only queues
the rows (its group commit fires them, as the real one does after the commit). What is
measured is the reactor thread's share of a poll, from the tick to the rows queued: what
the profile of the real center (benchmarks/modbus_scale.py) calls per-poll work. No reactor
dispatch, no system calls, no SQLite: the end-to-end figure is the scale scenario's.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from dtucenter.modbus.config import LinkSettings, MeterSettings, ModbusSettings
from dtucenter.modbus.filter import BoundaryNoise
from dtucenter.modbus.framing import RtuFraming
from dtucenter.modbus.master import ModbusMaster
from dtucenter.modbus.points import Point, PointType, Table
from dtucenter.modbus.poller import Poller
from dtucenter.sim.modbus import TransparentDTU, meters_for
from dtucenter.sim.stats import SimStats
from dtucenter.store.recorder import MeterRecorder

#: The youngest generation's threshold the center sets once its services are built (dtucenter/tap.py, which
#: only the twistd plugin may import): the poll path's garbage is collected here as there.
CENTER_GC_YOUNG_THRESHOLD = 20_000


def collect_as_the_center_does() -> None:
    """What the center's ``tune_garbage_collector`` does, for good: objects made so far frozen, the youngest
    generation collected less often."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(CENTER_GC_YOUNG_THRESHOLD, middle, oldest)


@implementer(IReactorTime)
class HeapClock:
    """``task.Clock`` with a heap, as the reactor keeps its timers: ``task.Clock`` sorts its whole list on
    every ``callLater``, which with thousands of meters would cost more than the polls measured."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, DelayedCall]] = []
        self._sequence = 0

    def seconds(self) -> float:
        return self.now

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object, **kw: object) -> DelayedCall:
        call = DelayedCall(self.now + delay, callable, args, kw, lambda _: None, self._push, seconds=self.seconds)
        self._push(call)
        return call

    def getDelayedCalls(self) -> list[DelayedCall]:
        return [call for _, _, call in self._heap if call.active()]

    def _push(self, call: DelayedCall) -> None:
        self._sequence += 1
        heapq.heappush(self._heap, (call.time, self._sequence, call))

    def advance(self, amount: float) -> None:
        self.now += amount
        while self._heap and self._heap[0][0] <= self.now:
            when, _, call = heapq.heappop(self._heap)
            if call.cancelled or call.called or call.time != when:  # cancelled, or moved by a reset
                continue
            call.called = 1
            call.func(*call.args, **call.kw)


class _QueueingStore:
    """The store's side of ``add_rows``: rows queued, each call's Deferred fired by the next "commit"."""

    def __init__(self) -> None:
        self.rows = 0
        self._waiting: list[Deferred[None]] = []

    def add_rows(self, table: Any, rows: list[Any]) -> Deferred[None]:
        self.rows += len(rows)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def commit(self) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)


class _Wire(StringTransport):
    """A master's transport whose bytes reach its simulated DTU at ``deliver``."""

    def __init__(self, outbox: list[_Wire]) -> None:
        super().__init__()
        self.outbox = outbox

    def write(self, data: bytes) -> None:
        if not self.io.tell():
            self.outbox.append(self)
        super().write(data)


class _DtuEnd:
    """The simulated DTU's link: what it writes goes straight back to the master."""

    def __init__(self, master: ModbusMaster) -> None:
        self.master = master
        self.pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.pending.append(data)

    def drop(self) -> None:
        pass


def build(meters: int, per_link: int, registers: int = 10) -> tuple[Poller, HeapClock, list[Any], _QueueingStore]:
    clock = HeapClock()
    points = tuple(Point(f"r{a}", Table.HOLDING, a, PointType.UINT16) for a in range(registers))
    links = -(-meters // per_link)
    settings = [MeterSettings(f"meter-{n:05d}", f"link-{n // per_link:05d}", n % per_link + 1, points, interval=1.0)
                for n in range(meters)]
    stats, rng = SimStats(), random.Random(1)
    outbox: list[_Wire] = []
    channels: dict[str, ModbusMaster] = {}
    pairs = []
    for n in range(links):
        name = f"link-{n:05d}"
        master = ModbusMaster(name, RtuFraming(), clock, timeout=3.0, retries=1, silence=0.2, idle_timeout=300.0,
                              noise=BoundaryNoise.for_link(f"SIM-{n:05d}".encode(), False, b"HB"))
        wire = _Wire(outbox)
        master.makeConnection(wire)
        dtu = TransparentDTU(f"SIM-{n:05d}".encode(), "rtu", meters_for(range(1, per_link + 1), clock, rng),
                             clock, stats)
        end = _DtuEnd(master)
        dtu.link = end
        wire.dtu, wire.end = dtu, end  # type: ignore[attr-defined]
        channels[name] = master
        pairs.append(wire)
    store = _QueueingStore()
    modbus = ModbusSettings(links=tuple(LinkSettings(name=name, registration=name.encode())
                                        for name in channels), meters=tuple(settings))
    recorder = MeterRecorder(store, clock, modbus, state_interval=1e9, stats=Counter())  # type: ignore[arg-type]
    poller = Poller(settings, channels, recorder, clock)
    return poller, clock, outbox, store


def _exchange(outbox: list[_Wire]) -> int:
    """Every request written goes to its DTU and every answer back, until no request is left."""
    answered = 0
    while outbox:
        wires, outbox[:] = list(outbox), []
        for wire in wires:
            data = wire.value()
            wire.clear()
            wire.dtu.data_received(data)  # type: ignore[attr-defined]
            end: _DtuEnd = wire.end  # type: ignore[attr-defined]
            replies, end.pending = end.pending, []
            for reply in replies:
                answered += 1
                end.master.dataReceived(reply)
    return answered


def measure(meters: int, per_link: int, rounds: int, tune_gc: bool = True) -> dict[str, Any]:
    """CPU per poll, the simulated meters' own answering excluded (timed apart and subtracted).

    ``tune_gc``: collect garbage as the center does once its services are built (for good: not in tests)."""
    poller, clock, outbox, store = build(meters, per_link)
    if tune_gc:
        collect_as_the_center_does()
    poller.startService()
    clock.advance(0)
    _exchange(outbox)
    store.commit()
    spent = 0.0
    polls_before = poller.stats.polls
    for _ in range(rounds):
        start = time.process_time()
        clock.advance(1.0)
        answered = _exchange(outbox)
        store.commit()
        spent += time.process_time() - start
        if answered != meters:
            raise RuntimeError(f"{answered} answers to {meters} polls")
    polls = poller.stats.polls - polls_before
    poller.stopService()
    # The simulated side's share: the same answers again, alone.
    sim_spent = _sim_cost(meters, per_link, rounds)
    per_poll = (spent - sim_spent) / polls
    return {"meters": meters, "per_link": per_link, "polls": polls, "failed": poller.stats.failed,
            "us_per_poll": per_poll * 1e6, "polls_per_core_s": 1 / per_poll if per_poll > 0 else 0.0,
            "rows": store.rows}


def _sim_cost(meters: int, per_link: int, rounds: int) -> float:
    clock = HeapClock()
    stats, rng = SimStats(), random.Random(1)
    framing = RtuFraming()
    from pymodbus.pdu.register_message import ReadHoldingRegistersRequest

    links = -(-meters // per_link)
    dtus = []
    for _ in range(links):
        dtu = TransparentDTU(b"X", "rtu", meters_for(range(1, per_link + 1), clock, rng), clock, stats)
        dtu.link = _DtuEnd(None)  # type: ignore[arg-type]  # its master is never used here
        dtus.append(dtu)
    frames = [framing.encode(ReadHoldingRegistersRequest(address=0, count=10, dev_id=u), 0)
              for u in range(1, per_link + 1)]
    start = time.process_time()
    for _ in range(rounds):
        for dtu in dtus:
            for frame in frames:
                dtu.data_received(frame)
            dtu.link.pending.clear()  # type: ignore[union-attr]
    return time.process_time() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.modbus_poll_path", description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=2000)
    parser.add_argument("--per-link", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3, help="runs; the cheapest is reported (least disturbed)")
    args = parser.parse_args(argv)
    best = min((measure(args.meters, args.per_link, args.rounds) for _ in range(args.repeat)),
               key=lambda r: r["us_per_poll"])
    print(f"{best['us_per_poll']:.1f} us per poll ({best['polls_per_core_s']:,.0f} polls per core-second) "
          f"over {best['polls']:,} polls of {args.meters:,} meters, {args.per_link} per link; "
          f"{best['failed']} failed, {best['rows']:,} rows queued")
    return 0


if __name__ == "__main__":
    sys.exit(main())
