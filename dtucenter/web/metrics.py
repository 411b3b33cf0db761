"""Prometheus metrics (``prometheus_client``): GET /metrics on the API, and a listener of its own.

Nothing here is counted per event. The center already counts what it does
(``DTUCenter.stats``, its ack-latency histogram, the store's ``StoreStats``
and commit durations, the poller's ``PollStats``, each link's ``LinkCounters``,
the router's requests); :class:`CenterCollector` reads those when Prometheus
scrapes, in the reactor thread where they are written, and turns them into
metric families. So the ingest path costs what it cost before, and a center
nobody scrapes does no metrics work at all.

Label values are never unbounded: no PSN, meter or peer. Per-link labels on
the Modbus metrics are an opt-in (``metrics_per_link``): links are few and
configured, but a center with thousands of them would make thousands of series.

docs/integrations.md lists every metric; tests/modbus/test_e2e_metrics.py checks
that list against what a scrape of the real center shows.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import attrs
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry
from twisted.web import resource, server

from dtucenter import __version__
from dtucenter.dtu.center import DTUCenter
from dtucenter.latency import Histogram
from dtucenter.modbus.poller import PollStats
from dtucenter.modbus.service import ModbusBridge
from dtucenter.store.facade import Store
from dtucenter.web.router import Call, Router, TextReply

if TYPE_CHECKING:
    from dtucenter.mqtt.publisher import MqttPublisher

#: Prometheus histogram bounds (seconds) for acks and commits: an ack waits for a commit,
#: a few milliseconds when all is well, seconds when the database struggles.
STORE_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: And for polls, which wait for a bus: tens of milliseconds to a few timeouts.
POLL_BOUNDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: ``DTUCenter.stats`` keys (the meter recorder counts into the same Counter) -> (metric, label value).
#: The label's name is in ``_STATS_FAMILIES``; None for a metric without labels. A key the center counts
#: that is missing here is a test failure (tests/test_metrics.py reads the source for every key).
STATS_METRICS: Mapping[str, tuple[str, str | None]] = {
    "connections": ("dtucenter_dtu_connections", None),
    "connections_closed": ("dtucenter_dtu_connections_closed", None),
    "logins": ("dtucenter_dtu_logins", "accepted"),
    "logins_refused": ("dtucenter_dtu_logins", "refused"),
    "logins_throttled": ("dtucenter_dtu_logins", "throttled"),
    "logins_abandoned": ("dtucenter_dtu_logins", "abandoned"),
    "logins_held": ("dtucenter_dtu_logins", "held_pending"),
    "login_timeouts": ("dtucenter_dtu_logins", "timed_out"),
    "udp_logins_refused_while_online": ("dtucenter_dtu_logins", "refused_while_online"),
    "idle_timeouts": ("dtucenter_dtu_connections_dropped", "idle_timeout"),
    "closed_for_garbage": ("dtucenter_dtu_connections_dropped", "garbage"),
    "closed_for_junk": ("dtucenter_dtu_connections_dropped", "junk"),
    "sessions_replaced": ("dtucenter_dtu_connections_dropped", "replaced"),
    "uploads_stored": ("dtucenter_dtu_uploads", "stored"),
    "uploads_repeated": ("dtucenter_dtu_uploads", "repeated"),
    "uploads_mismatched": ("dtucenter_dtu_uploads", "mismatched"),
    "samples_stored": ("dtucenter_dtu_samples_stored", None),
    "frames_in": ("dtucenter_dtu_frames_received", None),
    "frames_before_login": ("dtucenter_dtu_frame_problems", "before_login"),
    "frames_unexpected": ("dtucenter_dtu_frame_problems", "unexpected"),
    "bytes_skipped": ("dtucenter_dtu_skipped_bytes", None),
    "register_lists_asked": ("dtucenter_dtu_register_list_requests", None),
    "commands_sent": ("dtucenter_dtu_commands_sent", None),
    "commands_timed_out": ("dtucenter_dtu_command_timeouts", None),
    "acks_stray": ("dtucenter_dtu_stray_acks", None),
    "udp_datagrams_dropped": ("dtucenter_dtu_udp_datagrams_dropped", "busy"),
    "udp_pending_dropped": ("dtucenter_dtu_udp_datagrams_dropped", "pending_full"),
    "meter_values_stored": ("dtucenter_meter_values_stored", None),
    "meter_failures": ("dtucenter_meter_failures_stored", None),
}
#: ``dropped_<ParseProblem>`` keys: one ``problem`` label value per kind of parse problem (a fixed set).
DROPPED_PREFIX = "dropped_"

#: Counter families made from ``DTUCenter.stats``: name -> (help, label name or None).
_STATS_FAMILIES: Mapping[str, tuple[str, str | None]] = {
    "dtucenter_dtu_connections": ("TCP connections DTUs opened.", None),
    "dtucenter_dtu_connections_closed": ("TCP connections of DTUs that ended, for any reason.", None),
    "dtucenter_dtu_logins": ("DTU logins by outcome.", "outcome"),
    "dtucenter_dtu_connections_dropped": ("DTU connections the center closed, by reason.", "reason"),
    "dtucenter_dtu_uploads": ("DTU uploads (SendTest) by outcome.", "outcome"),
    "dtucenter_dtu_samples_stored": ("Values of DTU uploads committed to the store.", None),
    "dtucenter_dtu_frames_received": ("DTU frames handled.", None),
    "dtucenter_dtu_frame_problems": ("DTU frames dropped or refused, by problem.", "problem"),
    "dtucenter_dtu_skipped_bytes": ("Bytes from DTUs skipped as not part of a frame.", None),
    "dtucenter_dtu_register_list_requests": ("DTUs asked for their register list after mismatched uploads.", None),
    "dtucenter_dtu_commands_sent": ("Commands sent to DTUs.", None),
    "dtucenter_dtu_command_timeouts": ("Commands to DTUs that got no answer in time.", None),
    "dtucenter_dtu_stray_acks": ("Command answers from DTUs that matched no command.", None),
    "dtucenter_dtu_udp_datagrams_dropped": ("UDP datagrams from DTUs dropped, by reason.", "reason"),
    "dtucenter_meter_values_stored": ("Meter point values committed to the store.", None),
    "dtucenter_meter_failures_stored": ("Failed meter polls recorded in the store.", None),
}

#: The Modbus links' counters summed (or by link) -> (LinkCounters field, help).
_LINK_COUNTERS: Mapping[str, tuple[str, str]] = {
    "dtucenter_modbus_requests": ("requests", "Modbus request frames sent, retries included."),
    "dtucenter_modbus_responses": ("responses", "Modbus answers taken, exception responses included."),
    "dtucenter_modbus_timeouts": ("timeouts", "Modbus request attempts that got no answer in time."),
    "dtucenter_modbus_errors": ("errors", "Modbus exception responses, and requests lost to a disconnect."),
    "dtucenter_modbus_received_bytes": ("bytes_in", "Bytes received on Modbus links."),
    "dtucenter_modbus_sent_bytes": ("bytes_out", "Bytes sent on Modbus links."),
    "dtucenter_modbus_link_connections": ("connects", "Connections Modbus links got."),
    "dtucenter_modbus_heartbeats": ("heartbeats", "DTU heartbeat packets stripped from Modbus links."),
    "dtucenter_modbus_discarded_bytes": ("discarded_bytes", "Junk, stray and late bytes on Modbus links."),
}


@attrs.frozen
class MetricsSources:
    """What the metrics are read from; each is read only when scraped."""

    center: DTUCenter
    store: Store
    bridge: ModbusBridge | None = None
    #: The API's router, for its request counts (None with the API off).
    api: Router | None = None
    #: How many devices wait to be adopted (``PendingBook.count``); the gauge is left out without it.
    pending_devices: Callable[[], int] | None = None
    #: Modbus metrics with a ``link`` label, one series per link (off: one series for all links).
    per_link: bool = False
    #: The MQTT publisher, with ``--mqtt`` (its metrics are left out without it).
    mqtt: MqttPublisher | None = None


def _histogram(name: str, doc: str, histogram: Histogram, bounds: Iterable[float]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=_buckets(histogram, bounds), sum_value=histogram.total)


def _buckets(histogram: Histogram, bounds: Iterable[float]) -> list[tuple[str, float]]:
    return [("+Inf" if math.isinf(bound) else repr(bound), count) for bound, count in histogram.cumulative(bounds)]


class CenterCollector(Collector):
    """The center's own metrics (``dtucenter_*``), read from its counters at each scrape."""

    def __init__(self, sources: MetricsSources) -> None:
        self.sources = sources

    def describe(self) -> list[Metric]:
        # Nothing to check against other collectors; and no collection at registration.
        return []

    def collect(self) -> Iterator[Metric]:
        sources = self.sources
        yield InfoMetricFamily("dtucenter_build", "The running center's version.", value={"version": __version__})
        yield from self._dtu(sources.center)
        yield from self._store(sources.store)
        if sources.bridge is not None:
            yield from self._modbus(sources.bridge, sources.per_link)
        if sources.pending_devices is not None:
            yield GaugeMetricFamily(
                "dtucenter_pending_devices", "Devices that dialled in unknown and wait to be adopted.",
                value=sources.pending_devices(),
            )
        if sources.mqtt is not None:
            yield from self._mqtt(sources.mqtt)
        if sources.api is not None:
            yield self._api(sources.api.requests)

    @staticmethod
    def _dtu(center: DTUCenter) -> Iterator[Metric]:
        # Every series of a family, at 0 until it first counts: a rate needs its series from the start.
        totals: dict[str, Counter[str]] = {name: Counter() for name in _STATS_FAMILIES}
        for name, value in STATS_METRICS.values():
            totals[name][value or ""] += 0
        for key, count in list(center.stats.items()):
            if key.startswith(DROPPED_PREFIX):
                totals["dtucenter_dtu_frame_problems"][key.removeprefix(DROPPED_PREFIX)] += count
            elif (known := STATS_METRICS.get(key)) is not None:  # unknown: tests/test_metrics.py fails on it
                name, value = known
                totals[name][value or ""] += count
        for name, (doc, label) in _STATS_FAMILIES.items():
            if label is None:
                yield CounterMetricFamily(name + "_total", doc, value=totals[name][""])
                continue
            family = CounterMetricFamily(name + "_total", doc, labels=[label])
            for value, count in sorted(totals[name].items()):
                family.add_metric([value], count)
            yield family
        stats = center.stats
        yield GaugeMetricFamily(
            "dtucenter_dtu_connections_open", "TCP connections of DTUs open now, logged in or not.",
            value=stats["connections"] - stats["connections_closed"],
        )
        yield GaugeMetricFamily("dtucenter_dtu_online", "DTUs logged in now.", value=len(center.sessions))
        yield _histogram(
            "dtucenter_dtu_ack_latency_seconds",
            "Seconds from handling a DTU upload to acknowledging it, for uploads that waited for the store.",
            center.ack_latency, STORE_BOUNDS,
        )

    @staticmethod
    def _store(store: Store) -> Iterator[Metric]:
        stats = store.stats
        yield GaugeMetricFamily("dtucenter_store_queue_rows", "Rows waiting for a transaction.", value=store.backlog)
        yield GaugeMetricFamily(
            "dtucenter_store_queue_jobs", "Write jobs waiting for a transaction.", value=store.queued_jobs
        )
        yield GaugeMetricFamily(
            "dtucenter_store_healthy", "1 while the database takes writes, 0 while it fails.", value=int(store.healthy)
        )
        yield CounterMetricFamily("dtucenter_store_commits_total", "Write transactions committed.", value=stats.commits)
        yield CounterMetricFamily(
            "dtucenter_store_rows_committed_total", "Rows committed (DTU uploads and meter polls).",
            value=stats.rows_committed,
        )
        yield CounterMetricFamily(
            "dtucenter_store_jobs_committed_total", "Write jobs committed.", value=stats.jobs_committed
        )
        yield CounterMetricFamily(
            "dtucenter_store_errors_total", "Failed commits and failed probes of a failing database.",
            value=stats.failures,
        )
        yield CounterMetricFamily(
            "dtucenter_store_retries_total", "Write batches sent again after a failure.", value=stats.retries
        )
        yield _histogram(
            "dtucenter_store_commit_duration_seconds", "Seconds a write transaction took, for those committed.",
            store.commit_durations, STORE_BOUNDS,
        )

    @staticmethod
    def _modbus(bridge: ModbusBridge, per_link: bool) -> Iterator[Metric]:
        links = bridge.links
        yield GaugeMetricFamily("dtucenter_modbus_links", "Modbus links configured.", value=len(links))
        yield GaugeMetricFamily(
            "dtucenter_modbus_links_online", "Modbus links with a connection now.",
            value=sum(link.online for link in links.values()),
        )
        poller = bridge.poller
        yield GaugeMetricFamily("dtucenter_modbus_meters", "Meters polled.", value=poller.meter_count())
        yield GaugeMetricFamily(
            "dtucenter_modbus_meters_failing", "Meters whose latest poll had an error.", value=poller.failing_count()
        )
        if per_link:
            by_link = {name: link.counters for name, link in sorted(links.items())}
            stats = dict(sorted(poller.link_stats.items()))
        else:
            by_link = {"": bridge.total_counters()}
            stats = {"": poller.stats}
        for name, (field, doc) in _LINK_COUNTERS.items():
            family = CounterMetricFamily(name + "_total", doc, labels=["link"] if per_link else [])
            for link, counters in by_link.items():
                family.add_metric([link] if per_link else [], getattr(counters, field))
            yield family
        yield from _poll_families(stats, per_link)

    @staticmethod
    def _mqtt(publisher: MqttPublisher) -> Iterator[Metric]:
        stats = publisher.stats
        yield GaugeMetricFamily(
            "dtucenter_mqtt_connected", "1 while the broker is connected, 0 while it is away.",
            value=int(publisher.connected),
        )
        yield CounterMetricFamily(
            "dtucenter_mqtt_connections_total", "Connections to the broker made (the first included).",
            value=stats.connections,
        )
        messages = CounterMetricFamily(
            "dtucenter_mqtt_messages_total",
            "MQTT messages: composed, acknowledged by the broker, kept in the backlog, dropped by the full backlog.",
            labels=["outcome"],
        )
        for outcome, count in (("published", stats.published), ("delivered", stats.delivered),
                               ("backlogged", stats.backlogged), ("dropped", stats.dropped)):
            messages.add_metric([outcome], count)
        yield messages
        yield GaugeMetricFamily(
            "dtucenter_mqtt_backlog_messages", "Messages waiting in the database's backlog for the broker.",
            value=publisher.waiting,
        )
        yield GaugeMetricFamily(
            "dtucenter_mqtt_outstanding_messages", "Messages handed to the worker process, not yet acknowledged.",
            value=publisher.outstanding,
        )

    @staticmethod
    def _api(requests: Counter[tuple[str, str]]) -> Metric:
        family = CounterMetricFamily(
            "dtucenter_api_requests_total", "API requests answered, by method and status class.",
            labels=["method", "status_class"],
        )
        for (method, status_class), count in sorted(requests.items()):
            family.add_metric([method, status_class], count)
        return family


