"""Retention and roll-ups: how long each table keeps its rows, and hourly and daily summaries kept longer.

A periodic job (``RetentionJob``) on the store's reader threads, in small
steps, each its own short transaction (``Store.maintain``), never in the
writer's group commits, so that it never holds up an upload:

- **Roll-ups.** It reads the raw sample tables in (time, id) order from where
  it stopped (``rollup_cursors``, moved in the same transaction as the roll-ups
  it wrote, so a restart resumes exactly there and counts no row twice) and
  merges each batch into hourly and daily buckets of count, min, max and sum per
  DTU position and per meter point (on PostgreSQL in one SQL statement, on
  SQLite in Python). It reads only up to ``settle`` seconds before the moment
  every row queued until then was committed (``Store.flushed``): a meter's
  values carry the time its poll started.
- **Expiry.** Rows older than a table's retention go, oldest first, a batch per
  transaction; raw samples only once they are rolled up. On PostgreSQL the
  sample tables are partitioned by UTC day (migration ``0008_retention``): the
  job makes the coming days' partitions ahead and expires samples by dropping
  whole partitions, so a raw sample is kept until its whole day has expired.
- **Reads.** ``read_series`` answers a DTU's or a meter's values over a range
  from the raw rows for short ranges and from the roll-ups for long ones (plus
  the raw rows the job has not reached yet, so an answer is never behind).
"""

from __future__ import annotations

import datetime as dt
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any, Literal, TypeVar

import attrs
from sqlalchemy import ColumnElement, Table, case, column, delete, func, literal, select, text, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from dtucenter.isotime import utc_now
from dtucenter.store.facade import Store, is_transient
from dtucenter.store.models import (
    CommandRecord,
    DeviceOperation,
    DtuEdit,
    MeterFailure,
    MeterSample,
    MeterSampleRollup,
    MeterWrite,
    RollupCursor,
    Sample,
    SampleRollup,
    TemplateEdit,
    UTCDateTime,
)
from dtucenter.store.queries import rowcount, table_of

log = Logger()
T = TypeVar("T")

HOUR = 3600
DAY = 86400
#: The roll-ups' resolutions: bucket lengths in seconds.
PERIODS: dict[str, int] = {"hour": HOUR, "day": DAY}
Resolution = Literal["raw", "hour", "day"]
RESOLUTIONS: tuple[Resolution, ...] = ("raw", "hour", "day")
#: ``read_series`` on its own: raw values for ranges up to this long, hourly roll-ups up to LONGEST_HOURLY.
LONGEST_RAW = dt.timedelta(days=2)
LONGEST_HOURLY = dt.timedelta(days=62)
#: Days of partitions the job keeps made ahead of today, on PostgreSQL.
DAYS_AHEAD = 3
#: How long a DDL step waits for a lock before giving up until the next run: a partition
#: drop queued behind a long API read would otherwise hold up every insert queued behind it.
DDL_LOCK_TIMEOUT = "2s"


@attrs.frozen
class RetentionPolicy:
    """Days each kind of row is kept (None: for ever), and how the job runs."""

    samples: float | None = None
    meter_samples: float | None = None
    meter_failures: float | None = None
    #: Every audit trail: commands, DTU edits, meter writes, device operations, template edits.
    audit: float | None = None
    hourly: float | None = None
    daily: float | None = None
    #: Seconds between runs.
    interval: float = 60.0
    #: Rows per step (transaction) at most.
    batch_rows: int = 2000
    #: Seconds a sample is left before it is rolled up: rows of a poll carry its start time.
    settle: float = 300.0
    #: The share of the time the job works at most: after a step it waits for the rest. The
    #: steps' Python (unpacking and summing values) holds the interpreter's lock, which the
    #: reactor thread needs for every upload.
    share: float = 0.25


# -- the raw tables and their roll-ups ---------------------------------------------------------------

_VALUE = struct.Struct(">h")
_REGISTER = struct.Struct(">BH")

#: A bucket's key (without period and start), a value (None: not a number) and extra columns.
Exploded = tuple[tuple[Any, ...], "float | None", dict[str, Any]]


