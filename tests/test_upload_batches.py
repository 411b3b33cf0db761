"""The uploads of one read as one batch: one commit, acknowledged together and in order after it.

Sans-IO like tests/test_session.py (StringTransport, task.Clock, the held store): a read is
fed whole where the batch is the point, and byte by byte where it must make no difference.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from dtucenter.dtu import wire
from dtucenter.dtu.center import upload_row
from dtucenter.dtu.session import DTUProtocol
from dtucenter.events import Event, EventHub, UploadStored
from dtucenter.store.db import open_engine
from dtucenter.store.facade import COMMIT_INTERVAL, Store
from tests.support import until
from tests.test_session import Harness


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.store.engine.dispose()


def read(protocol: DTUProtocol, *messages: wire.Message) -> None:
    """The messages arrive in one read, as a DTU's frames sent back to back usually do."""
    protocol.dataReceived(b"".join(wire.encode_frame(m) for m in messages))


def test_the_uploads_of_one_read_are_one_commit_acknowledged_in_order_after_it(h: Harness) -> None:
    protocol, transport = h.logged_in()
    h.store.hold = True
    read(protocol, wire.SendTest(20, 1, (1,)), wire.SendTest(20, 2, (2, 3)), wire.SendTest(20, 3, (4,)))
    assert transport.value() == b""
    assert len(h.store.held) == 1, "one add to the store for the read, not one per upload"
    h.store.release()
    assert h.replies(transport) == [wire.SendTestAck(1), wire.SendTestAck(2), wire.SendTestAck(3)]
    assert h.store.samples(1) == [1, 2, 3, 4]
    assert h.center.stats["uploads_stored"] == 3
    assert h.center.stats["samples_stored"] == 4
    assert h.center.ack_latency.count == 3
    h.lose(protocol)
    assert h.clock.getDelayedCalls() == []


def test_the_same_uploads_byte_by_byte_are_acknowledged_and_stored_alike(h: Harness) -> None:
    protocol, transport = h.logged_in()
    h.store.hold = True
    h.feed(protocol, wire.SendTest(20, 1, (1,)), wire.SendTest(20, 2, (2, 3)), wire.SendTest(20, 3, (4,)))
    assert transport.value() == b""
    h.store.release()
    assert h.replies(transport) == [wire.SendTestAck(1), wire.SendTestAck(2), wire.SendTestAck(3)]
    assert h.store.samples(1) == [1, 2, 3, 4]
    h.lose(protocol)


def test_a_tick_between_uploads_of_one_read_is_answered_in_its_place(h: Harness) -> None:
    protocol, transport = h.logged_in()
    h.store.hold = True
    read(protocol, wire.SendTest(20, 1, (1,)), wire.SendTick(), wire.SendTest(20, 2, (2,)))
    assert transport.value() == b""  # the tick waits behind the first upload's commit
    h.store.release()
    assert h.replies(transport) == [wire.SendTestAck(1), wire.SendTickAck(), wire.SendTestAck(2)]
    assert h.store.samples(1) == [1, 2]
    h.lose(protocol)


def test_a_retransmission_inside_one_read_is_stored_once_and_acknowledged_in_its_place(h: Harness) -> None:
    protocol, transport = h.logged_in()
    h.store.hold = True
    read(protocol, wire.SendTest(20, 1, (5,)), wire.SendTest(20, 1, (5,)), wire.SendTest(20, 2, (6,)))
    h.store.release()
    assert h.replies(transport) == [wire.SendTestAck(1), wire.SendTestAck(1), wire.SendTestAck(2)]
    assert h.store.samples(1) == [5, 6]
    assert h.center.stats["uploads_repeated"] == 1
    # Sent again later, once committed: answered at once, not stored again.
    read(protocol, wire.SendTest(20, 2, (6,)))
    assert h.replies(transport) == [wire.SendTestAck(2)]
    assert h.store.samples(1) == [5, 6]
    h.lose(protocol)


@pytest.mark.expected_errors("Upload 1 of DTU 1 could not be stored (2 of this read)")
def test_a_batch_that_failed_is_not_acknowledged_and_is_stored_when_resent(h: Harness) -> None:
    uploads = (wire.SendTest(20, 1, (1,)), wire.SendTest(20, 2, (2,)))
    # The first connection's commit fails: nothing acknowledged, the connection dropped; the DTU sends the
    # same uploads on its next connection, and they are stored then, not taken for repeats.
    for commit, acks in ((h.store.fail, []), (h.store.release, [wire.SendTestAck(1), wire.SendTestAck(2)])):
        h.store.hold = False
        protocol, transport = h.logged_in()
        h.store.hold = True
        read(protocol, *uploads)
        commit()
        assert h.replies(transport) == acks
        assert transport.disconnecting is not bool(acks)
        h.lose(protocol)
    assert h.store.samples(1) == [1, 2]


