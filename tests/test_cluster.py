"""Three real ``twistd dtucenter`` nodes on one PostgreSQL database, behind a real HAProxy.

Every node is its own process (its own process group, ended pass or fail);
the DTUs reach them through HAProxy (TCP mode, round robin, health checks),
as in docs/deployment.md "Several nodes". What the tests look at comes
through the nodes' APIs, as an operator would see it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from sqlalchemy import create_engine, text
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from dtucenter.dtu import wire
from tests.conftest import POSTGRES_URL
from tests.support import ApiClient, DTUClient, end_process_group, eventually, start_process

pytestmark = [
    pytest.mark.skipif(
        not POSTGRES_URL, reason="a cluster shares a PostgreSQL database: set DTUCENTER_TEST_POSTGRES to run it"
    ),
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="the nodes are behind HAProxy: install haproxy"),
]

#: Seconds: short, so that a killed node's lease lapses quickly in the tests.
LEASE = 3
#: Generous bounds for what a lease or two, a reconnect and a busy machine take.
WAIT = 60.0
NODES = ("node-a", "node-b", "node-c")
COMMAND_TIMEOUT = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DialledDevice(Factory):
    """What a ``connect`` link dials: counts the connections open to it, and says nothing."""

    def __init__(self) -> None:
        self.open = 0
        self.accepted = 0

    def buildProtocol(self, addr: Any) -> Protocol:
        device = self

        class Connection(Protocol):
            def connectionMade(self) -> None:
                device.open += 1
                device.accepted += 1

            def connectionLost(self, reason: Failure | None = None) -> None:
                device.open -= 1

        return Connection()


@attrs.define
class Node:
    name: str
    dtu_port: int
    api_port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def api(self, token: str) -> ApiClient:
        return ApiClient(f"http://127.0.0.1:{self.api_port}", token)


@attrs.define
class Cluster:
    nodes: dict[str, Node]
    balancer_port: int
    token: str
    device: DialledDevice

    def api(self, node: str) -> ApiClient:
        return self.nodes[node].api(self.token)

    def kill(self, node: str) -> None:
        process = self.nodes[node].process
        assert process is not None
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    async def dtu(self, psn: int, port: int | None = None) -> DTUClient:
        """A DTU logged in through the balancer (or straight to a node's ``port``)."""
        client = DTUClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port or self.balancer_port), client)
        ack = await client.login(psn)
        assert ack.right == wire.LOGIN_ACCEPTED
        return client

    async def holder(self, psn: int, via: str | None = None) -> str | None:
        """The node holding DTU ``psn``, as the API of ``via`` (any live node) says."""
        body = (await self.api(via or self.live()[0]).get(f"/api/dtus/{psn}")).body
        return body["node"] if body["online"] else None

    def live(self) -> list[str]:
        return [name for name, node in self.nodes.items() if node.process is not None and node.process.poll() is None]

    async def status(self, via: str) -> dict[str, Any]:
        response = await self.api(via).get("/api/status")
        assert response.status == 200, response.body
        return response.body  # type: ignore[no-any-return]


def haproxy_config(port: int, nodes: list[Node]) -> str:
    servers = "\n".join(
        f"  server {node.name} 127.0.0.1:{node.dtu_port} check inter 300ms fall 2 rise 1" for node in nodes
    )
    return f"""global
  maxconn 2000
defaults
  mode tcp
  timeout connect 2s
  timeout client 120s
  timeout server 120s
frontend dtus
  bind 127.0.0.1:{port}
  default_backend centers
backend centers
  balance roundrobin
{servers}
"""


def empty_database() -> None:
    assert POSTGRES_URL is not None
    engine = create_engine(POSTGRES_URL)
    with engine.begin() as connection:
        tables = connection.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars()
        for table in list(tables):
            connection.exec_driver_sql(f'DROP TABLE IF EXISTS "{table}" CASCADE')
    engine.dispose()


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            end_process_group(process)