def _explode_samples(row: Any) -> Iterator[Exploded]:
    values = [v for (v,) in _VALUE.iter_unpack(row.values)]
    places: list[tuple[int | None, int | None]]
    if row.registers is not None and len(row.registers) == 3 * len(values):
        places = list(_REGISTER.iter_unpack(row.registers))
    else:
        places = [(None, None)] * len(values)
    for position, (value, (dev, addr)) in enumerate(zip(values, places, strict=True)):
        yield (row.psn, position), float(value), ({"dev": dev, "addr": addr} if dev is not None else {})


def _explode_meter_samples(row: Any) -> Iterator[Exploded]:
    yield (row.meter, row.point), row.value, {}


@attrs.frozen
class RollupSource:
    """A raw sample table and the roll-up table that summarises it."""

    raw: Table
    rollups: Table
    #: The roll-up's key columns besides period and start, as the raw table names them (but the position).
    key: tuple[str, ...]
    #: Raw columns read besides id and time.
    columns: tuple[str, ...]
    explode: Callable[[Any], Iterator[Exploded]]
    #: Roll-up columns taken from the latest value that has them.
    extras: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.raw.name


DTU_SAMPLES = RollupSource(
    table_of(Sample), table_of(SampleRollup), ("psn", "position"), ("psn", "values", "registers"),
    _explode_samples, ("dev", "addr"),
)
METER_SAMPLES = RollupSource(
    table_of(MeterSample), table_of(MeterSampleRollup), ("meter", "point"), ("meter", "point", "value"),
    _explode_meter_samples,
)
SOURCES = (DTU_SAMPLES, METER_SAMPLES)


def bucket_start(time: dt.datetime, period: int) -> dt.datetime:
    """The start of the UTC hour or day ``time`` falls in."""
    time = time.astimezone(dt.UTC)
    if period == HOUR:
        return time.replace(minute=0, second=0, microsecond=0)
    if period == DAY:
        return time.replace(hour=0, minute=0, second=0, microsecond=0)
    raise ValueError(f"no roll-ups of {period} s")


@attrs.define
class Aggregate:
    """count, min, max and sum of the numbers seen, and the latest extra columns."""

    count: int = 0
    min: float | None = None
    max: float | None = None
    sum: float | None = None
    extras: dict[str, Any] = attrs.Factory(dict)

    def add(self, value: float | None, extras: dict[str, Any]) -> None:
        if extras:
            self.extras = extras
        if value is None:
            return
        self.count += 1
        if self.min is None or self.max is None or self.sum is None:
            self.min = self.max = self.sum = value
        else:
            self.min, self.max, self.sum = min(self.min, value), max(self.max, value), self.sum + value

    def merge(self, later: Aggregate) -> None:
        """Take in the aggregate of values that came after this one's."""
        if later.extras:
            self.extras = later.extras
        if later.count == 0 or later.min is None or later.max is None or later.sum is None:
            return
        if self.min is None or self.max is None or self.sum is None:
            self.min, self.max, self.sum = later.min, later.max, later.sum
        else:
            self.min, self.max, self.sum = min(self.min, later.min), max(self.max, later.max), self.sum + later.sum
        self.count += later.count

    @property
    def mean(self) -> float | None:
        return None if self.sum is None or not self.count else self.sum / self.count


#: (key..., period, start) -> aggregate.
Buckets = dict[tuple[Any, ...], Aggregate]


def aggregate(source: RollupSource, rows: Iterable[Any], periods: Sequence[int]) -> Buckets:
    """Rows of ``source``'s raw table (oldest first) summarised per key, period and bucket start."""
    buckets: Buckets = {}
    for row in rows:
        starts = [(period, bucket_start(row.time, period)) for period in periods]
        for key, value, extras in source.explode(row):
            for period, start in starts:
                bucket = (*key, period, start)
                found = buckets.get(bucket)
                if found is None:
                    found = buckets[bucket] = Aggregate()
                found.add(value, extras)
    return buckets


