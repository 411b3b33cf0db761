"""GET /metrics on the real center, after real DTU traffic and real meter polls.

The scraped text is read with prometheus_client's own parser and checked with
Prometheus' ``promtool check metrics``; the numbers must move with what the
center did between two scrapes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from pymodbus.framer import FramerType
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.web.client import HTTPConnectionPool

from dtucenter.dtu import wire
from tests.modbus.interop_support import PymodbusServer, meter_toml
from tests.support import STEP_TIMEOUT, RunningCenter, connect_dtu, eventually, make_account, start_center

#: A scrape as {(sample name, sorted labels): value}.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

#: Every outcome a poll is counted under.
OUTCOMES = ("success", "error", "timeout")
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


class Silent(Protocol):
    """A Modbus device that takes every request and answers none: each poll of it times out."""

    def dataReceived(self, data: bytes) -> None:
        pass


def config(plant: PymodbusServer, silent_port: int) -> str:
    return f"""
[[link]]
name = "plant"
protocol = "tcp"
connect = "tcp:host=127.0.0.1:port={plant.port}"
timeout = 1.0

[[link]]
name = "quiet"
protocol = "tcp"
connect = "tcp:host=127.0.0.1:port={silent_port}"
timeout = 0.2
retries = 0

{meter_toml("m-good", "plant", 1)}
[[meter]]
name = "m-bad"
link = "plant"
unit = 1
interval = 0.2
[[meter.point]]
name = "unmapped"
table = "holding"
address = 900

{meter_toml("m-quiet", "quiet", 1)}
"""


async def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Status, content type and body; a connection of its own, closed after."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    response = await treq.get(url, headers=headers or {}, pool=pool, timeout=STEP_TIMEOUT)
    body = (await treq.content(response)).decode("utf-8")
    return response.code, response.headers.getRawHeaders("Content-Type", [""])[0], body


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


#: The metrics of the MQTT publisher, served only with ``--mqtt`` (tests/test_mqtt_e2e.py checks them).
MQTT_PREFIX = "dtucenter_mqtt_"


def documented_metrics(mqtt: bool = False) -> set[str]:
    """The metric names in docs/integrations.md's tables; the MQTT publisher's only if ``mqtt``."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "integrations.md").read_text()
    names = set(re.findall(r"^\| `(dtucenter_[a-z_]+)` \|", text, re.M))
    return names if mqtt else {name for name in names if not name.startswith(MQTT_PREFIX)}


