"""MQTT publishing against a real Mosquitto, with a subscriber that checks every message it hears."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from pymodbus.framer import FramerType
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dtucenter.dtu import wire
from dtucenter.mqtt.client import BrokerConnection
from dtucenter.mqtt.publisher import MqttPublisher
from dtucenter.store import queries
from dtucenter.store.models import MqttBacklog
from tests.modbus.interop_support import EXPECTED_UNIT_1, PymodbusServer, meter_toml, sample_meter
from tests.modbus.test_e2e_metrics import (
    Samples,
    Scraper,
    check_with_promtool,
    documented_metrics,
    parse,
    scraped_metrics,
    value,
)
from tests.mqtt_support import Mosquitto, Received, Subscriber, make_test_ca
from tests.support import STEP_TIMEOUT, DTUClient, RunningCenter, connect_dtu, eventually, start_center, until
from tests.test_process import twistd_center

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00$")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    mosquitto = Mosquitto(tmp_path / "broker")
    mosquitto.start()
    try:
        yield mosquitto
    finally:
        mosquitto.stop()


@pytest.fixture
def subscriber(broker: Mosquitto) -> Iterator[Subscriber]:
    checker = Subscriber(broker)
    try:
        yield checker
    finally:
        checker.stop()


def publisher_of(center: RunningCenter) -> MqttPublisher:
    return center.service.getServiceNamed("mqtt")  # type: ignore[return-value]


def add_dtu(center: RunningCenter, psn: int, registers: list[tuple[int, int]] | None = None) -> None:
    with Session(center.store.engine) as session, session.begin():
        queries.upsert_dtu(session, psn, {}, dt.datetime.now(dt.UTC))
        if registers:
            queries.replace_register_list(session, psn, 5, registers)


def backlog_count(center: RunningCenter) -> int:
    with Session(center.store.engine) as session:
        return int(session.scalar(select(func.count()).select_from(MqttBacklog)) or 0)


class Uploads:
    """A DTU's uploads of two values, n and -n, each waited for until acknowledged."""

    def __init__(self, dtu: DTUClient) -> None:
        self.dtu = dtu
        self.sent = 0

    @classmethod
    async def logged_in(cls, center: RunningCenter, psn: int) -> Uploads:
        """A DTU known to the database (so published under its account), connected and logged in."""
        add_dtu(center, psn)
        dtu = await connect_dtu(center)
        await dtu.login(psn)
        return cls(dtu)

    async def send(self, count: int) -> None:
        for _ in range(count):
            self.dtu.send(wire.SendTest(20, self.sent % 256, (self.sent, -self.sent)))
            await self.dtu.next(wire.SendTestAck)
            self.sent += 1


def check_every_message(messages: list[Received], value_topic: re.Pattern[str]) -> None:
    """What any message must look like: a value (time and value), a status (time and state) or the center's."""
    for message in messages:
        body = message.body
        assert isinstance(body, dict), message
        if message.topic == "dtucenter/center/status":
            assert set(body) in ({"online"}, {"online", "time"}), message
        elif message.topic.endswith("/status"):
            assert ISO_UTC.match(body["time"]), message
            assert "online" in body or body.get("state") in ("ok", "failing"), message
        else:
            assert value_topic.match(message.topic), message
            assert set(body) == {"time", "value"} and ISO_UTC.match(body["time"]), message