def _merged(old: ColumnElement[Any], new: ColumnElement[Any], pick: Callable[[Any, Any], Any]) -> Any:
    """The SQL of merging a stored roll-up column with a new one; either may be NULL."""
    return case((old.is_(None), new), (new.is_(None), old), else_=pick(old, new))


def _upsert(session: Session, source: RollupSource, buckets: Buckets) -> None:
    """Merge ``buckets`` into the roll-up table: counts and sums add up, min and max are kept."""
    if not buckets:
        return
    key = (*source.key, "period", "start")
    rows = [
        {**dict(zip(key, bucket, strict=True)), "count": found.count, "min": found.min, "max": found.max,
         "sum": found.sum, **{name: found.extras.get(name) for name in source.extras}}
        for bucket, found in buckets.items()
    ]
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert(source.rollups) if dialect == "postgresql" else sqlite.insert(source.rollups)
    session.execute(_merging(insert, source), rows)


def _merging(insert: Any, source: RollupSource) -> Any:
    """``insert`` (of roll-up rows) merging into a stored bucket where there is one."""
    table = source.rollups
    new, old = insert.excluded, table.c
    update: dict[str, Any] = {
        "count": old["count"] + new["count"],
        "min": _merged(old["min"], new["min"], lambda a, b: case((b < a, b), else_=a)),
        "max": _merged(old["max"], new["max"], lambda a, b: case((b > a, b), else_=a)),
        "sum": _merged(old["sum"], new["sum"], lambda a, b: a + b),
    }
    for name in source.extras:
        update[name] = func.coalesce(new[name], old[name])
    return insert.on_conflict_do_update(index_elements=[*source.key, "period", "start"], set_=update)


def _after_cursor(source: RollupSource, cursor: RollupCursor | None) -> list[ColumnElement[bool]]:
    if cursor is None:
        return []
    raw = source.raw.c
    return [tuple_(raw.time, raw.id) > tuple_(literal(cursor.time, UTCDateTime()), literal(cursor.row_id))]


def rollup_step(session: Session, source: RollupSource, horizon: dt.datetime, batch_rows: int) -> int:
    """Summarise the next ``batch_rows`` raw rows before ``horizon`` into the roll-ups; how many were read."""
    if session.get_bind().dialect.name == "postgresql":
        return _rollup_step_in_sql(session, source, horizon, batch_rows)
    raw = source.raw.c
    cursor = session.get(RollupCursor, source.name)
    query = (
        select(raw.id, raw.time, *(raw[name] for name in source.columns))
        .where(raw.time < horizon, *_after_cursor(source, cursor))
        .order_by(raw.time, raw.id)
        .limit(batch_rows)
    )
    rows = session.execute(query).all()
    if not rows:
        return 0
    _upsert(session, source, aggregate(source, rows, list(PERIODS.values())))
    last = rows[-1]
    if cursor is None:
        session.add(RollupCursor(source=source.name, time=last.time, row_id=last.id))
    else:
        cursor.time, cursor.row_id = last.time, last.id
    return len(rows)


#: Per source, PostgreSQL's rows of values to roll up: the roll-up's key, value and extras, and the time.
_SQL_VALUES = {
    # The documented view (migration 0008_retention) unpacks the uploads.
    "samples": 'SELECT psn, position, value, dev, addr, "time" FROM dtu_values',
    "meter_samples": 'SELECT meter, point, value, "time" FROM meter_samples',
}


