"""Database operations as plain synchronous functions of a Session.

They return attrs snapshots of plain types, never ORM objects, so results
can cross from the database thread to the reactor thread safely. The CLI
calls them directly; the running center through ``dtus.DtuStore`` (and the
API through ``Store``). Nothing here knows the DTU wire format's types.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any, TypeVarTuple

import attrs
from sqlalchemy import (
    CursorResult,
    Float,
    Integer,
    Result,
    Select,
    String,
    Table,
    and_,
    bindparam,
    cast,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from dtucenter.addresses import ipv4_octets
from dtucenter.store.accounts import first_admin_id
from dtucenter.store.models import Account, Base, Dtu, DtuHandover, RegisterEntry, Sample

#: The columns of a ``dtus`` row a DtuInfo tells as they are.
_INFO_COLUMNS = (
    "psn", "name", "pname", "version", "ccid", "fota_flag", "tick_time", "send_test_mode", "send_test_time",
    "new_ver", "new_port", "new_ip", "online", "remote", "last_login", "last_seen", "node",
)


@attrs.frozen
class DtuInfo:
    psn: int
    account: str
    name: str
    password_set: bool
    pname: str
    version: int
    ccid: str
    fota_flag: int
    tick_time: int
    send_test_mode: int
    send_test_time: int
    new_ver: int
    new_port: int
    new_ip: str
    online: bool
    remote: str | None
    last_login: dt.datetime | None
    last_seen: dt.datetime | None
    #: The cluster node its connection is on, while online.
    node: str | None

    @classmethod
    def of(cls, row: Dtu) -> DtuInfo:
        return cls.of_record({name: getattr(row, name) for name in (*_INFO_COLUMNS, "password")}, row.owner.name)

    @classmethod
    def of_record(cls, record: Mapping[str, Any], account: str) -> DtuInfo:
        """From a ``dtus`` row's columns by name, and its owner's name."""
        values = {name: record[name] for name in _INFO_COLUMNS}
        return cls(account=account, password_set=record["password"] != 0, **values)

    def to_json(self) -> dict[str, Any]:
        return {
            key: (value.isoformat() if isinstance(value, dt.datetime) else value)
            for key, value in attrs.asdict(self).items()
        }


@attrs.frozen
class LoginOutcome:
    accepted: bool
    reason: str
    #: The DTU's record as the login left it, when accepted (its LoginAck parameters among it).
    record: DtuInfo | None = None
    #: The stored register list, (dev, addr) per position.
    registers: tuple[tuple[int, int], ...] = ()
    enrolled: bool = False


#: Settings an operator may give a DTU record, with their valid ranges.
DTU_FIELD_RANGES: dict[str, tuple[int, int]] = {
    "password": (0, 0xFFFFFFFF),
    "fota_flag": (0, 255),
    "tick_time": (1, 255),
    "send_test_mode": (0, 255),
    "send_test_time": (0, 255),
    "new_ver": (0, 0xFFFF),
    "new_port": (0, 0xFFFF),
}
DTU_TEXT_FIELDS = {"name": 100, "new_ip": 15}


def validate_dtu_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Check operator-given DTU settings; raise ValueError naming the field."""
    checked: dict[str, Any] = {}
    for key, value in fields.items():
        if key in DTU_FIELD_RANGES:
            low, high = DTU_FIELD_RANGES[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{key} must be a whole number {low}..{high}, got {value!r}")
        elif key in DTU_TEXT_FIELDS:
            if not isinstance(value, str) or len(value) > DTU_TEXT_FIELDS[key]:
                raise ValueError(f"{key} must be text of at most {DTU_TEXT_FIELDS[key]} characters")
            if "\0" in value:  # PostgreSQL cannot store it in text; SQLite could, so refuse it on both
                raise ValueError(f"{key} must not contain a NUL character")
            if key == "new_ip":
                try:
                    ipv4_octets(value)
                except ValueError as e:
                    raise ValueError(f"new_ip: {e}") from None
        else:
            raise ValueError(f"unknown DTU field {key!r}")
        checked[key] = value
    return checked


def check_psn(psn: Any) -> int:
    if isinstance(psn, bool) or not isinstance(psn, int) or not 0 <= psn <= 0xFFFFFFFF:
        raise ValueError(f"PSN must be a whole number 0..4294967295, got {psn!r}")
    return psn


#: One login to decide: PSN, PASS, PName, CurVer, CCID, the peer it came from, and whether an
#: unknown PSN is enrolled (``dtucenter.dtu.ports.LoginAttempt``).
LoginAttempt = tuple[int, int, str, int, str, str, bool]


def authenticate(
    session: Session, psn: int, password: int, pname: str, version: int, ccid: str,
    remote: str, now: dt.datetime, enroll_unknown: bool, node: str | None = None,
) -> LoginOutcome:
    """One login: :func:`authenticate_many` of one."""
    return authenticate_many(session, [(psn, password, pname, version, ccid, remote, enroll_unknown)], now, node)[0]


def authenticate_many(
    session: Session, attempts: Sequence[LoginAttempt], now: dt.datetime, node: str | None = None,
) -> list[LoginOutcome]:
    """The seed's rule, for each login in order: a stored PASS of 0 takes (and keeps) any PASS;
    otherwise they must match.

    An accepted login is recorded (what the DTU reported, from where, when) and marks it online
    on ``node``. When it was online on another node, that node is told to close its older
    connection (``nodes.take_handovers``), in the same transaction.

    A redial storm brings thousands of logins a second, and three statements and an ORM object
    each set its pace: here the records and register lists of all the logins are read with one
    query each, and the accepted ones written with one statement (Core, executemany, in PSN order
    like :func:`record_last_seen`), the enrolled ones inserted with another.
    """
    table, accounts = table_of(Dtu), table_of(Account)
    psns = {attempt[0] for attempt in attempts}
    records: dict[int, dict[str, Any]] = {
        row["psn"]: dict(row) for row in session.execute(
            select(table, accounts.c.name.label(_ACCOUNT))
            .join(accounts, accounts.c.id == table.c.account_id).where(table.c.psn.in_(psns))
        ).mappings()
    }
    registers = register_lists(session, psns)
    enrolled_psns: set[int] = set()
    accepted_psns: set[int] = set()
    outcomes: list[LoginOutcome] = []
    for psn, password, pname, version, ccid, remote, enroll_unknown in attempts:
        record = records.get(psn)
        if record is None:
            if not enroll_unknown:
                outcomes.append(LoginOutcome(False, "unknown PSN"))
                continue
            # Enrolled devices go to the admin account, which assigns them to a customer.
            record = records[psn] = _new_record(session, psn, password, now)
            enrolled_psns.add(psn)
        elif record["password"] == 0:
            record["password"] = password
        elif record["password"] != password:
            outcomes.append(LoginOutcome(False, "wrong password"))
            continue
        if record["online"] and record["node"] is not None and record["node"] != node:
            session.add(DtuHandover(node=record["node"], psn=psn))
        record.update(pname=pname[:8], version=version, ccid=ccid[:20], online=True, node=node, remote=remote,
                      last_login=now, last_seen=now)
        accepted_psns.add(psn)
        info = DtuInfo.of_record(record, record[_ACCOUNT])
        outcomes.append(LoginOutcome(True, "ok", info, registers.get(psn, ()), psn in enrolled_psns))
    if enrolled_psns:
        session.connection().execute(table.insert(), [
            {key: value for key, value in records[psn].items() if key != _ACCOUNT} for psn in sorted(enrolled_psns)
        ])
    updated = sorted(accepted_psns - enrolled_psns)
    if updated:
        session.connection().execute(
            update(table).where(table.c.psn == bindparam("b_psn")).values(
                {name: bindparam(f"b_{name}") for name in _LOGIN_COLUMNS}),
            [{"b_psn": psn, **{f"b_{name}": records[psn][name] for name in _LOGIN_COLUMNS}} for psn in updated],
        )
    session.flush()  # the handovers
    return outcomes


#: The label of the owner's name in the records :func:`authenticate_many` reads.
_ACCOUNT = "account"
#: The columns a login writes.
_LOGIN_COLUMNS = ("password", "pname", "version", "ccid", "online", "node", "remote", "last_login", "last_seen")


def _new_record(session: Session, psn: int, password: int, now: dt.datetime) -> dict[str, Any]:
    """An enrolled DTU's record, as :func:`authenticate_many` reads them: the columns' defaults, owned by the
    admin account."""
    admin = session.get_one(Account, first_admin_id(session))
    record = _column_defaults()
    record.update(psn=psn, password=password, name="", created=now, account_id=admin.id)
    record[_ACCOUNT] = admin.name
    return record


def _fill_defaults(row: Dtu) -> None:
    # Column defaults apply only at flush; the login's parameters are read before that.
    for key, value in _column_defaults().items():
        if getattr(row, key) is None:
            setattr(row, key, value)


def _column_defaults() -> dict[str, Any]:
    """The ``dtus`` columns' scalar defaults by name (None for those without one)."""
    return {
        column.key: column.default.arg if column.default is not None and column.default.is_scalar else None
        for column in Dtu.__table__.columns
    }


def register_list(session: Session, psn: int) -> tuple[tuple[int, int], ...]:
    """(dev, addr) per position."""
    return register_lists(session, {psn}).get(psn, ())


def register_lists(session: Session, psns: Collection[int]) -> dict[int, tuple[tuple[int, int], ...]]:
    """The register lists of ``psns`` (those that have one), (dev, addr) per position, in one query."""
    lists: dict[int, list[tuple[int, int]]] = {}
    if psns:
        rows = session.execute(
            select(RegisterEntry.psn, RegisterEntry.dev, RegisterEntry.addr)
            .where(RegisterEntry.psn.in_(psns)).order_by(RegisterEntry.psn, RegisterEntry.position)
        )
        for psn, dev, addr in rows:
            lists.setdefault(psn, []).append((dev, addr))
    return {psn: tuple(pairs) for psn, pairs in lists.items()}


def replace_register_list(
    session: Session, psn: int, send_test_time: int, registers: Sequence[tuple[int, int]]
) -> None:
    session.execute(delete(RegisterEntry).where(RegisterEntry.psn == psn))
    session.add_all(
        RegisterEntry(psn=psn, position=i, dev=dev, addr=addr) for i, (dev, addr) in enumerate(registers)
    )
    session.execute(update(Dtu).where(Dtu.psn == psn).values(send_test_time=send_test_time))


def mark_offline(session: Session, psn: int, last_seen: dt.datetime, node: str | None = None) -> None:
    """The connection to ``psn`` on ``node`` went away: :func:`mark_offline_many` of one."""
    mark_offline_many(session, {psn: last_seen}, node)


def mark_offline_many(session: Session, last_seen: Mapping[int, dt.datetime], node: str | None = None) -> None:
    """The connections to these DTUs on ``node`` went away, each last seen at its time. A row another
    node took since (a newer login there) is left alone: the DTU is online, only elsewhere.

    One statement for them all (Core, as :func:`record_last_seen`), in PSN order: the nodes of a
    cluster that lock the same rows lock them in the same order.
    """
    if last_seen:
        table = table_of(Dtu)
        session.connection().execute(
            update(table).where(table.c.psn == bindparam("b_psn"), or_(table.c.node.is_(None), table.c.node == node))
            .values(online=False, node=None, last_seen=bindparam("b_seen")),
            [{"b_psn": psn, "b_seen": last_seen[psn]} for psn in sorted(last_seen)],
        )


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE matched (``Session.execute`` is typed for SELECTs)."""
    assert isinstance(result, CursorResult)
    return result.rowcount or 0


def table_of(model: type[Base]) -> Table:
    """A model's Table (``__table__`` is typed as any FROM clause)."""
    return model.metadata.tables[model.__tablename__]


def record_last_seen(session: Session, seen: Mapping[int, dt.datetime]) -> None:
    # Core, not the ORM's bulk update: that one fails the whole batch when a
    # DTU was deleted meanwhile; here a missing row simply updates nothing.
    # In PSN order: the nodes of a cluster that lock the same rows lock them in the same order.
    if seen:
        table = table_of(Dtu)
        session.connection().execute(
            update(table).where(table.c.psn == bindparam("b_psn")).values(last_seen=bindparam("b_seen")),
            [{"b_psn": psn, "b_seen": seen[psn]} for psn in sorted(seen)],
        )


def upsert_dtu(
    session: Session, psn: int, fields: dict[str, Any], now: dt.datetime, account: int | None = None
) -> tuple[DtuInfo, bool]:
    """Create or update a DTU record; returns it and whether it was created.

    ``account`` (an account id) owns a new record, or takes an existing one over;
    None leaves an existing record's owner, and gives a new one the first admin account.
    """
    fields = validate_dtu_fields(fields)
    row = session.get(Dtu, check_psn(psn))
    created = row is None
    if row is None:
        row = Dtu(psn=psn, created=now, name="", account_id=first_admin_id(session) if account is None else account)
        _fill_defaults(row)
        session.add(row)
    elif account is not None:
        row.account_id = account
    for key, value in fields.items():
        setattr(row, key, value)
    session.flush()
    session.refresh(row)  # the owner, by the account id just set
    return DtuInfo.of(row), created


def enrol_adopted_dtu(session: Session, psn: int, account: int, now: dt.datetime) -> None:
    """A record for an adopted pending DTU, owned by ``account``, with PASS 0: it takes (and
    keeps) the PASS of the login it is answered with, as the seed's rule says."""
    if session.get(Dtu, check_psn(psn)) is not None:
        raise ValueError(f"DTU {psn} exists")
    upsert_dtu(session, psn, {}, now, account)


def get_dtu(session: Session, psn: int, account: int | None = None) -> DtuInfo | None:
    """DTU ``psn``; None also when ``account`` (an account id) is given and does not own it."""
    row = session.get(Dtu, psn)
    if row is None or (account is not None and row.account_id != account):
        return None
    return DtuInfo.of(row)


def list_dtus(session: Session, account: int | None = None) -> list[DtuInfo]:
    """All DTUs by PSN, or those of ``account`` (an account id)."""
    query = select(Dtu).order_by(Dtu.psn)
    if account is not None:
        query = query.where(Dtu.account_id == account)
    return [DtuInfo.of(row) for row in session.scalars(query)]


#: What a DTU list may be sorted by: its columns.
DTU_SORT_KEYS: dict[str, Any] = {
    "psn": Dtu.psn, "name": Dtu.name, "online": Dtu.online, "last_seen": Dtu.last_seen, "last_login": Dtu.last_login,
}


def search_dtus(
    session: Session, account: int | None, text: str, sort: str, descending: bool, offset: int, limit: int,
) -> tuple[list[DtuInfo], int]:
    """One page of DTUs whose PSN starts with ``text`` or whose name or CCID contains it, and how many match.

    For the console's list of thousands of DTUs: the database filters, sorts
    and pages; ties are broken by PSN so pages never overlap.
    """
    query = select(Dtu)
    if account is not None:
        query = query.where(Dtu.account_id == account)
    if text:
        needle = text.lower()
        matches = [func.lower(Dtu.name).contains(needle, autoescape=True),
                   func.lower(Dtu.ccid).contains(needle, autoescape=True)]
        if needle.isdigit():
            matches.append(cast(Dtu.psn, String).startswith(needle))
        query = query.where(or_(*matches))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    column = DTU_SORT_KEYS[sort]
    order = [column.desc() if descending else column.asc()]
    if column is not Dtu.psn:
        order.append(Dtu.psn.desc() if descending else Dtu.psn.asc())
    rows = session.scalars(query.order_by(*order).offset(offset).limit(limit))
    return [DtuInfo.of(row) for row in rows], total


def dtu_psns(session: Session, account: int) -> frozenset[int]:
    """The PSNs of an account's DTUs."""
    return frozenset(session.scalars(select(Dtu.psn).where(Dtu.account_id == account)))


def count_dtus(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Dtu)) or 0


