"""The cluster scenario: 1, 2 and 3 ``twistd dtucenter`` nodes on one PostgreSQL database behind HAProxy.

    python -m benchmarks.run --only cluster --postgres postgresql+psycopg2://u:p@host/db --merge

The database is emptied first: give it a scratch one. Every node, HAProxy and
the simulator are processes of their own; each node's CPU is read from /proc.
"""

from __future__ import annotations

import resource
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import attrs
from sqlalchemy import create_engine, text

from benchmarks.procs import (
    PATIENCE,
    VENV_BIN,
    ApiClient,
    Child,
    ReportReader,
    cpu_seconds,
    free_port,
    start_sim,
    wait_listening,
)
from dtucenter.latency import histogram_difference, percentile

HEADING = "## Cluster: nodes on one PostgreSQL database behind HAProxy"
TOKEN = "benchmark-cluster-token"
VALUES = 8


@attrs.frozen
class ClusterScale:
    nodes: tuple[int, ...]
    ingest_dtus: int
    #: Uploads a second offered in each ingest run.
    rate: int
    warmup: float
    measure: float
    hold: int
    failover_dtus: int
    failover_rate: int
    #: ``--node-lease`` of every node: a killed node's DTUs are marked offline, its links moved, after it.
    lease: float


FULL = ClusterScale(nodes=(1, 2, 3), ingest_dtus=1000, rate=4000, warmup=5.0, measure=10.0, hold=19000,
                    failover_dtus=3000, failover_rate=1000, lease=5.0)
SMOKE = ClusterScale(nodes=(1, 2), ingest_dtus=20, rate=40, warmup=0.5, measure=1.0, hold=60,
                     failover_dtus=30, failover_rate=30, lease=3.0)


