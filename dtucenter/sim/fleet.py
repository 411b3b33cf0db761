"""Running many virtual devices in one process: ramp-up, progress, reports, summary."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, Protocol, TextIO, runtime_checkable

from twisted.application.service import MultiService, Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from dtucenter.sim.stats import PROGRESS_FIELDS, SimStats

log = Logger()

#: Counters whose rate the progress line shows.
RATE_FIELDS = ("acked", "polls")


@runtime_checkable
class Droppable(Protocol):
    def drop_connection(self) -> bool: ...


class Fleet(MultiService):
    """Starts its connectors ``connect_rate`` per second (a crowd dialling at once overflows accept queues)."""

    def __init__(self, reactor: IReactorTime, stats: SimStats, connect_rate: float) -> None:
        super().__init__()
        self.reactor = reactor
        self.stats = stats
        self.connect_rate = connect_rate
        self._waiting: list[Service] = []
        self._ramp = LoopingCall(self._start_some)
        self._ramp.clock = reactor
        self._step = 0.05

    def add(self, connector: Service) -> None:
        self._waiting.append(connector)

    def startService(self) -> None:
        super().startService()
        self._waiting.reverse()
        self._ramp.start(self._step, now=True)

    def _start_some(self) -> None:
        count = max(1, round(self.connect_rate * self._step))
        for _ in range(min(count, len(self._waiting))):
            self._waiting.pop().setServiceParent(self)
        if not self._waiting and self._ramp.running:
            self._ramp.stop()

    def drop_all(self) -> int:
        """Every device's connection closed at once, as a power cut or a carrier outage would; each dials
        again after its own backoff (1-2 s), so the whole fleet redials together: a redial storm."""
        dropped = sum(1 for connector in self if isinstance(connector, Droppable) and connector.drop_connection())
        self.stats.count("drop_all")
        self.stats.count("dropped", dropped)
        log.info("Dropped {count} connections at once", count=dropped)
        return dropped

    def stopService(self) -> Any:
        if self._ramp.running:
            self._ramp.stop()
        self._waiting.clear()
        return super().stopService()


class Reporter(Service):
    """The progress line on the terminal and, for the benchmark, JSON snapshots in a file."""

    def __init__(
        self,
        clock: IReactorTime,
        stats: SimStats,
        out: TextIO = sys.stderr,
        report_path: str | None = None,
        interval: float = 1.0,
        quiet: bool = False,
        fields: tuple[tuple[str, str], ...] = PROGRESS_FIELDS,
    ) -> None:
        self.fields = fields
        self.clock = clock
        self.stats = stats
        self.out = out
        self.report_path = report_path
        self.quiet = quiet
        self.interval = interval
        self._started = 0.0
        self._previous: dict[str, int] = {}
        self._loop = LoopingCall(self.report)
        self._loop.clock = clock
        self._report_file: TextIO | None = None
        self._tty = bool(getattr(out, "isatty", lambda: False)())

    def startService(self) -> None:
        super().startService()
        self._started = self.clock.seconds()
        if self.report_path:
            # Open while the service runs: stopService closes it.
            self._report_file = open(self.report_path, "w", buffering=1)  # noqa: SIM115
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        self.report(final=True)
        if self._report_file is not None:
            self._report_file.close()
            self._report_file = None

    def elapsed(self) -> float:
        return self.clock.seconds() - self._started

    def report(self, final: bool = False) -> None:
        try:
            elapsed = self.elapsed()
            if self._report_file is not None:
                snapshot = self.stats.snapshot(elapsed)
                snapshot["final"] = final
                self._report_file.write(json.dumps(snapshot) + "\n")
            if final:
                self._finish_line()
                summary = self.stats.line(elapsed, fields=self.fields)
                print(f"summary: {summary}{self._error_details()}", file=self.out, flush=True)
            elif not self.quiet:
                rates = {name: (self.stats.value(name) - self._previous.get(name, 0)) / self.interval
                         for name in RATE_FIELDS}
                self._previous = {name: self.stats.value(name) for name in RATE_FIELDS}
                line = self.stats.line(elapsed, rates, self.fields)
                if self._tty:
                    self.out.write("\r\x1b[K" + line)
                    self.out.flush()
                else:
                    print(line, file=self.out, flush=True)
        except Exception:
            log.failure("Could not write the progress report")

    def _finish_line(self) -> None:
        if self._tty and not self.quiet:
            self.out.write("\n")

    def _error_details(self) -> str:
        kinds = sorted(
            (name.removeprefix("error_"), count)
            for name, count in self.stats.counts.items() if name.startswith("error_")
        )
        return f" ({', '.join(f'{k} {c}' for k, c in kinds)})" if kinds else ""


def run(reactor: Any, top: MultiService, duration: float | None, on_exit: Callable[[], None] | None = None) -> int:
    """Run until Ctrl-C (or ``duration``); services stop cleanly either way."""
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    if duration is not None:
        reactor.callLater(duration, reactor.stop)
    reactor.run()
    if on_exit is not None:
        on_exit()
    return 0