def delete_dtu(session: Session, psn: int, with_samples: bool = True) -> bool:
    found = rowcount(session.execute(delete(Dtu).where(Dtu.psn == psn))) > 0
    session.execute(delete(RegisterEntry).where(RegisterEntry.psn == psn))
    if with_samples:
        session.execute(delete(Sample).where(Sample.psn == psn))
    return found


#: Column order of the rows ``Store.add_samples`` inserts (the DTU center builds them).
SAMPLE_ROW_COLUMNS = ("psn", "time", "net_state", "values", "registers")
#: ``values`` and ``registers`` packed as ``models.Sample`` says.
SampleRow = tuple[int, dt.datetime, int, bytes, "bytes | None"]

_VALUE = struct.Struct(">h")
_REGISTER = struct.Struct(">BH")


def _unpack(row: Any) -> list[SampleInfo]:
    values = [v for (v,) in _VALUE.iter_unpack(row.values)]
    if row.registers is not None and len(row.registers) == 3 * len(values):
        places: list[tuple[int | None, int | None]] = list(_REGISTER.iter_unpack(row.registers))
    else:
        places = [(None, None)] * len(values)
    return [
        SampleInfo(row.time, row.psn, row.net_state, position, dev, addr, value)
        for position, ((dev, addr), value) in enumerate(zip(places, values, strict=False))
    ]