def _rollup_step_in_sql(session: Session, source: RollupSource, horizon: dt.datetime, batch_rows: int) -> int:
    """``rollup_step`` done by PostgreSQL itself: the values' unpacking and sums are no work for the
    center's interpreter (whose lock the reactor thread needs). A batch ends with all the rows of its
    last time, so the cursor is that time (with its largest id)."""
    raw = source.raw.c
    cursor = session.get(RollupCursor, source.name)
    pending = [raw.time < horizon] + ([] if cursor is None else [raw.time > cursor.time])
    last = session.scalar(select(raw.time).where(*pending).order_by(raw.time).offset(batch_rows - 1).limit(1))
    if last is None:
        last = session.scalar(select(func.max(raw.time)).where(*pending))
        if last is None:
            return 0
    batch = [*pending, raw.time <= last]
    rows = session.scalar(select(func.count()).select_from(source.raw).where(*batch)) or 0
    last_id = session.scalar(select(func.max(raw.id)).where(raw.time == last))
    key = ", ".join(f"v.{name}" for name in source.key)
    extras = "".join(
        f', (array_agg(v.{name} ORDER BY v."time" DESC) FILTER (WHERE v.{name} IS NOT NULL))[1]'
        for name in source.extras
    )
    after = "" if cursor is None else 'AND v."time" > :after'
    summary = text(
        f"SELECT {key}, p.period, date_trunc(p.unit, v.\"time\" AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS start, "
        f"count(v.value), min(v.value), max(v.value), sum(v.value){extras} "
        f"FROM ({_SQL_VALUES[source.name]}) v CROSS JOIN (VALUES ({HOUR}, 'hour'), ({DAY}, 'day')) p(period, unit) "
        f"WHERE v.\"time\" < :horizon {after} AND v.\"time\" <= :last "
        f"GROUP BY {key}, p.period, start"
    ).bindparams(horizon=horizon, last=last, **({} if cursor is None else {"after": cursor.time}))
    columns = [*source.key, "period", "start", "count", "min", "max", "sum", *source.extras]
    summarised = summary.columns(*(column(name) for name in columns))
    session.execute(_merging(postgresql.insert(source.rollups).from_select(columns, summarised), source))
    if cursor is None:
        session.add(RollupCursor(source=source.name, time=last, row_id=last_id))
    else:
        cursor.time, cursor.row_id = last, last_id
    return rows


def rolled_up_until(session: Session, source: RollupSource) -> dt.datetime | None:
    """Every raw row before this time is in the roll-ups (None: none is yet)."""
    cursor = session.get(RollupCursor, source.name)
    return None if cursor is None else cursor.time


# -- reading a range --------------------------------------------------------------------------------


@attrs.frozen
class SeriesPoint:
    """One bucket of a series (or one raw value: count 1, min = max = mean = the value)."""

    start: dt.datetime
    #: The DTU position or the meter point.
    key: int | str
    count: int
    min: float | None
    max: float | None
    mean: float | None
    dev: int | None = None
    addr: int | None = None

    def to_json(self, key_name: str) -> dict[str, Any]:
        answer: dict[str, Any] = {"start": self.start.isoformat(), key_name: self.key}
        if key_name == "position":
            answer |= {"dev": self.dev, "addr": self.addr}
        return answer | {"count": self.count, "min": self.min, "max": self.max, "mean": self.mean}


@attrs.frozen
class Series:
    resolution: Resolution
    points: list[SeriesPoint]


def choose_resolution(since: dt.datetime | None, until: dt.datetime | None) -> Resolution:
    """Raw values for short ranges, hourly roll-ups for longer ones, daily ones beyond (or no start)."""
    if since is None:
        return "day"
    if until is None:  # of unknown length: resolve_resolution measures it
        return "hour"
    if until - since <= LONGEST_RAW:
        return "raw"
    return "hour" if until - since <= LONGEST_HOURLY else "day"


def resolve_resolution(
    session: Session, source: RollupSource, key: int | str, since: dt.datetime | None, until: dt.datetime | None,
    point: str | None = None,
) -> Resolution:
    """``choose_resolution``, a missing ``until`` taken as the time of the newest raw row (one index step)."""
    if since is not None and until is None:
        raw = source.raw.c
        query = select(raw.time).where(raw[source.key[0]] == key)
        if point is not None:
            query = query.where(raw.point == point)
        newest = session.scalar(query.order_by(raw.time.desc()).limit(1))
        until = since if newest is None else max(since, newest)
    return choose_resolution(since, until)


