"""pending devices: unknown DTUs waiting for adoption

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

Devices that dialled in unknown, waiting to be adopted (dtucenter/discovery.py); the running
center keeps them in memory and writes them here in batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('pending_devices',
        sa.Column('id', sa.String(length=32), nullable=False),
        sa.Column('kind', sa.String(length=8), nullable=False),
        sa.Column('registration', sa.LargeBinary(length=256), nullable=False),
        sa.Column('host', sa.String(length=64), nullable=False),
        sa.Column('peer', sa.String(length=100), nullable=False),
        sa.Column('listener', sa.String(length=100), nullable=False),
        sa.Column('first_bytes', sa.LargeBinary(length=64), nullable=False),
        sa.Column('first_seen', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_seen', sa.DateTime(timezone=True), nullable=False),
        sa.Column('times_seen', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('kind', 'registration', name='uq_pending_devices_kind_registration')
    )
    with op.batch_alter_table('pending_devices', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_pending_devices_last_seen'), ['last_seen'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('pending_devices', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_pending_devices_last_seen'))

    op.drop_table('pending_devices')