_Columns = TypeVarTuple("_Columns")


def time_window(
    query: Select[*_Columns], model: Any, since: dt.datetime | None, until: dt.datetime | None,
    limit: int | None, newest_first: bool = False,
) -> Select[*_Columns]:
    """Rows of a samples table in [since, until), oldest (or newest) first, at most ``limit``.

    How every sample query reads: either way it walks the table's (key, time)
    index, forwards or backwards, so the newest rows cost what the oldest do.
    """
    if since is not None:
        query = query.where(model.time >= since)
    if until is not None:
        query = query.where(model.time < until)
    order = (model.time.desc(), model.id.desc()) if newest_first else (model.time, model.id)
    query = query.order_by(*order)
    return query if limit is None else query.limit(limit)


@attrs.frozen
class SampleInfo:
    time: dt.datetime
    psn: int
    net_state: int
    position: int
    dev: int | None
    addr: int | None
    value: int

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time.isoformat(),
            "net_state": self.net_state,
            "position": self.position,
            "dev": self.dev,
            "addr": self.addr,
            "value": self.value,
        }


def query_samples(
    session: Session,
    psn: int,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int | None = None,
    newest_first: bool = False,
) -> list[SampleInfo]:
    """Samples of one DTU, oldest first; ``limit`` keeps the oldest ones after ``since``.

    ``newest_first``: uploads newest first (an upload's values stay in position
    order); ``limit`` then keeps the newest ones before ``until``.
    """
    # ``limit`` counts values, and an upload holds several: the rows are unpacked until it is reached.
    query = time_window(
        select(Sample.time, Sample.psn, Sample.net_state, Sample.values, Sample.registers).where(Sample.psn == psn),
        Sample, since, until, limit=None, newest_first=newest_first,
    )
    samples: list[SampleInfo] = []
    for row in session.execute(query):
        samples.extend(_unpack(row))
        if limit is not None and len(samples) >= limit:
            del samples[limit:]
            break
    return samples


