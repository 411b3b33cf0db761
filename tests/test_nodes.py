"""The cluster's shared truth in the database (dtucenter/store/nodes.py), on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import pytest_twisted
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from twisted.internet import reactor
from twisted.internet.task import Clock

from dtucenter.cluster import ClusterNode
from dtucenter.dtu.center import DTUCenter
from dtucenter.store import audit, nodes, queries
from dtucenter.store.db import open_engine
from dtucenter.store.dtus import DtuStore
from dtucenter.store.facade import Store
from dtucenter.store.models import CommandRecord, Dtu, Node
from tests.support import STEP_TIMEOUT, run_twistd, start_center, until

T = TypeVar("T")
T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
LEASE = 15.0


def later(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = open_engine(db_url)
    yield engine
    engine.dispose()


def run(engine: Engine, job: Callable[[Session], T]) -> T:
    with Session(engine) as session, session.begin():
        return job(session)


def join(engine: Engine, node: str, now: dt.datetime = T0, host: str = "host-1", pid: int = 1) -> None:
    run(engine, lambda s: nodes.register(s, node, f"http://{node}:8080", host, pid, now, LEASE))


def login(engine: Engine, psn: int, node: str, now: dt.datetime = T0) -> None:
    outcome = run(engine, lambda s: queries.authenticate(
        s, psn, 0, "HDTU", 1, "", "10.0.0.1:5000", now, enroll_unknown=True, node=node
    ))
    assert outcome.accepted


def where(engine: Engine, psn: int) -> tuple[bool, str | None]:
    def read(session: Session) -> tuple[bool, str | None]:
        row = session.get_one(Dtu, psn)
        return row.online, row.node

    return run(engine, read)


def test_a_live_node_id_is_refused_to_another_process_until_its_lease_lapses(engine: Engine) -> None:
    join(engine, "a", host="host-1", pid=1)
    with pytest.raises(nodes.NodeConflict, match=r"node id 'a' is taken by a running node \(host host-1, pid 1"):
        join(engine, "a", later(5), host="host-2", pid=2)
    join(engine, "a", later(LEASE + 1), host="host-2", pid=2)  # lapsed: a crashed node's id is free again
    run(engine, lambda s: nodes.leave(s, "a", later(LEASE + 2)))
    join(engine, "a", later(LEASE + 3), host="host-3", pid=3)  # a clean stop frees it at once


def test_a_crashed_node_restarted_on_its_host_takes_its_id_back_at_once(engine: Engine) -> None:
    join(engine, "a", host="host-1", pid=2**22 + 1)  # above Linux's default pid_max: no such process
    join(engine, "a", later(1), host="host-1", pid=1)


def test_a_node_alone_on_its_database_takes_every_other_node_for_dead_at_once(engine: Engine) -> None:
    join(engine, "earlier-run")
    login(engine, 1, "earlier-run")
    run(engine, lambda s: nodes.register(s, "this-run", None, "host-1", 2, later(1), LEASE, alone=True))
    assert run(engine, lambda s: nodes.mark_left_over_offline(s, "this-run", later(1))) == 1
    listed = run(engine, lambda s: nodes.list_nodes(s, later(1)))
    assert [(n.id, n.alive) for n in listed] == [("this-run", True), ("earlier-run", False)]


def test_a_renewal_keeps_the_lease_and_clears_what_dead_nodes_left(engine: Engine) -> None:
    join(engine, "a")
    join(engine, "b")
    login(engine, 1, "a")
    login(engine, 2, "b")
    pending = run(engine, lambda s: audit.record_command(s, 2, "read_test", {}, "admin/ops", T0))
    renewal = run(engine, lambda s: nodes.renew(s, "a", later(10), LEASE))
    assert renewal == nodes.Renewal(True, 0, ())
    # b never renewed: at T0 + 20 its lease has lapsed, a's (renewed at 10) runs.
    renewal = run(engine, lambda s: nodes.renew(s, "a", later(20), LEASE, "http://a:9"))
    assert renewal == nodes.Renewal(True, 1, ("b",))
    assert (where(engine, 1), where(engine, 2)) == ((True, "a"), (False, None))
    assert run(engine, lambda s: s.get_one(CommandRecord, pending).outcome) == audit.INTERRUPTED
    listed = run(engine, lambda s: nodes.list_nodes(s, later(20)))
    assert [(n.id, n.alive, n.dtus_online, n.url) for n in listed] == [
        ("a", True, 1, "http://a:9"), ("b", False, 0, "http://b:8080")
    ]


def test_a_node_whose_lease_lapsed_is_told_so_and_is_live_again(engine: Engine) -> None:
    join(engine, "a")
    assert not run(engine, lambda s: nodes.renew(s, "a", later(LEASE + 1), LEASE)).held
    assert run(engine, lambda s: nodes.renew(s, "a", later(LEASE + 2), LEASE)).held


def test_a_start_marks_offline_only_its_own_and_dead_nodes_dtus(engine: Engine) -> None:
    join(engine, "a")
    join(engine, "b")
    join(engine, "dead", now=later(-LEASE - 1))
    for psn, node in ((1, "a"), (2, "b"), (3, "dead")):
        login(engine, psn, node)
    assert run(engine, lambda s: nodes.mark_left_over_offline(s, "a", later(1))) == 2
    assert [where(engine, psn) for psn in (1, 2, 3)] == [(False, None), (True, "b"), (False, None)]


def test_a_newer_login_elsewhere_hands_the_dtu_over(engine: Engine) -> None:
    join(engine, "a")
    join(engine, "b")
    login(engine, 1, "a")
    login(engine, 1, "b")
    assert run(engine, lambda s: nodes.take_handovers(s, "b")) == []
    assert run(engine, lambda s: nodes.take_handovers(s, "a")) == [1]
    assert run(engine, lambda s: nodes.take_handovers(s, "a")) == []  # told once
    # a's older connection closing does not take the DTU offline on b.
    run(engine, lambda s: queries.mark_offline(s, 1, later(2), node="a"))
    assert where(engine, 1) == (True, "b")
    # Back on a before a looked: a keeps its (newer) connection, b lets its go.
    login(engine, 1, "a")
    login(engine, 1, "b")
    login(engine, 1, "a")
    assert run(engine, lambda s: nodes.take_handovers(s, "a")) == []
    assert run(engine, lambda s: nodes.take_handovers(s, "b")) == [1]


def test_each_dialled_link_is_held_by_one_live_node(engine: Engine) -> None:
    join(engine, "a")
    join(engine, "b")
    assert run(engine, lambda s: nodes.claim_links(s, "a", ["x", "y"], later(1))) == {"x", "y"}
    assert run(engine, lambda s: nodes.claim_links(s, "b", ["x", "y", "z"], later(1))) == {"z"}
    assert run(engine, lambda s: nodes.claim_links(s, "a", ["x"], later(2))) == {"x"}  # y no longer wanted
    assert run(engine, lambda s: nodes.claim_links(s, "b", ["x", "y", "z"], later(3))) == {"y", "z"}
    # a's lease lapses (b renewed): b takes x over.
    run(engine, lambda s: nodes.renew(s, "b", later(10), LEASE))
    assert run(engine, lambda s: nodes.claim_links(s, "b", ["x", "y", "z"], later(LEASE + 1))) == {"x", "y", "z"}
    listed = run(engine, lambda s: nodes.list_nodes(s, later(LEASE + 1)))
    assert [(n.id, n.links) for n in listed] == [("b", ("x", "y", "z")), ("a", ())]


def test_commands_other_live_nodes_run_are_not_interrupted_by_a_start(engine: Engine) -> None:
    join(engine, "a")
    join(engine, "b")
    login(engine, 1, "b")
    login(engine, 2, "a")

    def pending(session: Session) -> list[int]:
        return [audit.record_command(session, psn, "read_test", {}, "admin/ops", T0) for psn in (1, 2)]

    on_b, on_a = run(engine, pending)
    count = run(engine, lambda s: audit.interrupt_pending(s, later(1), nodes.held_by_other_nodes("a", later(1))))
    assert count == 1
    outcomes = run(engine, lambda s: dict(s.execute(select(CommandRecord.id, CommandRecord.outcome)).all()))
    assert outcomes == {on_b: audit.PENDING, on_a: audit.INTERRUPTED}


@pytest_twisted.ensureDeferred
async def test_the_lease_is_renewed_while_the_writer_is_busy(tmp_path: Path) -> None:
    """Under an ingest backlog the writer's queue is long: a renewal waiting in it would come too
    late, and the other nodes would take a busy node for dead."""
    engine = open_engine(f"sqlite:///{tmp_path / 'c.db'}")
    store = Store(engine, reactor)
    store.startService()
    clock = Clock()
    clock.advance(later(5).timestamp())
    join(engine, "a")
    release = threading.Event()
    busy = store.write(lambda s: release.wait(STEP_TIMEOUT))
    node = ClusterNode("a", store, clock, LEASE, DTUCenter(DtuStore(store, "a"), clock), shared=True)
    try:
        node.startService()

        def renewed() -> bool:
            return run(engine, lambda s: s.get_one(Node, "a").renewed) == later(5)

        await until(renewed)
        assert not busy.called
    finally:
        release.set()
        await busy
        await node.stopService()
        await store.stopService()
        engine.dispose()


@pytest_twisted.ensureDeferred
async def test_a_second_center_on_the_sqlite_file_of_a_running_one_is_refused(tmp_path: Path) -> None:
    first = await start_center(tmp_path)
    try:
        result = run_twistd(
            tmp_path, "--db", first.db_url, "--dtu", "tcp:0:interface=127.0.0.1", "--api", "off"
        )
        said = result.stdout + result.stderr  # twistd's log has started: the line is in it
        assert result.returncode != 0
        assert f"another center runs on {tmp_path / 'center.db'}" in said
        assert "for several nodes use PostgreSQL" in said
    finally:
        await first.stop()
    again = await start_center(tmp_path)  # its lock went with its stop
    await again.stop()
