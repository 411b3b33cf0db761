"""The web console's server side: sessions and CSRF, its files, live events, downsampled charts, exports, DTU pages."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import random
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import attrs
import pytest
import pytest_twisted
import treq
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.web.client import HTTPConnectionPool

from dtucenter.events import (
    AlarmCleared,
    AlarmRaised,
    DtuOffline,
    DtuOnline,
    EventHub,
    LinkUp,
    MeterFailed,
    UploadStored,
)
from dtucenter.store import console_sessions
from dtucenter.store.db import open_engine
from dtucenter.store.facade import METER_SAMPLES
from dtucenter.store.models import ConsoleSession
from dtucenter.web import live
from dtucenter.web.auth import Caller
from dtucenter.web.console_site import console_url, session_cookie
from dtucenter.web.downsample import Downsampler
from tests.support import STEP_TIMEOUT, ApiClient, RunningCenter, make_account, open_events, start_center

T0 = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)
PSN, OTHER_PSN = 5001, 5002


@attrs.frozen
class Answer:
    status: int
    headers: Mapping[str, list[str]]
    text: str


async def browser(center: RunningCenter, method: str, path: str, cookie: str | None = None, csrf: str | None = None,
                  body: bytes | None = None, token: str | None = None) -> Answer:
    """A request as the console's page makes it: the session cookie, the CSRF header, no bearer token."""
    assert center.api_port is not None
    headers: dict[str, str] = {}
    if cookie is not None:
        headers["Cookie"] = cookie
    if csrf is not None:
        headers["X-CSRF-Token"] = csrf
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    pool = HTTPConnectionPool(reactor, persistent=False)
    response = await treq.request(method, f"http://127.0.0.1:{center.api_port}{path}", headers=headers, data=body,
                                  pool=pool, timeout=STEP_TIMEOUT)
    text = (await treq.content(response)).decode("utf-8")
    raw = {k.decode().lower(): [v.decode() for v in vs] for k, vs in response.headers.getAllRawHeaders()}
    return Answer(response.code, raw, text)


async def sign_in(center: RunningCenter, token: str) -> tuple[str, str, str]:
    """(cookie header value, CSRF token, the Set-Cookie line) of a new session opened with ``token``."""
    answer = await browser(center, "POST", "/api/session", token=token)
    assert answer.status == 201, answer.text
    set_cookie = answer.headers["set-cookie"][0]
    return set_cookie.split(";")[0], json.loads(answer.text)["csrf"], set_cookie


