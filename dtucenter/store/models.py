"""SQLAlchemy models. Times are stored as timezone-aware UTC."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Stores UTC, always returns aware datetimes, whatever the backend keeps."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: object) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: object) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    pass


# LoginAck parameters a DTU gets unless its record says otherwise (the seed's defaults).
DEFAULT_TICK_TIME = 60
DEFAULT_SEND_TEST_MODE = 255
DEFAULT_SEND_TEST_TIME = 0


class Account(Base):
    """A customer (or the operator): owns DTUs and meters, and holds API tokens.

    ``admin`` accounts see and manage everything. The migration that added
    accounts made the first one, ``admin``, and gave it every existing DTU.
    """

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)


class ApiToken(Base):
    """A named API token of an account, kept only as the SHA-256 of the secret (never the secret)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(Integer, ForeignKey("accounts.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    #: hex SHA-256 of the token: a token is 256 random bits, so a fast hash is enough.
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    created: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)

    __table_args__ = (UniqueConstraint("account_id", "name", name="uq_api_tokens_account_name"),)


class ConsoleSession(Base):
    """A browser signed in to the console with an API token (web/console.py).

    The cookie holds a random secret; only its SHA-256 is kept here, as with
    tokens. ``token_digest`` is the digest of the token it was opened with:
    every request looks that token up again, so revoking the token ends its
    sessions at once (and ``revoke_token`` deletes their rows). No foreign key
    to ``api_tokens``: the configured token has no row there.
    """

    __tablename__ = "console_sessions"

    #: hex SHA-256 of the cookie's secret.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_digest: Mapped[str] = mapped_column(String(64), index=True)
    #: The CSRF token a state-changing request made with this session's cookie must carry.
    csrf: Mapped[str] = mapped_column(String(64))
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)


class Dtu(Base):
    __tablename__ = "dtus"

    psn: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    #: The owning account; checked by the API, never on the upload path.
    account_id: Mapped[int] = mapped_column(Integer, ForeignKey("accounts.id"), index=True)
    #: Loaded with the row: every answer about a DTU names its account.
    owner: Mapped[Account] = relationship(lazy="joined", innerjoin=True)
    #: 0 means "not set yet": the next login's PASS is accepted and stored.
    password: Mapped[int] = mapped_column(BigInteger, default=0)
    name: Mapped[str] = mapped_column(String(100), default="")

    # What the DTU reported at its last login.
    pname: Mapped[str] = mapped_column(String(8), default="")
    version: Mapped[int] = mapped_column(Integer, default=0)
    ccid: Mapped[str] = mapped_column(String(20), default="")

    # LoginAck parameters.
    fota_flag: Mapped[int] = mapped_column(SmallInteger, default=0)
    tick_time: Mapped[int] = mapped_column(SmallInteger, default=DEFAULT_TICK_TIME)
    send_test_mode: Mapped[int] = mapped_column(SmallInteger, default=DEFAULT_SEND_TEST_MODE)
    send_test_time: Mapped[int] = mapped_column(SmallInteger, default=DEFAULT_SEND_TEST_TIME)
    new_ver: Mapped[int] = mapped_column(Integer, default=0)
    new_port: Mapped[int] = mapped_column(Integer, default=0)
    new_ip: Mapped[str] = mapped_column(String(15), default="0.0.0.0")

    # Connection state.
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    remote: Mapped[str | None] = mapped_column(String(64), default=None)
    last_login: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    last_seen: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    #: The id of the center node its connection is on while online (``nodes``), None while offline.
    node: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    created: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)


class RegisterEntry(Base):
    """One position of a DTU's register list: the SendTest value at ``position`` comes from (dev, addr)."""

    __tablename__ = "registers"

    psn: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    dev: Mapped[int] = mapped_column(SmallInteger)
    addr: Mapped[int] = mapped_column(Integer)


