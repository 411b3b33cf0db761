"""The MQTT publisher's logic with a fake connection and backlog on a task.Clock; its settings; its messages."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from dtucenter.config import ConfigError, read_settings
from dtucenter.events import DtuOnline, EventHub, LinkUp, MeterFailed, MeterRead, UploadStored
from dtucenter.mqtt import frames
from dtucenter.mqtt import publisher as publisher_module
from dtucenter.mqtt.config import Broker, MqttSettings, parse_broker_url
from dtucenter.mqtt.messages import Composer, DeviceKey, Directory, Entry, Extra, Message, ValueRun, rows_of
from dtucenter.mqtt.publisher import FLUSH_INTERVAL, BacklogRow, Found, MqttPublisher

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


class FakeBacklog:
    """The database's backlog, in memory; every call answers at once, in order."""

    def __init__(self, accounts: dict[DeviceKey, str] | None = None) -> None:
        self.rows: list[BacklogRow] = []
        self.accounts = dict(accounts or {("dtu", 1): "acme"})
        self.registers: dict[int, tuple[tuple[int, int], ...]] = {}
        self.directory_reads = 0
        self.looked_up: list[list[DeviceKey]] = []

    def state(self) -> Deferred[tuple[int, int]]:
        return succeed((len(self.rows), max((row[0] for row in self.rows), default=0)))

    def append(self, rows: list[BacklogRow]) -> Deferred[None]:
        self.rows += rows
        return succeed(None)

    def oldest(self, limit: int) -> Deferred[list[BacklogRow]]:
        return succeed(sorted(self.rows)[:limit])

    def remove_through(self, seq: int) -> Deferred[int]:
        kept = [row for row in self.rows if row[0] > seq]
        removed, self.rows = len(self.rows) - len(kept), kept
        return succeed(removed)

    def directory(self) -> Deferred[tuple[dict[DeviceKey, str], dict[int, tuple[tuple[int, int], ...]]]]:
        self.directory_reads += 1
        return succeed((dict(self.accounts), dict(self.registers)))

    def devices(self, keys: list[DeviceKey]) -> Deferred[Found]:
        self.looked_up.append(keys)
        return succeed((
            {key: self.accounts[key] for key in keys if key in self.accounts},
            {psn: self.registers[psn] for kind, psn in keys if kind == "dtu" and psn in self.registers},
        ))


@attrs.define
class FakeConnection:
    sent: list[tuple[int, Message]] = attrs.Factory(list)
    up: Callable[[], None] | None = None
    down: Callable[[str], None] | None = None
    delivered: Callable[[int], None] | None = None
    stopped: bool = False

    def start(self, on_up: Callable[[], None], on_down: Callable[[str], None],
              on_delivered: Callable[[int], None]) -> None:
        self.up, self.down, self.delivered = on_up, on_down, on_delivered

    hand_overs: int = 0

    def send(self, entries: list[Entry]) -> None:
        self.hand_overs += 1
        self.sent += [(seq, Message(*message)) for entry in entries for seq, *message in rows_of(entry)]

    def stop(self) -> Deferred[None]:
        self.stopped = True
        return succeed(None)

    def deliver_all(self) -> None:
        assert self.delivered is not None
        if self.sent:
            self.delivered(self.sent[-1][0])


@attrs.define
class Rig:
    hub: EventHub
    backlog: FakeBacklog
    connection: FakeConnection
    clock: Clock
    publisher: MqttPublisher

    def upload(self, *values: int, psn: int = 1) -> None:
        self.hub.publish(UploadStored(psn, T0, values))
        self.clock.advance(FLUSH_INTERVAL)

    def values_sent(self) -> list[int]:
        return [int(message.payload.split(b'"value":')[1].rstrip(b"}")) for _, message in self.connection.sent]


def rig(backlog_limit: int = 1000, **settings: object) -> Rig:
    hub, backlog, connection, clock = EventHub(), FakeBacklog(), FakeConnection(), Clock()
    mqtt = MqttSettings(url="mqtt://broker", backlog=backlog_limit, **settings)  # type: ignore[arg-type]
    publisher = MqttPublisher(mqtt, hub, backlog, connection, Composer(mqtt), clock)
    publisher.startService()
    return Rig(hub, backlog, connection, clock, publisher)