@pytest_twisted.ensureDeferred
async def test_uploads_polls_and_states_are_published(
    tmp_path: Path, db_url: str, broker: Mosquitto, subscriber: Subscriber
) -> None:
    meter = PymodbusServer([sample_meter(1)], framer=FramerType.SOCKET).start()
    config = tmp_path / "center.toml"
    config.write_text(
        f'[mqtt]\nurl = "{broker.url}"\nclient_id = "center-under-test"\n\n'
        f'[[link]]\nname = "plant"\nprotocol = "tcp"\nconnect = "tcp:host=127.0.0.1:port={meter.port}"\n'
        f'timeout = 1.0\n\n' + meter_toml("m1", "plant", 1, interval=0.3)
    )
    center = await start_center(
        tmp_path, "--config", str(config), "--mqtt-topic", "plant/{account}/{kind}/{device}/{point}", db_url=db_url
    )
    try:
        add_dtu(center, 1001)
        add_dtu(center, 1002, registers=[(1, 0), (2, 10)])
        plain, listed = await connect_dtu(center), await connect_dtu(center)
        await plain.login(1001)
        await listed.login(1002)
        plain.send(wire.SendTest(20, 1, (5, -6, 7)))
        await plain.next(wire.SendTestAck)
        listed.send(wire.SendTest(20, 1, (11, 22)))
        await listed.next(wire.SendTestAck)
        plain.send(wire.SendTest(20, 2, (8, 9, 10)))
        await plain.next(wire.SendTestAck)

        await until(lambda: len(subscriber.on("plant/admin/dtu/1001/2")) == 2
                    and subscriber.on("plant/admin/dtu/1002/2-10")
                    and len(subscriber.on("plant/admin/meter/m1/voltage")) >= 2, timeout=3 * STEP_TIMEOUT)
        with Session(center.store.engine) as session:
            stored = queries.query_samples(session, 1001)
        first, second = stored[0].time.isoformat(), stored[3].time.isoformat()
        assert [subscriber.on(f"plant/admin/dtu/1001/{p}") for p in range(3)] == [
            [{"time": first, "value": 5}, {"time": second, "value": 8}],
            [{"time": first, "value": -6}, {"time": second, "value": 9}],
            [{"time": first, "value": 7}, {"time": second, "value": 10}],
        ]
        # With its register list known, a DTU's values are named dev-addr.
        assert [m["value"] for m in subscriber.on("plant/admin/dtu/1002/1-0")] == [11]
        assert [m["value"] for m in subscriber.on("plant/admin/dtu/1002/2-10")] == [22]
        polled = {point: subscriber.on(f"plant/admin/meter/m1/{point}")[-1]["value"] for point in EXPECTED_UNIT_1}
        assert polled == EXPECTED_UNIT_1
        assert abs(subscriber.on("plant/admin/meter/m1/pi")[-1]["value"] - 3.14159) < 1e-5
        # Online states, retained; the center's own birth message.
        (online,) = subscriber.on("dtucenter/admin/1001/status") or [sorted({m.topic for m in subscriber.all()})]
        assert online["online"] is True and online["peer"].startswith("127.0.0.1:")
        assert subscriber.on("dtucenter/admin/plant/status")[0]["online"] is True
        assert subscriber.on("dtucenter/center/status")[0]["online"] is True

        plain.close()
        await until(lambda: len(subscriber.on("dtucenter/admin/1001/status")) == 2)
        assert subscriber.on("dtucenter/admin/1001/status")[1]["online"] is False
        check_every_message(subscriber.all(), re.compile(r"^plant/admin/(dtu/\d+/(\d+|\d+-\d+)|meter/m1/\w+)$"))

        # A subscriber that comes later gets the last value and state of each topic, retained.
        late = Subscriber(broker, "late", persistent=False)
        try:
            await until(lambda: late.on("plant/admin/dtu/1001/0") and late.on("dtucenter/admin/1001/status"))
            (last,) = [m for m in late.all() if m.topic == "plant/admin/dtu/1001/0"]
            assert last.retained and last.body == {"time": second, "value": 8}
            assert [m.body["online"] for m in late.all() if m.topic == "dtucenter/admin/1001/status"] == [False]
        finally:
            late.stop()
        assert publisher_of(center).stats.dropped == 0
    finally:
        await center.stop()
        meter.stop()