# -- sessions -------------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_session_is_a_revocable_csrf_checked_cookie(tmp_path: Path, db_url: str) -> None:
    center = await start_center(tmp_path, db_url=db_url)
    try:
        admin = center.api()
        acme = await make_account(admin, "acme")
        assert (await admin.call("PUT", f"/api/dtus/{PSN}", {"name": "admin's"})).status == 201

        # Signed out: the sign-in page only, and the API refuses the browser.
        page = await browser(center, "GET", "/")
        assert page.status == 200 and "signin.js" in page.text and "app.js" not in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"][0]
        assert (await browser(center, "GET", "/api/dtus")).status == 401

        cookie, csrf, set_cookie = await sign_in(center, acme.token)
        attributes = {part.strip().split("=")[0] for part in set_cookie.split(";")}
        assert {"Path", "Max-Age", "HttpOnly", "SameSite"} <= attributes and "Secure" not in attributes
        assert "SameSite=Strict" in set_cookie and "Max-Age=43200" in set_cookie
        assert acme.token not in set_cookie

        # Signed in: the console page, and the API as acme (scoped: the admin's DTU is not there).
        page = await browser(center, "GET", "/", cookie)
        assert "app.js" in page.text and "signin.js" not in page.text
        me = await browser(center, "GET", "/api/session", cookie)
        assert '"account": "acme"' in me.text and csrf in me.text
        assert '"dtus": []' in (await browser(center, "GET", "/api/dtus", cookie)).text

        # A state-changing request with the cookie needs the session's CSRF token; a bearer client does not.
        body = b'{"name": "second"}'
        no_csrf = await browser(center, "POST", "/api/accounts/acme/tokens", cookie, body=body)
        assert no_csrf.status == 403 and "X-CSRF-Token" in no_csrf.text
        wrong = await browser(center, "POST", "/api/accounts/acme/tokens", cookie, csrf=csrf[:-1] + "x", body=body)
        assert wrong.status == 403
        made = await browser(center, "POST", "/api/accounts/acme/tokens", cookie, csrf=csrf, body=body)
        assert made.status == 201, made.text
        assert (await acme.post("/api/accounts/acme/tokens", {"name": "third"})).status == 201
        # Opening a session takes a token, never the cookie of another session.
        assert (await browser(center, "POST", "/api/session", cookie, csrf=csrf)).status == 400

        # Sign-out ends the session: the cookie is cleared and refused from then on.
        out = await browser(center, "DELETE", "/api/session", cookie, csrf=csrf)
        assert out.status == 200 and '"signed_out": true' in out.text
        assert "Max-Age=0" in out.headers["set-cookie"][0]
        assert (await browser(center, "GET", "/api/session", cookie)).status == 401
        assert "signin.js" in (await browser(center, "GET", "/", cookie)).text

        # Revoking the token ends every session opened with it, at once.
        first, _, _ = await sign_in(center, acme.token)
        second, _, _ = await sign_in(center, acme.token)
        assert (await browser(center, "GET", "/api/session", first)).status == 200
        assert (await admin.call("DELETE", "/api/accounts/acme/tokens/ops")).status == 200
        for ended in (first, second):
            assert (await browser(center, "GET", "/api/session", ended)).status == 401

        def rows(session: Session) -> int:
            return session.scalar(select(func.count()).select_from(ConsoleSession)) or 0

        assert await center.store.read(rows) == 0

        # The configured token signs in as the first admin; a cookie that is not ASCII is just refused.
        admin_cookie, _, _ = await sign_in(center, center.api_token)
        assert '"admin": true' in (await browser(center, "GET", "/api/session", admin_cookie)).text
        assert (await browser(center, "GET", "/api/session", "dtucenter_session=\xe9")).status == 401
    finally:
        await center.stop()


def test_sessions_expire_and_expired_ones_are_swept(db_url: str) -> None:
    engine = open_engine(db_url)
    try:
        hour = dt.timedelta(hours=1)
        with Session(engine) as session, session.begin():
            opened = console_sessions.open_session(session, "d" * 64, T0, hour)
        with Session(engine) as session:
            assert console_sessions.find_session(session, opened.secret, T0 + hour - dt.timedelta(seconds=1))
            assert console_sessions.find_session(session, opened.secret, T0 + hour) is None
            assert console_sessions.find_session(session, opened.secret + "x", T0) is None
            stored = session.scalars(select(ConsoleSession.id)).all()
            assert opened.secret not in stored, "only the secret's digest is kept"
        with Session(engine) as session, session.begin():
            console_sessions.open_session(session, "d" * 64, T0 + hour, hour)
            assert session.scalar(select(func.count()).select_from(ConsoleSession)) == 1
    finally:
        engine.dispose()


def test_the_console_url_in_the_log_is_one_a_browser_on_the_machine_opens() -> None:
    assert console_url(IPv4Address("TCP", "0.0.0.0", 8080), tls=False) == "http://127.0.0.1:8080/"
    assert console_url(IPv4Address("TCP", "10.0.0.5", 8080), tls=False) == "http://10.0.0.5:8080/"
    assert console_url(IPv6Address("TCP", "::1", 8443), tls=True) == "https://[::1]:8443/"


def test_the_cookie_is_secure_over_tls() -> None:
    assert session_cookie("s", 60, secure=True).endswith("; Secure")
    assert "Secure" not in session_cookie("s", 60, secure=False)