def test_a_read_that_repeats_an_upload_in_flight_on_another_connection_waits_for_that_commit(h: Harness) -> None:
    old, _old_transport = h.logged_in()
    h.store.hold = True
    read(old, wire.SendTest(20, 8, (4, 5)))
    # The DTU gave up on the old link, dialled again and resends that frame, twice, and then the next one.
    h.store.hold = False
    new, new_transport = h.connect()
    h.feed(new, wire.Login(1, 7))
    h.replies(new_transport)
    h.store.hold = True
    read(new, wire.SendTest(20, 8, (4, 5)), wire.SendTest(20, 8, (4, 5)), wire.SendTest(20, 9, (6,)))
    # The repeats wait for the old link's commit, and 9 behind them: nothing new went to the store yet.
    assert len(h.store.held) == 1
    assert new_transport.value() == b""
    h.store.release()
    assert h.replies(new_transport) == [wire.SendTestAck(8), wire.SendTestAck(8), wire.SendTestAck(9)]
    assert h.store.samples(1) == [4, 5, 6]
    assert h.center.stats["uploads_repeated"] == 2
    assert h.center.stats["frames_in"] == 2 + 4  # the two logins, and each upload once
    h.lose(old)
    h.lose(new)
    assert h.clock.getDelayedCalls() == []


def test_uploads_of_a_dtu_with_a_register_list_are_refused_or_stored_one_by_one_in_one_batch(h: Harness) -> None:
    protocol, transport = h.logged_in()
    h.store.add_dtu(1, password=7)
    protocol.session.registers = (wire.Register(1, 10), wire.Register(1, 11))
    h.store.hold = True
    read(protocol, wire.SendTest(20, 1, (1, 2)), wire.SendTest(20, 2, (3,)), wire.SendTest(20, 3, (4, 5)))
    h.store.release()
    # The one with the wrong count is refused (TestCode - 1 asks the DTU to resend), in its place.
    assert h.replies(transport) == [wire.SendTestAck(1), wire.SendTestAck(1), wire.SendTestAck(3)]
    assert h.store.samples(1) == [1, 2, 4, 5]
    assert h.center.stats["uploads_mismatched"] == 1
    h.lose(protocol)


def test_listeners_hear_each_upload_of_a_batch_after_its_commit(h: Harness) -> None:
    heard: list[Event] = []
    hub = EventHub()
    h.center.events = hub
    unsubscribe = hub.subscribe(heard.append)
    protocol, _ = h.logged_in()
    h.clock.advance(2.5)
    h.store.hold = True
    read(protocol, wire.SendTest(20, 1, (1,)), wire.SendTest(20, 2, (2, 3)))
    assert [e for e in heard if isinstance(e, UploadStored)] == []
    h.store.release()
    when = dt.datetime.fromtimestamp(2.5, dt.UTC)
    assert [e for e in heard if isinstance(e, UploadStored)] == [
        UploadStored(1, when, (1,)), UploadStored(1, when, (2, 3))]
    unsubscribe()
    h.lose(protocol)


# -- the store: one callback per writer, told in order ---------------------------------------


def _rows(psn: int, n: int) -> list[Any]:
    now = dt.datetime.now(dt.UTC)
    return [upload_row(psn, now, wire.SendTest(1, i, (i,)), ()) for i in range(n)]


@pytest.mark.expected_errors("A writer of rows failed on hearing how they ended")
@pytest_twisted.ensureDeferred
async def test_the_store_tells_each_writer_of_a_commit_in_order_even_after_one_raises(tmp_path: Path) -> None:
    store = Store(open_engine(f"sqlite:///{tmp_path / 'store.db'}"), reactor)
    store.startService()
    told: list[tuple[int, Failure | None]] = []
    try:
        def writer(psn: int) -> Any:
            def settle(failure: Failure | None) -> None:
                told.append((psn, failure))
                if psn == 2:
                    raise RuntimeError("a broken writer")
            return settle

        for psn in range(1, 5):
            store.add_samples_then(_rows(psn, 3), writer(psn))
        await store.when_idle()
        assert told == [(1, None), (2, None), (3, None), (4, None)]
        # The store goes on: the next rows are committed and told too.
        done: defer.Deferred[None] = defer.Deferred()
        store.add_samples_then(_rows(5, 1), done.callback)
        assert await done is None
        assert store.stats.rows_committed == 13
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_rows_that_come_while_the_store_commits_wait_out_the_commit_interval_but_a_job_does_not(
    tmp_path: Path,
) -> None:
    clock = Clock()
    store = Store(open_engine(f"sqlite:///{tmp_path / 'store.db'}"), reactor, clock)
    store.startService()
    told: list[int] = []

    def then(psn: int, more: int | None = None) -> Any:
        def settle(failure: Failure | None) -> None:
            told.append(psn)
            if more is not None:  # rows that came while this commit ran
                store.add_samples_then(_rows(more, 1), then(more))
        return settle

    try:
        store.add_samples_then(_rows(1, 1), then(1, more=2))
        await until(lambda: told == [1])
        # A commit costs the same for one row as for hundreds: the next waits for COMMIT_INTERVAL.
        assert store.stats.commits == 1 and len(clock.getDelayedCalls()) == 1
        clock.advance(COMMIT_INTERVAL)
        await until(lambda: told == [1, 2])
        assert store.stats.commits == 2
        store.add_samples_then(_rows(3, 1), then(3, more=4))
        await until(lambda: told == [1, 2, 3])
        assert len(clock.getDelayedCalls()) == 1
        # A login (a job) does not wait: it starts the commit at once, and the waiting rows go with it.
        await store.write(lambda session: None)
        await until(lambda: told == [1, 2, 3, 4])
        assert store.stats.commits == 4  # the job and row 4 in one
        assert clock.getDelayedCalls() == []
    finally:
        await store.stopService()