def read_series(
    session: Session,
    source: RollupSource,
    key: int | str,
    since: dt.datetime | None,
    until: dt.datetime | None,
    resolution: Resolution | Literal["auto"] = "auto",
    point: str | None = None,
    limit: int | None = None,
    newest_first: bool = False,
) -> Series:
    """A DTU's (``DTU_SAMPLES``, ``key`` its PSN) or a meter's (``METER_SAMPLES``, its name; ``point``
    one of its points) values in [since, until), oldest first (or newest first), at most ``limit`` points.

    ``auto`` picks the resolution by the range's length (``choose_resolution``).
    Roll-up buckets are those starting in the range (``since`` is taken back to its
    bucket's start), and include the raw rows the roll-up job has not reached yet.
    """
    chosen = resolve_resolution(session, source, key, since, until, point) if resolution == "auto" else resolution
    raw = source.raw.c
    selected = [raw[source.key[0]] == key]
    if point is not None:
        selected.append(raw.point == point)
    if chosen == "raw":
        query = select(raw.id, raw.time, *(raw[name] for name in source.columns)).where(*selected)
        order = (raw.time.desc(), raw.id.desc()) if newest_first else (raw.time, raw.id)
        points: list[SeriesPoint] = []
        for row in session.execute(_in_range(query, raw.time, since, until).order_by(*order)):
            for (_, item), value, extras in source.explode(row):
                points.append(SeriesPoint(row.time, item, int(value is not None), value, value, value, **extras))
            if limit is not None and len(points) >= limit:
                break
        return Series("raw", points[:limit])
    period = PERIODS[chosen]
    first = None if since is None else bucket_start(since, period)
    rolled = source.rollups.c
    query = select(source.rollups).where(rolled[source.key[0]] == key, rolled.period == period)
    if point is not None:
        query = query.where(rolled.point == point)
    buckets: Buckets = {}
    for row in session.execute(_in_range(query, rolled.start, first, until)):
        bucket = tuple(row._mapping[name] for name in (*source.key, "period", "start"))
        extras = {name: row._mapping[name] for name in source.extras if row._mapping[name] is not None}
        stored = row._mapping
        buckets[bucket] = Aggregate(stored["count"], stored["min"], stored["max"], stored["sum"], extras)
    # The raw rows the job has not reached yet (all if it reached none), merged into their buckets.
    cursor = session.get(RollupCursor, source.name)
    tail = select(raw.id, raw.time, *(raw[name] for name in source.columns)).where(
        *selected, *_after_cursor(source, cursor))
    tail_start = first if cursor is None else cursor.time if first is None else max(first, cursor.time)
    tail_rows = session.execute(_in_range(tail, raw.time, tail_start, until).order_by(raw.time, raw.id))
    for bucket, later in aggregate(source, tail_rows, [period]).items():
        found = buckets.get(bucket)
        if found is None:
            buckets[bucket] = later
        else:
            found.merge(later)
    ordered = sorted(buckets.items(), key=lambda item: (item[0][-1], item[0][1]), reverse=newest_first)
    return Series(chosen, [
        SeriesPoint(bucket[-1], bucket[1], found.count, found.min, found.max, found.mean,
                    found.extras.get("dev"), found.extras.get("addr"))
        for bucket, found in ordered[:limit]
    ])


def _in_range(query: Any, column: Any, since: dt.datetime | None, until: dt.datetime | None) -> Any:
    if since is not None:
        query = query.where(column >= since)
    if until is not None:
        query = query.where(column < until)
    return query


# -- expiry -----------------------------------------------------------------------------------------


@attrs.frozen
class Expiry:
    """Rows of ``table`` whose ``column`` is older than a retention go, a batch per transaction."""

    table: Table
    column: str
    #: The table has an index starting with (``column``), walked oldest first; else its ids are.
    indexed: bool
    #: For roll-ups: only this period's rows.
    period: int | None = None