@pytest_twisted.ensureDeferred
async def test_the_console_files_are_served_from_the_package(tmp_path: Path) -> None:
    center = await start_center(tmp_path)
    try:
        for path, kind in (("/console/app.js", "text/javascript"), ("/console/style.css", "text/css"),
                           ("/console/vendor/uPlot.iife.min.js", "text/javascript")):
            answer = await browser(center, "GET", path)
            assert answer.status == 200 and answer.headers["content-type"][0].startswith(kind), path
            assert answer.headers["x-content-type-options"] == ["nosniff"]
        missing = await browser(center, "GET", "/console/../setup.cfg")
        assert missing.status == 404
        assert (await browser(center, "POST", "/", body=b"x")).status == 405
        # The API keeps answering JSON under /api/, an unknown endpoint included.
        unknown = await center.api().get("/api/nothing-here")
        assert unknown.status == 404
        # A route outside /api/ (/metrics) goes before the console's files.
        metrics = await browser(center, "GET", "/metrics", token=center.api_token)
        assert metrics.status == 200 and "dtucenter_build_info" in metrics.text
        assert (await browser(center, "GET", "/metrics")).status == 401
        more = await browser(center, "GET", "/metrics/more")
        assert more.status == 404 and more.headers["content-type"][0].startswith("text/plain")
    finally:
        await center.stop()


# -- live events ----------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_live_events_are_filtered_per_account_and_resume(tmp_path: Path, db_url: str) -> None:
    center = await start_center(tmp_path, db_url=db_url)
    try:
        admin = center.api()
        acme = await make_account(admin, "acme")
        for psn in (PSN, OTHER_PSN):
            assert (await admin.call("PUT", f"/api/dtus/{psn}", {})).status == 201
        assert (await admin.call("PUT", f"/api/dtus/{PSN}", {"account": "acme"})).status == 200
        hub: EventHub = center.service.events  # type: ignore[attr-defined]
        feed: live.LiveFeed = center.service.getServiceNamed("live")  # type: ignore[assignment]

        cookie, _, _ = await sign_in(center, acme.token)
        mine = await open_events(center, cookie=cookie, watch=f"dtu:{PSN},dtu:{OTHER_PSN}")
        everything = await open_events(center, watch=f"dtu:{PSN}")
        try:
            await mine.until(lambda text: "event: summary" in text)
            await everything.until(lambda text: "event: summary" in text)
            hub.publish(DtuOnline(PSN, "127.0.0.1:1000", T0))
            hub.publish(DtuOnline(OTHER_PSN, "127.0.0.1:2000", T0))
            hub.publish(UploadStored(PSN, T0, (1, 2)))
            hub.publish(UploadStored(OTHER_PSN, T0, (3, 4)))
            hub.publish(LinkUp("someone-elses", "127.0.0.1:3000", T0))
            feed._summarize()
            for stream in (mine, everything):
                await stream.until(lambda text: text.count("event: summary") >= 2)
            seen = [(name, data.get("psn", data.get("link"))) for _, name, data in mine.events()]
            assert seen == [("hello", None), ("summary", None), ("dtu_online", PSN), ("upload", PSN), ("summary", None)]
            assert [e[1] for e in mine.events() if e[1] == "summary"] and mine.events()[-1][2]["dtus_total"] == 1
            admin_seen = [(name, data.get("psn", data.get("link"))) for _, name, data in everything.events()]
            # The admin sees every status event, and values of what it watches only.
            assert admin_seen[2:] == [("dtu_online", PSN), ("dtu_online", OTHER_PSN), ("upload", PSN),
                                      ("link_up", "someone-elses"), ("summary", None)]
            # The pending devices' count is the admin's, kept live; an account finds its own by registration.
            assert everything.events()[-1][2]["pending"] == 0
            assert "pending" not in mine.events()[-1][2]
            last_id = [i for i, _, _ in mine.events() if i][-1]
        finally:
            mine.close()
            everything.close()

        # Reconnecting with Last-Event-ID: what was missed meanwhile, in order, and nothing twice.
        hub.publish(DtuOffline(PSN, "127.0.0.1:1000", T0))
        hub.publish(UploadStored(PSN, T0, (5, 6)))
        resumed = await open_events(center, cookie=cookie, watch=f"dtu:{PSN}", last_id=last_id)
        stale = await open_events(center, cookie=cookie, last_id=f"{feed.epoch}-\u00b2")
        fresh = await open_events(center, cookie=cookie)
        try:
            await resumed.until(lambda text: "event: summary" in text)
            names = [name for _, name, _ in resumed.events()]
            assert names == ["hello", "dtu_offline", "upload", "summary"]
            assert resumed.events()[2][2]["values"] == [5, 6]
            await stale.until(lambda text: "event: resync" in text)
            # A new stream starts with the recent status events it may see (the overview's list).
            await fresh.until(lambda text: "event: summary" in text)
            assert [name for _, name, _ in fresh.events()] == ["hello", "dtu_online", "dtu_offline", "summary"]
        finally:
            for stream in (resumed, stale, fresh):
                stream.close()

        bad = await browser(center, "GET", "/api/events?watch=pumps", token=center.api_token)
        assert bad.status == 400 and "dtu:PSN" in bad.text
    finally:
        await center.stop()


