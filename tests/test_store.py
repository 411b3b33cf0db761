"""The store façade on real threads and a real SQLite file, with a real lock as the fault."""

from __future__ import annotations

import datetime as dt
import socket
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from sqlalchemy import create_engine, func, make_url, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool
from twisted.internet import defer, protocol, reactor
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from dtucenter.dtu import wire
from dtucenter.dtu.center import upload_row
from dtucenter.store import queries
from dtucenter.store.db import open_engine
from dtucenter.store.facade import RETRY_MAX, Store
from dtucenter.store.models import MeterSample, Sample
from tests.support import until


def rows(psn: int, n: int) -> list[queries.SampleRow]:
    """``n`` uploads of one value each: ``n`` rows of the samples table."""
    now = dt.datetime.now(dt.UTC)
    return [upload_row(psn, now, wire.SendTest(1, i, (i,)), ()) for i in range(n)]


def count(store: Store) -> int:
    with Session(store.engine) as session:
        return session.scalar(select(func.count()).select_from(Sample)) or 0


def make_store(url: str, **kwargs: Any) -> Store:
    store = Store(open_engine(url, **kwargs), reactor)
    store.startService()
    return store


@pytest_twisted.ensureDeferred
async def test_uploads_from_many_dtus_share_few_transactions(db_url: str) -> None:
    store = make_store(db_url)
    try:
        await defer.gatherResults([store.add_samples(rows(psn, 8)) for psn in range(500)])
        assert count(store) == 4000
        # The first upload commits alone; everything that queued meanwhile goes together.
        assert store.stats.commits <= 3
    finally:
        await store.stopService()


@pytest.mark.expected_errors("database is locked")
@pytest_twisted.ensureDeferred
async def test_locked_database_delays_but_never_loses_or_fakes_a_commit(tmp_path: Path) -> None:
    store = make_store(f"sqlite:///{tmp_path / 's.db'}", sqlite_busy_timeout=0.05)
    blocker = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        stored = store.add_samples(rows(1, 3))
        await until(lambda: store.stats.failures >= 1)
        assert not stored.called and not store.healthy
        assert store.stats.retries == 0 and store.commit_durations.count == 0  # nothing committed, nothing re-sent
        blocker.execute("COMMIT")
        await stored
        assert store.healthy and count(store) == 3
        # Sent again once a probe answered; the commit that took it is timed, the failed attempts are not.
        assert store.stats.retries >= 1 and store.commit_durations.count == store.stats.commits
    finally:
        blocker.close()
        await store.stopService()


@pytest.mark.expected_errors("will not be retried", error=ValueError)
@pytest_twisted.ensureDeferred
async def test_a_failing_job_fails_alone(db_url: str) -> None:
    store = make_store(db_url)

    def broken(session: Session) -> None:
        raise ValueError("bad job")

    try:
        blocker = store.write(lambda s: None)  # occupies the writer so the next three share a batch
        bad = store.write(broken)
        good = store.write(lambda s: "fine")
        samples = store.add_samples(rows(2, 2))
        await blocker
        assert await good == "fine"
        await samples
        try:
            await bad
        except ValueError as e:
            assert str(e) == "bad job"
        else:
            raise AssertionError("the broken job succeeded")
        assert count(store) == 2
    finally:
        await store.stopService()


class _Deadlock(Exception):
    pgcode = "40P01"  # what psycopg2 says of PostgreSQL's "deadlock detected"


@pytest_twisted.ensureDeferred
async def test_a_batch_that_crossed_another_writer_is_retried_one_job_a_transaction(db_url: str) -> None:
    store = make_store(db_url)
    transactions: list[list[str]] = []
    crossed = [False]

    def job(name: str) -> Any:
        def run(session: Session) -> str:
            jobs = session.info.get("jobs")
            if jobs is None:  # the first job of this transaction
                jobs = session.info["jobs"] = []
                transactions.append(jobs)
            jobs.append(name)
            if name == "b" and not crossed[0]:
                crossed[0] = True
                raise OperationalError("UPDATE dtus ...", {}, _Deadlock("deadlock detected"))
            return name

        return run

    try:
        blocker = store.write(lambda s: None)  # occupies the writer so the next three share a batch
        done = [store.write(job(name)) for name in "abc"]
        await blocker
        assert [await d for d in done] == ["a", "b", "c"]
        assert transactions == [["a", "b"], ["a"], ["b"], ["c"]]
        assert store.healthy
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_stop_waits_for_pending_writes(db_url: str) -> None:
    store = make_store(db_url)
    pending = store.add_samples(rows(3, 5))
    await store.stopService()
    assert pending.called
    engine = open_engine(db_url)
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Sample)) == 5
    engine.dispose()


