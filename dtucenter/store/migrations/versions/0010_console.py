"""console_sessions: browsers signed in to the web console, each with the digest of the token it used

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30

A new table only: nothing stored before changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('console_sessions',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('token_digest', sa.String(length=64), nullable=False),
        sa.Column('csrf', sa.String(length=64), nullable=False),
        sa.Column('created', sa.DateTime(timezone=True), nullable=False),
        sa.Column('expires', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('console_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_console_sessions_expires'), ['expires'], unique=False)
        batch_op.create_index(batch_op.f('ix_console_sessions_token_digest'), ['token_digest'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('console_sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_console_sessions_token_digest'))
        batch_op.drop_index(batch_op.f('ix_console_sessions_expires'))

    op.drop_table('console_sessions')