def stop(r: Rig) -> None:
    r.publisher.stopService()
    assert not r.clock.getDelayedCalls()


def test_before_the_broker_answers_messages_wait_in_the_backlog_then_go_in_order() -> None:
    r = rig()
    r.upload(1, 2)
    assert [row[0] for row in r.backlog.rows] == [1, 2] and r.connection.sent == []
    assert r.connection.up is not None
    r.connection.up()
    assert [seq for seq, _ in r.connection.sent] == [1, 2]
    r.upload(3)  # while the drained batch is on its way: behind it
    r.connection.deliver_all()
    assert r.values_sent() == [1, 2, 3]
    r.connection.deliver_all()
    assert r.backlog.rows == []
    r.upload(4)  # the backlog found empty: straight to the connection now
    assert r.values_sent() == [1, 2, 3, 4] and r.backlog.rows == []
    assert r.publisher.stats.backlogged == 3
    stop(r)


def test_what_was_outstanding_when_the_connection_dropped_goes_first() -> None:
    r = rig()
    assert r.connection.up is not None and r.connection.down is not None and r.connection.delivered is not None
    r.connection.up()
    r.upload(1, 2, 3)  # one run of three messages, delivered in part
    r.connection.delivered(1)
    r.connection.down("gone")
    assert [row[0] for row in r.backlog.rows] == [2, 3]
    assert r.publisher.stats.delivered == 1
    r.upload(4)
    r.connection.sent.clear()
    r.connection.up()
    r.connection.deliver_all()
    r.connection.deliver_all()
    assert r.values_sent() == [2, 3, 4] and r.backlog.rows == []
    assert (r.publisher.stats.published, r.publisher.stats.delivered) == (4, 4)
    stop(r)


def test_too_many_outstanding_spill_to_the_backlog_and_drain_after_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publisher_module, "MAX_OUTSTANDING", 2)
    r = rig()
    assert r.connection.up is not None and r.connection.delivered is not None
    r.connection.up()
    r.upload(1, 2)
    r.upload(3)  # a third outstanding would be too many
    assert r.values_sent() == [1, 2] and [row[0] for row in r.backlog.rows] == [3]
    r.connection.delivered(2)
    r.connection.deliver_all()
    assert r.values_sent() == [1, 2, 3]
    stop(r)


def test_a_full_backlog_drops_the_newest_counts_and_summarises() -> None:
    said: list[str] = []

    def observer(event: LogEvent) -> None:
        if event.get("log_namespace") == "dtucenter.mqtt.publisher":
            said.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    try:
        r = rig(backlog_limit=100)
        r.upload(*range(60))
        r.upload(*range(60, 120))
        r.upload(*range(120, 130))
        assert [row[0] for row in r.backlog.rows] == list(range(1, 101)) and r.publisher.stats.dropped == 30
        assert said == [
            "MQTT: the backlog is full (100 messages): dropped 20; more drops are summarised every 60 s"
        ]
        r.clock.advance(publisher_module.SUMMARY_INTERVAL)
        assert said[1:] == ["MQTT: the backlog is full: dropped 10 more messages (30 since start)"]
        r.clock.advance(publisher_module.SUMMARY_INTERVAL)  # nothing more dropped: no more summaries
        assert len(said) == 2 and r.publisher._summary_call is None
        stop(r)
    finally:
        globalLogPublisher.removeObserver(observer)


def test_what_is_heard_within_the_flush_interval_is_handed_over_at_once() -> None:
    r = rig()
    r.connection.up()
    r.clock.advance(FLUSH_INTERVAL)
    before = r.connection.hand_overs
    for value in range(3):
        r.hub.publish(UploadStored(1, T0, (value,)))
        r.clock.advance(FLUSH_INTERVAL / 4)  # turns of the event loop go by
    assert r.connection.hand_overs == before  # not one per turn
    r.clock.advance(FLUSH_INTERVAL)
    assert r.connection.hand_overs == before + 1 and r.values_sent()[-3:] == [0, 1, 2]
    stop(r)


