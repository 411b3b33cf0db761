"""SQLAlchemy models. Times are stored as timezone-aware UTC."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, Boolean, DateTime, Index, Integer, LargeBinary, SmallInteger, String, TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Stores UTC, always returns aware datetimes, whatever the backend keeps."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: object) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.timezone.utc)

    def process_result_value(self, value: dt.datetime | None, dialect: object) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


# LoginAck parameters a DTU gets unless its record says otherwise (the seed's defaults).
DEFAULT_TICK_TIME = 60
DEFAULT_SEND_TEST_MODE = 255
DEFAULT_SEND_TEST_TIME = 0


class Dtu(Base):
    __tablename__ = "dtus"

    psn: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
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

    __table_args__ = (Index("ix_samples_psn_time", "psn", "time"),)