class FakeTransport:
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


@attrs.define
class FakeChannel:
    transport: FakeTransport = attrs.Factory(FakeTransport)


class FakeRequest:
    """What LiveFeed uses of a twisted.web request, with the producer under the test's control."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None
        self.finished = False
        self.channel = FakeChannel()
        self._finish: Deferred[None] = Deferred()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def notifyFinish(self) -> Deferred[None]:
        finished: Deferred[None] = Deferred()
        self._finish.addBoth(lambda result: finished.callback(None))
        return finished

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def finish(self) -> None:
        self.finished = True
        self._finish.callback(None)

    def setResponseCode(self, code: int) -> None:
        pass

    def setHeader(self, name: bytes, value: bytes) -> None:
        pass


class FakeStore:
    healthy = True
    backlog = 0

    def read(self, job: Any) -> Deferred[Any]:
        return succeed(live.Visible(True, dtus_total=7))


@attrs.define
class FakeCenter:
    sessions: dict[int, object] = attrs.Factory(dict)


def test_a_stream_has_heartbeats_summaries_and_a_bounded_queue() -> None:
    clock, hub = Clock(), EventHub()
    feed = live.LiveFeed(hub, FakeCenter({1: object()}), FakeStore(), None, clock)  # type: ignore[arg-type]
    feed.startService()
    admin = Caller("admin", 1, "ops", True)
    request = FakeRequest()
    feed._open(request, admin, live.Visible(True, dtus_total=7), frozenset({"dtu:1"}), "")  # type: ignore[arg-type]
    stream = next(iter(feed.streams))
    for _ in range(int(live.HEARTBEAT_INTERVAL // live.SUMMARY_INTERVAL)):
        clock.advance(live.SUMMARY_INTERVAL)
    text = b"".join(request.written).decode()
    assert text.count("event: summary") == 1 + int(live.HEARTBEAT_INTERVAL // live.SUMMARY_INTERVAL)
    assert ": keep-alive\n\n" in text and '"dtus_online":1' in text and '"dtus_total":7' in text

    # While the client is behind, events wait; once it catches up they go in order.
    request.producer.pauseProducing()
    before = len(request.written)
    for value in range(3):
        hub.publish(UploadStored(1, T0, (value,)))
    assert len(request.written) == before and len(stream.queue) == 3
    request.producer.resumeProducing()
    assert [b'"values":[0]' in w for w in request.written[before:]] == [True, False, False]
    assert b'"values":[2]' in request.written[-1] and not stream.queue

    # A client that stays behind is disconnected rather than buffered for without bound.
    request.producer.pauseProducing()
    for value in range(live.MAX_QUEUED + 1):
        hub.publish(MeterFailed("m", T0, str(value)))
    assert request.channel.transport.aborted and not feed.streams and not stream.queue

    feed.stopService()
    assert not clock.getDelayedCalls()


def test_alarms_go_to_the_streams_that_may_see_their_device() -> None:
    clock, hub = Clock(), EventHub()
    feed = live.LiveFeed(hub, FakeCenter(), FakeStore(), None, clock)  # type: ignore[arg-type]
    feed.startService()
    mine, theirs = FakeRequest(), FakeRequest()
    acme = Caller("acme", 2, "ops", False)
    feed._open(mine, acme, live.Visible(False, dtus=frozenset({7})), frozenset(), "")  # type: ignore[arg-type]
    feed._open(theirs, acme, live.Visible(False, dtus=frozenset({8})), frozenset(), "")  # type: ignore[arg-type]
    hub.publish(AlarmRaised(1, "acme", "hot", "dtu", "7", "0", 99.0, 90.0, "too hot", T0))
    hub.publish(AlarmCleared(1, "acme", "hot", "dtu", "7", "0", 80.0, "back", T0))
    text = b"".join(mine.written).decode()
    assert "event: alarm_raised" in text and "event: alarm_cleared" in text and '"rule":"hot"' in text
    assert "alarm" not in b"".join(theirs.written).decode()
    feed.stopService()


# -- charts and exports ---------------------------------------------------------------------------------------


def naive(points: list[tuple[float, float]], since: float, width: float) -> dict[int, tuple[float, float, float]]:
    buckets: dict[int, list[float]] = {}
    for time, value in points:
        buckets.setdefault(int((time - since) // width), []).append(value)
    return {i: (min(v), max(v), sum(v) / len(v)) for i, v in buckets.items()}


def test_downsampling_keeps_min_max_and_mean_of_each_bucket() -> None:
    rng = random.Random(4)
    times = sorted(rng.uniform(0, 1000) for _ in range(5000))
    points = [(t, rng.uniform(-100, 100)) for t in times]
    sampler = Downsampler(0.0, 1000.0, 37, gap=10_000)
    for time, value in points:
        sampler.add_row(time, (value, -value))
    result = sampler.result()
    expected = naive(points, 0.0, 1000 / 37)
    assert len(result["time"]) == len(expected) and result["gaps"] == 0
    for column, (low, high, mean) in enumerate(expected[i] for i in sorted(expected)):
        assert result["min"][0][column] == low and result["max"][0][column] == high
        assert result["mean"][0][column] == pytest.approx(mean)
        assert result["min"][1][column] == -high and result["max"][1][column] == -low
    assert result["samples"] == 5000


def test_downsampling_shows_gaps_where_samples_stopped() -> None:
    sampler = Downsampler(0.0, 600.0, 600)
    for time in [*range(100), *range(300, 400)]:  # one a second, and 200 s offline between
        sampler.add(float(time), 0, float(time))
    result = sampler.result()
    assert result["gap_s"] == pytest.approx(3 * 399 / 199)
    assert result["gaps"] == 1
    gap = result["mean"][0].index(None)
    assert result["time"][gap - 1] == 99 and result["time"][gap + 1] == 300
    assert None not in result["mean"][0][:gap] + result["mean"][0][gap + 1:]


def between(since: dt.datetime, until: dt.datetime) -> str:
    return urlencode({"since": since.isoformat(), "until": until.isoformat()})


def test_the_gap_threshold_counts_polls_not_the_points_each_poll_reads() -> None:
    sampler = Downsampler(0.0, 100.0, 1000)  # buckets narrower than the polls: only real gaps may show
    for time in range(0, 100, 10):
        for series in range(5):
            sampler.add(float(time), series, 1.0)
    result = sampler.result()
    assert result["gap_s"] == pytest.approx(30.0) and result["gaps"] == 0


def test_rows_of_different_lengths_and_value_by_value_feeding_agree() -> None:
    rows = [(0.0, (1, 2, 3)), (1.0, (4,)), (2.0, (0, 9)), (3.0, (7, 1, 5, 2))]
    by_row, by_value, batched = Downsampler(0.0, 10.0, 1), Downsampler(0.0, 10.0, 1), Downsampler(0.0, 10.0, 1)
    for time, row in rows:
        by_row.add_row(time, row)
        for series, value in enumerate(row):
            by_value.add(time, series, value)
    batched.add_rows(rows)
    for sampler in (by_row, by_value, batched):
        result = sampler.result()
        assert result["min"] == [[0], [1], [3], [2]] and result["max"] == [[7], [9], [5], [2]]
        assert result["mean"] == [[3.0], [4.0], [4.0], [2.0]] and result["time"] == [1.5]


def test_gathering_a_buckets_rows_first_changes_nothing() -> None:
    rng = random.Random(7)
    rows, time = [], 0.0
    for _ in range(3000):
        time += 2000.0 if rng.random() < 0.005 else rng.choice((0.5, 1.0))  # now and then a gap
        rows.append((time, tuple(rng.randint(-500, 500) for _ in range(rng.choice((3, 3, 3, 2))))))
    one_by_one, gathered = Downsampler(0.0, time + 1, 97), Downsampler(0.0, time + 1, 97)
    for row in rows:
        one_by_one.add_row(*row)
    gathered.add_rows(rows)
    expected, got = one_by_one.result(), gathered.result()
    assert got["gaps"] > 0 and got.keys() == expected.keys()
    for key in ("time", "min", "max", "samples", "gaps", "gap_s"):
        assert got[key] == expected[key], key
    for mine, theirs in zip(got["mean"], expected["mean"], strict=True):
        assert [m is None for m in mine] == [t is None for t in theirs]
        assert [m for m in mine if m is not None] == pytest.approx([t for t in theirs if t is not None])


def values(*numbers: int) -> bytes:
    return struct.pack(f">{len(numbers)}h", *numbers)


@pytest_twisted.ensureDeferred
async def test_charts_and_exports_of_a_dtu_and_a_meter(tmp_path: Path, db_url: str) -> None:
    config = tmp_path / "center.toml"
    config.write_text("""