def test_a_device_not_yet_known_is_looked_up_and_order_is_kept() -> None:
    r = rig()
    assert r.connection.up is not None
    r.connection.up()
    r.connection.deliver_all()
    r.backlog.accounts[("dtu", 2)] = "newco"
    r.backlog.accounts[("dtu", 4)] = "other"
    r.backlog.registers[4] = ((1, 2),)
    r.hub.publish(UploadStored(2, T0, (10,)))
    r.hub.publish(UploadStored(1, T0, (11,)))
    r.hub.publish(UploadStored(4, T0, (12,)))
    r.clock.advance(FLUSH_INTERVAL)
    # Every device the waiting events name and the directory lacks, in one look-up.
    assert r.backlog.looked_up == [[("dtu", 2), ("dtu", 4)]]
    assert [m.topic for _, m in r.connection.sent] == ["dtucenter/newco/2/0", "dtucenter/acme/1/0",
                                                       "dtucenter/other/4/1-2"]
    # One the database does not know either is published under "-", and looked up once, not per event.
    r.hub.publish(UploadStored(3, T0, (12,)))
    r.hub.publish(UploadStored(3, T0, (13,)))
    r.clock.advance(FLUSH_INTERVAL)
    assert [m.topic for _, m in r.connection.sent][3:] == ["dtucenter/-/3/0", "dtucenter/-/3/0"]
    assert r.backlog.looked_up[1:] == [[("dtu", 3)]]
    stop(r)


class FailingOnce(Exception):
    pass


@pytest.mark.expected_errors("could not look up devices' accounts; trying again in 1 s", error=FailingOnce)
def test_a_failed_look_up_is_tried_again_and_a_stop_cancels_the_attempt() -> None:
    r = rig()
    assert r.connection.up is not None
    r.connection.up()
    r.connection.deliver_all()
    r.backlog.accounts[("dtu", 2)] = "newco"
    answer = r.backlog.devices
    failures = [FailingOnce()]

    def devices(keys: list[DeviceKey]) -> Deferred[Found]:
        if failures:
            return fail(failures.pop())
        return answer(keys)

    r.backlog.devices = devices  # type: ignore[method-assign]
    r.hub.publish(UploadStored(2, T0, (10,)))
    r.clock.advance(FLUSH_INTERVAL)
    assert r.connection.sent == []  # waits, in order, for the account
    r.clock.advance(publisher_module.LOOK_UP_RETRY)
    assert [m.topic for _, m in r.connection.sent] == ["dtucenter/newco/2/0"]
    # Failing again just before a stop: the stop leaves no attempt behind.
    failures.append(FailingOnce())
    r.hub.publish(UploadStored(3, T0, (11,)))
    r.clock.advance(FLUSH_INTERVAL)
    stop(r)


def test_stopping_keeps_what_was_not_delivered() -> None:
    r = rig()
    assert r.connection.up is not None
    r.connection.up()
    r.upload(1, 2)
    r.publisher.stopService()
    assert [row[0] for row in r.backlog.rows] == [1, 2] and r.connection.stopped
    r.upload(3)  # no longer listening
    assert len(r.backlog.rows) == 2


# -- messages ------------------------------------------------------------------------------------


