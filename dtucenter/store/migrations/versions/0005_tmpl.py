"""templates of accounts: each account's own meter templates, and their audit trail

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

New tables only: every row of the earlier ones stays as it was.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('template_edits',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('account', sa.String(length=100), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('who', sa.String(length=100), nullable=False),
    sa.Column('time', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('template_edits', schema=None) as batch_op:
        batch_op.create_index('ix_template_edits_account_name_id', ['account', 'name', 'id'], unique=False)

    op.create_table('meter_templates',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('document', sa.Text(), nullable=False),
    sa.Column('created', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(
        ['account_id'], ['accounts.id'], name='fk_meter_templates_account_id_accounts', ondelete='CASCADE'
    ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('account_id', 'name', name='uq_meter_templates_account_name')
    )


def downgrade() -> None:
    op.drop_table('meter_templates')
    with op.batch_alter_table('template_edits', schema=None) as batch_op:
        batch_op.drop_index('ix_template_edits_account_name_id')
    op.drop_table('template_edits')