@pytest_twisted.async_yield_fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """Three nodes started at the same moment on an empty database, HAProxy in front; up once all answer."""
    empty_database()
    device = DialledDevice()
    device_port = reactor.listenTCP(0, device, interface="127.0.0.1")  # type: ignore[attr-defined]
    config = tmp_path / "center.toml"
    config.write_text(
        f'[[link]]\nname = "plant"\nconnect = "tcp:127.0.0.1:{device_port.getHost().port}"\n'
        'timeout = 0.5\nretries = 0\n'
        '[[meter]]\nname = "m1"\nlink = "plant"\nunit = 1\ninterval = 3600\n'
        '[[meter.point]]\nname = "v"\ntable = "holding"\naddress = 0\n'
    )
    token = secrets.token_urlsafe()
    nodes = {name: Node(name, free_port(), free_port(), tmp_path / f"{name}.log") for name in NODES}
    balancer_port = free_port()
    (tmp_path / "haproxy.cfg").write_text(haproxy_config(balancer_port, list(nodes.values())))
    twistd = str(Path(sys.executable).parent / "twistd")
    with processes() as started:
        for node in nodes.values():
            node.process = start_process(
                [twistd, "-n", "--pidfile=", f"--logfile={node.log}", "dtucenter", "--config", str(config),
                 "--db", POSTGRES_URL or "", "--node-id", node.name, "--node-lease", str(LEASE),
                 "--dtu", f"tcp:{node.dtu_port}:interface=127.0.0.1",
                 "--api", f"tcp:{node.api_port}:interface=127.0.0.1", "--api-token", token,
                 "--unknown-dtu", "accept", "--command-timeout", str(COMMAND_TIMEOUT)],
                cwd=tmp_path,
            )
            started.append(node.process)
        balancer_log = tmp_path / "haproxy.log"
        with balancer_log.open("wb") as output:
            haproxy = start_process(
                ["haproxy", "-db", "-f", str(tmp_path / "haproxy.cfg")], cwd=tmp_path, stdout=output, stderr=output
            )
        started.append(haproxy)
        result = Cluster(nodes, balancer_port, token, device)

        async def all_up() -> bool:
            for name, node in nodes.items():
                assert node.process is not None and node.process.poll() is None, (
                    f"{name} exited: {node.log.read_text()[-3000:] if node.log.exists() else ''}"
                )
                try:
                    response = await result.api(name).get("/api/status")
                except Exception:
                    return False
                if response.status != 200 or sum(n["alive"] for n in response.body["nodes"]) != len(nodes):
                    return False
            return True

        try:
            await eventually(all_up, "three nodes up", timeout=WAIT)

            async def balanced() -> bool:  # HAProxy sends to a node once its health check passed
                said = balancer_log.read_text(errors="replace")
                return all(f"centers/{name} is UP" in said for name in NODES)

            await eventually(balanced, "HAProxy sending to every node", timeout=WAIT)
            yield result
        finally:
            await device_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_nodes_started_together_on_an_empty_database_all_come_up_and_any_reads_a_meter(
    cluster: Cluster,
) -> None:
    for name in NODES:
        status = await cluster.status(name)
        assert status["node"] == name
        assert [n["id"] for n in status["nodes"]] == list(NODES)
        assert all(n["alive"] and n["url"] == f"http://127.0.0.1:{cluster.nodes[n['id']].api_port}"
                   for n in status["nodes"])
    # A meter is read by the node running its link, whichever node is asked: the dialled device
    # never answers, so each read times out there (504), where a node without the link would say
    # the link is offline (409); and each is in the meter's one trail.
    await eventually(lambda: defer.succeed(cluster.device.open == 1), "the link dialled", timeout=WAIT)
    for name in NODES:
        response = await cluster.api(name).post("/api/meters/m1/read", {})
        assert response.status == 504, (name, response.body)
    reads = (await cluster.api("node-a").get("/api/meters/m1/reads")).body["reads"]
    assert [r["outcome"] for r in reads] == ["timeout"] * len(NODES)


@pytest_twisted.ensureDeferred
async def test_logins_spread_the_newest_wins_across_nodes_and_commands_reach_any_node(cluster: Cluster) -> None:
    dtus = {psn: await cluster.dtu(psn) for psn in range(101, 107)}
    holders = {psn: await cluster.holder(psn) for psn in dtus}
    assert sorted(holders.values()) == sorted(NODES * 2), "round robin: two DTUs on each node"
    counts = {n["id"]: n["dtus_online"] for n in (await cluster.status("node-a"))["nodes"]}
    assert counts == dict.fromkeys(NODES, 2)

    # The newest login wins: DTU 101 logs in again straight at another node; its older connection goes.
    first = holders[101]
    other = next(name for name in NODES if name != first)
    newer = await cluster.dtu(101, cluster.nodes[other].dtu_port)
    await dtus[101].closed()
    assert await cluster.holder(101) == other
    dtus[101] = newer
    assert (await cluster.api(first).get("/api/dtus/101")).body["node"] == other

    # A command asked of one node reaches a DTU held by another, and its answer comes back.
    psn = next(p for p, holder in holders.items() if p != 101 and holder != "node-a")
    api = cluster.api("node-a")
    pending = defer.ensureDeferred(api.post(f"/api/dtus/{psn}/read", {"registers": [{"dev": 1, "addr": 7}]}))
    assert await dtus[psn].next(wire.ReadTest) == wire.ReadTest((wire.Register(1, 7),))
    dtus[psn].send(wire.ReadTestAck(1, (1234,)))
    response = await pending
    assert (response.status, response.body) == (200, {"values": [1234]})
    # ... with the same error codes: a DTU that does not answer is a 504 after the command timeout.
    pending = defer.ensureDeferred(api.post(f"/api/dtus/{psn}/read", {"registers": [{"dev": 1, "addr": 8}]}))
    await dtus[psn].next(wire.ReadTest)
    response = await pending
    assert response.status == 504 and "ReadTestAck" in response.error
    # ... and in the same audit trail, whichever node is asked.
    for via in NODES:
        records = (await cluster.api(via).get(f"/api/dtus/{psn}/commands")).body["commands"]
        assert [(r["kind"], r["outcome"]) for r in records][:2] == [("read_test", "timeout"), ("read_test", "ok")]
    for client in dtus.values():
        client.close()


