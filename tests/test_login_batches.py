"""Logins and offline marks reach the store in batches: what arrives while a store call is in flight
goes in the next one, decided in order, each DTU answered on its own.

StringTransport and task.Clock, with the real queries on SQLite through ``HeldStore``, whose
``hold`` keeps a store call in flight until the test releases it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session
from twisted.internet.defer import Deferred, fail

from dtucenter.dtu import wire
from dtucenter.dtu.center import MAX_LOGINS_PER_CALL
from dtucenter.dtu.ports import LoginAttempt
from dtucenter.store import queries
from tests.test_session import Harness

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class Calls:
    """Wraps the center's store: records the PSNs of each login and offline-mark call; a login call
    with a PSN in ``poison`` fails as a bad job would."""

    def __init__(self, h: Harness) -> None:
        self.records = h.center.records
        self.logins: list[list[int]] = []
        self.offline: list[list[int]] = []
        self.poison: set[int] = set()
        h.center.records = self  # type: ignore[assignment]

    def authenticate_many(self, attempts: Sequence[LoginAttempt], now: dt.datetime) -> Any:
        psns = [attempt[0] for attempt in attempts]
        self.logins.append(psns)
        if self.poison & set(psns):
            return fail(ValueError(f"no such thing as DTU {sorted(self.poison & set(psns))}"))
        return self.records.authenticate_many(attempts, now)

    def mark_offline_many(self, last_seen: Mapping[int, dt.datetime]) -> Deferred[None]:
        self.offline.append(list(last_seen))
        return self.records.mark_offline_many(last_seen)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.records, name)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    assert harness.clock.getDelayedCalls() == []
    harness.store.engine.dispose()


def accepted(h: Harness, transport: Any) -> bool:
    replies = h.replies(transport)
    assert len(replies) <= 1
    return bool(replies) and replies[0].accepted


def test_logins_that_arrive_while_one_is_decided_are_decided_by_one_store_call_in_order(h: Harness) -> None:
    for psn in range(1, 6):
        h.store.add_dtu(psn, password=7)
    calls = Calls(h)
    h.store.hold = True
    connections = [h.connect() for _ in range(6)]
    # DTU 1 first (its call goes at once), then 2, 3, 4, 5 and a second connection of DTU 2, in this turn.
    for (protocol, _), psn in zip(connections, [1, 2, 3, 4, 5, 2], strict=True):
        h.feed(protocol, wire.Login(psn, 7))
    assert calls.logins == [[1]] and len(h.store.held) == 1
    assert all(transport.value() == b"" for _, transport in connections)
    h.store.release()
    assert calls.logins == [[1], [2, 3, 4, 5, 2]]
    assert [accepted(h, transport) for _, transport in connections] == [True] * 6
    # In order: the later connection of DTU 2 is the one that holds it, the earlier one is dropped.
    assert h.center.sessions[2] is connections[5][0].session
    assert connections[1][1].disconnecting and not connections[5][1].disconnecting
    assert list(h.center.sessions) == [1, 2, 3, 4, 5]
    assert all(h.store.dtu(psn).online for psn in range(1, 6))  # type: ignore[union-attr]
    for protocol, _ in connections:
        h.lose(protocol)
    assert not any(h.store.dtu(psn).online for psn in range(1, 6))  # type: ignore[union-attr]


def test_each_dtu_of_a_batch_gets_its_own_answer(h: Harness) -> None:
    h.store.add_dtu(1, password=7)
    h.store.add_dtu(2, password=7)
    calls = Calls(h)
    h.store.hold = True
    first, right, wrong, unknown = (h.connect() for _ in range(4))
    h.feed(first[0], wire.Login(1, 7))
    h.feed(right[0], wire.Login(2, 7))
    h.feed(wrong[0], wire.Login(1, 8))
    h.feed(unknown[0], wire.Login(99, 7))
    h.store.release()
    assert calls.logins == [[1], [2, 1, 99]]
    assert accepted(h, first[1]) and accepted(h, right[1])
    assert not accepted(h, wrong[1]) and wrong[1].disconnecting
    assert not accepted(h, unknown[1]) and unknown[1].disconnecting
    assert h.center.sessions == {1: first[0].session, 2: right[0].session}
    assert h.center.stats["logins"] == 2 and h.center.stats["logins_refused"] == 2
    for protocol, _ in (first, right, wrong, unknown):
        h.lose(protocol)


@pytest.mark.expected_errors("Could not authenticate a DTU at")
def test_a_failed_batch_is_decided_again_one_login_each_and_fails_only_its_culprit(h: Harness) -> None:
    for psn in (1, 2, 3, 13):
        h.store.add_dtu(psn, password=7)
    calls = Calls(h)
    calls.poison = {13}
    h.store.hold = True
    connections = [h.connect() for _ in range(4)]
    for (protocol, _), psn in zip(connections, [1, 2, 13, 3], strict=True):
        h.feed(protocol, wire.Login(psn, 7))
    h.store.release()
    assert calls.logins == [[1], [2, 13, 3], [2], [13], [3]]
    answers = [accepted(h, transport) for _, transport in connections]
    assert answers == [True, True, False, True]
    # A store failure is not a refusal: the DTU hears nothing and dials again.
    assert connections[2][1].value() == b"" and connections[2][1].disconnecting
    assert sorted(h.center.sessions) == [1, 2, 3]
    for protocol, _ in connections:
        h.lose(protocol)


def test_many_logins_go_in_calls_of_at_most_the_limit(h: Harness) -> None:
    calls = Calls(h)
    h.store.hold = True
    connections = [h.connect() for _ in range(MAX_LOGINS_PER_CALL + 2)]
    for psn, (protocol, _) in enumerate(connections, start=1):
        protocol.dataReceived(wire.encode_frame(wire.Login(psn, 7)))
    assert [len(psns) for psns in calls.logins] == [1]
    h.store.release()
    # Unknown PSNs, refused: the answers are not the point here, the calls are.
    assert [len(psns) for psns in calls.logins] == [1, MAX_LOGINS_PER_CALL, 1]
    assert [psn for psns in calls.logins for psn in psns] == list(range(1, MAX_LOGINS_PER_CALL + 3))
    for protocol, _ in connections:
        h.lose(protocol)


def test_offline_marks_go_together_and_before_a_newer_login_of_the_same_dtu(h: Harness) -> None:
    logged_in = [h.logged_in(psn) for psn in (1, 2, 3, 4)]
    calls = Calls(h)
    h.store.hold = True
    for protocol, _ in logged_in[:3]:
        h.lose(protocol)  # DTU 1's mark goes at once; 2's and 3's wait for it
    assert calls.offline == [[1]]
    again, again_transport = h.connect()
    h.feed(again, wire.Login(2, 7))  # DTU 2 back while its mark waits: the mark goes first
    assert calls.offline == [[1], [2, 3]] and calls.logins == [[2]]
    h.store.release()
    assert accepted(h, again_transport)
    assert h.center.sessions == {2: again.session, 4: logged_in[3][0].session}
    assert [h.store.dtu(psn).online for psn in (1, 2, 3, 4)] == [False, True, False, True]  # type: ignore[union-attr]
    h.lose(again)
    h.lose(logged_in[3][0])
    assert calls.offline == [[1], [2, 3], [2], [4]]
    assert not any(h.store.dtu(psn).online for psn in (1, 2, 3, 4))  # type: ignore[union-attr]


def test_the_queries_decide_a_batch_in_order(h: Harness) -> None:
    h.store.add_dtu(1, password=0)
    with h.store.engine.begin() as connection:
        connection.exec_driver_sql("INSERT INTO registers (psn, position, dev, addr) VALUES (1, 0, 1, 40001)")
        connection.exec_driver_sql("INSERT INTO registers (psn, position, dev, addr) VALUES (1, 1, 1, 40002)")
    with Session(h.store.engine) as session, session.begin():
        outcomes = queries.authenticate_many(session, [
            (1, 5, "A", 1, "", "p1", False),   # PASS 0 takes the first PASS ...
            (1, 6, "B", 2, "", "p2", False),   # ... and keeps it: a second, different one is refused
            (1, 5, "C", 3, "", "p3", False),
            (2, 5, "D", 1, "", "p4", False),   # unknown, not enrolled
            (3, 5, "E", 1, "", "p5", True),    # unknown, enrolled
        ], NOW, node="n")
    assert [(o.accepted, o.reason, o.enrolled) for o in outcomes] == [
        (True, "ok", False), (False, "wrong password", False), (True, "ok", False),
        (False, "unknown PSN", False), (True, "ok", True),
    ]
    assert outcomes[0].registers == outcomes[2].registers == ((1, 40001), (1, 40002))
    assert outcomes[2].record.pname == "C" and outcomes[4].registers == ()  # type: ignore[union-attr]
    stored = h.store.dtu(1)
    assert stored is not None and stored.pname == "C" and stored.online and stored.node == "n"
    assert h.store.dtu(3) is not None and h.store.dtu(2) is None


def test_a_batch_of_known_dtus_costs_three_statements_whatever_its_size(h: Harness) -> None:
    for psn in range(1, 51):
        h.store.add_dtu(psn, password=7)
    statements: list[str] = []
    event.listen(h.store.engine, "before_cursor_execute", lambda *args: statements.append(args[2].split()[0]))
    with Session(h.store.engine) as session, session.begin():
        outcomes = queries.authenticate_many(
            session, [(psn, 7, "P", 1, "", f"peer{psn}", False) for psn in range(1, 51)], NOW, node="n")
        assert all(outcome.accepted for outcome in outcomes)
        # The records, the register lists, the updates (one executemany).
        assert statements == ["SELECT", "SELECT", "UPDATE"]
        statements.clear()
        queries.mark_offline_many(session, dict.fromkeys(range(1, 51), NOW), node="n")
        assert statements == ["UPDATE"]
    assert not any(h.store.dtu(psn).online for psn in range(1, 51))  # type: ignore[union-attr]