def scraped_metrics(text: str) -> set[str]:
    """The center's own metric names in a scrape, as the docs write them (counters with ``_total``)."""
    names = set()
    for family in text_string_to_metric_families(text):
        if family.name.startswith("dtucenter_"):
            names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def check_with_promtool(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        return  # the test that needs it skips with the reason; the parser's check still ran
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


class Scraper:
    def __init__(self, center: RunningCenter) -> None:
        self.url = f"http://127.0.0.1:{center.api_port}/metrics"
        self.token = center.api_token

    async def text(self) -> str:
        status, content_type, body = await http_get(self.url, {"Authorization": f"Bearer {self.token}"})
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4"), (status, content_type, body)
        return body

    async def samples(self) -> Samples:
        return parse(await self.text())


@pytest.fixture
def plant(meter_server) -> PymodbusServer:  # type: ignore[no-untyped-def]
    server: PymodbusServer = meter_server(FramerType.SOCKET)
    return server


@pytest.fixture
def silent_port():  # type: ignore[no-untyped-def]
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = pytest_twisted.blockon(endpoint.listen(Factory.forProtocol(Silent)))
    yield port.getHost().port
    pytest_twisted.blockon(port.stopListening())


async def start(tmp_path: Path, plant: PymodbusServer, silent_port: int, *args: str,
                db_url: str | None = None) -> RunningCenter:
    path = tmp_path / "center.toml"
    path.write_text(config(plant, silent_port))
    return await start_center(tmp_path, "--config", str(path), "--unknown-dtu", "accept", *args, db_url=db_url)


@pytest_twisted.ensureDeferred
async def test_metrics_move_with_dtu_traffic_and_polls(
    tmp_path: Path, db_url: str, plant: PymodbusServer, silent_port: int
) -> None:
    center = await start(tmp_path, plant, silent_port, db_url=db_url)
    scraper = Scraper(center)
    try:
        before = await scraper.samples()
        assert value(before, "dtucenter_dtu_online") == 0
        assert value(before, "dtucenter_dtu_uploads_total", outcome="stored") == 0

        dtu = await connect_dtu(center)
        await dtu.login(8, 8)
        bad = bytearray(wire.encode_frame(wire.SendTick()))
        bad[-1] ^= 1
        dtu.send_raw(bytes(bad))
        for code in (1, 2, 3):
            dtu.send(wire.SendTest(10, code, (code, 2, 3)))
            assert (await dtu.next(wire.SendTestAck)).test_code == code
        dtu.send(wire.SendTest(10, 3, (3, 2, 3)))  # a retransmission: acknowledged, not stored again
        assert (await dtu.next(wire.SendTestAck)).test_code == 3

        async def polled_every_way() -> Samples | None:
            samples = await scraper.samples()
            polls = [value(samples, "dtucenter_modbus_polls_total", outcome=o) for o in OUTCOMES]
            # A poll counts when it ends, its values when they are committed: a moment later.
            stored = value(samples, "dtucenter_meter_values_stored_total")
            failing = value(samples, "dtucenter_modbus_meters_failing")  # m-bad and m-quiet, once both were polled
            return samples if all(polls) and stored and failing == 2 else None

        during = await eventually(polled_every_way, "a successful, a failed and a timed-out poll, values stored")
        assert value(during, "dtucenter_dtu_online") == 1
        assert value(during, "dtucenter_dtu_connections_open") == 1
        assert value(during, "dtucenter_dtu_connections_total") == value(before, "dtucenter_dtu_connections_total") + 1
        assert value(during, "dtucenter_dtu_logins_total", outcome="accepted") == 1
        assert value(during, "dtucenter_dtu_uploads_total", outcome="stored") == 3
        assert value(during, "dtucenter_dtu_uploads_total", outcome="repeated") == 1
        assert value(during, "dtucenter_dtu_samples_stored_total") == 9
        assert value(during, "dtucenter_dtu_frame_problems_total", problem="BadChecksum") == 1
        assert value(during, "dtucenter_dtu_ack_latency_seconds_count") == 3  # the repeat waited for nothing
        assert value(during, "dtucenter_dtu_ack_latency_seconds_bucket", le="+Inf") == 3
        assert 0 < value(during, "dtucenter_dtu_ack_latency_seconds_sum") < 3 * STEP_TIMEOUT

        commits = value(during, "dtucenter_store_commits_total")
        assert commits > value(before, "dtucenter_store_commits_total")
        assert value(during, "dtucenter_store_commit_duration_seconds_count") == commits
        assert value(during, "dtucenter_store_rows_committed_total") >= 3
        assert value(during, "dtucenter_store_healthy") == 1 and value(during, "dtucenter_store_errors_total") == 0

        assert value(during, "dtucenter_modbus_links") == 2 and value(during, "dtucenter_modbus_links_online") == 2
        assert value(during, "dtucenter_modbus_meters") == 3
        timeouts = value(during, "dtucenter_modbus_polls_total", outcome="timeout")
        assert value(during, "dtucenter_modbus_timeouts_total") >= timeouts
        polls = sum(value(during, "dtucenter_modbus_polls_total", outcome=o) for o in OUTCOMES)
        assert value(during, "dtucenter_modbus_poll_duration_seconds_count") == polls
        # A poll that found its link not yet connected sent nothing; the others sent at least one request.
        answered_or_timed_out = polls - value(during, "dtucenter_modbus_polls_total", outcome="error")
        assert value(during, "dtucenter_modbus_requests_total") >= answered_or_timed_out
        assert ("dtucenter_modbus_polls_total", (("link", "plant"), ("outcome", "success"))) not in during, "opt-in"

        # Histograms are cumulative and end in +Inf = count.
        buckets = sorted(
            (float(dict(labels)["le"]), count) for (name, labels), count in during.items()
            if name == "dtucenter_modbus_poll_duration_seconds_bucket"
        )
        assert [count for _, count in buckets] == sorted(count for _, count in buckets)
        assert buckets[-1] == (float("inf"), polls)

        # Every API request counts, by method and status class: the scrapes so far (each counted once
        # answered, so not in its own text), and a refused one.
        assert value(during, "dtucenter_api_requests_total", method="GET", status_class="2xx") >= 1
        assert (await http_get(scraper.url))[0] == 401
        after_refusal = await scraper.samples()
        assert value(after_refusal, "dtucenter_api_requests_total", method="GET", status_class="4xx") == 1

        dtu.close()

        async def offline() -> Samples | None:
            samples = await scraper.samples()
            return samples if value(samples, "dtucenter_dtu_online") == 0 else None

        after = await eventually(offline, "the DTU offline in the metrics")
        assert value(after, "dtucenter_dtu_connections_open") == 0
        assert value(after, "dtucenter_dtu_connections_closed_total") == value(after, "dtucenter_dtu_connections_total")
        successes = value(during, "dtucenter_modbus_polls_total", outcome="success")

        async def polled_again() -> bool:
            return value(await scraper.samples(), "dtucenter_modbus_polls_total", outcome="success") > successes

        await eventually(polled_again, "more successful polls counted")
        text = await scraper.text()
        check_with_promtool(text)
        assert documented_metrics() - scraped_metrics(text) == set(), "every documented metric is served"
        assert value(after, "dtucenter_pending_devices") == 0
        assert scraped_metrics(text) - documented_metrics() == set(), "document every metric"
    finally:
        await center.stop()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed")
@pytest_twisted.ensureDeferred
async def test_promtool_accepts_the_scrape_with_per_link_labels(
    tmp_path: Path, plant: PymodbusServer, silent_port: int
) -> None:
    center = await start(tmp_path, plant, silent_port, "--metrics-per-link")
    scraper = Scraper(center)
    try:
        async def both_links_polled() -> Samples | None:
            samples = await scraper.samples()
            outcomes = {
                (link, outcome): samples.get(("dtucenter_modbus_polls_total", (("link", link), ("outcome", outcome))))
                for link, outcome in (("plant", "success"), ("quiet", "timeout"))
            }
            return samples if all(outcomes.values()) else None

        samples = await eventually(both_links_polled, "polls of plant's meters and timeouts of quiet's")
        assert value(samples, "dtucenter_modbus_polls_total", link="quiet", outcome="success") == 0
        for link in ("plant", "quiet"):
            polls = sum(value(samples, "dtucenter_modbus_polls_total", link=link, outcome=o) for o in OUTCOMES)
            assert value(samples, "dtucenter_modbus_poll_duration_seconds_count", link=link) == polls
        assert value(samples, "dtucenter_modbus_timeouts_total", link="quiet") > 0
        assert value(samples, "dtucenter_modbus_timeouts_total", link="plant") == 0
        assert ("dtucenter_modbus_timeouts_total", ()) not in samples
        check_with_promtool(await scraper.text())
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_api_metrics_need_the_token_of_an_admin(tmp_path: Path) -> None:
    center = await start_center(tmp_path)
    try:
        url = f"http://127.0.0.1:{center.api_port}/metrics"
        status, content_type, body = await http_get(url)
        assert status == 401 and content_type.startswith("application/json"), body
        assert (await http_get(url, {"Authorization": "Bearer wrong"}))[0] == 401
        customer = await make_account(center.api(), "acme")
        status, _, body = await http_get(url, {"Authorization": f"Bearer {customer.token}"})
        assert status == 403 and "dtucenter_" not in body
        status, content_type, body = await http_get(
            url, {"Authorization": f"Bearer {center.api_token}", "Accept": OPENMETRICS}
        )
        assert status == 200 and content_type.startswith("application/openmetrics-text"), content_type
        assert body.endswith("# EOF\n") and "dtucenter_dtu_online 0" in body
        assert "process_cpu_seconds_total" in body, "prometheus_client's process metrics"
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_the_metrics_listener_needs_no_token_and_stays_on_loopback(tmp_path: Path) -> None:
    center = await start_center(tmp_path, "--metrics", "tcp:0", "--api", "off")
    try:
        port = await center.service.getServiceNamed("metrics").when_listening()  # type: ignore[attr-defined]
        assert port.getHost().host == "127.0.0.1"
        base = f"http://127.0.0.1:{port.getHost().port}"
        status, content_type, body = await http_get(base + "/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4"), content_type
        samples = parse(body)
        assert value(samples, "dtucenter_dtu_online") == 0
        assert ("dtucenter_api_requests_total", ()) not in samples and "dtucenter_api_requests" not in body  # API off
        assert (await http_get(base + "/"))[0] == 404
        check_with_promtool(body)
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_a_metrics_listener_on_a_named_interface_stays_there_with_a_warning(tmp_path: Path) -> None:
    warnings: list[str] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "dtucenter.tap" and event.get("log_level") == LogLevel.warn:
            warnings.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        center = await start_center(tmp_path, "--metrics", "tcp:0:interface=0.0.0.0", "--api", "off")
    finally:
        globalLogPublisher.removeObserver(observe)
    try:
        port = await center.service.getServiceNamed("metrics").when_listening()  # type: ignore[attr-defined]
        assert port.getHost().host == "0.0.0.0"
        assert len(warnings) == 1 and "without a token" in warnings[0], warnings
    finally:
        await center.stop()