def latest_upload(session: Session, psn: int) -> list[SampleInfo]:
    """The values of a DTU's latest upload, one per position (empty if it never uploaded)."""
    query = time_window(
        select(Sample.time, Sample.psn, Sample.net_state, Sample.values, Sample.registers).where(Sample.psn == psn),
        Sample, None, None, limit=1, newest_first=True,
    )
    row = session.execute(query).first()
    return [] if row is None else _unpack(row)


def upload_values(
    session: Session, psn: int, since: dt.datetime, until: dt.datetime, after: tuple[dt.datetime, int] | None = None,
    limit: int | None = None,
) -> Iterator[tuple[dt.datetime, int, tuple[int, ...]]]:
    """The uploads of one DTU in [since, until), oldest first, as (time, id, values): streamed, not listed.

    ``after`` (a time and id given before) continues where a page ended, for exports read a page at a time.
    """
    query = select(Sample.time, Sample.id, Sample.values).where(Sample.psn == psn)
    if after is not None:
        query = query.where(or_(Sample.time > after[0], and_(Sample.time == after[0], Sample.id > after[1])))
    query = time_window(query, Sample, since, until, limit)
    for time, row_id, packed in session.execute(query.execution_options(yield_per=10_000)):
        yield time, row_id, tuple(v for (v,) in _VALUE.iter_unpack(packed))