def expiries(policy: RetentionPolicy) -> list[tuple[Expiry, float, RollupSource | None]]:
    """What the policy expires: the table, days kept, and for raw samples the source that must roll them up first."""
    audit = [
        Expiry(table_of(CommandRecord), "queued", False),
        Expiry(table_of(DtuEdit), "time", False),
        Expiry(table_of(MeterWrite), "requested", False),
        Expiry(table_of(DeviceOperation), "requested", False),
        Expiry(table_of(TemplateEdit), "time", False),
    ]
    planned: list[tuple[Expiry, float | None, RollupSource | None]] = [
        (Expiry(DTU_SAMPLES.raw, "time", True), policy.samples, DTU_SAMPLES),
        (Expiry(METER_SAMPLES.raw, "time", True), policy.meter_samples, METER_SAMPLES),
        (Expiry(table_of(MeterFailure), "last", False), policy.meter_failures, None),
        *((expiry, policy.audit, None) for expiry in audit),
        *((Expiry(source.rollups, "start", True, HOUR), policy.hourly, None) for source in SOURCES),
        *((Expiry(source.rollups, "start", True, DAY), policy.daily, None) for source in SOURCES),
    ]
    return [(expiry, days, source) for expiry, days, source in planned if days is not None]


def expire_step(session: Session, expiry: Expiry, cutoff: dt.datetime, batch_rows: int) -> int:
    """Delete up to about ``batch_rows`` of the oldest rows before ``cutoff``; how many went."""
    table = expiry.table
    column = table.c[expiry.column]
    chosen = [column < cutoff]
    if expiry.period is not None:
        chosen.append(table.c.period == expiry.period)
    if expiry.indexed:
        # The batch_rows-th oldest time: everything up to it goes (with its ties), else all before the cutoff.
        boundary = session.scalar(select(column).where(*chosen).order_by(column).offset(batch_rows - 1).limit(1))
        if boundary is not None:
            chosen.append(column <= boundary)
        return rowcount(session.execute(delete(table).where(*chosen)))
    # No index on the time: the oldest ids, of which those before the cutoff go. Ids grow with
    # the time in these tables, so once the oldest ids are not expired, nothing is.
    oldest = select(table.c.id).order_by(table.c.id).limit(batch_rows)
    return rowcount(session.execute(delete(table).where(table.c.id.in_(oldest), *chosen)))


# -- PostgreSQL partitions -------------------------------------------------------------------------

_DAY_PARTITION = re.compile(r"_p(\d{8})$")
_OLD_PARTITION = re.compile(r"_p_before(\d{8})$")


def _day(digits: str) -> dt.date:
    return dt.datetime.strptime(digits, "%Y%m%d").replace(tzinfo=dt.UTC).date()


def _midnight(day: dt.date) -> str:
    return f"'{day.isoformat()} 00:00:00+00'"


def partitions(session: Session, table: str) -> dict[str, dt.date | None]:
    """A partitioned table's partitions, each with the first day it no longer holds (None: the default)."""
    names = session.scalars(text(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = :table ORDER BY c.relname"
    ), {"table": table})
    found: dict[str, dt.date | None] = {}
    for name in names:
        if (day := _DAY_PARTITION.search(name)) is not None:
            found[name] = _day(day.group(1)) + dt.timedelta(days=1)
        elif (before := _OLD_PARTITION.search(name)) is not None:
            found[name] = _day(before.group(1))
        else:
            found[name] = None
    return found


def is_partitioned(session: Session, table: str) -> bool:
    if session.get_bind().dialect.name != "postgresql":
        return False
    return bool(session.scalar(text(
        "SELECT count(*) FROM pg_partitioned_table t JOIN pg_class c ON c.oid = t.partrelid WHERE c.relname = :t"
    ), {"t": table}))


