"""accounts: accounts, their hashed API tokens, DTU and meter owners, the DTU edit trail

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30

Makes the first account, ``admin`` (an admin), and gives it every DTU and
meter already stored, so an upgraded installation keeps its devices; its
existing API token keeps working as that account's token (web/auth.py).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The account the upgrade makes; the models' ``accounts.FIRST_ADMIN``.
FIRST_ADMIN = "admin"


def upgrade() -> None:
    accounts = op.create_table('accounts',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=100), nullable=False),
        sa.Column('admin', sa.Boolean(), nullable=False),
        sa.Column('created', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('name'),
    )
    op.create_table('api_tokens',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('account_id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=100), nullable=False),
        sa.Column('digest', sa.String(length=64), nullable=False),
        sa.Column('created', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('account_id', 'name', name='uq_api_tokens_account_name'),
        sa.UniqueConstraint('digest'),
    )
    op.create_table('dtu_edits',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('psn', sa.BigInteger(), nullable=False),
        sa.Column('action', sa.String(length=16), nullable=False),
        sa.Column('fields', sa.Text(), nullable=False),
        sa.Column('who', sa.String(length=100), nullable=False),
        sa.Column('time', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_dtu_edits_psn_id', 'dtu_edits', ['psn', 'id'], unique=False)
    op.bulk_insert(accounts, [{"id": 1, "name": FIRST_ADMIN, "admin": True, "created": dt.datetime.now(dt.UTC)}])
    if op.get_bind().dialect.name == "postgresql":
        # The explicit id above did not move the sequence: the next account must not collide with it.
        op.execute("SELECT setval(pg_get_serial_sequence('accounts', 'id'), 1)")
    for table in ('dtus', 'meters'):
        # Added with the admin account as default so existing rows get an owner, then made plain.
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column('account_id', sa.Integer(), nullable=False, server_default='1'))
        with op.batch_alter_table(table) as batch:
            batch.alter_column('account_id', server_default=None)
            batch.create_foreign_key(f'fk_{table}_account_id_accounts', 'accounts', ['account_id'], ['id'])
            batch.create_index(f'ix_{table}_account_id', ['account_id'], unique=False)


def downgrade() -> None:
    for table in ('meters', 'dtus'):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f'ix_{table}_account_id')
            batch.drop_constraint(f'fk_{table}_account_id_accounts', type_='foreignkey')
            batch.drop_column('account_id')
    op.drop_index('ix_dtu_edits_psn_id', table_name='dtu_edits')
    op.drop_table('dtu_edits')
    op.drop_table('api_tokens')
    op.drop_table('accounts')
