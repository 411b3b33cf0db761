"""The Modbus bridge's meters in the database, as plain synchronous functions of a Session.

Like ``queries``: the results are attrs snapshots, safe to hand from a
database thread to the reactor thread; the CLI calls these directly.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import attrs
from sqlalchemy import and_, bindparam, exists, func, literal_column, or_, select, text, update
from sqlalchemy.orm import Session

from dtucenter.setting import MAX_NAME
from dtucenter.store.accounts import first_admin_id
from dtucenter.store.links import DeviceConflict
from dtucenter.store.models import (
    MANAGED_BY_API,
    MANAGED_BY_FILE,
    DeviceOperation,
    Meter,
    MeterFailure,
    MeterSample,
    MeterWrite,
    UTCDateTime,
)
from dtucenter.store.queries import bucket_index, epoch_seconds, table_of, time_window
from dtucenter.store.templates import template_of_meter

#: Point types whose stored value is a whole number when the scale is one.
_WHOLE_TYPES = frozenset({"int16", "uint16", "int32", "uint32", "int64", "uint64"})


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.datetime) else value


@attrs.frozen
class MeterInfo:
    name: str
    account: str
    link: str
    unit: int
    interval: float
    points: tuple[Mapping[str, Any], ...]
    configured: bool
    last_poll: dt.datetime | None
    last_success: dt.datetime | None
    last_error: str | None
    last_error_time: dt.datetime | None
    failing: bool
    #: ``file`` or ``api``: where the meter is changed.
    managed_by: str
    #: The ``[[meter]]`` table, as the API takes it; None for a row older than definitions.
    definition: Mapping[str, Any] | None

    @classmethod
    def of(cls, row: Meter) -> MeterInfo:
        return cls(
            name=row.name, account=row.owner.name, link=row.link, unit=row.unit, interval=row.interval,
            points=tuple(json.loads(row.points)), configured=row.configured, last_poll=row.last_poll,
            last_success=row.last_success, last_error=row.last_error, last_error_time=row.last_error_time,
            failing=row.failing, managed_by=row.managed_by,
            definition=None if row.definition is None else json.loads(row.definition),
        )

    def point(self, name: str) -> Mapping[str, Any] | None:
        return next((p for p in self.points if p["name"] == name), None)

    def to_json(self) -> dict[str, Any]:
        body = {key: _iso(value) for key, value in attrs.asdict(self, recurse=False).items()}
        body["points"] = [dict(p) for p in self.points]
        return body


def typed_value(value: float | None, point: Mapping[str, Any] | None) -> bool | int | float | None:
    """A stored float shown as what the point holds: bool points as bools, unscaled integers as integers."""
    if value is None or point is None:
        return value
    if point.get("type") == "bool":
        return value != 0
    scale = float(point.get("scale", 1))
    if point.get("type") in _WHOLE_TYPES and scale.is_integer() and value.is_integer():
        return int(value)
    return value


@attrs.frozen
class MeterSampleInfo:
    time: dt.datetime
    meter: str
    point: str
    value: bool | int | float | None

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time.isoformat(), "point": self.point, "value": self.value}


@attrs.frozen
class FailureStreakInfo:
    reason: str
    first: dt.datetime
    last: dt.datetime
    count: int

    def to_json(self) -> dict[str, Any]:
        return {key: _iso(value) for key, value in attrs.asdict(self).items()}


@attrs.frozen
class MeterWriteInfo:
    id: int
    meter: str
    point: str
    value: float
    who: str
    requested: dt.datetime
    finished: dt.datetime
    outcome: str
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {key: _iso(value) for key, value in attrs.asdict(self).items()}


# -- the configured meters ---------------------------------------------------------------------


def sync_meters(session: Session, meters: Sequence[Mapping[str, Any]], now: dt.datetime) -> tuple[int, int]:
    """Make the file's meters in the table match the config: add or update ``meters`` (dicts of
    name, link, unit, interval, points and definition) as file-managed, flag the other
    file-managed ones as no longer configured. Returns (added, retired).

    A meter new to the table belongs to the first admin account (the file is the operator's);
    one that exists keeps its owner, so an admin may move it to a customer's account. A meter
    the API made under a name the file now declares becomes the file's: the file is what
    the operator wrote last. The API's meters are otherwise left alone."""
    rows = {row.name: row for row in session.scalars(select(Meter))}
    owner = first_admin_id(session) if any(spec["name"] not in rows for spec in meters) else None
    added = retired = 0
    for spec in meters:
        row = rows.pop(spec["name"], None)
        if row is None:
            assert owner is not None
            row = Meter(name=spec["name"], created=now, failing=False, account_id=owner)
            session.add(row)
            added += 1
        row.link, row.unit, row.interval = spec["link"], spec["unit"], spec["interval"]
        row.points = json.dumps(list(spec["points"]))
        row.definition = spec["definition"]
        row.managed_by = MANAGED_BY_FILE
        row.configured = True
    for row in rows.values():
        if row.configured and row.managed_by == MANAGED_BY_FILE:
            row.configured = False
            retired += 1
    return added, retired


def api_meter_definitions(session: Session) -> list[tuple[str, int, str]]:
    """(name, account id, ``[[meter]]`` table as JSON) of the meters the API manages and has not
    deleted, by name."""
    query = (
        select(Meter.name, Meter.account_id, Meter.definition)
        .where(Meter.managed_by == MANAGED_BY_API, Meter.configured.is_(True), Meter.definition.is_not(None))
        .order_by(Meter.name)
    )
    return [(name, account, definition) for name, account, definition in session.execute(query)
            if definition is not None]


#: The poll state of a meter row, as ``record_meter_states`` takes it.
STATE_FIELDS = ("last_poll", "last_success", "last_error", "last_error_time", "failing")


def record_meter_states(session: Session, states: Sequence[Mapping[str, Any]]) -> None:
    """Update poll states by meter name: dicts of name and every one of STATE_FIELDS.

    A Core executemany, not the ORM's bulk update: that one fails the whole
    transaction when a row is missing (say the start-up sync failed), and
    one missing row is no reason to lose the others' state.
    """
    if not states:
        return
    table = table_of(Meter)
    statement = (
        update(table)
        .where(table.c.name == bindparam("b_name"))
        .values({field: bindparam(f"b_{field}") for field in STATE_FIELDS})
    )
    session.connection().execute(
        statement, [{"b_name": state["name"], **{f"b_{f}": state[f] for f in STATE_FIELDS}} for state in states]
    )


def record_failure_streaks(
    session: Session, started: Sequence[Mapping[str, Any]], extended: Sequence[Mapping[str, Any]]
) -> None:
    """Insert new streaks (meter, reason, first, last, count) and move on the ones stored
    already, found by (meter, first)."""
    table = table_of(MeterFailure)
    if started:
        session.connection().execute(table.insert(), list(started))
    if extended:
        statement = (
            update(table)
            .where(table.c.meter == bindparam("b_meter"), table.c.first == bindparam("b_first"))
            .values(last=bindparam("b_last"), count=bindparam("b_count"))
        )
        session.connection().execute(
            statement,
            [
                {"b_meter": s["meter"], "b_first": s["first"], "b_last": s["last"], "b_count": s["count"]}
                for s in extended
            ],
        )


def get_meter(session: Session, name: str, account: int | None = None) -> MeterInfo | None:
    """Meter ``name``; None also when ``account`` (an account id) is given and does not own it."""
    row = session.get(Meter, name)
    if row is None or (account is not None and row.account_id != account):
        return None
    return MeterInfo.of(row)


def meter_owner(session: Session, name: str, account: int | None = None) -> int | None:
    """The id of the account owning meter ``name`` (configured); None also when ``account`` is
    given and is not it."""
    row = session.get(Meter, name)
    if row is None or not row.configured or (account is not None and row.account_id != account):
        return None
    return row.account_id


def list_meters(session: Session, account: int | None = None) -> list[MeterInfo]:
    """All meters by name, or those of ``account`` (an account id)."""
    query = select(Meter).order_by(Meter.name)
    if account is not None:
        query = query.where(Meter.account_id == account)
    return [MeterInfo.of(row) for row in session.scalars(query)]


def move_meter(session: Session, name: str, account: int) -> MeterInfo | None:
    """Give meter ``name`` to ``account`` (an account id); None when there is no such meter.

    ``DeviceConflict`` when it is made from its account's own template: no other account's
    meter may use that."""
    row = session.get(Meter, name)
    if row is None:
        return None
    own_template = template_of_meter(session, name)
    if own_template is not None and own_template[0] != account:
        raise DeviceConflict(
            f"meter {name!r} is made from template {own_template[1]!r} of account {row.owner.name!r}, which "
            "another account's meters cannot use: give it its points or a shipped template first"
        )
    row.account_id = account
    session.flush()
    session.refresh(row)
    return MeterInfo.of(row)


# -- samples -------------------------------------------------------------------------------------


#: The order of a row of ``sample_rows`` (a tuple: the store inserts those in bulk).
METER_SAMPLE_COLUMNS = ("meter", "point", "time", "value")
MeterSampleRow = tuple[str, str, dt.datetime, "float | None"]


def sample_rows(meter: str, time: dt.datetime, values: Mapping[str, bool | int | float]) -> list[MeterSampleRow]:
    """Rows for one poll. A float that is NaN or infinite has no SQL value: it is stored as NULL."""
    rows = []
    for point, value in values.items():
        number = float(value)
        rows.append((meter, point, time, number if math.isfinite(number) else None))
    return rows


def has_samples(session: Session, meter: str, point: str) -> bool:
    query = select(exists().where(MeterSample.meter == meter, MeterSample.point == point))
    return bool(session.scalar(query))


def query_meter_samples(
    session: Session,
    meter: MeterInfo,
    point: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int | None = None,
    newest_first: bool = False,
) -> list[MeterSampleInfo]:
    """Samples of one meter (one point of it), oldest first; ``limit`` keeps the oldest after ``since``.

    ``newest_first``: the other way round; ``limit`` keeps the newest before ``until``.
    """
    query = select(MeterSample).where(MeterSample.meter == meter.name)
    if point is not None:
        query = query.where(MeterSample.point == point)
    query = time_window(query, MeterSample, since, until, limit, newest_first)
    return [
        MeterSampleInfo(r.time, r.meter, r.point, typed_value(r.value, meter.point(r.point)))
        for r in session.scalars(query)
    ]


def meter_values(
    session: Session, meter: str, point: str | None, since: dt.datetime, until: dt.datetime,
    after: tuple[dt.datetime, int] | None = None, limit: int | None = None,
) -> Iterator[tuple[dt.datetime, int, str, float | None]]:
    """A meter's samples (one point's) in [since, until), oldest first, as (time, id, point, value): streamed.

    ``after`` (a time and id given before) continues where a page ended, for exports read a page at a time.
    """
    query = select(MeterSample.time, MeterSample.id, MeterSample.point, MeterSample.value).where(
        MeterSample.meter == meter
    )
    if point is not None:
        query = query.where(MeterSample.point == point)
    if after is not None:
        query = query.where(
            or_(MeterSample.time > after[0], and_(MeterSample.time == after[0], MeterSample.id > after[1]))
        )
    query = time_window(query, MeterSample, since, until, limit)
    yield from session.execute(query.execution_options(yield_per=10_000))


@attrs.frozen
class MeterBucket:
    """One point's samples in one time bucket, reduced by the database."""

    point: str
    index: int
    samples: int
    #: Samples with a value (a NaN read is stored as NULL).
    count: int
    low: float | None
    high: float | None
    total: float | None
    first: float
    last: float


def meter_buckets(
    session: Session, meter: str, point: str | None, since: dt.datetime, until: dt.datetime, width: float,
) -> list[MeterBucket]:
    """Min, max, sum and count of a meter's samples (one point's) per ``width``-second bucket from ``since``,
    in bucket order: the database reads the range along its index and answers one row per point and bucket."""
    seconds = epoch_seconds(session, MeterSample.time)
    index = bucket_index(session, seconds, since.timestamp(), width).label("bucket")
    query = select(
        MeterSample.point, index, func.count(), func.count(MeterSample.value), func.min(MeterSample.value),
        func.max(MeterSample.value), func.sum(MeterSample.value), func.min(seconds), func.max(seconds),
    ).where(MeterSample.meter == meter, MeterSample.time >= since, MeterSample.time < until)
    if point is not None:
        query = query.where(MeterSample.point == point)
    # By the label: PostgreSQL takes the repeated expression for another one (its parameters are new ones).
    query = query.group_by(MeterSample.point, literal_column("bucket")).order_by(literal_column("bucket"))
    return [MeterBucket(*row) for row in session.execute(query)]


def latest_meter_values(session: Session, meter: MeterInfo) -> list[MeterSampleInfo]:
    """The latest stored value of each of the meter's configured points, in config order.

    One query per point, each one step back along the (meter, point, time)
    index, so it costs the same however many samples are stored. A point
    never read successfully has no entry.
    """
    found: list[MeterSampleInfo] = []
    for point in meter.points:
        latest = query_meter_samples(session, meter, point["name"], limit=1, newest_first=True)
        found.extend(latest)
    return found


@attrs.frozen
class MeterLatest:
    """A meter's latest stored value of each configured point (a point never read has none)."""

    meter: str
    link: str
    samples: tuple[MeterSampleInfo, ...]

    def to_json(self) -> dict[str, Any]:
        return {"meter": self.meter, "link": self.link, "samples": [s.to_json() for s in self.samples]}


#: (meter, point) pairs per statement of ``newest_samples``.
NEWEST_CHUNK = 5000

# One step back along the (meter, point, time) index per pair, all in one statement: a statement per
# pair would cost more in the driver than the index step does in the database. SQLite takes the pairs
# as a JSON array; the row found is fetched by its id from the index (it holds the rowid).
_NEWEST_SQLITE = text(
    "SELECT j.key AS n, s.time AS time, s.value AS value FROM json_each(:pairs) AS j "
    "JOIN meter_samples AS s ON s.id = (SELECT x.id FROM meter_samples AS x "
    "WHERE x.meter = j.value ->> 0 AND x.point = j.value ->> 1 ORDER BY x.time DESC LIMIT 1)"
)
# On PostgreSQL, whose meter_samples is partitioned by day, the newest partitions are tried first:
# an unbounded ``ORDER BY time DESC LIMIT 1`` would step into every partition's index (a merge of
# them all), one bounded below by :recent only into the few it can reach.
_NEWEST_POSTGRESQL = text(
    "SELECT p.n AS n, s.time AS time, s.value AS value "
    "FROM unnest(CAST(:meters AS text[]), CAST(:points AS text[])) WITH ORDINALITY AS p(meter, point, n) "
    "CROSS JOIN LATERAL (SELECT x.time, x.value FROM meter_samples AS x "
    "WHERE x.meter = p.meter AND x.point = p.point AND x.time >= :recent ORDER BY x.time DESC LIMIT 1) AS s"
)
#: How far back ``newest_samples`` looks first on PostgreSQL; pairs without a value since then are looked
#: up again without the bound, one statement each.
RECENT = dt.timedelta(days=1)


def newest_samples(
    session: Session, pairs: Sequence[tuple[str, str]], now: dt.datetime
) -> dict[tuple[str, str], tuple[dt.datetime, float | None]]:
    """The newest stored sample (time, value) of each (meter, point) pair that has one."""
    found: dict[tuple[str, str], tuple[dt.datetime, float | None]] = {}
    dialect = session.get_bind().dialect
    postgresql = dialect.name == "postgresql"
    # The times as the column type reads them, each distinct one once: a poll's points share its time.
    read_time = UTCDateTime().dialect_impl(dialect).result_processor(dialect, None)
    times: dict[Any, dt.datetime] = {}

    def utc(raw: Any) -> dt.datetime:
        time = times.get(raw)
        if time is None:  # the column is NOT NULL: read, it is a datetime
            time = times[raw] = cast(dt.datetime, raw if read_time is None else read_time(raw))
        return time

    for first in range(0, len(pairs), NEWEST_CHUNK):
        chunk = pairs[first:first + NEWEST_CHUNK]
        if not postgresql:
            rows = session.execute(_NEWEST_SQLITE, {"pairs": json.dumps(chunk)})
            found.update((chunk[n], (utc(time), value)) for n, time, value in rows)
            continue
        rows = session.execute(_NEWEST_POSTGRESQL, {
            "meters": [m for m, _ in chunk], "points": [p for _, p in chunk], "recent": now - RECENT})
        # ORDINALITY counts from 1.
        found.update((chunk[n - 1], (utc(time), value)) for n, time, value in rows)
        # A point silent for longer (a meter failing for days, one taken away): each its own statement, whose
        # values the planner sees. Unbounded, the lateral join above is planned for any pair alike (a
        # partition's rows over its number of meters), and where a partition holds few meters it walks
        # that partition's (time, id) index backwards, past every row of the others, in every partition.
        for pair in chunk:
            if pair not in found:
                newest = session.execute(
                    select(MeterSample.time, MeterSample.value)
                    .where(MeterSample.meter == pair[0], MeterSample.point == pair[1])
                    .order_by(MeterSample.time.desc()).limit(1)
                ).first()
                if newest is not None:
                    found[pair] = (newest.time, newest.value)
    return found


def latest_values(
    session: Session, account: int | None, now: dt.datetime, after: str | None = None, limit: int | None = None,
    needle: str | None = None, link: str | None = None,
) -> list[MeterLatest]:
    """Many meters' latest values, by name after ``after`` (a page), those of ``account`` (None: all),
    whose name or link contains ``needle`` (any case), or on ``link``: a fleet's latest values in one
    statement per NEWEST_CHUNK points, each an index step, however many samples are stored."""
    query = select(Meter.name, Meter.link, Meter.points).order_by(Meter.name)
    if account is not None:
        query = query.where(Meter.account_id == account)
    if after is not None:
        query = query.where(Meter.name > after)
    if needle:
        lowered = needle.lower()
        query = query.where(or_(func.lower(Meter.name).contains(lowered, autoescape=True),
                                func.lower(Meter.link).contains(lowered, autoescape=True)))
    if link is not None:
        query = query.where(Meter.link == link)
    if limit is not None:
        query = query.limit(limit)
    # Meters made from one template share their points' text: each is parsed once.
    parsed: dict[str, tuple[Mapping[str, Any], ...]] = {}
    meters = []
    for name, where, text_of_points in session.execute(query):
        points = parsed.get(text_of_points)
        if points is None:
            points = parsed[text_of_points] = tuple(json.loads(text_of_points))
        meters.append((name, where, points))
    values = newest_samples(session, [(name, p["name"]) for name, _, points in meters for p in points], now)
    answer = []
    for name, where, points in meters:
        samples = []
        for point in points:
            value = values.get((name, point["name"]))
            if value is not None:
                samples.append(MeterSampleInfo(value[0], name, point["name"], typed_value(value[1], point)))
        answer.append(MeterLatest(name, where, tuple(samples)))
    return answer


# -- failures and writes ---------------------------------------------------------------------------


def list_failures(session: Session, meter: str, limit: int) -> list[FailureStreakInfo]:
    """Newest first."""
    rows = session.scalars(
        select(MeterFailure).where(MeterFailure.meter == meter).order_by(MeterFailure.first.desc()).limit(limit)
    )
    return [FailureStreakInfo(r.reason, r.first, r.last, r.count) for r in rows]


def record_write(session: Session, **fields: Any) -> None:
    """One row of the write audit trail: meter, point, value, who, requested, finished, outcome, error."""
    fields["who"] = fields["who"][:MAX_NAME]
    session.add(MeterWrite(**fields))


def list_writes(session: Session, meter: str, limit: int) -> list[MeterWriteInfo]:
    """Newest first."""
    rows = session.scalars(
        select(MeterWrite).where(MeterWrite.meter == meter).order_by(MeterWrite.id.desc()).limit(limit)
    )
    return [
        MeterWriteInfo(r.id, r.meter, r.point, r.value, r.who, r.requested, r.finished, r.outcome, r.error)
        for r in rows
    ]


# -- the device operation audit trail (reads on demand, raw exchanges) -------------------------


@attrs.frozen
class DeviceOperationInfo:
    id: int
    kind: str
    target: str
    who: str
    requested: dt.datetime
    finished: dt.datetime
    outcome: str
    request: Any
    answer: Any
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {key: _iso(value) for key, value in attrs.asdict(self).items()}


def record_operation(
    session: Session, *, kind: str, target: str, who: str, requested: dt.datetime, finished: dt.datetime,
    outcome: str, request: Mapping[str, Any], answer: Mapping[str, Any] | None, error: str | None,
) -> None:
    """One row of the device operation audit trail; ``request`` and ``answer`` are stored as JSON."""
    session.add(DeviceOperation(
        kind=kind, target=target, who=who[:MAX_NAME], requested=requested, finished=finished, outcome=outcome,
        request=json.dumps(request), answer=None if answer is None else json.dumps(answer), error=error,
    ))


def list_operations(session: Session, kind: str, target: str, limit: int) -> list[DeviceOperationInfo]:
    """Newest first."""
    rows = session.scalars(
        select(DeviceOperation)
        .where(DeviceOperation.kind == kind, DeviceOperation.target == target)
        .order_by(DeviceOperation.id.desc())
        .limit(limit)
    )
    return [
        DeviceOperationInfo(
            r.id, r.kind, r.target, r.who, r.requested, r.finished, r.outcome, json.loads(r.request),
            None if r.answer is None else json.loads(r.answer), r.error,
        )
        for r in rows
    ]


# -- written through the API ------------------------------------------------------------------


def _set_definition(row: Meter, spec: Mapping[str, Any]) -> None:
    row.link, row.unit, row.interval = spec["link"], spec["unit"], spec["interval"]
    row.points = json.dumps(list(spec["points"]))
    row.definition = spec["definition"]
    row.configured = True


def create_meter(session: Session, spec: Mapping[str, Any], account: int, now: dt.datetime) -> bool:
    """Add an API-managed meter (``spec`` as ``sync_meters`` takes one) owned by ``account``.

    The name of a meter deleted earlier is free again for its own account, which finds its
    samples under it; another account's deleted meter keeps its name taken, samples and all.
    Returns whether the row is new."""
    row = session.get(Meter, spec["name"])
    if row is not None and (row.configured or row.account_id != account):
        raise DeviceConflict(f"a meter named {spec['name']!r} exists")
    created = row is None
    if row is None:
        row = Meter(name=spec["name"], created=now, failing=False, account_id=account)
        session.add(row)
    row.managed_by = MANAGED_BY_API
    _set_definition(row, spec)
    return created


def undo_create_meter(session: Session, name: str, created: bool) -> None:
    """Take back :func:`create_meter` when the bridge refused the meter: a new row goes, a
    reused one is no longer configured, as it was."""
    row = session.get(Meter, name)
    if row is None:
        return
    if created:
        session.delete(row)
    else:
        row.configured = False


def _api_row(session: Session, name: str, account: int | None, config_file: str) -> Meter | None:
    row = session.get(Meter, name)
    if row is None or not row.configured or (account is not None and row.account_id != account):
        return None
    if row.managed_by == MANAGED_BY_FILE:
        raise DeviceConflict(f"meter {name!r} is managed by the config file {config_file}: change it there")
    return row


def replace_meter(
    session: Session, spec: Mapping[str, Any], account: int | None, config_file: str
) -> dict[str, Any] | None:
    """Replace an API-managed meter's definition; returns the old one as ``spec`` (to put back
    should the bridge refuse the new one), None when there is no such meter or ``account``
    does not own it."""
    row = _api_row(session, spec["name"], account, config_file)
    if row is None:
        return None
    old = {"name": row.name, "link": row.link, "unit": row.unit, "interval": row.interval,
           "points": json.loads(row.points), "definition": row.definition}
    _set_definition(row, spec)
    return old


def delete_meter(session: Session, name: str, account: int | None, config_file: str) -> bool:
    """Stop an API-managed meter: its row stays, not configured, so its samples stay readable.
    False when there is no such meter (or ``account`` does not own it)."""
    row = _api_row(session, name, account, config_file)
    if row is None:
        return False
    row.configured = False
    return True


def retire_link_meters(session: Session, link: str) -> list[str]:
    """Mark the API-managed meters of a deleted link as no longer configured; their names."""
    rows = session.scalars(
        select(Meter).where(Meter.link == link, Meter.managed_by == MANAGED_BY_API, Meter.configured.is_(True))
    ).all()
    for row in rows:
        row.configured = False
    return [row.name for row in rows]