class Sample(Base):
    """The values of one SendTest upload, one row per upload.

    ``values`` holds them as the wire does (big-endian int16 each);
    ``registers`` holds the (Dev u8, Addr u16) of each position, packed the
    same way, when the DTU's register list matched the upload, else NULL.
    ``queries.query_samples`` unpacks rows into one SampleInfo per value.
    One row per value made SQLite insert 8 rows per frame and cost most of
    the ingest's CPU (docs/performance.md).

    No foreign key to ``dtus`` on purpose: group commits insert uploads of
    thousands of DTUs at once, and one DTU deleted meanwhile must not make
    the whole batch fail.
    """

    __tablename__ = "samples"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    psn: Mapped[int] = mapped_column(BigInteger)
    time: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    net_state: Mapped[int] = mapped_column(SmallInteger)
    values: Mapped[bytes] = mapped_column(LargeBinary)
    registers: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)

    __table_args__ = (
        Index("ix_samples_psn_time", "psn", "time"),
        # The order roll-ups and expiry walk the table in (store/retention.py).
        Index("ix_samples_time_id", "time", "id"),
    )


class CommandRecord(Base):
    """The audit trail: one row per command an operator sent (or tried to send) to a DTU.

    No foreign key either: the trail outlives a deleted DTU.
    """

    __tablename__ = "commands"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    psn: Mapped[int] = mapped_column(BigInteger)
    #: save_setup, read_setup, read_test or set_control.
    kind: Mapped[str] = mapped_column(String(16))
    #: The command's parameters as JSON.
    request: Mapped[str] = mapped_column(Text)
    #: Who asked: the API token's account and name (``acme/ops``).
    who: Mapped[str] = mapped_column(String(100))
    queued: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    sent: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    finished: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    #: pending, ok, timeout, refused, disconnected, offline, busy, interrupted or error.
    outcome: Mapped[str] = mapped_column(String(16), default="pending")
    #: The result as JSON when ok.
    result: Mapped[str | None] = mapped_column(Text, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)

    __table_args__ = (Index("ix_commands_psn_id", "psn", "id"),)


# -- the Modbus bridge's meters ------------------------------------------------------------------


#: Who may change a link's or a meter's definition: the config file (changed by editing the
#: file; the API refuses) or the API and the CLI.
MANAGED_BY_FILE = "file"
MANAGED_BY_API = "api"


class Link(Base):
    """A Modbus link (a DTU, a gateway or a serial line), defined in the file or through the API.

    ``definition`` is the link's table with the same keys as a ``[[link]]`` of the
    config file, as JSON (a registration or heartbeat in its file spelling, ``hex:...``
    where not printable): one reader checks both, and a key added to the file is a key
    of the API with no schema change. ``registration`` repeats the parsed registration
    to find a link by what its DTU sends.
    """

    __tablename__ = "links"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    account_id: Mapped[int] = mapped_column(Integer, ForeignKey("accounts.id"), index=True)
    owner: Mapped[Account] = relationship(lazy="joined", innerjoin=True)
    #: ``file`` or ``api`` (MANAGED_BY_*).
    managed_by: Mapped[str] = mapped_column(String(8))
    #: The ``[[link]]`` table as JSON.
    definition: Mapped[str] = mapped_column(Text)
    #: The parsed registration, to find a link by it (discovery); the bridge refuses two
    #: shared links whose registrations cannot be told apart, which a unique index could not.
    registration: Mapped[bytes | None] = mapped_column(LargeBinary(256), index=True, nullable=True, default=None)
    created: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    updated: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)


class Meter(Base):
    """A meter, defined in the file or through the API, with what was last learnt about its polls.

    ``definition`` is the ``[[meter]]`` table as JSON, with the same keys as the file
    (``template`` or ``[[meter.point]]``s as ``point``); ``link``, ``unit``,
    ``interval`` and the resolved ``points`` repeat it for queries and for typing stored
    values. A meter of the file is synced at every start; one that left the file keeps
    its row (``configured`` false) so that its samples stay reachable by name, as does
    a meter deleted through the API. Rows from before definitions were stored have
    ``definition`` NULL and are not started. The poll state is written in batches, so
    it may trail the live state (``GET /api/meters``) by a few seconds.
    """

    __tablename__ = "meters"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    #: The owning account; the config file's meters go to the first admin account.
    account_id: Mapped[int] = mapped_column(Integer, ForeignKey("accounts.id"), index=True)
    owner: Mapped[Account] = relationship(lazy="joined", innerjoin=True)
    link: Mapped[str] = mapped_column(String(100))
    unit: Mapped[int] = mapped_column(SmallInteger)
    interval: Mapped[float] = mapped_column(Double)
    #: The points as JSON (name, table, address, type, scale, unit...), to show and to type stored values.
    points: Mapped[str] = mapped_column(Text)
    configured: Mapped[bool] = mapped_column(Boolean, default=True)
    #: ``file`` or ``api`` (MANAGED_BY_*).
    managed_by: Mapped[str] = mapped_column(String(8), default=MANAGED_BY_FILE)
    #: The ``[[meter]]`` table as JSON; NULL for rows stored before definitions were.
    definition: Mapped[str | None] = mapped_column(Text, default=None)
    last_poll: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    last_success: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    last_error_time: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    #: The latest poll ended with an error.
    failing: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)


