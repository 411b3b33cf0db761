"""baseline: the schema of the last release before migrations

Revision ID: 0001
Revises: nothing
Create Date: 2026-11-30

The tables, indexes and constraints exactly as ``Base.metadata.create_all`` made them
in the last release before migrations: a database that release made is stamped
with this revision instead of running it (dtucenter.store.schema).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('commands',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('psn', sa.BigInteger(), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('request', sa.Text(), nullable=False),
        sa.Column('who', sa.String(length=100), nullable=False),
        sa.Column('queued', sa.DateTime(timezone=True), nullable=False),
        sa.Column('sent', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished', sa.DateTime(timezone=True), nullable=True),
        sa.Column('outcome', sa.String(length=16), nullable=False),
        sa.Column('result', sa.Text(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_commands_psn_id', 'commands', ['psn', 'id'], unique=False)
    op.create_table('dtus',
        sa.Column('psn', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('password', sa.BigInteger(), nullable=False),
        sa.Column('name', sa.String(length=100), nullable=False),
        sa.Column('pname', sa.String(length=8), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('ccid', sa.String(length=20), nullable=False),
        sa.Column('fota_flag', sa.SmallInteger(), nullable=False),
        sa.Column('tick_time', sa.SmallInteger(), nullable=False),
        sa.Column('send_test_mode', sa.SmallInteger(), nullable=False),
        sa.Column('send_test_time', sa.SmallInteger(), nullable=False),
        sa.Column('new_ver', sa.Integer(), nullable=False),
        sa.Column('new_port', sa.Integer(), nullable=False),
        sa.Column('new_ip', sa.String(length=15), nullable=False),
        sa.Column('online', sa.Boolean(), nullable=False),
        sa.Column('remote', sa.String(length=64), nullable=True),
        sa.Column('last_login', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_seen', sa.DateTime(timezone=True), nullable=True),
        sa.Column('created', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('psn')
    )
    op.create_table('meter_failures',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('meter', sa.String(length=100), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('first', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last', sa.DateTime(timezone=True), nullable=False),
        sa.Column('count', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_meter_failures_meter_first', 'meter_failures', ['meter', 'first'], unique=False)
    op.create_table('meter_samples',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('meter', sa.String(length=100), nullable=False),
        sa.Column('point', sa.String(length=100), nullable=False),
        sa.Column('time', sa.DateTime(timezone=True), nullable=False),
        sa.Column('value', sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_meter_samples_meter_point_time', 'meter_samples', ['meter', 'point', 'time'], unique=False)
    op.create_index('ix_meter_samples_meter_time', 'meter_samples', ['meter', 'time'], unique=False)
    op.create_table('meter_writes',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('meter', sa.String(length=100), nullable=False),
        sa.Column('point', sa.String(length=100), nullable=False),
        sa.Column('value', sa.Double(), nullable=False),
        sa.Column('who', sa.String(length=100), nullable=False),
        sa.Column('requested', sa.DateTime(timezone=True), nullable=False),
        sa.Column('finished', sa.DateTime(timezone=True), nullable=False),
        sa.Column('outcome', sa.String(length=16), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_meter_writes_meter_id', 'meter_writes', ['meter', 'id'], unique=False)
    op.create_table('meters',
        sa.Column('name', sa.String(length=100), nullable=False),
        sa.Column('link', sa.String(length=100), nullable=False),
        sa.Column('unit', sa.SmallInteger(), nullable=False),
        sa.Column('interval', sa.Double(), nullable=False),
        sa.Column('points', sa.Text(), nullable=False),
        sa.Column('configured', sa.Boolean(), nullable=False),
        sa.Column('last_poll', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_success', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('last_error_time', sa.DateTime(timezone=True), nullable=True),
        sa.Column('failing', sa.Boolean(), nullable=False),
        sa.Column('created', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('name')
    )
    op.create_table('registers',
        sa.Column('psn', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('position', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('dev', sa.SmallInteger(), nullable=False),
        sa.Column('addr', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('psn', 'position')
    )
    op.create_table('samples',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('psn', sa.BigInteger(), nullable=False),
        sa.Column('time', sa.DateTime(timezone=True), nullable=False),
        sa.Column('net_state', sa.SmallInteger(), nullable=False),
        sa.Column('values', sa.LargeBinary(), nullable=False),
        sa.Column('registers', sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_samples_psn_time', 'samples', ['psn', 'time'], unique=False)


def downgrade() -> None:
    op.drop_table('samples')
    op.drop_table('registers')
    op.drop_table('meters')
    op.drop_table('meter_writes')
    op.drop_table('meter_samples')
    op.drop_table('meter_failures')
    op.drop_table('dtus')
    op.drop_table('commands')
