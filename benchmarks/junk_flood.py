"""The junk-flood scenario: well-behaved DTUs upload while many connections stream junk at line rate.

    python -m benchmarks.junk_flood --server 127.0.0.1:PORT --count 100 --report FILE   # the flooder alone

The flooder keeps ``count`` connections open to the center's DTU port, each
writing ``AA 55`` (frame heads with a Length no frame may have: today's
incident) whenever its socket takes more, and dials again at once when the
center closes it. ``run_junk_flood`` measures what the well-behaved DTUs'
acks cost before and during the flood, and how many lines the center logs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from benchmarks.procs import Child, ReportReader, cpu_seconds, free_port, start_center, start_sim
from dtucenter.latency import histogram_difference, percentile

#: What every junk connection writes, over and over.
JUNK = b"\xaa\x55" * 32768


@attrs.frozen
class FloodScale:
    junk_connections: int
    dtus: int
    #: Uploads per second from all the well-behaved DTUs together.
    rate: int
    warmup: float
    measure: float
    #: The flooder's niceness: 0 shares the cores evenly with the center; a junk source
    #: is normally another machine, whose CPU the center does not pay for.
    flooder_nice: int = 0


FULL = FloodScale(junk_connections=100, dtus=200, rate=1000, warmup=3.0, measure=15.0)
SMOKE = FloodScale(junk_connections=5, dtus=5, rate=20, warmup=0.5, measure=1.0)


def _line_count(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _ack_window(reader: ReportReader, sim: Child, seconds: float) -> dict[str, Any]:
    first = reader.next(sim)
    while True:
        last = reader.next(sim)
        if last["elapsed"] - first["elapsed"] >= seconds:
            break
    latency = histogram_difference(last["latency"], first["latency"])
    span = last["elapsed"] - first["elapsed"]
    acked = last["counts"].get("acked", 0) - first["counts"].get("acked", 0)
    return {"p50": percentile(latency, 0.5), "p99": percentile(latency, 0.99), "acked_per_s": acked / span,
            "ack_timeouts": last["counts"].get("ack_timeouts", 0) - first["counts"].get("ack_timeouts", 0),
            "seconds": span}


def _flooder_totals(path: Path) -> dict[str, Any]:
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else {"bytes": 0, "connections": 0, "closed": 0}


def run_junk_flood(workdir: Path, scale: FloodScale) -> dict[str, Any]:
    """Ack latency of well-behaved DTUs without, then with, the flood; the center's CPU and log lines."""
    from benchmarks.run import _sim_dtu_args, _wait_logged_in

    port = free_port()
    center = start_center(workdir, port)
    interval = scale.dtus / scale.rate
    sim, path = start_sim(workdir, "flood-dtus", _sim_dtu_args(port, scale.dtus, 4_000_000, interval, 1000))
    flood_report = workdir / "flooder.jsonl"
    flooder: Child | None = None
    try:
        reader = ReportReader(path)
        _wait_logged_in(reader, sim, scale.dtus)
        time.sleep(scale.warmup)
        quiet = _ack_window(reader, sim, scale.measure)
        flooder = Child("flooder", [
            *(["nice", "-n", str(scale.flooder_nice)] if scale.flooder_nice else []),
            sys.executable, "-m", "benchmarks.junk_flood", "--server", f"127.0.0.1:{port}",
            "--count", str(scale.junk_connections), "--report", str(flood_report),
        ], workdir / "flooder.log")
        time.sleep(scale.warmup)
        flood_start = _flooder_totals(flood_report)
        lines_a, cpu_a, wall_a = _line_count(center.log_path), cpu_seconds(center.pid), time.monotonic()
        flooder_cpu_a = cpu_seconds(flooder.pid)
        flooded = _ack_window(reader, sim, scale.measure)
        lines_b, cpu_b, wall_b = _line_count(center.log_path), cpu_seconds(center.pid), time.monotonic()
        flooder_cpu_b = cpu_seconds(flooder.pid)
        flood_end = _flooder_totals(flood_report)
        if not flooder.alive():
            raise RuntimeError(f"the flooder exited:\n{flooder.tail()}")
    finally:
        if flooder is not None:
            flooder.stop()
        sim.stop()
        center.stop()
    seconds = wall_b - wall_a
    return {
        "junk_connections": scale.junk_connections, "dtus": scale.dtus, "rate": scale.rate,
        "quiet": quiet, "flooded": flooded, "seconds": seconds,
        "junk_bytes_per_s": (flood_end["bytes"] - flood_start["bytes"]) / seconds,
        "junk_connections_closed_per_s": (flood_end["closed"] - flood_start["closed"]) / seconds,
        "log_lines": lines_b - lines_a, "cpu": (cpu_b - cpu_a) / seconds,
        "flooder_nice": scale.flooder_nice, "flooder_cpu": (flooder_cpu_b - flooder_cpu_a) / seconds,
        "load_average": os.getloadavg()[0], "cores": os.cpu_count(),
    }


# -- the flooder process ---------------------------------------------------------------------------


def flood(host: str, port: int, count: int, report: Path) -> None:
    from twisted.internet import reactor, task
    from twisted.internet.protocol import ClientFactory, Protocol

    totals = {"bytes": 0, "connections": 0, "closed": 0}
    started = time.monotonic()

    class Junk(Protocol):
        """Writes JUNK whenever the socket has taken the last: as fast as the center reads."""

        def connectionMade(self) -> None:
            totals["connections"] += 1
            self.transport.registerProducer(self, False)  # type: ignore[union-attr]

        def resumeProducing(self) -> None:
            totals["bytes"] += len(JUNK)
            self.transport.write(JUNK)  # type: ignore[union-attr]

        def stopProducing(self) -> None:
            pass

    class Redial(ClientFactory):
        protocol = Junk

        def clientConnectionLost(self, connector: Any, reason: Any) -> None:
            totals["closed"] += 1
            connector.connect()

        def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
            reactor.callLater(0.1, connector.connect)  # type: ignore[attr-defined]

    factory = Redial()
    for _ in range(count):
        reactor.connectTCP(host, port, factory)  # type: ignore[attr-defined]

    def write_report() -> None:
        with open(report, "a") as f:
            f.write(json.dumps({**totals, "elapsed": time.monotonic() - started}) + "\n")

    task.LoopingCall(write_report).start(0.5)
    reactor.run()  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.junk_flood", description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="center HOST:PORT")
    parser.add_argument("--count", type=int, default=100, help="junk connections kept open")
    parser.add_argument("--report", type=Path, required=True, help="JSON lines of cumulative totals")
    args = parser.parse_args(argv)
    host, _, port = args.server.rpartition(":")
    flood(host, int(port), args.count, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