@pytest_twisted.ensureDeferred
async def test_broker_restart_loses_nothing_and_keeps_order(
    tmp_path: Path, db_url: str, broker: Mosquitto, subscriber: Subscriber
) -> None:
    center = await start_center(tmp_path, "--mqtt", broker.url, "--mqtt-qos", "1", db_url=db_url)
    publisher = publisher_of(center)
    scraper = Scraper(center)
    try:
        upload = await Uploads.logged_in(center, 7)
        await upload.send(10)
        await until(lambda: len(subscriber.on("dtucenter/admin/7/0")) == 10)
        text = await scraper.text()
        check_with_promtool(text)
        assert scraped_metrics(text) == documented_metrics(mqtt=True), "every metric served and documented"
        up = parse(text)
        assert value(up, "dtucenter_mqtt_connected") == 1 and value(up, "dtucenter_mqtt_connections_total") == 1

        async def all_delivered() -> Samples | None:
            # The DTU's online status and 20 values, each acknowledged by the broker (told a moment after).
            samples = await scraper.samples()
            return samples if value(samples, "dtucenter_mqtt_messages_total", outcome="delivered") == 21 else None

        up = await eventually(all_delivered, "the broker's acks counted")
        assert value(up, "dtucenter_mqtt_messages_total", outcome="published") == 21
        assert value(up, "dtucenter_mqtt_outstanding_messages") == 0
        # Those of the first moments may have gone through the backlog: direct once a drain found it empty.
        backlogged = value(up, "dtucenter_mqtt_messages_total", outcome="backlogged")
        broker.stop()
        await until(lambda: not publisher.connected)
        await upload.send(40)  # acknowledged as ever: the broker is not on the ingest path
        await until(lambda: backlog_count(center) >= 80)
        down = await scraper.samples()
        assert value(down, "dtucenter_mqtt_connected") == 0
        assert value(down, "dtucenter_mqtt_messages_total", outcome="backlogged") >= backlogged + 80
        assert value(down, "dtucenter_mqtt_backlog_messages") >= 80
        broker.start()
        await upload.send(30)  # while the backlog drains, or after
        await until(lambda: len({m["value"] for m in subscriber.on("dtucenter/admin/7/0")}) == 80,
                    timeout=3 * STEP_TIMEOUT)
        for position, sign in ((0, 1), (1, -1)):
            values = [m["value"] for m in subscriber.on(f"dtucenter/admin/7/{position}")]
            # QoS 1 is at least once: a message delivered just as the broker went down may come twice,
            # next to itself; none is missing and none comes out of order.
            first_seen = list(dict.fromkeys(values))
            assert first_seen == [sign * n for n in range(80)], values
        await until(lambda: backlog_count(center) == 0 and publisher.stats.delivered >= publisher.stats.published)
        drained = await scraper.samples()
        assert value(drained, "dtucenter_mqtt_connected") == 1
        assert value(drained, "dtucenter_mqtt_connections_total") == 2
        assert value(drained, "dtucenter_mqtt_backlog_messages") == 0
        assert value(drained, "dtucenter_mqtt_outstanding_messages") == 0
        published = value(drained, "dtucenter_mqtt_messages_total", outcome="published")
        assert published >= 161 and value(drained, "dtucenter_mqtt_messages_total", outcome="delivered") == published
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_a_full_backlog_drops_counts_and_logs(tmp_path: Path, broker: Mosquitto, subscriber: Subscriber) -> None:
    broker.stop()
    config = tmp_path / "center.toml"
    config.write_text(f'[mqtt]\nurl = "{broker.url}"\nbacklog = 100\nretain = false\n')
    center = await start_center(tmp_path, "--config", str(config))
    publisher = publisher_of(center)
    try:
        add_dtu(center, 9)
        dtu = await connect_dtu(center)
        await dtu.login(9)
        for n in range(20):
            dtu.send(wire.SendTest(20, n, tuple(range(n * 8, n * 8 + 8))))
            await dtu.next(wire.SendTestAck)
        # The online status and 160 values: the first 100 kept, the rest dropped and counted.
        await until(lambda: publisher.stats.dropped == 61)
        assert backlog_count(center) == 100
        full = await Scraper(center).samples()
        assert value(full, "dtucenter_mqtt_messages_total", outcome="dropped") == 61
        assert value(full, "dtucenter_mqtt_messages_total", outcome="backlogged") == 100
        assert value(full, "dtucenter_mqtt_backlog_messages") == 100
        assert value(full, "dtucenter_mqtt_connected") == 0
        broker.start()
        await until(lambda: len(subscriber.all()) >= 100 and backlog_count(center) == 0, timeout=3 * STEP_TIMEOUT)
        values = [m.body["value"] for m in subscriber.all() if m.topic.startswith("dtucenter/admin/9/")
                  and not m.topic.endswith("status")]
        assert values[:99] == list(range(99))
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_tls_and_mqtt_5(tmp_path: Path) -> None:
    tls = make_test_ca(tmp_path)
    broker = Mosquitto(tmp_path / "broker", tls=tls)
    broker.start()
    subscriber = Subscriber(broker)
    config = tmp_path / "center.toml"
    config.write_text(f'[mqtt]\nurl = "{broker.url}"\nca = "{tls.ca}"\nversion = "5"\npayload = "device"\n')
    center = await start_center(tmp_path, "--config", str(config))
    try:
        add_dtu(center, 31)
        dtu = await connect_dtu(center)
        await dtu.login(31)
        dtu.send(wire.SendTest(20, 1, (1, 2)))
        await dtu.next(wire.SendTestAck)
        await until(lambda: subscriber.on("dtucenter/admin/31/values"))
        (upload,) = subscriber.on("dtucenter/admin/31/values")
        assert upload["values"] == {"0": 1, "1": 2} and ISO_UTC.match(upload["time"])
    finally:
        await center.stop()
        subscriber.stop()
        broker.stop()