@attrs.define
class UploadingDtu:
    """A DTU that uploads without pause, reconnecting through the balancer whenever its connection goes;
    it remembers the values of each upload the center acknowledged."""

    psn: int
    cluster: Cluster
    acknowledged: list[tuple[int, int]] = attrs.Factory(list)
    logins: int = 0
    running: bool = True

    async def run(self) -> None:
        sequence = 0
        while self.running:
            try:
                client = await self.cluster.dtu(self.psn)
            except Exception:
                await deferred_sleep(0.2)
                continue
            self.logins += 1
            try:
                while self.running:
                    sequence += 1
                    values = (self.psn % 30000, sequence % 30000)
                    client.send(wire.SendTest(0, sequence & 0xFF, values))
                    ack = await client.next(wire.SendTestAck)
                    if ack.test_code == sequence & 0xFF:
                        self.acknowledged.append(values)
                    await deferred_sleep(0.05)
                client.close()
            except Exception:
                client.close()  # cut off (its node was killed): log in again through the balancer


def deferred_sleep(seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_killed_nodes_link_moves_and_its_dtus_come_back_with_no_acknowledged_upload_lost(
    cluster: Cluster,
) -> None:
    async def link_holder() -> str | None:
        for node in (await cluster.status(cluster.live()[0]))["nodes"]:
            if node["alive"] and "plant" in node["links"]:
                return str(node["id"])
        return None

    owner = await eventually(link_holder, "a node holding the link", timeout=WAIT)
    await eventually(lambda: defer.succeed(cluster.device.open == 1), "the link dialled", timeout=WAIT)
    for node in NODES:  # each node has started its links (or not) by the time its API answers
        status = await cluster.status(node)
        assert status["modbus"]["links_online"] == (node == owner)
    assert cluster.device.accepted == 1, "dialled by one node only"
    dtus = [UploadingDtu(psn, cluster) for psn in range(201, 210)]
    running = [defer.ensureDeferred(dtu.run()) for dtu in dtus]
    try:
        async def all_uploading() -> bool:
            return all(len(dtu.acknowledged) >= 3 for dtu in dtus)

        await eventually(all_uploading, "every DTU uploading", timeout=WAIT)
        victims = [dtu for dtu in dtus if await cluster.holder(dtu.psn) == owner]
        assert victims, "round robin put some DTUs on the link's node"
        cluster.kill(owner)

        async def link_moved() -> bool:
            holder = await link_holder()
            return holder is not None and holder != owner and cluster.device.open == 1

        await eventually(link_moved, "the link taken over by a live node", timeout=WAIT)
        assert cluster.device.accepted == 2

        async def all_back() -> bool:
            holders = [await cluster.holder(dtu.psn) for dtu in dtus]
            return all(holder in cluster.live() for holder in holders) and all(
                dtu.logins >= 2 and len(dtu.acknowledged) >= 3 for dtu in victims
            )

        await eventually(all_back, "the killed node's DTUs back on the others", timeout=WAIT)
        status = await cluster.status(cluster.live()[0])
        dead = next(node for node in status["nodes"] if node["id"] == owner)
        assert not dead["alive"] and dead["dtus_online"] == 0
    finally:
        for dtu in dtus:
            dtu.running = False
        await defer.DeferredList(running)
    api = cluster.api(cluster.live()[0])
    for dtu in dtus:
        body = (await api.get(f"/api/dtus/{dtu.psn}/samples?limit=100000")).body
        assert not body["more"]
        by_time: dict[str, dict[int, int]] = {}
        for sample in body["samples"]:
            by_time.setdefault(sample["time"], {})[sample["position"]] = sample["value"]
        stored = {(values[0], values[1]) for values in by_time.values()}
        lost = [values for values in dtu.acknowledged if values not in stored]
        assert not lost, f"DTU {dtu.psn}: {len(lost)} of {len(dtu.acknowledged)} acknowledged uploads not stored"