def _poll_families(stats: Mapping[str, PollStats], per_link: bool) -> Iterator[Metric]:
    link_label = ["link"] if per_link else []
    polls = CounterMetricFamily(
        "dtucenter_modbus_polls_total", "Meter polls finished, by outcome.", labels=[*link_label, "outcome"]
    )
    durations = HistogramMetricFamily(
        "dtucenter_modbus_poll_duration_seconds", "Seconds a meter poll took.", labels=link_label
    )
    for link, poll_stats in stats.items():
        prefix = [link] if per_link else []
        timed_out, other_errors = poll_stats.timed_out, max(0, poll_stats.failed - poll_stats.timed_out)
        polls.add_metric([*prefix, "success"], poll_stats.polls - poll_stats.failed)
        polls.add_metric([*prefix, "error"], other_errors)
        polls.add_metric([*prefix, "timeout"], timed_out)
        durations.add_metric(prefix, _buckets(poll_stats.durations, POLL_BOUNDS), poll_stats.durations.total)
    yield polls
    yield durations


def metrics_registry(sources: MetricsSources) -> CollectorRegistry:
    """The center's metrics and prometheus_client's own process, platform and garbage-collector metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CenterCollector(sources))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry, accept: bytes | None) -> tuple[bytes, str]:
    """The scraped text in the format the scraper asks for (Prometheus' text or OpenMetrics), and its type."""
    encode, content_type = choose_encoder((accept or b"").decode("latin-1"))
    return encode(registry), content_type


class MetricsApi:
    """GET /metrics on the API listener, with the API's bearer token: fleet-wide numbers are for admins."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def install(self, router: Router) -> None:
        router.add("GET", "/metrics", self.metrics)

    async def metrics(self, call: Call) -> TextReply:
        call.require_admin()
        call.query(())
        body, content_type = exposition(self.registry, call.request.getHeader(b"Accept"))
        return TextReply(body, content_type)


class MetricsResource(resource.Resource):
    """/metrics without a token, for the listener of its own (loopback unless told otherwise).

    Collected in the reactor thread, where the counters are written: prometheus_client's own
    Twisted resource collects on a thread, and would read them while they change.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"Cache-Control", b"no-store")
        if request.path != b"/metrics":
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"Not found: the metrics are at /metrics\n"
        body, content_type = exposition(self.registry, request.getHeader(b"Accept"))
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return body


def metrics_site(registry: CollectorRegistry) -> server.Site:
    site = server.Site(MetricsResource(registry))
    site.displayTracebacks = False
    return site
