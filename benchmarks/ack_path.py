"""A/B of the reply path: ``write_now`` against plain ``transport.write``, at one offered rate.

    python -m benchmarks.ack_path --rate 5000 --rounds 4                    # the center
    python -m benchmarks.ack_path --server baseline --rate 5000 --rounds 6  # the framing-only baseline

Each round runs a fresh server once each way, in alternating order, against the same ingest step
(benchmarks/run.py): the machine's other work drifts, so the two ways are compared round by round. The
plain way is the same server with ``write_now`` replaced by ``transport.write`` before it starts. What
counts is the server's CPU per acknowledged upload and the ack latency.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from benchmarks.procs import free_port, raise_file_limit, start_baseline, start_center
from benchmarks.run import SMOKE, run_ingest_step

#: Replaces write_now by transport.write in the module named, then runs what follows it.
_PLAIN = (
    "import sys; import {module} as m; m.write_now = lambda transport, data: transport.write(data); {run}"
)
#: How each server is started each way: None for its usual command.
LAUNCHERS: dict[str, dict[str, tuple[str, ...] | None]] = {
    "center": {
        "write_now": None,
        "transport.write": (sys.executable, "-c", _PLAIN.format(
            module="dtucenter.dtu.session",
            run="from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
        )),
    },
    "baseline": {
        "write_now": None,
        "transport.write": (sys.executable, "-c", _PLAIN.format(
            module="benchmarks.baseline", run="sys.exit(m.main(sys.argv[1:]))",
        )),
    },
}
WAYS = ("write_now", "transport.write")


def one_run(workroot: Path, server: str, way: str, rate: int, dtus: int, measure: float, n: int) -> dict[str, Any]:
    workdir = workroot / f"{n}-{way}"
    workdir.mkdir()
    scale = attrs.evolve(SMOKE, ingest_dtus=dtus, warmup=3.0, measure=measure)
    port = free_port()
    launcher = LAUNCHERS[server][way]
    if server == "center":
        child = start_center(workdir, port, twistd=launcher) if launcher else start_center(workdir, port)
    else:
        child = start_baseline(workdir, port, python=launcher) if launcher else start_baseline(workdir, port)
    try:
        db = workdir / "center.db" if server == "center" else None
        step = run_ingest_step(workdir, scale, child, port, rate, way, db)
    finally:
        child.stop()
    step["way"] = way
    step["cpu_us_per_ack"] = step["cpu"] / step["frames_per_s"] * 1e6
    return step


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.ack_path", description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=sorted(LAUNCHERS), default="center")
    parser.add_argument("--rate", type=int, default=5000, help="frames/s offered")
    parser.add_argument("--dtus", type=int, default=1000)
    parser.add_argument("--measure", type=float, default=10.0, help="seconds measured per run")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    raise_file_limit()
    workroot = Path(tempfile.mkdtemp(prefix="dtucenter-ackpath-"))
    runs: list[dict[str, Any]] = []
    try:
        for n in range(args.rounds):
            for way in WAYS if n % 2 == 0 else reversed(WAYS):
                step = one_run(workroot, args.server, way, args.rate, args.dtus, args.measure, n)
                runs.append(step)
                print(f"round {n + 1} {way:>15}: {step['frames_per_s']:7.0f} acks/s, "
                      f"{args.server} CPU {step['cpu']:.1%} = {step['cpu_us_per_ack']:5.1f} us/ack, "
                      f"ack p50 {step['p50'] * 1000:5.1f} ms p99 {step['p99'] * 1000:6.1f} ms", flush=True)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    for way in WAYS:
        mine = [r for r in runs if r["way"] == way]
        print(f"{way:>15}: median {statistics.median(r['cpu_us_per_ack'] for r in mine):5.1f} us/ack, "
              f"p50 {statistics.median(r['p50'] for r in mine) * 1000:5.1f} ms, "
              f"p99 {statistics.median(r['p99'] for r in mine) * 1000:6.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