def test_topics_and_payloads() -> None:
    composer = Composer(MqttSettings(url="mqtt://b", topic="x/{account}/{kind}/{device}/{point}", qos=0))
    directory = Directory({("dtu", 5): "a/b", ("meter", "m#1"): "acme", ("link", "l"): "acme"}, {5: ((1, 2), (3, 4))})
    # An upload is one run of messages, a message per value, made by the worker process (rows_of).
    (run,) = composer.messages(UploadStored(5, T0, (7, -8)), directory)
    assert isinstance(run, ValueRun)
    assert rows_of((41, *run)) == [
        (41, "x/a_b/dtu/5/1-2", b'{"time":"2026-11-30T12:00:00+00:00","value":7}', 0, True),
        (42, "x/a_b/dtu/5/3-4", b'{"time":"2026-11-30T12:00:00+00:00","value":-8}', 0, True),
    ]
    read = composer.messages(MeterRead("m#1", T0, {"v/1": 1.5, "bad": float("nan"), "on": True}), directory)
    assert [(m.topic, m.payload) for m in read] == [
        ("x/acme/meter/m_1/v_1", b'{"time": "2026-11-30T12:00:00+00:00", "value": 1.5}'),
        ("x/acme/meter/m_1/bad", b'{"time": "2026-11-30T12:00:00+00:00", "value": null}'),
        ("x/acme/meter/m_1/on", b'{"time": "2026-11-30T12:00:00+00:00", "value": true}'),
    ]
    # A failing meter's status is told once per streak, and when it recovers.
    failed = composer.messages(MeterFailed("m#1", T0, "timeout"), directory)
    assert [(m.topic, m.retain, m.qos) for m in failed] == [("dtucenter/acme/m_1/status", True, 1)]
    assert composer.messages(MeterFailed("m#1", T0, "timeout"), directory) == []
    recovered = composer.messages(MeterRead("m#1", T0, {}), directory)
    assert [m.payload for m in recovered] == [b'{"time": "2026-11-30T12:00:00+00:00", "state": "ok"}']
    (online,) = composer.messages(DtuOnline(5, "1.2.3.4:5", T0), directory)
    assert online.payload == b'{"time": "2026-11-30T12:00:00+00:00", "online": true, "peer": "1.2.3.4:5"}'
    (link,) = composer.messages(LinkUp("l", "/dev/ttyS0", T0), directory)
    assert link.topic == "dtucenter/acme/l/status"
    assert composer.center_status(False, None) == Message("dtucenter/center/status", b'{"online": false}', 1, True)


def test_device_payloads_carry_a_whole_upload() -> None:
    composer = Composer(MqttSettings(url="mqtt://b", payload="device"))
    (message,) = composer.messages(UploadStored(5, T0, (7, 8)), Directory({("dtu", 5): "acme"}))
    assert message.topic == "dtucenter/acme/5/values"
    assert message.payload == b'{"time": "2026-11-30T12:00:00+00:00", "values": {"0": 7, "1": 8}}'


# -- settings ------------------------------------------------------------------------------------


def test_broker_urls() -> None:
    assert parse_broker_url("mqtt://h") == Broker("h", 1883, False)
    assert parse_broker_url("mqtts://u%40x:p%3Aw@h:1") == Broker("h", 1, True, "u@x", "p:w")
    assert "p:w" not in repr(parse_broker_url("mqtts://u:p:w@h")) and "p:w" not in str(parse_broker_url("mqtts://u:p:w@h"))


