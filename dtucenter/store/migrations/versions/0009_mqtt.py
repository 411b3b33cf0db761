"""mqtt: the MQTT publisher's backlog of messages waiting for the broker

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('mqtt_backlog',
        sa.Column('seq', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('topic', sa.Text(), nullable=False),
        sa.Column('payload', sa.LargeBinary(), nullable=False),
        sa.Column('qos', sa.SmallInteger(), nullable=False),
        sa.Column('retain', sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint('seq'),
    )


def downgrade() -> None:
    op.drop_table('mqtt_backlog')