def epoch_seconds(session: Session, column: Any) -> Any:
    """Unix seconds of a time column, computed by the database: reading it costs no datetime per row.

    SQLite keeps the time as text, ``2026-11-30 08:00:10.000000`` (UTC): whole seconds from ``strftime``,
    the microseconds from the text itself, exactly (``julianday`` is off by tens of microseconds, enough
    to put a sample on a bucket's edge into the bucket before).
    """
    if session.get_bind().dialect.name == "sqlite":
        return cast(func.strftime("%s", column), Integer) + cast(func.substr(column, 20), Float)
    return cast(func.extract("epoch", column), Float)


def bucket_index(session: Session, seconds: Any, start: float, width: float) -> Any:
    """The number of the ``width``-second bucket from ``start`` a time falls in (times from ``start`` on)."""
    offset = (seconds - start) / width
    if session.get_bind().dialect.name == "sqlite":
        return cast(offset, Integer)  # truncates, which is the floor of what is not negative
    return cast(func.floor(offset), Integer)  # PostgreSQL's cast rounds


def upload_seconds(
    session: Session, psn: int, since: dt.datetime, until: dt.datetime,
) -> Iterator[tuple[float, tuple[int, ...]]]:
    """The uploads of one DTU in [since, until), oldest first, as (Unix seconds, values): for charts, streamed."""
    query = time_window(
        select(epoch_seconds(session, Sample.time), Sample.values).where(Sample.psn == psn), Sample, since, until, None
    )
    formats: dict[int, struct.Struct] = {}
    # Through the connection: Core rows, without the ORM's per-row work on top.
    for seconds, packed in session.connection().execute(query.execution_options(yield_per=10_000)):
        size = len(packed)
        values = formats.get(size)
        if values is None:
            values = formats[size] = struct.Struct(f">{size // 2}h")
        yield seconds, values.unpack(packed[: size - size % 2])


def register_places(session: Session, psn: int) -> dict[int, tuple[int, int]]:
    """The (dev, addr) of each upload position, from the DTU's register list."""
    return {position: (dev, addr) for position, (dev, addr) in enumerate(register_list(session, psn))}
