"""alarms: accounts' alarm rules, their webhooks, and the alarms raised and cleared

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30

New tables only: every row of the earlier ones stays as it was.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('alarms',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('account', sa.String(length=100), nullable=False),
    sa.Column('rule', sa.String(length=100), nullable=False),
    sa.Column('device_kind', sa.String(length=8), nullable=False),
    sa.Column('device', sa.String(length=100), nullable=False),
    sa.Column('point', sa.String(length=100), nullable=True),
    sa.Column('limit', sa.Double(), nullable=True),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('raised', sa.DateTime(timezone=True), nullable=False),
    sa.Column('raised_value', sa.Double(), nullable=True),
    sa.Column('cleared', sa.DateTime(timezone=True), nullable=True),
    sa.Column('cleared_value', sa.Double(), nullable=True),
    sa.Column('cleared_message', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('alarms', schema=None) as batch_op:
        batch_op.create_index('ix_alarms_account_id', ['account_id', 'id'], unique=False)
        batch_op.create_index('ix_alarms_account_rule_cleared', ['account_id', 'rule', 'cleared'], unique=False)

    op.create_table('alarm_rules',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('definition', sa.Text(), nullable=False),
    sa.Column('created', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(
        ['account_id'], ['accounts.id'], name='fk_alarm_rules_account_id_accounts', ondelete='CASCADE'
    ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('account_id', 'name', name='uq_alarm_rules_account_name')
    )
    op.create_table('alarm_webhooks',
    sa.Column('account_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('url', sa.String(length=1000), nullable=False),
    sa.Column('updated', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(
        ['account_id'], ['accounts.id'], name='fk_alarm_webhooks_account_id_accounts', ondelete='CASCADE'
    ),
    sa.PrimaryKeyConstraint('account_id')
    )


def downgrade() -> None:
    op.drop_table('alarm_webhooks')
    op.drop_table('alarm_rules')
    with op.batch_alter_table('alarms', schema=None) as batch_op:
        batch_op.drop_index('ix_alarms_account_rule_cleared')
        batch_op.drop_index('ix_alarms_account_id')

    op.drop_table('alarms')
