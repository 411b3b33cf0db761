"""retention: roll-up tables and their cursors, a time index on the sample tables, the dtu_values view;
on PostgreSQL the sample tables become partitioned by day

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30

On PostgreSQL ``samples`` and ``meter_samples`` are turned into tables
partitioned by range of ``time`` (one partition a UTC day, made ahead by the
retention job, store/retention.py), so that expiring old rows drops a
partition. Every existing row is kept: the old table becomes one partition,
``<table>_p_before<YYYYMMDD>``, for every time before the day after its newest
row (it is attached, not copied), and is dropped whole once that day has
expired. A ``<table>_p_default`` partition takes rows no day partition covers
yet. The primary key becomes (id, time), as a partitioned table's keys must
hold its partition key. SQLite keeps plain tables.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Per partitioned table: its columns (after id) as PostgreSQL declares them, and its indexes.
_PARTITIONED = {
    "samples": (
        ('psn BIGINT NOT NULL, "time" TIMESTAMP WITH TIME ZONE NOT NULL, net_state SMALLINT NOT NULL, '
         '"values" BYTEA NOT NULL, registers BYTEA'),
        {"ix_samples_psn_time": "psn, \"time\"", "ix_samples_time_id": "\"time\", id"},
    ),
    "meter_samples": (
        ('meter VARCHAR(100) NOT NULL, point VARCHAR(100) NOT NULL, "time" TIMESTAMP WITH TIME ZONE NOT NULL, '
         'value DOUBLE PRECISION'),
        {
            "ix_meter_samples_meter_point_time": "meter, point, \"time\"",
            "ix_meter_samples_meter_time": "meter, \"time\"",
            "ix_meter_samples_time_id": "\"time\", id",
        },
    ),
}
#: Days of partitions made from today on; the retention job keeps making them.
_DAYS_AHEAD = 3


def upgrade() -> None:
    op.create_table('sample_rollups',
        sa.Column('psn', sa.BigInteger(), nullable=False),
        sa.Column('period', sa.Integer(), nullable=False),
        sa.Column('start', sa.DateTime(timezone=True), nullable=False),
        sa.Column('position', sa.Integer(), nullable=False),
        sa.Column('dev', sa.SmallInteger(), nullable=True),
        sa.Column('addr', sa.Integer(), nullable=True),
        sa.Column('count', sa.BigInteger(), nullable=False),
        sa.Column('min', sa.Double(), nullable=False),
        sa.Column('max', sa.Double(), nullable=False),
        sa.Column('sum', sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint('psn', 'period', 'start', 'position'),
    )
    op.create_index('ix_sample_rollups_period_start', 'sample_rollups', ['period', 'start'], unique=False)
    op.create_table('meter_sample_rollups',
        sa.Column('meter', sa.String(length=100), nullable=False),
        sa.Column('point', sa.String(length=100), nullable=False),
        sa.Column('period', sa.Integer(), nullable=False),
        sa.Column('start', sa.DateTime(timezone=True), nullable=False),
        sa.Column('count', sa.BigInteger(), nullable=False),
        sa.Column('min', sa.Double(), nullable=True),
        sa.Column('max', sa.Double(), nullable=True),
        sa.Column('sum', sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint('meter', 'point', 'period', 'start'),
    )
    op.create_index('ix_meter_sample_rollups_period_start', 'meter_sample_rollups', ['period', 'start'], unique=False)
    op.create_table('rollup_cursors',
        sa.Column('source', sa.String(length=64), nullable=False),
        sa.Column('time', sa.DateTime(timezone=True), nullable=False),
        sa.Column('row_id', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('source'),
    )
    if op.get_bind().dialect.name == "postgresql":
        for table in _PARTITIONED:
            _partition(table)
        op.execute(_POSTGRESQL_VIEW)
    else:
        op.create_index('ix_samples_time_id', 'samples', ['time', 'id'], unique=False)
        op.create_index('ix_meter_samples_time_id', 'meter_samples', ['time', 'id'], unique=False)
        op.execute(_sqlite_view())


def _partition(table: str) -> None:
    """``table`` as a table partitioned by day, its rows kept in the old table attached as one partition."""
    columns, indexes = _PARTITIONED[table]
    connection = op.get_bind()
    old = f"{table}_p_old"
    op.execute(f"ALTER TABLE {table} RENAME TO {old}")
    # Its key becomes (id, time) when it is attached, as the partitioned table's is.
    op.execute(f"ALTER TABLE {old} DROP CONSTRAINT {table}_pkey")
    for index in indexes:  # kept, under other names: attaching the old table adopts them
        op.execute(f"ALTER INDEX IF EXISTS {index} RENAME TO {index}_old")
    op.execute(f"ALTER TABLE {old} ALTER COLUMN id DROP DEFAULT")
    op.execute(
        f"CREATE TABLE {table} (id BIGINT NOT NULL DEFAULT nextval('{table}_id_seq'), {columns}, "
        f"CONSTRAINT {table}_pkey PRIMARY KEY (id, \"time\")) PARTITION BY RANGE (\"time\")"
    )
    op.execute(f"ALTER SEQUENCE {table}_id_seq OWNED BY {table}.id")
    for index, on in indexes.items():
        op.execute(f"CREATE INDEX {index} ON {table} ({on})")
    today = connection.execute(sa.text("SELECT (now() AT TIME ZONE 'UTC')::date")).scalar_one()
    newest = connection.execute(sa.text(f"SELECT max(\"time\" AT TIME ZONE 'UTC')::date FROM {old}")).scalar()
    first_day = today
    if newest is None:
        op.execute(f"DROP TABLE {old}")
    else:
        first_day = max(today, newest + dt.timedelta(days=1))
        op.execute(f"ALTER TABLE {old} RENAME TO {table}_p_before{first_day:%Y%m%d}")
        op.execute(
            f"ALTER TABLE {table} ATTACH PARTITION {table}_p_before{first_day:%Y%m%d} "
            f"FOR VALUES FROM (MINVALUE) TO ('{first_day.isoformat()} 00:00:00+00')"
        )
    for offset in range(_DAYS_AHEAD):
        day = first_day + dt.timedelta(days=offset)
        following = day + dt.timedelta(days=1)
        op.execute(
            f"CREATE TABLE {table}_p{day:%Y%m%d} PARTITION OF {table} "
            f"FOR VALUES FROM ('{day.isoformat()} 00:00:00+00') TO ('{following.isoformat()} 00:00:00+00')"
        )
    op.execute(f"CREATE TABLE {table}_p_default PARTITION OF {table} DEFAULT")


# -- the dtu_values view: one row per value of the samples, for Grafana and any SQL client -----------

_POSTGRESQL_VIEW = """
CREATE VIEW dtu_values AS
SELECT s."time", s.psn, p.position,
  CASE WHEN s.registers IS NOT NULL AND length(s.registers) = 3 * (length(s."values") / 2)
       THEN get_byte(s.registers, 3 * p.position) END AS dev,
  CASE WHEN s.registers IS NOT NULL AND length(s.registers) = 3 * (length(s."values") / 2)
       THEN get_byte(s.registers, 3 * p.position + 1) * 256 + get_byte(s.registers, 3 * p.position + 2) END AS addr,
  CASE WHEN s.registers IS NOT NULL AND length(s.registers) = 3 * (length(s."values") / 2)
       THEN get_byte(s.registers, 3 * p.position) || '-'
            || (get_byte(s.registers, 3 * p.position + 1) * 256 + get_byte(s.registers, 3 * p.position + 2))
       ELSE p.position::text END AS point,
  get_byte(s."values", 2 * p.position) * 256 + get_byte(s."values", 2 * p.position + 1)
    - CASE WHEN get_byte(s."values", 2 * p.position) >= 128 THEN 65536 ELSE 0 END AS value
