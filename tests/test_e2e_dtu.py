"""The real service on a loopback port, real sockets, a real SQLite file."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
from sqlalchemy.orm import Session
from twisted.internet import reactor

from dtucenter.dtu import wire
from dtucenter.store import queries
from tests.support import UDPDTU, RunningCenter, connect_dtu, start_center, until


def samples_of(center: RunningCenter, psn: int) -> list[queries.SampleInfo]:
    with Session(center.store.engine) as session:
        return queries.query_samples(session, psn)


def dtu_row(center: RunningCenter, psn: int) -> queries.DtuInfo | None:
    with Session(center.store.engine) as session:
        return queries.get_dtu(session, psn)


def add_dtu(center: RunningCenter, psn: int, **fields: object) -> None:
    import datetime as dt

    with Session(center.store.engine) as session, session.begin():
        queries.upsert_dtu(session, psn, dict(fields), dt.datetime.now(dt.UTC))


@pytest_twisted.ensureDeferred
async def test_login_upload_ack_and_stored(tmp_path: Path, db_url: str) -> None:
    center = await start_center(tmp_path, db_url=db_url)
    try:
        add_dtu(center, 1001, tick_time=30, send_test_time=10)
        dtu = await connect_dtu(center)
        ack = await dtu.login(1001, 4242, pname="HS121", cur_ver=7, ccid="89860012345678901234")
        assert ack.accepted and ack.tick_time == 30 and ack.send_test_time == 10
        row = dtu_row(center, 1001)
        assert row is not None and row.online and row.password_set and row.pname == "HS121"
        assert row.version == 7 and row.ccid == "89860012345678901234"

        dtu.send(wire.SendTick())
        await dtu.next(wire.SendTickAck)
        dtu.send(wire.SendTest(net_state=25, test_code=9, values=(100, -200, 300)))
        assert (await dtu.next(wire.SendTestAck)).test_code == 9
        # Acknowledged means committed: visible to a fresh connection right now.
        stored = samples_of(center, 1001)
        assert [(s.position, s.value, s.net_state, s.dev) for s in stored] == [
            (0, 100, 25, None), (1, -200, 25, None), (2, 300, 25, None),
        ]
        assert stored[0].time.tzinfo is not None

        dtu.close()
        await until(lambda: 1001 not in center.center.sessions)
        await center.store.when_idle()
        assert not dtu_row(center, 1001).online  # type: ignore[union-attr]
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_password_rules(tmp_path: Path, db_url: str) -> None:
    center = await start_center(tmp_path, "--unknown-dtu", "reject", db_url=db_url)
    try:
        # Unknown PSN under reject: refused, then closed (the default holds it: test_e2e_pending_dtu.py).
        stranger = await connect_dtu(center)
        assert not (await stranger.login(555, 1)).accepted
        await stranger.closed()

        # PASS 0 in the table takes the first PASS and keeps it.
        add_dtu(center, 556)
        first = await connect_dtu(center)
        assert (await first.login(556, 777)).accepted
        first.close()
        wrong = await connect_dtu(center)
        ack = await wrong.login(556, 778)
        assert ack.right == wire.LOGIN_REFUSED
        await wrong.closed()
        right = await connect_dtu(center)
        assert (await right.login(556, 777)).accepted
        right.close()
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_unknown_dtu_accept_enrols(tmp_path: Path) -> None:
    center = await start_center(tmp_path, "--unknown-dtu", "accept")
    try:
        dtu = await connect_dtu(center)
        assert (await dtu.login(9000, 31337)).accepted
        dtu.close()
        again = await connect_dtu(center)
        assert (await again.login(9000, 1)).right == wire.LOGIN_REFUSED
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_frame_before_login_closes(tmp_path: Path) -> None:
    center = await start_center(tmp_path)
    try:
        dtu = await connect_dtu(center)
        dtu.send(wire.SendTick())
        await dtu.closed()
        assert center.center.stats["frames_before_login"] == 1
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_second_login_replaces_older_connection(tmp_path: Path, db_url: str) -> None:
    center = await start_center(tmp_path, "--unknown-dtu", "accept", db_url=db_url)
    try:
        old = await connect_dtu(center)
        await old.login(42, 1)
        new = await connect_dtu(center)
        assert (await new.login(42, 1)).accepted
        await old.closed()
        await center.store.when_idle()
        assert dtu_row(center, 42).online  # type: ignore[union-attr]
        new.send(wire.SendTest(1, 1, (5,)))
        await new.next(wire.SendTestAck)
        assert center.center.sessions[42].peer.startswith("127.0.0.1:")
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_register_list_names_values_and_rejects_wrong_count(tmp_path: Path, db_url: str) -> None:
    center = await start_center(tmp_path, "--unknown-dtu", "accept", db_url=db_url)
    try:
        add_dtu(center, 77)
        with Session(center.store.engine) as session, session.begin():
            queries.replace_register_list(session, 77, 5, [(1, 0), (2, 10)])
        dtu = await connect_dtu(center)
        await dtu.login(77, 1)
        dtu.send(wire.SendTest(20, 0, (1, 2, 3)))
        assert (await dtu.next(wire.SendTestAck)).test_code == 255  # TestCode - 1: resend
        assert samples_of(center, 77) == []
        dtu.send(wire.SendTest(20, 0, (11, 22)))
        assert (await dtu.next(wire.SendTestAck)).test_code == 0
        assert [(s.dev, s.addr, s.value) for s in samples_of(center, 77)] == [(1, 0, 11), (2, 10, 22)]
        # A retransmission of the stored frame is acknowledged but not stored twice.
        dtu.send(wire.SendTest(20, 0, (11, 22)))
        assert (await dtu.next(wire.SendTestAck)).test_code == 0
        assert len(samples_of(center, 77)) == 2
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_garbage_split_and_glued_frames_over_a_socket(tmp_path: Path) -> None:
    center = await start_center(tmp_path, "--unknown-dtu", "accept")
    try:
        dtu = await connect_dtu(center)
        stream = (
            b"\x00junk\xaa"
            + wire.encode_frame(wire.Login(5, 5))
            + wire.encode_frame(wire.SendTest(1, 1, (1,)))[:-1] + b"\x00"  # bad checksum
            + wire.encode_frame(wire.SendTest(1, 2, (2,)))
            + wire.encode_frame(wire.SendTick())
        )
        for i in range(0, len(stream), 3):
            dtu.send_raw(stream[i : i + 3])
        await dtu.next(wire.LoginAck)
        assert (await dtu.next(wire.SendTestAck)).test_code == 2
        await dtu.next(wire.SendTickAck)
        assert [s.value for s in samples_of(center, 5)] == [2]
        assert center.center.stats["dropped_BadChecksum"] == 1
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_endless_garbage_is_cut_off(tmp_path: Path) -> None:
    center = await start_center(tmp_path)
    try:
        dtu = await connect_dtu(center)
        dtu.send_raw(b"\x01" * (wire.DEFAULT_LOGIN_GARBAGE_LIMIT + 1))
        await dtu.closed()
        assert center.center.stats["closed_for_garbage"] == 1
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_udp_login_and_upload(tmp_path: Path) -> None:
    center = await start_center(tmp_path, "--unknown-dtu", "accept", "--dtu-udp", "127.0.0.1:0")
    client = UDPDTU()
    port = reactor.listenUDP(0, client, interface="127.0.0.1")
    try:
        assert center.udp_port
        target = ("127.0.0.1", center.udp_port)
        # Several frames in one datagram.
        client.transport.write(
            wire.encode_frame(wire.Login(321, 9)) + wire.encode_frame(wire.SendTest(10, 3, (7, 8))), target
        )
        await until(lambda: len(client.events) >= 2)
        assert isinstance(client.events[0], wire.LoginAck) and client.events[0].accepted
        assert client.events[1] == wire.SendTestAck(3)
        assert [s.value for s in samples_of(center, 321)] == [7, 8]
        client.transport.write(wire.encode_frame(wire.SendTick()), target)
        await until(lambda: len(client.events) >= 3)
        assert client.events[2] == wire.SendTickAck()
    finally:
        await port.stopListening()
        await center.stop()