@pytest.mark.parametrize(("document", "options", "message"), [
    ({"mqtt": {"url": "http://h"}}, {}, "defaults: mqtt: url: expected mqtt://"),
    ({}, {"mqtt": "mqtt://h:99999"}, "--mqtt: not a port number"),
    ({}, {"mqtt-topic": "a/+/{device}"}, "--mqtt-topic: a topic to publish on has no wildcards"),
    ({}, {"mqtt-topic": "a/{psn}"}, "--mqtt-topic: unknown placeholder {psn}"),
    ({}, {"mqtt-qos": "2"}, "--mqtt-qos: must be between 0 and 1, got 2"),
    ({}, {"mqtt-version": "3"}, "--mqtt-version: must be one of 3.1.1, 5"),
    ({"mqtt": {"url": "mqtt://h", "ca": "ca.pem"}}, {}, "defaults: mqtt: ca: is for a TLS broker"),
    ({"mqtt": {"url": "mqtts://h", "key": "k.pem"}}, {}, "defaults: mqtt: key: needs cert"),
    ({"mqtt": {"nope": 1}}, {}, "defaults: mqtt: nope: unknown key"),
])
def test_settings_errors(document: dict[str, object], options: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        read_settings(document, options)
    assert str(raised.value).startswith(message), raised.value


def test_options_win_over_the_file() -> None:
    settings = read_settings(
        {"mqtt": {"url": "mqtt://file", "qos": 0, "client_id": "a"}}, {"mqtt": "mqtts://option", "mqtt-qos": "1"},
        source="c.toml",
    )
    assert settings.mqtt.broker == Broker("option", 8883, True) and settings.mqtt.qos == 1
    assert settings.mqtt.client_id == "a"
    assert settings.where("mqtt.url") == "--mqtt" and settings.where("mqtt.client_id") == "c.toml: mqtt: client_id"
    assert read_settings({}).mqtt.url is None


def test_extras_are_published_in_order_with_the_events() -> None:
    r = rig()
    assert r.connection.up is not None
    r.connection.up()
    r.connection.deliver_all()
    r.upload(1)
    alarm = Extra(("dtu", 1), "alarms/{account}/{device}/{point}", {"state": "raised", "value": 1}, point="p0")
    r.publisher.publish_extra(alarm)
    r.upload(2)
    r.clock.advance(FLUSH_INTERVAL)
    assert [(m.topic, m.payload) for _, m in r.connection.sent] == [
        ("dtucenter/acme/1/0", b'{"time":"2026-11-30T12:00:00+00:00","value":1}'),
        ("alarms/acme/1/p0", b'{"state": "raised", "value": 1}'),
        ("dtucenter/acme/1/0", b'{"time":"2026-11-30T12:00:00+00:00","value":2}'),
    ]
    stop(r)


def test_batches_carry_a_turns_uploads_and_polls_per_account_and_keep_order_with_states() -> None:
    r = rig(payload="batch")
    r.backlog.accounts[("meter", "m")] = "other"
    r.publisher._reload()
    assert r.connection.up is not None
    r.connection.up()
    r.connection.deliver_all()
    r.hub.publish(UploadStored(1, T0, (1, 2)))
    r.hub.publish(MeterRead("m", T0, {"v": 1.5}))
    r.hub.publish(UploadStored(1, T0, (3, 4)))
    r.hub.publish(MeterFailed("m", T0, "timeout"))  # a state: after the values before it
    r.hub.publish(UploadStored(1, T0, (5, 6)))
    r.clock.advance(FLUSH_INTERVAL)
    time = "2026-11-30T12:00:00+00:00"
    assert [(m.topic, m.payload, m.retain) for _, m in r.connection.sent] == [
        ("dtucenter/acme/batch",
         b'[{"kind":"dtu","device":"1","time":"%s","values":{"0":1,"1":2}},'
         b'{"kind":"dtu","device":"1","time":"%s","values":{"0":3,"1":4}}]' % (time.encode(), time.encode()), False),
        ("dtucenter/other/batch", b'[{"kind":"meter","device":"m","time":"%s","values":{"v":1.5}}]' % time.encode(),
         False),
        ("dtucenter/other/m/status", b'{"time": "%s", "state": "failing", "reason": "timeout"}' % time.encode(), True),
        ("dtucenter/acme/batch",
         b'[{"kind":"dtu","device":"1","time":"%s","values":{"0":5,"1":6}}]' % time.encode(), False),
    ]
    stop(r)


def test_alarms_are_published_retained_per_rule_after_what_was_batched_before() -> None:
    from dtucenter.events import AlarmCleared, AlarmRaised

    r = rig(payload="batch")
    assert r.connection.up is not None
    r.connection.up()
    r.connection.deliver_all()
    r.hub.publish(UploadStored(1, T0, (90,)))
    # Alarms name their account: no look-up, even for a device the directory does not know.
    r.hub.publish(AlarmRaised(7, "acme", "hot/1", "dtu", "1", "0", 90.0, 80.0, "dtu 1 0 = 90 above 80", T0))
    r.hub.publish(AlarmCleared(7, "acme", "hot/1", "dtu", "1", "0", 70.0, "back", T0))
    r.clock.advance(FLUSH_INTERVAL)
    sent = [(m.topic, m.retain, m.qos) for _, m in r.connection.sent]
    assert sent == [("dtucenter/acme/batch", False, 1), ("dtucenter/acme/1/alarms/hot_1", True, 1),
                    ("dtucenter/acme/1/alarms/hot_1", True, 1)]
    assert r.connection.sent[1][1].payload == (
        b'{"time": "2026-11-30T12:00:00+00:00", "state": "raised", "alarm": 7, "rule": "hot/1", "kind": "dtu", '
        b'"device": "1", "point": "0", "value": 90.0, "limit": 80.0, "message": "dtu 1 0 = 90 above 80"}'
    )
    assert b'"state": "cleared"' in r.connection.sent[2][1].payload
    assert r.backlog.looked_up == []
    stop(r)


def test_frames_come_whole_whatever_the_chunks() -> None:
    sent = [("send", [(1, [(1, "t/1", b"\x00\xff", 1, True), (2, "t/2", b"{}", 0, False)])]),
            ("delivered", 2), ("down", "gone")]
    stream = b"".join(map(frames.encode, sent))
    reader = frames.FrameReader()
    received = [frame for byte in range(len(stream)) for frame in reader.feed(stream[byte:byte + 1])]
    assert received == sent
    assert frames.FrameReader().feed(stream) == sent


def test_a_stream_out_of_step_is_refused() -> None:
    with pytest.raises(frames.FrameError, match="announced"):
        frames.FrameReader().feed(b"\xff\xff\xff\xff")
    with pytest.raises(frames.FrameError, match="not a frame"):
        frames.FrameReader().feed(b"\x00\x00\x00\x03abc")
    reader = frames.FrameReader()
    assert reader.feed(frames.encode(("up", 1))[:-1]) == []  # a frame not yet whole waits


class FakeWorkerReactor(Clock):
    """spawnProcess recorded: each worker's protocol and what was written to its stdin, frame by frame."""

    def __init__(self) -> None:
        super().__init__()
        self.workers: list[tuple[Any, list[Any]]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any, childFDs: Any) -> Any:
        assert args[1:] == ["-m", "dtucenter.mqtt.worker"]
        writes: list[Any] = []
        reader = frames.FrameReader()
        signals: list[str] = []

        @attrs.define
        class Transport:
            pid: int = 4242

            def write(self, data: bytes) -> None:
                writes.append(reader.feed(data))  # one write: the frames it held

            def signalProcess(self, name: str) -> None:
                signals.append(name)

        self.workers.append((protocol, writes))
        return Transport()


def test_the_worker_connection_writes_once_a_turn_and_restarts_a_dead_worker() -> None:
    from twisted.internet.error import ProcessDone, ProcessTerminated
    from twisted.python.failure import Failure

    from dtucenter.mqtt.client import RESTART_FIRST, BrokerConnection

    reactor = FakeWorkerReactor()
    settings = MqttSettings(url="mqtt://broker")
    heard: list[object] = []
    def status(online: bool) -> Message:
        return Message("center", b"on" if online else b"off", 1, True)

    connection = BrokerConnection(settings, Broker("broker", 1883, False), reactor, status,
                                  Message("center", b"will", 1, True))
    connection.start(lambda: heard.append("up"), heard.append, heard.append)
    worker, writes = reactor.workers[0]
    [[(kind, sent_settings, _, will)]] = writes
    assert (kind, sent_settings, will) == ("config", settings, (0, "center", b"will", 1, True))

    worker.outReceived(frames.encode(("up", 1)))
    assert writes[1:] == [[("birth", 1, (0, "center", b"on", 1, True))]] and heard == ["up"]
    connection.send([(1, "a", b"1", 1, False)])
    connection.send([(2, "b", b"2", 1, False), (3, "c", b"3", 1, False)])
    assert len(writes) == 2  # nothing written until the turn ends
    reactor.advance(0)
    assert writes[2] == [("send", [(1, [(1, "a", b"1", 1, False)]), (1, [(2, "b", b"2", 1, False),
                                                                         (3, "c", b"3", 1, False)])])]
    stream = b"".join(frames.encode(("delivered", n)) for n in (1, 2, 3))
    worker.outReceived(stream[:5])
    worker.outReceived(stream[5:])
    assert heard == ["up", 3]  # a chunk's run of acks told once

    connection.send([(4, "d", b"4", 1, False)])
    worker.processEnded(Failure(ProcessTerminated(signal=9)))
    assert heard[2].startswith("the MQTT worker process")  # type: ignore[union-attr]
    assert connection.pid is None and len(reactor.workers) == 1
    reactor.advance(0)
    assert len(writes) == 3  # the batch for the dead worker is the publisher's to keep, not written anywhere
    reactor.advance(RESTART_FIRST)
    assert connection.starts == 2
    second, second_writes = reactor.workers[1]
    connection.send([(4, "d", b"4", 1, False)])  # before the new worker is up: meant for no connection
    stopped = connection.stop()
    assert [frame[0] for chunk in second_writes for frame in chunk] == ["config", "stop"]
    assert not stopped.called
    second.processEnded(Failure(ProcessDone(0)))
    assert stopped.called and connection.pid is None
    assert not reactor.getDelayedCalls()


def test_a_dtus_topics_cross_to_the_worker_once_then_by_slot() -> None:
    from dtucenter.mqtt.client import TopicSlots
    from dtucenter.mqtt.worker import Worker

    slots = TopicSlots(size=2)
    a, b, c = ("a/0", "a/1"), ("b/0",), ("c/0",)
    first = slots.numbered([(1, a, b"h", (5, 6), 1, True), (3, "x", b"p", 1, False), (4, a, b"h", (7, 8), 1, True)])
    assert first == [(1, (0, a), b"h", (5, 6), 1, True), (3, "x", b"p", 1, False), (4, 0, b"h", (7, 8), 1, True)]
    second = slots.numbered([(6, b, b"h", (1,), 1, True), (7, a, b"h", (2,), 1, True)])
    assert [e[1] for e in second] == [(1, b), 0]
    # Past its size the oldest slot is given anew, within one frame too: c takes a's slot, then a b's.
    third = slots.numbered([(10, c, b"h", (1,), 1, True), (11, a, b"h", (2,), 1, True), (12, c, b"h", (3,), 1, True)])
    assert [e[1] for e in third] == [(0, c), (1, a), 0]

    # The worker learns each set where it comes and resolves the runs in order, as PUBLISH names the topics.
    worker = Worker(MqttSettings(url="mqtt://broker"), Broker("broker", 1883, False), (0, "w", b"", 1, True), -1, -1,
                    frames.FrameReader())
    worker.take([("send", [(1, first), (1, second)])])
    worker.take([("send", [(1, third)])])
    names = [entry[1] for _, _, entries in worker._inbox for entry in entries if len(entry) == 6]
    a_names, b_names, c_names = (b"\x00\x03a/0", b"\x00\x03a/1"), (b"\x00\x03b/0",), (b"\x00\x03c/0",)
    assert names == [a_names, a_names, b_names, a_names, c_names, a_names, c_names]


def test_the_worker_hears_a_stop_while_it_waits_for_the_broker_or_to_reconnect() -> None:
    import os
    import socket

    from dtucenter.mqtt.packets import PacketReader
    from dtucenter.mqtt.worker import Lost, Worker

    def worker_told_to_stop() -> tuple[Worker, int]:
        source, center = os.pipe()
        os.write(center, frames.encode(("stop", (0, "c", b"bye", 1, True))))
        worker = Worker(MqttSettings(url="mqtt://broker"), Broker("broker", 1883, False), (0, "w", b"", 1, True),
                        source, -1, frames.FrameReader())
        return worker, center

    worker, center = worker_told_to_stop()
    worker._wait(3600)  # the backoff before reconnecting
    assert worker.stopping
    os.close(center)
    os.close(worker._source)

    worker, center = worker_told_to_stop()
    client, silent_broker = socket.socketpair()  # connected, never answers CONNECT
    with pytest.raises(Lost, match="no answer"):
        worker._connack(client, PacketReader(False))
    assert worker.stopping  # heard, not timed out
    for end in (client, silent_broker):
        end.close()
    os.close(center)
    os.close(worker._source)