@pytest.mark.expected_errors("database is locked")
@pytest.mark.expected_errors("Stopping with the database unwritable")
@pytest_twisted.ensureDeferred
async def test_stop_gives_up_on_a_dead_database_without_acknowledging(tmp_path: Path) -> None:
    store = make_store(f"sqlite:///{tmp_path / 's.db'}", sqlite_busy_timeout=0.05)
    store.shutdown_grace = 0.3
    blocker = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        pending = store.add_samples(rows(4, 2))
        pending.addErrback(lambda f: f.trap(ConnectionError) and "not stored")
        await until(lambda: store.stats.failures >= 1)
        await store.stopService()
        assert await pending == "not stored"
    finally:
        blocker.close()


@pytest_twisted.ensureDeferred
async def test_rows_of_several_tables_share_one_transaction(db_url: str) -> None:
    store = make_store(db_url)
    try:
        blocker = store.write(lambda s: None)  # occupies the writer so that the rest queue up together
        meter_rows = [("m1", "p", rows(0, 1)[0][1], 1.5)]
        waiting = [
            store.add_samples(rows(5, 3)),
            store.add_rows(MeterSample.__table__, meter_rows),
            store.add_samples(rows(6, 2)),
        ]
        await blocker
        commits = store.stats.commits
        await defer.gatherResults(waiting)
        assert store.stats.commits == commits + 1
        assert count(store) == 5
        with Session(store.engine) as session:
            assert session.scalar(select(MeterSample.value)) == 1.5
    finally:
        await store.stopService()


def test_last_seen_of_a_deleted_dtu_does_not_fail_the_others(tmp_path: Path) -> None:
    """A DTU deleted through the API while online must not stall everyone's last-seen times."""
    engine = open_engine(f"sqlite:///{tmp_path / 's.db'}")
    when = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)
    with Session(engine) as session, session.begin():
        queries.upsert_dtu(session, 1, {}, when)
    with Session(engine) as session, session.begin():
        queries.record_last_seen(session, {1: when, 2: when})
    with Session(engine) as session:
        assert queries.get_dtu(session, 1).last_seen == when  # type: ignore[union-attr]
    engine.dispose()


class Outage:
    """An SQLite database that refuses new connections while ``down``, as a stopped server does.

    With ``NullPool`` every attempt opens a new connection, so every attempt meets the outage.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.down = False
        self.attempts = 0

    def connect(self) -> sqlite3.Connection:
        self.attempts += 1
        if self.down:
            raise sqlite3.OperationalError("connection refused")
        return sqlite3.connect(self.path, check_same_thread=False)


@pytest.mark.expected_errors("Database write of 0 jobs and 3 rows failed", error=OperationalError)
@pytest_twisted.ensureDeferred
async def test_writes_resume_within_a_second_of_the_database_returning_after_a_long_outage(tmp_path: Path) -> None:
    open_engine(f"sqlite:///{tmp_path / 's.db'}").dispose()  # the schema
    outage = Outage(tmp_path / "s.db")
    clock = Clock()
    store = Store(create_engine("sqlite://", creator=outage.connect, poolclass=NullPool), reactor, clock)
    store.startService()
    summaries: list[str] = []

    def collect(event: dict[str, Any]) -> None:
        if event.get("log_level") is LogLevel.warn and "still failing" in event.get("log_format", ""):
            summaries.append(formatEvent(event))

    globalLogPublisher.addObserver(collect)
    try:
        outage.down = True
        stored = store.add_samples(rows(5, 3))

        async def advance(seconds: float) -> None:
            clock.advance(seconds)
            # A probe or retry that fired runs on the writer thread: wait until it is rescheduled or done.
            await until(lambda: bool(clock.getDelayedCalls()) or stored.called)

        await until(lambda: bool(clock.getDelayedCalls()))
        while clock.seconds() < 300:  # five minutes down
            await advance(min(c.getTime() for c in clock.getDelayedCalls()) - clock.seconds())
        assert not stored.called and not store.healthy
        attempts_while_down = outage.attempts

        outage.down = False
        back = clock.seconds()
        while not stored.called:
            await advance(0.05)
            assert clock.seconds() - back <= 1.5, "no attempt within 1.5s of the database coming back"
        await stored
        # The batch itself was tried again only once the probe answered.
        assert outage.attempts - attempts_while_down == 2
        assert store.healthy and count(store) == 3
        # A cheap probe at least every RETRY_MAX; one failure logged in full, then a summary a minute.
        assert attempts_while_down >= 300 / RETRY_MAX
        assert 4 <= len(summaries) <= 5 and "connection refused" in summaries[-1]
    finally:
        globalLogPublisher.removeObserver(collect)
        stopped = store.stopService()
        clock.advance(store.shutdown_grace)  # a batch still failing is given up on, as at a real stop
        await until(lambda: stopped.called)
        stopped.addErrback(lambda f: f.trap(ConnectionError))


class CuttableProxy(protocol.Factory):
    """A TCP proxy on loopback to a real database server, which the test cuts and restores: an outage
    of the server as its clients see it, without stopping a server others share."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.links: list[_ProxyLink] = []
        self.listening: Any = None
        self.port = 0

    def buildProtocol(self, addr: Any) -> _ProxyLink:
        link = _ProxyLink(self)
        self.links.append(link)
        return link

    def listen(self) -> None:
        self.listening = reactor.listenTCP(self.port, self, interface="127.0.0.1")
        self.port = self.listening.getHost().port

    async def cut(self) -> None:
        await self.listening.stopListening()
        for link in self.links:
            link.transport.abortConnection()
            if link.server is not None:
                link.server.transport.abortConnection()
        self.links.clear()