def days_to_partition(session: Session, table: str, today: dt.date) -> list[dt.date]:
    """The coming days (from tomorrow on) without a partition yet.

    Never today or a day before: an insert that PostgreSQL routed to the default
    partition while a partition for its day is attached fails, so a day is
    partitioned only before its rows arrive. Rows of days without a partition
    (the center was stopped for longer than the days made ahead) stay in the
    default partition and are expired row by row.
    """
    existing = partitions(session, table)
    covered = {name for name, end in existing.items() if end is not None}
    days = {today + dt.timedelta(days=offset) for offset in range(1, DAYS_AHEAD + 1)}
    default = f"{table}_p_default"
    if default in existing:
        # Rows from a clock ahead of ours: moved into their day's partition when it is made.
        days |= set(session.scalars(text(
            f"SELECT DISTINCT (\"time\" AT TIME ZONE 'UTC')::date FROM {default} WHERE \"time\" >= :tomorrow"
        ), {"tomorrow": _midnight_of(today + dt.timedelta(days=1))}))
    # The partition of an upgraded installation's rows covers every day before its end.
    old_rows_end = max((end for name, end in existing.items() if end is not None and "_before" in name),
                       default=None)
    return sorted(day for day in days if f"{table}_p{day:%Y%m%d}" not in covered
                  and (old_rows_end is None or day >= old_rows_end))


