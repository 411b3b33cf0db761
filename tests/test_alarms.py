"""Alarm rules and their evaluation, on ``task.Clock``: limits, hysteresis, delays, offline timers, flapping."""

from __future__ import annotations

import datetime as dt
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from dtucenter.alarms.engine import ActiveAlarm, AlarmEngine, OwnedRule
from dtucenter.alarms.rules import AlarmRule, read_alarm_rule
from dtucenter.config import ConfigError, read_settings
from dtucenter.events import (
    AlarmCleared,
    AlarmRaised,
    DtuOffline,
    DtuOnline,
    Event,
    EventHub,
    LinkDown,
    LinkUp,
    MeterFailed,
    MeterRead,
    UploadStored,
)
from dtucenter.isotime import utc_now
from dtucenter.setting import Place

T0 = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)


def rule(**keys: Any) -> AlarmRule:
    return read_alarm_rule({"name": "r", **keys}, Place("test"))


@attrs.define
class FakeSink:
    """The store's part: one active alarm per rule, as the real store keeps."""

    active: dict[tuple[int, str], int] = attrs.Factory(dict)
    written: list[tuple[str, str, float | None]] = attrs.Factory(list)
    next_id: int = 1

    def raised(self, owned: OwnedRule, value: float | None, message: str, time: dt.datetime) -> Deferred[int | None]:
        self.written.append(("raised", owned.rule.name, value))
        if owned.key in self.active:
            return succeed(None)
        self.active[owned.key] = self.next_id
        self.next_id += 1
        return succeed(self.active[owned.key])

    def cleared(self, owned: OwnedRule, value: float | None, message: str, time: dt.datetime) -> Deferred[int | None]:
        self.written.append(("cleared", owned.rule.name, value))
        return succeed(self.active.pop(owned.key, None))


@attrs.define
class Harness:
    clock: Clock
    hub: EventHub
    sink: FakeSink
    engine: AlarmEngine
    heard: list[AlarmRaised | AlarmCleared]
    online: set[tuple[str, str]]

    def states(self) -> list[tuple[str, float | None]]:
        return [("raised" if isinstance(e, AlarmRaised) else "cleared", e.value) for e in self.heard]

    def meter(self, value: float, meter: str = "m", point: str = "p") -> None:
        self.hub.publish(MeterRead(meter, utc_now(self.clock), {point: value}))

    def upload(self, *values: int, psn: int = 7) -> None:
        self.hub.publish(UploadStored(psn, utc_now(self.clock), values))


def harness(*rules: AlarmRule, active: tuple[ActiveAlarm, ...] = (), online: tuple[tuple[str, str], ...] = (),
            registers: dict[int, list[tuple[int, int]]] | None = None) -> Harness:
    clock = Clock()
    hub = EventHub()
    sink = FakeSink()
    up = set(online)
    for alarm in active:
        sink.active[(alarm.account_id, alarm.rule)] = 100
    engine = AlarmEngine(
        hub, sink, clock, lambda: utc_now(clock), lambda kind, name: (kind, name) in up,
        (lambda psn: succeed((registers or {}).get(psn))),
    )
    heard: list[AlarmRaised | AlarmCleared] = []

    def listen(event: Event) -> None:
        if isinstance(event, AlarmRaised | AlarmCleared):
            heard.append(event)

    hub.subscribe(listen)
    engine.start((), [OwnedRule(1, "acme", r) for r in rules], active)
    return Harness(clock, hub, sink, engine, heard, up)