def balancer_connections() -> int:
    """Most connections HAProxy can take here: each takes two descriptors (the DTU's and the node's)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return min(60_000, (hard - 200) // 2)


def empty_database(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        for table in list(connection.execute(
            text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ).scalars()):
            connection.exec_driver_sql(f'DROP TABLE IF EXISTS "{table}" CASCADE')
    engine.dispose()


def stored_uploads(url: str) -> int:
    engine = create_engine(url)
    with engine.connect() as connection:
        count = int(connection.execute(text("SELECT count(*) FROM samples")).scalar_one())
    engine.dispose()
    return count


@attrs.define
class Cluster:
    nodes: list[Child]
    dtu_ports: list[int]
    api: ApiClient
    balancer: Child
    port: int

    def stop(self) -> None:
        for child in [self.balancer, *self.nodes]:
            child.stop()


def start_cluster(workdir: Path, url: str, count: int, lease: float) -> Cluster:
    """``count`` nodes started at once on an emptied database, HAProxy (round robin) in front."""
    empty_database(url)
    nodes: list[Child] = []
    ports = [free_port() for _ in range(count)]
    api_port = free_port()
    for index, port in enumerate(ports):
        api = ["--api", f"tcp:{api_port}:interface=127.0.0.1"] if index == 0 else ["--api", "off"]
        argv = [
            str(VENV_BIN / "twistd"), "-n", "--pidfile=", "dtucenter",
            "--dtu", f"tcp:{port}:interface=127.0.0.1:backlog=4096", "--db", url, "--unknown-dtu", "accept",
            "--node-id", f"node-{index + 1}", "--node-lease", str(lease), "--api-token", TOKEN, *api,
        ]
        nodes.append(Child(f"node-{index + 1}", argv, workdir / f"node-{index + 1}.log"))
    try:
        for port, node in zip(ports, nodes, strict=True):
            wait_listening(port, node)
        return _behind_balancer(workdir, nodes, ports, api_port)
    except BaseException:
        for node in nodes:
            node.stop()
        raise


def _behind_balancer(workdir: Path, nodes: list[Child], ports: list[int], api_port: int) -> Cluster:
    balancer_port = free_port()
    servers = "\n".join(f"  server n{i} 127.0.0.1:{port} check inter 500ms fall 2 rise 1"
                        for i, port in enumerate(ports))
    config = workdir / "haproxy.cfg"
    config.write_text(
        f"global\n  maxconn {balancer_connections()}\ndefaults\n  mode tcp\n  timeout connect 5s\n"
        f"  timeout client 10m\n  timeout server 10m\n"
        f"frontend dtus\n  bind 127.0.0.1:{balancer_port}\n  default_backend centers\n"
        f"backend centers\n  balance roundrobin\n{servers}\n"
    )
    balancer = Child("haproxy", [shutil.which("haproxy") or "haproxy", "-db", "-f", str(config)],
                     workdir / "haproxy.log")
    try:
        wait_listening(balancer_port, balancer)
    except BaseException:
        balancer.stop()
        raise
    return Cluster(nodes, ports, ApiClient(api_port, TOKEN), balancer, balancer_port)


def _sim_args(port: int, count: int, psn: int, interval: float) -> list[str]:
    return ["dtu", "--server", f"127.0.0.1:{port}", "--count", str(count), "--psn", str(psn),
            "--values", str(VALUES), "--interval", f"{interval:.6f}", "--connect-rate", "2000",
            "--report-interval", "0.25"]


def _until(reader: ReportReader, sim: Child, done: Any) -> dict[str, Any]:
    """The first snapshot ``done`` accepts; gives up when the simulator stops reporting."""
    while True:
        snap = reader.next(sim)
        if done(snap):
            return snap


def run_ingest(workdir: Path, url: str, scale: ClusterScale, count: int) -> dict[str, Any]:
    cluster = start_cluster(workdir, url, count, scale.lease)
    sim, path = start_sim(workdir, f"ingest-{count}", _sim_args(
        cluster.port, scale.ingest_dtus, 3_000_000, scale.ingest_dtus / scale.rate))
    try:
        reader = ReportReader(path)
        ready = _until(reader, sim, lambda s: s["logged_in"] >= scale.ingest_dtus)
        first = _until(reader, sim, lambda s: s["elapsed"] >= ready["elapsed"] + scale.warmup)
        cpu_a = [cpu_seconds(node.pid) for node in cluster.nodes]
        last = _until(reader, sim, lambda s: s["elapsed"] >= first["elapsed"] + scale.measure)
        cpu_b = [cpu_seconds(node.pid) for node in cluster.nodes]
    finally:
        sim.stop()
        cluster.stop()
    seconds = last["elapsed"] - first["elapsed"]
    acked = last["counts"].get("acked", 0) - first["counts"].get("acked", 0)
    latency = histogram_difference(last["latency"], first["latency"])
    cpu = [b - a for a, b in zip(cpu_a, cpu_b, strict=True)]
    return {
        "nodes": count, "offered": scale.rate, "uploads_per_s": acked / seconds,
        "p50": percentile(latency, 0.5), "p99": percentile(latency, 0.99),
        "cpu_per_node": [c / seconds for c in cpu],
        "cpu_us_per_upload": [1e6 * c / max(acked, 1) for c in cpu],
    }


def run_hold(workdir: Path, url: str, scale: ClusterScale) -> dict[str, Any]:
    """As many DTUs as asked, or as HAProxy can carry on this machine's descriptor limit."""
    count = min(scale.hold, balancer_connections() - 100)
    cluster = start_cluster(workdir, url, 3, scale.lease)
    sim, path = start_sim(workdir, "hold", _sim_args(cluster.port, count, 4_000_000, 100_000.0))
    try:
        reader = ReportReader(path)
        logged_in = _until(reader, sim, lambda s: s["logged_in"] >= count)
        deadline = time.monotonic() + PATIENCE
        while True:  # the logins' database work is asynchronous: wait until it shows
            nodes = cluster.api.get("/api/status")["nodes"]
            if sum(n["dtus_online"] for n in nodes) >= count or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        sim.stop()
        cluster.stop()
    return {"dtus": count, "asked": scale.hold, "login_time": logged_in["elapsed"],
            "per_node": {n["id"]: n["dtus_online"] for n in nodes}}