def add_partition(session: Session, table: str, day: dt.date) -> None:
    """The partition of ``day``, taking over the rows of that day from the default partition."""
    name, following = f"{table}_p{day:%Y%m%d}", day + dt.timedelta(days=1)
    session.execute(text(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'"))
    default = f"{table}_p_default"
    has_default = default in partitions(session, table)
    if has_default:
        # Else a row of that day inserted after the move would make the attach fail.
        session.execute(text(f"LOCK TABLE {default} IN ACCESS EXCLUSIVE MODE"))
    session.execute(text(f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS)"))
    if has_default:
        session.execute(text(
            f"WITH moved AS (DELETE FROM {default} WHERE \"time\" >= {_midnight(day)} "
            f"AND \"time\" < {_midnight(following)} RETURNING *) INSERT INTO {name} SELECT * FROM moved"
        ))
    session.execute(text(
        f"ALTER TABLE {table} ATTACH PARTITION {name} FOR VALUES FROM ({_midnight(day)}) TO ({_midnight(following)})"
    ))


def drop_partition(session: Session, name: str) -> None:
    session.execute(text(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'"))
    session.execute(text(f"DROP TABLE {name}"))


def expired_partitions(session: Session, table: str, cutoff: dt.datetime) -> list[str]:
    """Partitions holding only rows before ``cutoff``."""
    return [name for name, end in partitions(session, table).items()
            if end is not None and _midnight_of(end) <= cutoff]


def _midnight_of(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


def expire_default_partition(session: Session, table: str, cutoff: dt.datetime, batch_rows: int) -> int:
    default = f"{table}_p_default"
    return rowcount(session.execute(text(
        f"DELETE FROM {default} WHERE id IN (SELECT id FROM {default} "
        "WHERE \"time\" < :cutoff LIMIT :rows)"
    ), {"cutoff": cutoff, "rows": batch_rows}))


# -- the job ----------------------------------------------------------------------------------------


class _Stopping(Exception):
    """The service is stopping: a run ends after the step under way, before the next."""


@attrs.define
class RetentionStats:
    runs: int = 0
    rows_rolled_up: int = 0
    rows_expired: int = 0
    partitions_added: int = 0
    partitions_dropped: int = 0
    failed_runs: int = 0


class RetentionJob(Service):
    """Rolls up and expires, every ``policy.interval`` seconds, in steps of its own transactions.

    Each run first waits for the rows queued before it to be committed
    (``Store.flushed``), then rolls up every raw table up to then, makes the
    coming days' partitions (PostgreSQL), and expires what the policy says,
    batch by batch until nothing is left or the service stops. A failed run is
    logged and the next one starts over from the cursors: every step is
    idempotent or transactional with its cursor.
    """

    def __init__(self, store: Store, clock: IReactorTime, policy: RetentionPolicy) -> None:
        self.store = store
        self.clock = clock
        self.policy = policy
        self.stats = RetentionStats()
        self._loop = LoopingCall(self.run)
        self._loop.clock = clock
        self._current: Deferred[None] | None = None
        #: stopService was called: a run under way ends after its current step.
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._loop.start(self.policy.interval, now=True)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        if self._loop.running:
            self._loop.stop()
        # The store stops after us (it started before): a step under way finishes first.
        return succeed(None) if self._current is None else self._current

    def run(self) -> Deferred[None]:
        """One run; fires when it ends, never with a failure (the failure is logged)."""
        if self._current is not None:
            return self._current
        d = self._current = ensureDeferred(self._run())

        def done(_: object) -> None:
            self._current = None

        d.addBoth(done)
        return d

    async def _run(self) -> None:
        before = attrs.evolve(self.stats)
        try:
            await self.store.flushed()
            horizon = utc_now(self.clock) - dt.timedelta(seconds=self.policy.settle)
            for source in SOURCES:
                await self._repeat(partial(rollup_step, source=source, horizon=horizon,
                                           batch_rows=self.policy.batch_rows), "rows_rolled_up")
            now = utc_now(self.clock)
            for expiry, days, rolled_by in expiries(self.policy):
                await self._expire(expiry, now - dt.timedelta(days=days), rolled_by)
            await self._add_partitions(now.date())
            self.stats.runs += 1
            self._report(before)
        except _Stopping:
            return
        except Exception as error:
            self.stats.failed_runs += 1
            if is_transient(error):
                log.warn("Retention run stopped, the database failing ({error}); trying again in {interval:g}s",
                         error=str(error).strip().splitlines()[0], interval=self.policy.interval)
            else:
                log.failure("Retention run failed; trying again in {interval:g}s", interval=self.policy.interval)

    def _report(self, before: RetentionStats) -> None:
        """One line for a run that changed something."""
        done = {name: getattr(self.stats, name) - getattr(before, name)
                for name in ("rows_rolled_up", "rows_expired", "partitions_added", "partitions_dropped")}
        if any(done.values()):
            log.info("Retention: {rows_rolled_up} rows rolled up, {rows_expired} rows expired, "
                     "{partitions_added} partitions added and {partitions_dropped} dropped", **done)

    async def _write(self, job: Callable[[Session], T]) -> T:
        """``job`` in a transaction of its own on the store's threads, unless the service is stopping;
        then a pause, so that the job takes at most ``policy.share`` of the time."""
        if self._stopping:
            raise _Stopping()
        started = self.clock.seconds()
        result = await self.store.maintain(job)
        pause = (self.clock.seconds() - started) * (1 / self.policy.share - 1)
        if pause > 0:
            await deferLater(self.clock, pause, lambda: None)
        return result

    def _read(self, job: Callable[[Session], T]) -> Deferred[T]:
        if self._stopping:
            raise _Stopping()
        return self.store.read(job)

    async def _repeat(self, step: Callable[[Session], int], counter: str) -> None:
        """Run ``step`` in transactions until a batch comes out short (or the service stops)."""
        while True:
            done = await self._write(step)
            setattr(self.stats, counter, getattr(self.stats, counter) + done)
            if done < self.policy.batch_rows:
                return

    async def _expire(self, expiry: Expiry, cutoff: dt.datetime, rolled_by: RollupSource | None) -> None:
        if rolled_by is not None:
            # Raw rows go only once rolled up.
            rolled = await self._read(partial(rolled_up_until, source=rolled_by))
            if rolled is None:
                return
            cutoff = min(cutoff, rolled)
            table = rolled_by.name
            if await self._read(partial(is_partitioned, table=table)):
                for name in await self._read(partial(expired_partitions, table=table, cutoff=cutoff)):
                    await self._write(partial(drop_partition, name=name))
                    self.stats.partitions_dropped += 1
                    log.info("Dropped partition {name}: all its rows are past their retention", name=name)
                await self._repeat(partial(expire_default_partition, table=table, cutoff=cutoff,
                                           batch_rows=self.policy.batch_rows), "rows_expired")
                return
        await self._repeat(partial(expire_step, expiry=expiry, cutoff=cutoff, batch_rows=self.policy.batch_rows),
                           "rows_expired")

    async def _add_partitions(self, today: dt.date) -> None:
        for source in SOURCES:
            table = source.name
            if not await self._read(partial(is_partitioned, table=table)):
                continue
            for day in await self._read(partial(days_to_partition, table=table, today=today)):
                await self._write(partial(add_partition, table=table, day=day))
                self.stats.partitions_added += 1
