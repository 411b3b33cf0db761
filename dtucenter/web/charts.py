"""Charts and exports of stored samples: ``/api/dtus/{psn}/chart|export`` and ``/api/meters/{name}/chart|export``.

``chart`` answers about one point per pixel, whatever the range holds:
min, max and mean per time bucket with gaps kept (``downsample.py``).
``export`` answers the raw samples of the same range as CSV, read a page
at a time and written at the pace the client reads (``streaming.py``), so
a month of data costs one page of memory. Both are scoped like the rest of
the API: another account's DTU or meter answers 404.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from sqlalchemy.orm import Session
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web import server

from dtucenter.store import meters, queries
from dtucenter.store.facade import Store
from dtucenter.store.models import RollupCursor
from dtucenter.store.recorder import MeterRecorder
from dtucenter.store.retention import DTU_SAMPLES, METER_SAMPLES, PERIODS, Resolution, RollupSource, read_series
from dtucenter.web.downsample import Downsampler
from dtucenter.web.dtus import psn_param
from dtucenter.web.params import time_param
from dtucenter.web.router import ApiError, Call, Router, Stream
from dtucenter.web.streaming import Paced

log = Logger()

#: Points a chart gets unless ``points`` says otherwise (about a chart's width in pixels), and at most.
DEFAULT_POINTS = 1000
MAX_POINTS = 10_000
#: The range a chart or export covers when ``since`` is not given: the last day.
DEFAULT_RANGE = dt.timedelta(days=1)
#: Stored rows an export reads per database round trip.
EXPORT_PAGE = 5000
#: A chart whose buckets are at least this many seconds wide is drawn from the hourly roll-ups (the daily
#: ones from DAILY_WIDTH), once the roll-up job has reached its range: a month of one-second uploads is
#: 2.6 million raw rows to read, but 720 hourly buckets (docs/integrations.md "Retention and roll-ups").
HOURLY_WIDTH = 1800.0
DAILY_WIDTH = 43200.0
#: A range at least this long is drawn from the hourly roll-ups whatever the ``points`` asked (the range of
#: a default chart whose buckets are HOURLY_WIDTH wide, about three weeks): a wide chart (the console asks
#: for its width in pixels, up to 4000) would else fold millions of raw rows, seconds of work, for points
#: that a month's 720 hourly ones already fill.
ROLLUP_RANGE = DEFAULT_POINTS * HOURLY_WIDTH


def _positive(params: dict[str, str], name: str, default: float | None, most: float) -> float | None:
    text = params.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= most:
        raise ApiError(400, f"{name} must be a number above 0 and at most {most:g}, got {text!r}")
    return value


def rollup_resolution(
    session: Session, source: RollupSource, sampler: Downsampler, since: dt.datetime
) -> Resolution | None:
    """The roll-ups to draw a chart from, or None to read the raw rows: roll-ups when the chart's buckets are
    wide enough to hold whole ones or the range is ROLLUP_RANGE long, and the roll-up job has reached the
    range (else reading them would fold every raw row of the range in Python on top)."""
    if sampler.width < HOURLY_WIDTH and sampler.until - sampler.since < ROLLUP_RANGE:
        return None
    cursor = session.get(RollupCursor, source.name)
    if cursor is None or cursor.time <= since:
        return None
    return "day" if sampler.width >= DAILY_WIDTH else "hour"


def feed_rollups(
    session: Session, source: RollupSource, key: int | str, resolution: Resolution, sampler: Downsampler,
    since: dt.datetime, until: dt.datetime, series_of: Callable[[int | str], int], point: str | None = None,
    one_per_row: Callable[[int | str], bool] = lambda key: True,
) -> None:
    """Feeds ``sampler`` the roll-up buckets of the range (with the raw rows the job has not reached yet),
    each a whole bucket of its series; a roll-up bucket covers its period, so only hours (or days)
    without any sample show as gaps. ``one_per_row`` says of which series a bucket's count is the stored
    rows' (a DTU's position 0: every upload has one), so that ``samples`` counts uploads, as from raw rows."""
    period = PERIODS[resolution]
    start, end = sampler.since, sampler.until
    for found in read_series(session, source, key, since, until, resolution, point=point).points:
        first = found.start.timestamp()
        index = max(0, int((first - start) // sampler.width))
        total = None if found.mean is None else found.mean * found.count
        rows = found.count if one_per_row(found.key) else 0
        sampler.add_bucket(index, max(first, start), min(first + period, end), series_of(found.key), rows,
                           found.count, found.min, found.max, total)


def reduce_dtu_samples(
    session: Session, psn: int, scope: int | None, sampler: Downsampler, since: dt.datetime, until: dt.datetime,
) -> dict[int, tuple[int, int]] | None:
    """Feeds ``sampler`` the DTU's uploads in the range; its register places, or None if ``scope`` may not see it."""
    if queries.get_dtu(session, psn, scope) is None:
        return None
    resolution = rollup_resolution(session, DTU_SAMPLES, sampler, since)
    if resolution is None:
        sampler.add_rows(queries.upload_seconds(session, psn, since, until))
    else:
        feed_rollups(session, DTU_SAMPLES, psn, resolution, sampler, since, until, int,
                     one_per_row=lambda position: position == 0)
    return queries.register_places(session, psn)