@pytest_twisted.ensureDeferred
async def test_a_password_and_batches(tmp_path: Path) -> None:
    """The broker takes only its users: the center's URL carries one (percent-encoded); payload = batch."""
    broker = Mosquitto(tmp_path / "broker", users={"checker": "seen", "center": "p@ss w/rd"})
    broker.start()
    subscriber = Subscriber(broker)
    (tmp_path / "wrong").mkdir()
    wrong = await start_center(tmp_path / "wrong", "--mqtt", f"mqtt://center:nope@127.0.0.1:{broker.port}")
    try:
        await until(lambda: "refused" in (publisher_of(wrong).problem or ""))
        assert publisher_of(wrong).stats.connections == 0 and "nope" not in (publisher_of(wrong).problem or "")
    finally:
        await wrong.stop()
    config = tmp_path / "center.toml"
    config.write_text(
        f'[mqtt]\nurl = "mqtt://center:p%40ss%20w%2Frd@127.0.0.1:{broker.port}"\npayload = "batch"\n'
    )
    center = await start_center(tmp_path, "--config", str(config))
    try:
        add_dtu(center, 41)
        add_dtu(center, 42, registers=[(1, 100)])
        first, second = await connect_dtu(center), await connect_dtu(center)
        await first.login(41)
        await second.login(42)
        for n in range(3):
            first.send(wire.SendTest(20, n, (n, n + 1)))
            second.send(wire.SendTest(20, n, (10 + n,)))
            await first.next(wire.SendTestAck)
            await second.next(wire.SendTestAck)

        def batched() -> list[Any]:
            return [entry for body in subscriber.on("dtucenter/admin/batch") for entry in body]

        await until(lambda: len(batched()) == 6)
        assert [(e["device"], e["values"]) for e in batched() if e["device"] == "41"] == [
            ("41", {"0": 0, "1": 1}), ("41", {"0": 1, "1": 2}), ("41", {"0": 2, "1": 3}),
        ]
        assert [e["values"] for e in batched() if e["device"] == "42"] == [{"1-100": 10}, {"1-100": 11}, {"1-100": 12}]
        assert all(e["kind"] == "dtu" and ISO_UTC.match(e["time"]) for e in batched())
        assert [m.retained for m in subscriber.all() if m.topic == "dtucenter/admin/batch"] == [False] * len(
            subscriber.on("dtucenter/admin/batch"))
    finally:
        await center.stop()
        subscriber.stop()
        broker.stop()


def test_the_last_will_says_the_center_died(tmp_path: Path, broker: Mosquitto, subscriber: Subscriber) -> None:
    """Stopped, the center says it is offline itself; killed, the broker says it for the center."""

    def center_states() -> list[Any]:
        return subscriber.on("dtucenter/center/status")

    def wait_for(count: int) -> None:
        import time

        deadline = time.monotonic() + 3 * STEP_TIMEOUT
        while len(center_states()) < count:
            assert time.monotonic() < deadline, center_states()
            time.sleep(0.02)

    with twistd_center(tmp_path, "--mqtt", broker.url) as center:
        wait_for(1)
        center.signal(signal.SIGTERM)
        center.process.wait(STEP_TIMEOUT)
    wait_for(2)
    assert [s["online"] for s in center_states()] == [True, False] and "time" in center_states()[1]
    with twistd_center(tmp_path, "--mqtt", broker.url) as center:
        wait_for(3)
        os.killpg(center.process.pid, signal.SIGKILL)
        center.process.wait(STEP_TIMEOUT)
    wait_for(4)
    assert center_states()[2]["online"] is True
    assert center_states()[3] == {"online": False}  # the will: no time, the center could not tell it