class _ProxyLink(protocol.Protocol):
    def __init__(self, proxy: CuttableProxy) -> None:
        self.proxy = proxy
        self.server: _ServerSide | None = None
        self.pending = bytearray()

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        connected = protocol.ClientCreator(reactor, _ServerSide, self).connectTCP(*self.proxy.target)
        connected.addCallback(self._server_ready)
        connected.addErrback(lambda _: self.transport.abortConnection())

    def _server_ready(self, server: _ServerSide) -> None:
        self.server = server
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        assert self.server is not None
        self.server.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.server is not None:
            self.server.transport.loseConnection()


class _ServerSide(protocol.Protocol):
    def __init__(self, client: _ProxyLink) -> None:
        self.client = client

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.client.transport.loseConnection()


@pytest.mark.expected_errors("Database write of 0 jobs and 2 rows failed", error=OperationalError)
@pytest_twisted.ensureDeferred
async def test_postgresql_going_away_and_coming_back_loses_and_repeats_nothing(db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("the outage of a database server; SQLite's is the lock test above")
    open_engine(db_url).dispose()  # the schema
    server = make_url(db_url)
    proxy = CuttableProxy(server.host or "127.0.0.1", server.port or 5432)
    proxy.listen()
    proxied = server.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    store = Store(open_engine(proxied, create=False), reactor)
    store.startService()
    try:
        await store.add_samples(rows(6, 1))  # a pooled connection through the proxy
        await proxy.cut()
        stored = store.add_samples(rows(6, 2))
        await until(lambda: store.stats.failures >= 3)  # the failed commit and probes that met no server
        assert not stored.called and not store.healthy
        proxy.listen()
        await stored
        assert store.healthy
        # Counted past the proxy: a blocking query through it would wait on this very reactor thread.
        direct = open_engine(db_url, create=False)
        with Session(direct) as session:
            assert session.scalar(select(func.count()).select_from(Sample)) == 3
        direct.dispose()
    finally:
        await proxy.cut()
        await store.stopService()


def test_a_postgresql_server_that_never_answers_fails_the_connection_instead_of_hanging() -> None:
    """A server that accepts and then says nothing (a dead backend behind a live port, a
    half-open NAT) must cost the store's thread ``connect_timeout`` seconds, not the kernel's
    minutes: the connection fails, and the store retries."""
    pytest.importorskip("psycopg2")
    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    port = silent.getsockname()[1]
    engine = open_engine(f"postgresql+psycopg2://u:p@127.0.0.1:{port}/db", create=False, connect_timeout=2)
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            engine.connect().close()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    attempt = threading.Thread(target=connect, daemon=True)
    attempt.start()
    attempt.join(120)  # a generous bound: without a connect timeout this would wait for ever
    try:
        assert outcome, "the connection attempt still hangs"
        assert isinstance(outcome[0], OperationalError)
        assert "timeout" in str(outcome[0]).lower()
    finally:
        engine.dispose()
        for sock in (*accepted, silent):
            sock.close()
