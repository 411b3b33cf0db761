"""cluster nodes, who holds each DTU and link

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30

New tables, and a new column that is empty (NULL) on every existing DTU: no row changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('dtu_handovers',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('node', sa.String(length=64), nullable=False),
    sa.Column('psn', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('dtu_handovers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dtu_handovers_node'), ['node'], unique=False)

    op.create_table('link_owners',
    sa.Column('link', sa.String(length=100), nullable=False),
    sa.Column('node', sa.String(length=64), nullable=False),
    sa.Column('since', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('link')
    )
    op.create_table('nodes',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('url', sa.String(length=200), nullable=True),
    sa.Column('host', sa.String(length=100), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('started', sa.DateTime(timezone=True), nullable=False),
    sa.Column('renewed', sa.DateTime(timezone=True), nullable=False),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=False),
    sa.Column('stopped', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('dtus', schema=None) as batch_op:
        batch_op.add_column(sa.Column('node', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_dtus_node'), ['node'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('dtus', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dtus_node'))
        batch_op.drop_column('node')

    op.drop_table('nodes')
    op.drop_table('link_owners')
    with op.batch_alter_table('dtu_handovers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dtu_handovers_node'))

    op.drop_table('dtu_handovers')