@pytest_twisted.ensureDeferred
async def test_the_outbox_keeps_order_and_reads_what_was_appended_before(db_url: str) -> None:
    from twisted.internet import reactor

    from dtucenter.store.db import open_engine
    from dtucenter.store.facade import Store
    from dtucenter.store.outbox import MqttOutbox

    store = Store(open_engine(db_url), reactor)
    store.startService()
    try:
        outbox = MqttOutbox(store)
        outbox.append([(3, "t/3", b"{}", 1, True), (1, "t/1", b"\x00", 0, False)])
        outbox.append([(2, "t/2", b"[]", 1, False)])
        # Asked in the same turn, so committed in one transaction: still after the appends.
        assert await outbox.oldest(2) == [(1, "t/1", b"\x00", 0, False), (2, "t/2", b"[]", 1, False)]
        assert await outbox.state() == (3, 3)
        assert await outbox.remove_through(2) == 2
        assert await outbox.oldest(10) == [(3, "t/3", b"{}", 1, True)]
        with Session(store.engine) as session, session.begin():
            queries.upsert_dtu(session, 5, {}, dt.datetime.now(dt.UTC))
            queries.replace_register_list(session, 5, 1, [(1, 2), (3, 4)])
            queries.upsert_dtu(session, 6, {}, dt.datetime.now(dt.UTC))
            queries.replace_register_list(session, 6, 1, [(5, 6)])
        accounts, registers = await outbox.directory()
        assert accounts == {("dtu", 5): "admin", ("dtu", 6): "admin"}
        assert registers == {5: ((1, 2), (3, 4)), 6: ((5, 6),)}
        assert await outbox.devices([("dtu", 6), ("dtu", 7), ("meter", "m")]) == ({("dtu", 6): "admin"}, {6: ((5, 6),)})
    finally:
        await store.stopService()


def worker_of(center: RunningCenter) -> BrokerConnection:
    connection = publisher_of(center).connection
    assert isinstance(connection, BrokerConnection)
    return connection


def process_gone(pid: int) -> bool:
    """Ended: reaped, or a zombie whose parent has not reaped it yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest_twisted.ensureDeferred
async def test_a_killed_worker_is_restarted_and_nothing_is_lost_or_reordered(
    tmp_path: Path, db_url: str, broker: Mosquitto, subscriber: Subscriber
) -> None:
    center = await start_center(tmp_path, "--mqtt", broker.url, "--mqtt-qos", "1", db_url=db_url)
    publisher, connection = publisher_of(center), worker_of(center)
    try:
        upload = await Uploads.logged_in(center, 8)
        await upload.send(10)
        await until(lambda: len(subscriber.on("dtucenter/admin/8/0")) == 10)
        for _ in range(3):
            first = connection.pid
            assert first is not None
            await upload.send(20)  # not waited for: some are on their way when the worker dies
            os.kill(first, signal.SIGKILL)
            await upload.send(10)  # while it is dead: kept in the backlog
            await until(lambda: connection.pid not in (None, first) and publisher.connected)  # noqa: B023
        await upload.send(10)
        await until(lambda: len({m["value"] for m in subscriber.on("dtucenter/admin/8/0")}) == upload.sent,
                    timeout=3 * STEP_TIMEOUT)
        assert connection.starts == 4 and publisher.stats.connections == 4
        for position, sign in ((0, 1), (1, -1)):
            values = [m["value"] for m in subscriber.on(f"dtucenter/admin/8/{position}")]
            # At least once: what was published but not confirmed when the worker died comes again; in order.
            assert list(dict.fromkeys(values)) == [sign * n for n in range(upload.sent)], values
        await until(lambda: backlog_count(center) == 0 and publisher.stats.delivered >= publisher.stats.published)
        assert publisher.stats.dropped == 0
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_stopping_the_center_ends_the_worker(tmp_path: Path, broker: Mosquitto, subscriber: Subscriber) -> None:
    center = await start_center(tmp_path, "--mqtt", broker.url)
    try:
        await until(lambda: subscriber.on("dtucenter/center/status"))
        pid = worker_of(center).pid
        assert pid is not None and not process_gone(pid)
    finally:
        await center.stop()
    assert process_gone(pid) and worker_of(center).pid is None
    assert [s["online"] for s in subscriber.on("dtucenter/center/status")] == [True, False]


def test_a_killed_center_takes_its_worker_along(tmp_path: Path, broker: Mosquitto, subscriber: Subscriber) -> None:
    """SIGKILL to the center's process alone (not its group): the worker ends too, and the broker says the will."""
    import time

    def wait(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 3 * STEP_TIMEOUT
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.02)

    with twistd_center(tmp_path, "--mqtt", broker.url) as center:
        wait(lambda: len(subscriber.on("dtucenter/center/status")) == 1)
        children = Path(f"/proc/{center.process.pid}/task/{center.process.pid}/children").read_text().split()
        (worker,) = [int(pid) for pid in children
                     if "dtucenter.mqtt.worker" in Path(f"/proc/{pid}/cmdline").read_text()]
        os.kill(center.process.pid, signal.SIGKILL)
        center.process.wait(STEP_TIMEOUT)
        wait(lambda: process_gone(worker))
    wait(lambda: len(subscriber.on("dtucenter/center/status")) == 2)
    assert subscriber.on("dtucenter/center/status")[1] == {"online": False}