def reduce_meter_samples(
    session: Session, meter: str, point: str | None, scope: int | None, sampler: Downsampler, since: dt.datetime,
    until: dt.datetime,
) -> list[str] | None:
    """Feeds ``sampler`` the meter's samples in the range, a series per point; the points' names, or None if
    ``scope`` may not see the meter."""
    info = meters.get_meter(session, meter, scope)
    if info is None:
        return None
    names = [p["name"] for p in info.points if point is None or p["name"] == point]
    index = {n: i for i, n in enumerate(names)}

    def series_of(name: int | str) -> int:
        found = index.get(str(name))
        if found is None:  # a point that left the definition, still stored
            found = index[str(name)] = len(names)
            names.append(str(name))
        return found

    resolution = rollup_resolution(session, METER_SAMPLES, sampler, since)
    if resolution is not None:
        feed_rollups(session, METER_SAMPLES, meter, resolution, sampler, since, until, series_of, point)
        return names
    for bucket in meters.meter_buckets(session, meter, point, since, until, sampler.width):
        sampler.add_bucket(bucket.index, bucket.first, bucket.last, series_of(bucket.point), bucket.samples,
                           bucket.count, bucket.low, bucket.high, bucket.total)
    return names


class ChartApi:
    def __init__(self, store: Store, recorder: MeterRecorder, now: Callable[[], dt.datetime]) -> None:
        self.store = store
        self.recorder = recorder
        self.now = now

    def install(self, router: Router) -> None:
        router.add("GET", "/api/dtus/{psn}/chart", self.dtu_chart)
        router.add("GET", "/api/dtus/{psn}/export", self.dtu_export)
        router.add("GET", "/api/meters/{name}/chart", self.meter_chart)
        router.add("GET", "/api/meters/{name}/export", self.meter_export)

    def _range(self, params: dict[str, str]) -> tuple[dt.datetime, dt.datetime]:
        until = time_param(params, "until") or self.now()
        since = time_param(params, "since") or until - DEFAULT_RANGE
        if not since < until:
            raise ApiError(400, "since must be before until")
        return since, until

    def _sampler(self, params: dict[str, str], since: dt.datetime, until: dt.datetime) -> Downsampler:
        points = int(_positive(params, "points", DEFAULT_POINTS, MAX_POINTS) or DEFAULT_POINTS)
        gap = _positive(params, "gap", None, 366 * 86400.0)
        return Downsampler(since.timestamp(), until.timestamp(), points, gap)

    # -- DTUs ------------------------------------------------------------------------------------

    async def dtu_chart(self, call: Call, psn: str) -> Any:
        params = call.query(("since", "until", "points", "gap"))
        number = psn_param(psn)
        since, until = self._range(params)
        sampler = self._sampler(params, since, until)
        places = await self.store.read(
            partial(reduce_dtu_samples, psn=number, scope=call.caller.scope, sampler=sampler, since=since, until=until)
        )
        if places is None:
            raise ApiError(404, f"no DTU {number}")
        body = sampler.result()
        series = [
            {"position": i, "dev": places[i][0] if i in places else None, "addr": places[i][1] if i in places else None}
            for i in range(len(body["mean"]))
        ]
        return {"psn": number, "since": since.isoformat(), "until": until.isoformat(), "series": series, **body}

    async def dtu_export(self, call: Call, psn: str) -> Any:
        params = call.query(("since", "until"))
        number = psn_param(psn)
        since, until = self._range(params)
        scope = call.caller.scope
        places = await self.store.read(
            lambda session: None if queries.get_dtu(session, number, scope) is None
            else queries.register_places(session, number)
        )
        if places is None:
            raise ApiError(404, f"no DTU {number}")

        def page(after: tuple[dt.datetime, int] | None) -> Callable[[Session], list[Any]]:
            return lambda session: list(queries.upload_values(session, number, since, until, after, EXPORT_PAGE))

        def lines(rows: list[Any]) -> Iterator[list[Any]]:
            for time, _, values in rows:
                for position, value in enumerate(values):
                    dev, addr = places.get(position, ("", ""))
                    yield [time.isoformat(), position, dev, addr, value]

        header = ["time", "position", "dev", "addr", "value"]
        return self._csv(f"dtu-{number}", since, until, header, page, lines)

    # -- meters ----------------------------------------------------------------------------------

    async def meter_chart(self, call: Call, name: str) -> Any:
        params = call.query(("point", "since", "until", "points", "gap"))
        point = params.get("point")
        since, until = self._range(params)
        sampler = self._sampler(params, since, until)
        await self.recorder.synced()
        names = await self.store.read(partial(
            reduce_meter_samples, meter=name, point=point, scope=call.caller.scope, sampler=sampler, since=since,
            until=until,
        ))
        if names is None:
            raise ApiError(404, f"no meter {name!r}")
        body = sampler.result()
        # A point without samples in the range still gets its (empty) columns.
        for key in ("mean", "min", "max"):
            body[key].extend([[None] * len(body["time"]) for _ in range(len(names) - len(body[key]))])
        return {"meter": name, "since": since.isoformat(), "until": until.isoformat(),
                "series": [{"point": n} for n in names], **body}

    async def meter_export(self, call: Call, name: str) -> Any:
        params = call.query(("point", "since", "until"))
        point = params.get("point")
        since, until = self._range(params)
        scope = call.caller.scope
        await self.recorder.synced()
        if await self.store.read(partial(meters.get_meter, name=name, account=scope)) is None:
            raise ApiError(404, f"no meter {name!r}")

        def page(after: tuple[dt.datetime, int] | None) -> Callable[[Session], list[Any]]:
            return lambda session: list(meters.meter_values(session, name, point, since, until, after, EXPORT_PAGE))

        def lines(rows: list[Any]) -> Iterator[list[Any]]:
            for time, _, found, value in rows:
                yield [time.isoformat(), found, "" if value is None else value]

        return self._csv(f"meter-{name}", since, until, ["time", "point", "value"], page, lines)

    # -- CSV -------------------------------------------------------------------------------------

    def _csv(
        self, what: str, since: dt.datetime, until: dt.datetime, header: list[str],
        page: Callable[[tuple[dt.datetime, int] | None], Callable[[Session], list[Any]]],
        lines: Callable[[list[Any]], Iterator[list[Any]]],
    ) -> Stream:
        stamp = f"{since:%Y%m%dT%H%M%SZ}-{until:%Y%m%dT%H%M%SZ}"
        filename = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{what}-{stamp}.csv")

        def start(request: server.Request) -> None:
            request.setResponseCode(200)
            request.setHeader(b"Content-Type", b"text/csv; charset=utf-8")
            request.setHeader(b"Content-Disposition", f'attachment; filename="{filename}"'.encode("ascii"))
            request.setHeader(b"Cache-Control", b"no-store")
            paced = Paced(request)
            ensureDeferred(self._write_csv(paced, header, page, lines)).addErrback(
                lambda f: log.failure("Export {what} failed", f, what=what)
            )

        return Stream(start)

    async def _write_csv(
        self, paced: Paced, header: list[str],
        page: Callable[[tuple[dt.datetime, int] | None], Callable[[Session], list[Any]]],
        lines: Callable[[list[Any]], Iterator[list[Any]]],
    ) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(header)
        after: tuple[dt.datetime, int] | None = None
        more = True
        try:
            while more and not paced.gone():
                rows = await self.store.read(page(after))
                writer.writerows(lines(rows))
                if paced.gone():
                    return
                paced.request.write(buffer.getvalue().encode("utf-8"))
                buffer.seek(0)
                buffer.truncate()
                more = len(rows) == EXPORT_PAGE
                if more:
                    after = (rows[-1][0], rows[-1][1])
                    await paced.drained()
        except Exception:
            # The status line went out already: the client sees a cut-off file, the log says why.
            log.failure("An export stopped half-way")
            if not paced.gone():
                paced.request.write(b"# export failed half-way; the center's log has the details\r\n")
        paced.finish()