def run_failover(workdir: Path, url: str, scale: ClusterScale) -> dict[str, Any]:
    """3 nodes under load; one killed (SIGKILL): how long until its DTUs are back, and what was lost."""
    cluster = start_cluster(workdir, url, 3, scale.lease)
    sim, path = start_sim(workdir, "failover", _sim_args(
        cluster.port, scale.failover_dtus, 5_000_000, scale.failover_dtus / scale.failover_rate))
    try:
        reader = ReportReader(path)
        ready = _until(reader, sim, lambda s: s["logged_in"] >= scale.failover_dtus)
        _until(reader, sim, lambda s: s["elapsed"] >= ready["elapsed"] + scale.warmup)
        victim = cluster.nodes[1]
        held = next(n["dtus_online"] for n in cluster.api.get("/api/status")["nodes"] if n["id"] == "node-2")
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        killed = time.monotonic()
        _until(reader, sim, lambda s: s["logged_in"] < scale.failover_dtus)
        back = _until(reader, sim, lambda s: s["logged_in"] >= scale.failover_dtus)
        back_after = time.monotonic() - killed
        deadline = time.monotonic() + PATIENCE
        while True:
            dead = next(n for n in cluster.api.get("/api/status")["nodes"] if n["id"] == "node-2")
            if not dead["alive"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        dead_after = time.monotonic() - killed
        _until(reader, sim, lambda s: s["elapsed"] >= back["elapsed"] + scale.warmup)
    finally:
        sim.stop()
        final = reader.poll() or reader.latest or {}
        for node in cluster.nodes:
            node.stop()  # each stores what it acknowledged before it ends
        cluster.balancer.stop()
    acked = int(final.get("counts", {}).get("acked", 0))
    stored = stored_uploads(url)
    return {"dtus": scale.failover_dtus, "rate": scale.failover_rate, "lease": scale.lease, "killed_held": held,
            "back_after": back_after, "dead_after": dead_after, "acked": acked, "stored": stored,
            "lost": max(0, acked - stored)}


def run_cluster(workroot: Path, url: str, scale: ClusterScale, log: Any) -> dict[str, Any]:
    if shutil.which("haproxy") is None:
        raise RuntimeError("the cluster scenario needs haproxy (apt-get install haproxy)")
    results: dict[str, Any] = {"ingest": [], "hold": None, "failover": None}
    for count in scale.nodes:
        workdir = workroot / f"cluster-ingest-{count}"
        workdir.mkdir()
        row = run_ingest(workdir, url, scale, count)
        log(f"  {count} node(s): {row['uploads_per_s']:.0f} uploads/s acked of {scale.rate} offered, "
            f"p99 {_ms(row['p99'])}")
        results["ingest"].append(row)
    workdir = workroot / "cluster-hold"
    workdir.mkdir()
    results["hold"] = run_hold(workdir, url, scale)
    log(f"  hold: {results['hold']}")
    workdir = workroot / "cluster-failover"
    workdir.mkdir()
    results["failover"] = run_failover(workdir, url, scale)
    log(f"  failover: {results['failover']}")
    return results


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def render(cluster: dict[str, Any], machine: dict[str, Any]) -> list[str]:
    lines = [
        HEADING, "",
        (f"`python -m benchmarks.run --only cluster --postgres URL --merge`, on {machine.get('cores', '?')} cores "
         "shared by the nodes, PostgreSQL, HAProxy and the simulator: the numbers say how the cluster behaves, "
         "not what separate machines would give."), "",
        "| nodes | offered/s | acked uploads/s | ack p50 | ack p99 | CPU per node | CPU µs per upload, per node |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in cluster["ingest"]:
        cpu = ", ".join(f"{c:.0%}" for c in row["cpu_per_node"])
        per = ", ".join(f"{u:.0f}" for u in row["cpu_us_per_upload"])
        lines.append(f"| {row['nodes']} | {row['offered']} | {row['uploads_per_s']:.0f} | {_ms(row['p50'])} "
                     f"| {_ms(row['p99'])} | {cpu} | {per} |")
    hold = cluster["hold"]
    if hold:
        spread = ", ".join(f"{node} {count:,}" for node, count in sorted(hold["per_node"].items()))
        capped = (f" (not {hold['asked']:,}: HAProxy takes two descriptors a connection, and the "
                  f"descriptor limit here carries no more)" if hold["dtus"] < hold["asked"] else "")
        lines += ["", (f"Hold: {hold['dtus']:,} DTUs{capped} through HAProxy logged in within "
                       f"{hold['login_time']:.1f}s, spread {spread}.")]
    failover = cluster["failover"]
    if failover:
        lines += ["", (
            f"Failover: {failover['dtus']:,} DTUs uploading {failover['rate']:,}/s over 3 nodes, lease "
            f"{failover['lease']:g}s; node-2 (holding {failover['killed_held']:,} DTUs) killed with SIGKILL. "
            f"All DTUs logged in again after {failover['back_after']:.1f}s; the others saw node-2 dead after "
            f"{failover['dead_after']:.1f}s. Acknowledged uploads {failover['acked']:,}, stored "
            f"{failover['stored']:,}: lost {failover['lost']}."
        )]
    return lines


if __name__ == "__main__":
    sys.exit("run it through python -m benchmarks.run --only cluster --postgres URL")