def test_the_worker_keeps_its_window_full_and_every_message_in_order(broker: Mosquitto, subscriber: Subscriber) -> None:
    """Enough messages at once to fill the worker's window many times over: it waits for acks to gather
    (the pace) and writes a quarter of the window at a time, and nothing is lost or reordered."""
    import select
    import subprocess
    import sys
    import time

    from dtucenter.mqtt import frames
    from dtucenter.mqtt.client import PACKAGE_ROOT, TopicSlots
    from dtucenter.mqtt.config import MqttSettings, parse_broker_url
    from dtucenter.mqtt.worker import MAX_INFLIGHT
    from tests.support import end_process_group

    settings = MqttSettings(url=broker.url, client_id="window")
    worker = subprocess.Popen([sys.executable, "-m", "dtucenter.mqtt.worker"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": PACKAGE_ROOT},
                              start_new_session=True)
    assert worker.stdin is not None and worker.stdout is not None
    reader = frames.FrameReader()
    heard: list[Any] = []

    def hear_until(done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 6 * STEP_TIMEOUT
        while not done():
            assert time.monotonic() < deadline, heard[-3:]
            if select.select([worker.stdout], [], [], 1)[0]:
                heard.extend(reader.feed(os.read(worker.stdout.fileno(), 1 << 20)))

    try:
        worker.stdin.write(frames.encode(("config", settings, parse_broker_url(broker.url),
                                          (0, "w/status", b'{"online": false}', 1, True))))
        worker.stdin.flush()
        hear_until(lambda: ("up", 1) in heard)
        dtus, uploads = 250, 2500  # 8 values each: 20 times the window
        topics = [tuple(f"w/{dtu}/{point}" for point in range(8)) for dtu in range(dtus)]
        slots, seq = TopicSlots(), 1
        for _ in range(5):
            runs = []
            for _ in range(uploads // 5):
                upload = (seq - 1) // 8
                runs.append((seq, topics[upload % dtus], b'{"time":"t","value":',
                             tuple(upload * 8 + point for point in range(8)), 1, False))
                seq += 8
            worker.stdin.write(frames.encode(("send", [(1, slots.numbered(runs))])))
            worker.stdin.flush()
        assert seq - 1 == uploads * 8 >= 20 * MAX_INFLIGHT
        hear_until(lambda: ("delivered", seq - 1) in heard)
        delivered = [frame[1] for frame in heard if frame[0] == "delivered"]
        assert delivered == sorted(delivered) and not [frame for frame in heard if frame[0] == "down"]
        until_heard = time.monotonic() + 6 * STEP_TIMEOUT
        while len(subscriber.all()) < uploads * 8 and time.monotonic() < until_heard:
            time.sleep(0.05)
        for dtu in (0, 1, dtus - 1):
            for point in (0, 7):
                values = [body["value"] for body in subscriber.on(f"w/{dtu}/{point}")]
                assert values == [upload * 8 + point for upload in range(dtu, uploads, dtus)]
    finally:
        end_process_group(worker)