# -- reading rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("keys", "message"), [
    ({"point": "p", "above": 1}, "test: needs the device it watches: meter, dtu or link"),
    ({"meter": "m"}, "test: needs point (with above or below) or failed_polls or failing_for"),
    ({"meter": "m", "dtu": 1, "offline": 3}, "test: dtu: cannot be combined with meter; a rule watches one device"),
    ({"meter": "m", "point": "p"}, "test: a point rule needs above or below"),
    ({"meter": "m", "point": "p", "above": 1, "below": 0},
     "test: below: cannot be combined with above; make two rules"),
    ({"meter": "m", "offline": 3}, "test: offline: does not apply to a meter; give failed_polls or failing_for"),
    ({"link": "l", "point": "p", "above": 1}, "test: point: a link has no points; watch its meters, or give offline"),
    ({"dtu": 1, "point": "x", "above": 1},
     "test: point: a DTU point is a position (0, 1, ...) or dev-addr (1-40001), got 'x'"),
    ({"dtu": 1, "offline": 3, "delay": 2}, "test: delay: needs point (a device rule has no limit)"),
    ({"meter": "m", "point": "p", "above": 1, "hysteresis": -1},
     "test: hysteresis: must be between 0 and 1e+300, got -1"),
    ({"meter": "m", "failed_polls": 3, "webhook": "ftp://x"},
     "test: webhook: must be an http:// or https:// URL, got 'ftp://x'"),
    ({"meter": "m", "failed_polls": 3, "colour": "red"}, "test: colour: unknown key (a typo?)"),
])
def test_a_rule_that_cannot_work_is_refused_naming_the_key(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        rule(**keys)
    assert str(refused.value) == message


def test_the_files_alarm_tables_are_read_with_their_names_and_must_be_unique() -> None:
    settings = read_settings({"alarm": [
        {"name": "hot", "meter": "m", "point": "t", "above": 80, "hysteresis": 5, "delay": 30},
        {"name": "silent", "dtu": 7, "offline": 60, "webhook": "https://example.com/hook"},
    ]}, source="center.toml")
    assert [r.definition() for r in settings.alarms] == [
        {"name": "hot", "meter": "m", "point": "t", "above": 80.0, "hysteresis": 5.0, "delay": 30.0},
        {"name": "silent", "dtu": 7, "offline": 60.0, "webhook": "https://example.com/hook"},
    ]
    with pytest.raises(ConfigError, match=r'^center.toml: alarm "hot": delay: must be a number'):
        read_settings({"alarm": [{"name": "hot", "meter": "m", "point": "t", "above": 1, "delay": "x"}]},
                      source="center.toml")
    with pytest.raises(ConfigError, match=r"^center.toml: alarm\[1\]: name: 'a' is already the name of alarm\[0\]$"):
        read_settings({"alarm": [{"name": "a", "dtu": 1, "offline": 1}, {"name": "a", "dtu": 2, "offline": 1}]},
                      source="center.toml")


# -- point rules ---------------------------------------------------------------------------------------


def test_above_a_limit_raises_at_once_and_hysteresis_keeps_it_until_the_value_is_well_back() -> None:
    h = harness(rule(meter="m", point="p", above=80, hysteresis=5))
    h.meter(80)
    assert h.heard == []  # at the limit is not above it
    h.meter(81)
    assert h.states() == [("raised", 81.0)]
    h.meter(90)
    h.meter(76)  # within the hysteresis: still raised, not raised again
    assert h.states() == [("raised", 81.0)]
    h.meter(75)
    assert h.states() == [("raised", 81.0), ("cleared", 75.0)]
    raised = h.heard[0]
    assert isinstance(raised, AlarmRaised)
    assert (raised.account, raised.rule, raised.device_kind, raised.device, raised.point, raised.limit) == (
        "acme", "r", "meter", "m", "p", 80.0)
    assert raised.message == "meter m p = 81, above 80"
    assert not h.clock.getDelayedCalls()


def test_below_a_limit_mirrors_above() -> None:
    h = harness(rule(meter="m", point="p", below=10, hysteresis=2))
    h.meter(9.5)
    h.meter(11.9)
    h.meter(12)
    assert h.states() == [("raised", 9.5), ("cleared", 12.0)]


def test_the_delay_before_raising_needs_the_condition_to_hold_throughout() -> None:
    h = harness(rule(meter="m", point="p", above=80, delay=30))
    h.meter(85)
    h.clock.advance(29)
    h.meter(79)  # back under before the delay: nothing, and the countdown is gone
    h.clock.advance(10)
    assert h.heard == [] and not h.clock.getDelayedCalls()
    h.meter(85)
    h.clock.advance(20)
    h.meter(90)  # still above: the countdown is not restarted
    h.clock.advance(10)
    assert h.states() == [("raised", 90.0)]
    assert h.heard[0].time == T0.replace(year=1970, month=1, day=1) + dt.timedelta(seconds=69)


def test_the_delay_before_clearing_and_flapping_around_the_limit_raise_once() -> None:
    h = harness(rule(meter="m", point="p", above=80, hysteresis=5, delay=5, clear_delay=10))
    for _ in range(20):  # flapping faster than the delay: never raised
        h.meter(81)
        h.clock.advance(2)
        h.meter(70)
        h.clock.advance(2)
    assert h.heard == []
    h.meter(81)
    h.clock.advance(5)
    assert h.states() == [("raised", 81.0)]
    for _ in range(20):  # flapping faster than the clearing delay: stays raised, raised once
        h.meter(70)
        h.clock.advance(5)
        h.meter(81)
        h.clock.advance(5)
    assert h.states() == [("raised", 81.0)]
    h.meter(70)
    h.clock.advance(10)
    assert h.states() == [("raised", 81.0), ("cleared", 70.0)]
    assert not h.clock.getDelayedCalls()


def test_a_dtu_point_is_its_position_or_its_dev_addr_in_the_register_list() -> None:
    by_position = harness(rule(dtu=7, point=1, above=100))
    by_position.upload(500, 50)
    by_position.upload(50, 150)
    by_position.upload(150, 50, psn=8)  # another DTU: not looked at
    assert by_position.states() == [("raised", 150.0)]
    by_register = harness(rule(dtu=7, point="1-40002", above=100), registers={7: [(1, 40001), (1, 40002)]})
    by_register.upload(500, 50)
    by_register.upload(50, 150)
    assert by_register.states() == [("raised", 150.0)]
    unknown = harness(rule(dtu=7, point="2-1", above=100), registers={7: [(1, 40001)]})
    unknown.upload(500)
    assert unknown.heard == []


# -- device rules --------------------------------------------------------------------------------------


def test_a_dtu_offline_for_n_seconds_raises_and_its_login_clears() -> None:
    h = harness(rule(dtu=7, offline=60), online=(("dtu", "7"),))
    assert not h.clock.getDelayedCalls()  # online when the rule began
    h.hub.publish(DtuOffline(7, "peer", utc_now(h.clock)))
    h.clock.advance(59)
    h.hub.publish(DtuOnline(7, "peer", utc_now(h.clock)))  # back in time: nothing
    h.clock.advance(120)
    assert h.heard == []
    h.hub.publish(DtuOffline(7, "peer", utc_now(h.clock)))
    h.clock.advance(60)
    assert h.states() == [("raised", None)]
    assert h.heard[0].message == "dtu 7 offline for 60 s"
    h.hub.publish(DtuOnline(7, "peer", utc_now(h.clock)))
    assert h.states() == [("raised", None), ("cleared", None)]
    assert not h.clock.getDelayedCalls()


def test_a_device_offline_when_its_rule_begins_is_counted_from_then() -> None:
    h = harness(rule(link="site-a", offline=30))
    h.clock.advance(30)
    assert h.states() == [("raised", None)]
    h.hub.publish(LinkUp("site-a", "1.2.3.4:5", utc_now(h.clock)))
    h.hub.publish(LinkDown("site-a", utc_now(h.clock)))
    h.clock.advance(30)
    assert h.states() == [("raised", None), ("cleared", None), ("raised", None)]


def test_a_meter_failing_n_polls_in_a_row_or_for_n_seconds() -> None:
    by_count = harness(rule(meter="m", failed_polls=3))
    for _ in range(2):
        by_count.hub.publish(MeterFailed("m", utc_now(by_count.clock), "timeout"))
    by_count.meter(1)  # a good poll starts the count again
    for _ in range(3):
        by_count.hub.publish(MeterFailed("m", utc_now(by_count.clock), "timeout"))
    assert by_count.states() == [("raised", None)]
    assert by_count.heard[0].message == "meter m: 3 polls failed in a row (last: timeout)"
    by_count.hub.publish(MeterFailed("m", utc_now(by_count.clock), "timeout"))
    by_count.meter(1)
    assert by_count.states() == [("raised", None), ("cleared", None)]

    by_time = harness(rule(meter="m", failing_for=60))
    by_time.hub.publish(MeterFailed("m", utc_now(by_time.clock), "timeout"))
    by_time.clock.advance(30)
    by_time.hub.publish(MeterFailed("m", utc_now(by_time.clock), "timeout"))
    by_time.clock.advance(30)
    assert by_time.states() == [("raised", None)]


# -- rules changing, restarts ------------------------------------------------------------------------


def test_an_alarm_active_in_the_store_is_not_raised_again_and_clears_as_usual() -> None:
    h = harness(rule(meter="m", point="p", above=80),
                active=(ActiveAlarm(1, "acme", "r", "meter", "m", "p"),))
    assert h.engine.is_raised(1, "r")
    h.meter(90)
    assert h.heard == [] and h.sink.written == []
    h.meter(10)
    assert h.states() == [("cleared", 10.0)]
    assert h.heard[0].alarm == 100
    dtu = harness(rule(dtu=7, point="1-2", above=80), registers={7: [(1, 1), (1, 2)]},
                  active=(ActiveAlarm(1, "acme", "r", "dtu", "7", "1-2"),))
    dtu.upload(0, 90)
    dtu.upload(0, 10)
    assert dtu.states() == [("cleared", 10.0)]
    offline = harness(rule(dtu=7, offline=5), active=(ActiveAlarm(1, "acme", "r", "dtu", "7", None),))
    assert not offline.clock.getDelayedCalls()  # offline and raised: nothing to count down
    offline.hub.publish(DtuOnline(7, "peer", utc_now(offline.clock)))
    assert offline.states() == [("cleared", None)]


def test_an_active_alarm_whose_rule_is_gone_is_cleared_at_start() -> None:
    h = harness(active=(ActiveAlarm(1, "acme", "old", "dtu", "7", None),))
    assert [(e.rule, e.device_kind, e.device, e.message) for e in h.heard] == [("old", "dtu", "7", "rule removed")]


def test_a_rule_removed_or_changed_clears_its_alarm_and_cancels_its_timers() -> None:
    h = harness(rule(dtu=7, offline=10))
    h.clock.advance(10)
    h.engine.put_rule(OwnedRule(1, "acme", rule(dtu=7, offline=20)))
    assert [(type(e).__name__, e.message) for e in h.heard] == [
        ("AlarmRaised", "dtu 7 offline for 10 s"), ("AlarmCleared", "rule changed")]
    assert len(h.clock.getDelayedCalls()) == 1  # the new rule counts anew
    h.engine.remove_rule(1, "r")
    assert not h.clock.getDelayedCalls()
    h.engine.put_rule(OwnedRule(1, "acme", rule(meter="m", point="p", above=1)))
    h.engine.stop()
    assert not h.clock.getDelayedCalls()


def test_the_engine_listens_only_while_it_has_rules() -> None:
    clock = Clock()
    hub = EventHub()
    engine = AlarmEngine(hub, FakeSink(), clock, lambda: utc_now(clock), lambda kind, name: True)
    engine.start((), (), ())
    assert not hub.listening  # uploads build no event for it
    engine.put_rule(OwnedRule(1, "acme", rule(meter="m", failed_polls=1)))
    assert hub.listening
    engine.remove_rule(1, "r")
    assert not hub.listening


# -- webhooks ------------------------------------------------------------------------------------------


@attrs.define
class FakeAgent:
    """Answers each POST with the Deferred a test fires; records what was sent."""

    sent: list[tuple[bytes, bytes]] = attrs.Factory(list)
    answers: list[Deferred[Any]] = attrs.Factory(list)

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:
        key = headers.getRawHeaders(b"X-Dtucenter-Delivery")[0]
        body: list[bytes] = []
        bodyProducer.startProducing(_Collect(body))
        self.sent.append((key, b"".join(body)))
        answer: Deferred[Any] = Deferred()
        self.answers.append(answer)
        return answer


class _Collect:
    def __init__(self, into: list[bytes]) -> None:
        self.into = into

    def write(self, data: bytes) -> None:
        self.into.append(data)


class FakeResponse:
    def __init__(self, code: int) -> None:
        self.code = code

    def deliverBody(self, protocol: Any) -> None:
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseDone

        protocol.dataReceived(b"ok")
        protocol.connectionLost(Failure(ResponseDone()))


def sender(**options: Any) -> tuple[Any, FakeAgent, Clock]:
    from dtucenter.alarms.webhooks import WebhookSender

    clock = Clock()
    agent = FakeAgent()
    return WebhookSender(clock, clock, agent=agent, **options), agent, clock  # type: ignore[arg-type]


def test_a_webhook_is_retried_with_backoff_one_at_a_time_in_order() -> None:
    from dtucenter.alarms.webhooks import Delivery

    webhooks, agent, clock = sender(first_retry=1, max_retry=4)
    for key in ("a", "b", "c"):
        webhooks.send("http://x/", Delivery(key, key.encode()))
    assert [key for key, _ in agent.sent] == [b"a"]  # one in flight
    delays = []
    for _ in range(4):
        agent.answers[-1].callback(FakeResponse(503))
        (retry,) = clock.getDelayedCalls()
        delays.append(retry.getTime() - clock.seconds())
        clock.advance(delays[-1])
    assert delays == [1, 2, 4, 4]
    agent.answers[-1].errback(ConnectionRefusedError())
    clock.advance(4)
    for _ in range(3):
        agent.answers[-1].callback(FakeResponse(200))
    assert [key for key, _ in agent.sent] == [b"a"] * 6 + [b"b", b"c"]
    assert (webhooks.stats.delivered, webhooks.stats.failed_attempts, webhooks.queued) == (3, 5, 0)
    assert not clock.getDelayedCalls()


def test_a_webhook_that_does_not_answer_times_out_and_the_queue_is_bounded() -> None:
    from dtucenter.alarms.webhooks import Delivery

    webhooks, agent, clock = sender(first_retry=1, max_queued=3, timeout=10)
    for key in "abcde":
        webhooks.send("http://x/", Delivery(key, b"{}"))
    # The oldest waiting ones went (the one in flight stays), counted.
    assert (webhooks.queued, webhooks.stats.dropped) == (3, 2)
    clock.advance(10)  # no answer: timed out, retried after a second
    clock.advance(1)
    for _ in range(3):
        agent.answers[-1].callback(FakeResponse(204))
    assert [key for key, _ in agent.sent] == [b"a", b"a", b"d", b"e"]
    webhooks.send("http://x/", Delivery("f", b"{}"))
    webhooks.stop()
    assert not clock.getDelayedCalls()


def test_the_cost_benchmark_runs_and_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import alarms_cost

    alarms_cost.main(["--uploads", "50", "--rate", "1000"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| case | µs per upload | share of a core at 1000 uploads/s |"
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| no rules", "| 10,000 rules on other DTUs", "| 1 rule per DTU (10,000 DTUs)",
        "| 8 rules per DTU (2,000 DTUs)"]