class MeterSample(Base):
    """One point's scaled value from one poll; ``time`` is when the poll started.

    No foreign key, like ``samples``: a batch of thousands of meters' values
    must not fail because one meter row changed meanwhile.
    """

    __tablename__ = "meter_samples"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    meter: Mapped[str] = mapped_column(String(100))
    point: Mapped[str] = mapped_column(String(100))
    time: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    #: bool points are 0/1; NULL for a float that read NaN or infinity.
    value: Mapped[float | None] = mapped_column(Double, nullable=True)

    __table_args__ = (
        Index("ix_meter_samples_meter_point_time", "meter", "point", "time"),
        Index("ix_meter_samples_meter_time", "meter", "time"),
        Index("ix_meter_samples_time_id", "time", "id"),
    )


class MeterFailure(Base):
    """A failure streak: consecutive failed polls of one meter with the same reason.

    One row per streak rather than per poll, so a meter that stays dead for a
    month costs one row, not one per slot. A successful poll or another
    reason ends the streak; the next failure starts a new row.
    """

    __tablename__ = "meter_failures"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    meter: Mapped[str] = mapped_column(String(100))
    reason: Mapped[str] = mapped_column(Text)
    #: Start times of the first and the latest failed poll of the streak.
    first: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    count: Mapped[int] = mapped_column(Integer)

    __table_args__ = (Index("ix_meter_failures_meter_first", "meter", "first"),)


class MeterWrite(Base):
    """The audit trail of writes to meter points through the API.

    Apart from ``commands`` because a write addresses a meter point, not a
    DTU by PSN, and carries one scaled value rather than a register list.
    """

    __tablename__ = "meter_writes"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    meter: Mapped[str] = mapped_column(String(100))
    point: Mapped[str] = mapped_column(String(100))
    value: Mapped[float] = mapped_column(Double)
    who: Mapped[str] = mapped_column(String(100))
    requested: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    #: ok, offline, timeout, refused (exception response), disconnected or error.
    outcome: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text, default=None)

    __table_args__ = (Index("ix_meter_writes_meter_id", "meter", "id"),)


class DtuEdit(Base):
    """The audit trail of changes to DTU records through the API: created, changed, moved, deleted.

    No foreign key, like ``commands``: the trail outlives a deleted DTU.
    """

    __tablename__ = "dtu_edits"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    psn: Mapped[int] = mapped_column(BigInteger)
    #: create, update, delete.
    action: Mapped[str] = mapped_column(String(16))
    #: The fields given, as JSON (a password only as "set").
    fields: Mapped[str] = mapped_column(Text)
    who: Mapped[str] = mapped_column(String(100))
    time: Mapped[dt.datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_dtu_edits_psn_id", "psn", "id"),)


class DeviceOperation(Base):
    """The audit trail of operations on devices through the API besides writes: reads
    on demand (``kind`` ``read``, ``target`` a meter) and raw exchanges (``raw``, a link).

    ``request`` and ``answer`` are JSON: what was asked (points; the bytes sent in hex,
    the timeout, what ended the answer) and what came back (the values; the bytes in hex).
    """

    __tablename__ = "device_operations"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    target: Mapped[str] = mapped_column(String(100))
    #: Who asked: the API token's account and name (``acme/ops``).
    who: Mapped[str] = mapped_column(String(100))
    requested: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    #: ok, partial (a read with some errors), offline, timeout, disconnected or error.
    outcome: Mapped[str] = mapped_column(String(16))
    request: Mapped[str] = mapped_column(Text)
    answer: Mapped[str | None] = mapped_column(Text, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)

    __table_args__ = (Index("ix_device_operations_kind_target_id", "kind", "target", "id"),)


class MeterTemplate(Base):
    """An account's own meter template: a named, versioned point list its meters may be made from.

    ``document`` is the template with the same keys as a shipped template's file, as JSON
    (the API's body): the template reader checks it, as it checks the shipped files. Names
    are unique per account; the shipped templates' names are refused by the writers, so a
    meter's template name means one template for its account.
    """

    __tablename__ = "meter_templates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(Integer, ForeignKey("accounts.id", ondelete="CASCADE"))
    owner: Mapped[Account] = relationship(lazy="joined", innerjoin=True)
    name: Mapped[str] = mapped_column(String(100))
    version: Mapped[int] = mapped_column(Integer)
    #: The template as JSON, in the keys of a template file.
    document: Mapped[str] = mapped_column(Text)
    created: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    updated: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)

    __table_args__ = (UniqueConstraint("account_id", "name", name="uq_meter_templates_account_name"),)