[modbus]
listen = "tcp:0:interface=127.0.0.1"

[[link]]
name = "site"
registration = "R-1"

[[meter]]
name = "m1"
link = "site"
unit = 1
interval = 60

[[meter.point]]
name = "power"
table = "holding"
address = 0
""")
    center = await start_center(tmp_path, "--config", str(config), db_url=db_url)
    try:
        admin = center.api()
        assert (await admin.call("PUT", f"/api/dtus/{PSN}", {})).status == 201
        rows = [(PSN, T0 + dt.timedelta(seconds=s), 1, values(s, -s), None) for s in [*range(60), *range(600, 660)]]
        await center.store.add_samples(rows)
        await center.store.add_rows(METER_SAMPLES, [("m1", "power", T0 + dt.timedelta(seconds=s), s * 0.5)
                                                    for s in range(0, 120, 2)])
        span = between(T0, T0 + dt.timedelta(hours=1))

        chart = (await admin.get(f"/api/dtus/{PSN}/chart?{span}&points=60")).body
        assert chart["samples"] == 120 and chart["bucket_s"] == 60 and chart["gaps"] == 1
        assert [s["position"] for s in chart["series"]] == [0, 1]
        assert chart["mean"][0] == [29.5, None, 629.5] and chart["min"][1] == [-59, None, -659]
        assert chart["max"][0] == [59, None, 659]

        export = await browser(center, "GET", f"/api/dtus/{PSN}/export?{span}", token=center.api_token)
        assert export.status == 200 and export.headers["content-type"][0].startswith("text/csv")
        assert "attachment" in export.headers["content-disposition"][0]
        lines = list(csv.reader(io.StringIO(export.text)))
        assert lines[0] == ["time", "position", "dev", "addr", "value"] and len(lines) == 1 + 240
        assert lines[1] == [T0.isoformat(), "0", "", "", "0"] and lines[-1][1:] == ["1", "", "", "-659"]

        two_minutes = between(T0, T0 + dt.timedelta(minutes=2))
        meter = (await admin.get(f"/api/meters/m1/chart?{two_minutes}&points=12&point=power")).body
        assert meter["series"] == [{"point": "power"}] and meter["samples"] == 60 and meter["bucket_s"] == 10
        assert meter["max"][0][:2] == [4, 9] and meter["min"][0][:2] == [0, 5] and meter["mean"][0][:2] == [2, 7]
        meter_csv = await browser(center, "GET", f"/api/meters/m1/export?{span}", token=center.api_token)
        meter_lines = list(csv.reader(io.StringIO(meter_csv.text)))
        assert meter_lines[0] == ["time", "point", "value"] and len(meter_lines) == 61

        bad = await admin.get(f"/api/dtus/{PSN}/chart?points=0")
        assert bad.status == 400 and "points" in bad.error
        backwards = await admin.get(f"/api/dtus/{PSN}/chart?{between(T0, T0 - dt.timedelta(1))}")
        assert backwards.status == 400
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_an_export_longer_than_a_page_comes_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dtucenter.web import charts

    monkeypatch.setattr(charts, "EXPORT_PAGE", 7)
    center = await start_center(tmp_path)
    try:
        assert (await center.api().call("PUT", f"/api/dtus/{PSN}", {})).status == 201
        # Two uploads in the same microsecond: a page boundary between them loses neither.
        rows = [(PSN, T0 + dt.timedelta(seconds=s // 2), 1, values(s), None) for s in range(30)]
        await center.store.add_samples(rows)
        export = await browser(center, "GET", f"/api/dtus/{PSN}/export?since=2026-11-30T07:00:00Z",
                               token=center.api_token)
        got = [int(line[4]) for line in list(csv.reader(io.StringIO(export.text)))[1:]]
        assert got == list(range(30))
    finally:
        await center.stop()


# -- the DTU list ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_dtu_list_is_searched_sorted_and_paged_by_the_database(tmp_path: Path, db_url: str) -> None:
    center = await start_center(tmp_path, db_url=db_url)
    try:
        admin = center.api()
        for n in range(25):
            name = f"pump-{n:02d}" if n % 2 else f"valve_{n:02d}"
            assert (await admin.call("PUT", f"/api/dtus/{7000 + n}", {"name": name})).status == 201

        everything = (await admin.get("/api/dtus")).body
        assert everything["total"] == 25 and len(everything["dtus"]) == 25
        page = (await admin.get("/api/dtus?sort=name&order=desc&offset=2&limit=5")).body
        names = [d["name"] for d in page["dtus"]]
        assert page["total"] == 25 and names == [f"valve_{n:02d}" for n in (20, 18, 16, 14, 12)]
        pumps = (await admin.get("/api/dtus?q=PUMP&limit=3")).body
        assert pumps["total"] == 12 and [d["psn"] for d in pumps["dtus"]] == [7001, 7003, 7005]
        by_psn = (await admin.get("/api/dtus?q=701")).body
        assert [d["psn"] for d in by_psn["dtus"]] == list(range(7010, 7020))
        # LIKE's wildcards are text here: "_" matches only an underscore.
        assert (await admin.get("/api/dtus?q=e_1")).body["total"] == 5
        # An account's page holds only its own DTUs.
        acme: ApiClient = await make_account(admin, "acme")
        assert (await acme.get("/api/dtus?q=pump")).body == {"dtus": [], "total": 0}
        for query in ("sort=password", "offset=-1", "offset=%C2%B2", "offset=99999999999", "limit=0", "order=up"):
            assert (await admin.get(f"/api/dtus?{query}")).status == 400, query
    finally:
        await center.stop()