FROM samples s CROSS JOIN LATERAL generate_series(0, length(s."values") / 2 - 1) AS p(position)
"""

#: Positions the SQLite view unpacks per upload (it has no generate_series).
_SQLITE_VIEW_POSITIONS = 256


def _sqlite_byte(column: str, index: str) -> str:
    """Byte ``index`` (0-based) of a blob as an integer: SQLite reads bytes only through hex()."""
    digits = f"hex(substr({column}, ({index}) + 1, 1))"
    return (f"((instr('0123456789ABCDEF', substr({digits}, 1, 1)) - 1) * 16"
            f" + instr('0123456789ABCDEF', substr({digits}, 2, 1)) - 1)")


def _sqlite_view() -> str:
    known = 's.registers IS NOT NULL AND length(s.registers) = 3 * (length(s."values") / 2)'
    dev = _sqlite_byte("s.registers", "3 * p.position")
    addr = (f"({_sqlite_byte('s.registers', '3 * p.position + 1')} * 256"
            f" + {_sqlite_byte('s.registers', '3 * p.position + 2')})")
    high = _sqlite_byte('s."values"', "2 * p.position")
    low = _sqlite_byte('s."values"', "2 * p.position + 1")
    return f"""
CREATE VIEW dtu_values AS
WITH RECURSIVE positions(position) AS (
  SELECT 0 UNION ALL SELECT position + 1 FROM positions WHERE position < {_SQLITE_VIEW_POSITIONS - 1}
)
SELECT s."time" AS "time", s.psn AS psn, p.position AS position,
  CASE WHEN {known} THEN {dev} END AS dev,
  CASE WHEN {known} THEN {addr} END AS addr,
  CASE WHEN {known} THEN {dev} || '-' || {addr} ELSE CAST(p.position AS TEXT) END AS point,
  {high} * 256 + {low} - CASE WHEN {high} >= 128 THEN 65536 ELSE 0 END AS value
FROM samples s JOIN positions p ON p.position < length(s."values") / 2
"""


def downgrade() -> None:
    op.execute("DROP VIEW dtu_values")
    if op.get_bind().dialect.name == "postgresql":
        raise NotImplementedError("the partitioned sample tables are not turned back into plain ones")
    op.drop_index('ix_meter_samples_time_id', table_name='meter_samples')
    op.drop_index('ix_samples_time_id', table_name='samples')
    op.drop_table('rollup_cursors')
    op.drop_table('meter_sample_rollups')
    op.drop_table('sample_rollups')