class TemplateEdit(Base):
    """The audit trail of accounts' templates: created, replaced, deleted, through the API or the CLI.

    No foreign key, like ``dtu_edits``: the trail outlives a deleted template (and its account).
    """

    __tablename__ = "template_edits"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    account: Mapped[str] = mapped_column(String(100))
    name: Mapped[str] = mapped_column(String(100))
    #: create, replace, delete.
    action: Mapped[str] = mapped_column(String(16))
    #: The version written (the one deleted, for a delete).
    version: Mapped[int] = mapped_column(Integer)
    who: Mapped[str] = mapped_column(String(100))
    time: Mapped[dt.datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_template_edits_account_name_id", "account", "name", "id"),)


class Node(Base):
    """A running center process of the cluster sharing this database, under a lease it renews.

    A node whose ``lease_until`` has passed is dead: its DTUs are offline and its links free.
    """

    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: Where its peers reach its API, for commands to the DTUs it holds; None without an API.
    url: Mapped[str | None] = mapped_column(String(200), default=None)
    host: Mapped[str] = mapped_column(String(100), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    started: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    renewed: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    lease_until: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    #: Set by a clean stop: the node is gone without waiting for its lease to lapse.
    stopped: Mapped[bool] = mapped_column(Boolean, default=False)


class LinkOwner(Base):
    """Which node runs a link the center dials (``connect``) or opens (``serial``): one node at a time.

    The claim lasts as long as its node's lease: a live owner keeps it, any node may take it from a dead one.
    """

    __tablename__ = "link_owners"

    link: Mapped[str] = mapped_column(String(100), primary_key=True)
    node: Mapped[str] = mapped_column(String(64))
    since: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class DtuHandover(Base):
    """A DTU logged in on another node: the node named here closes its older connection (and deletes the row)."""

    __tablename__ = "dtu_handovers"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    #: The node told to let the connection go.
    node: Mapped[str] = mapped_column(String(64), index=True)
    psn: Mapped[int] = mapped_column(BigInteger)
class PendingDeviceRow(Base):
    """A device that dialled in with a registration (Modbus) or PSN (binary protocol) nobody
    knows, waiting to be adopted into an account (dtucenter/discovery.py). The running center
    keeps the list in memory and writes it here in batches; ``id`` is opaque and unguessable."""

    __tablename__ = "pending_devices"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    #: ``modbus`` or ``dtu``.
    kind: Mapped[str] = mapped_column(String(8))
    registration: Mapped[bytes] = mapped_column(LargeBinary(256))
    host: Mapped[str] = mapped_column(String(64))
    peer: Mapped[str] = mapped_column(String(100))
    listener: Mapped[str] = mapped_column(String(100))
    #: The first bytes the connection sent (at most 64).
    first_bytes: Mapped[bytes] = mapped_column(LargeBinary(64))
    first_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    times_seen: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (UniqueConstraint("kind", "registration", name="uq_pending_devices_kind_registration"),)


class AlarmRuleRow(Base):
    """An account's alarm rule made through the API: its ``[[alarm]]`` keys as JSON.

    The config file's rules are not stored: the file holds them. Names are unique per
    account, among the file's rules too (the API refuses a file rule's name).
    """

    __tablename__ = "alarm_rules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(Integer, ForeignKey("accounts.id", ondelete="CASCADE"))
    owner: Mapped[Account] = relationship(lazy="joined", innerjoin=True)
    name: Mapped[str] = mapped_column(String(100))
    #: The rule's keys as JSON, read by the file's reader.
    definition: Mapped[str] = mapped_column(Text)
    created: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    updated: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)

    __table_args__ = (UniqueConstraint("account_id", "name", name="uq_alarm_rules_account_name"),)


class AlarmWebhook(Base):
    """Where an account's alarms are POSTed, besides the webhooks of their rules."""

    __tablename__ = "alarm_webhooks"

    account_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    url: Mapped[str] = mapped_column(String(1000))
    updated: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)


class Alarm(Base):
    """One alarm: raised by a rule, active until ``cleared`` is set; the history is these rows.

    The rule, device and account are kept by name, like the audit trails: the history
    outlives a rule, a device or an account that is deleted. At most one row per
    account and rule is active (``cleared`` NULL): a restart reads them back instead of
    raising again.
    """

    __tablename__ = "alarms"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    account_id: Mapped[int] = mapped_column(Integer)
    account: Mapped[str] = mapped_column(String(100))
    rule: Mapped[str] = mapped_column(String(100))
    #: dtu, meter or link.
    device_kind: Mapped[str] = mapped_column(String(8))
    device: Mapped[str] = mapped_column(String(100))
    point: Mapped[str | None] = mapped_column(String(100), default=None)
    limit: Mapped[float | None] = mapped_column(Double, default=None)
    message: Mapped[str] = mapped_column(Text)
    raised: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    raised_value: Mapped[float | None] = mapped_column(Double, default=None)
    cleared: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    cleared_value: Mapped[float | None] = mapped_column(Double, default=None)
    cleared_message: Mapped[str | None] = mapped_column(Text, default=None)

    __table_args__ = (
        Index("ix_alarms_account_id", "account_id", "id"),
        Index("ix_alarms_account_rule_cleared", "account_id", "rule", "cleared"),
    )
# -- roll-ups and retention (store/retention.py) ---------------------------------------------------


class SampleRollup(Base):
    """The values of one position of one DTU over an hour or a day: count, min, max and sum.

    ``period`` is the bucket's length in seconds (3600 or 86400) and ``start``
    its beginning, UTC-aligned. ``dev`` and ``addr`` are those of the bucket's
    latest value that had them. Kept longer than the raw samples they summarise.
    """

    __tablename__ = "sample_rollups"

    psn: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    period: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    start: Mapped[dt.datetime] = mapped_column(UTCDateTime, primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    dev: Mapped[int | None] = mapped_column(SmallInteger, nullable=True)
    addr: Mapped[int | None] = mapped_column(Integer, nullable=True)
    count: Mapped[int] = mapped_column(BigInteger)
    min: Mapped[float] = mapped_column(Double)
    max: Mapped[float] = mapped_column(Double)
    sum: Mapped[float] = mapped_column(Double)

    #: Expiry walks a resolution's oldest buckets.
    __table_args__ = (Index("ix_sample_rollups_period_start", "period", "start"),)


class MeterSampleRollup(Base):
    """A meter point's values over an hour or a day, like ``SampleRollup``.

    ``count`` counts the values that were numbers; a bucket whose values were
    all NaN (stored as NULL) has count 0 and NULL min, max and sum.
    """

    __tablename__ = "meter_sample_rollups"

    meter: Mapped[str] = mapped_column(String(100), primary_key=True)
    point: Mapped[str] = mapped_column(String(100), primary_key=True)
    period: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    start: Mapped[dt.datetime] = mapped_column(UTCDateTime, primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)
    min: Mapped[float | None] = mapped_column(Double, nullable=True)
    max: Mapped[float | None] = mapped_column(Double, nullable=True)
    sum: Mapped[float | None] = mapped_column(Double, nullable=True)

    __table_args__ = (Index("ix_meter_sample_rollups_period_start", "period", "start"),)


class RollupCursor(Base):
    """How far the roll-up job has read a raw table: the (time, id) of the last row it summarised.

    Moved in the same transaction as the roll-ups it wrote, so a restart
    resumes exactly there and no row is counted twice.
    """

    __tablename__ = "rollup_cursors"

    #: The raw table's name.
    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    time: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    row_id: Mapped[int] = mapped_column(BigInteger)


class MqttBacklog(Base):
    """Messages for the MQTT broker while it is away (dtucenter/mqtt/publisher.py), sent in ``seq`` order.

    Bounded by the ``[mqtt] backlog`` setting; rows are deleted once the broker has them.
    """

    __tablename__ = "mqtt_backlog"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    topic: Mapped[str] = mapped_column(Text)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    qos: Mapped[int] = mapped_column(SmallInteger)
    retain: Mapped[bool] = mapped_column(Boolean)
