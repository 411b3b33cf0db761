"""devices: links as rows, meters' whole definitions, and who manages each (the file or the API)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

Meters stored before this revision came from the config file: they are marked
file-managed, with no definition, and get one at the next start that finds
them in the file (store/recorder.py). Links were not stored before: the next
start imports the file's.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('links',
        sa.Column('name', sa.String(length=100), nullable=False),
        sa.Column('account_id', sa.Integer(), nullable=False),
        sa.Column('managed_by', sa.String(length=8), nullable=False),
        sa.Column('definition', sa.Text(), nullable=False),
        sa.Column('registration', sa.LargeBinary(length=256), nullable=True),
        sa.Column('created', sa.DateTime(timezone=True), nullable=True),
        sa.Column('updated', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name='fk_links_account_id_accounts'),
        sa.PrimaryKeyConstraint('name'),
    )
    op.create_index('ix_links_account_id', 'links', ['account_id'], unique=False)
    op.create_index('ix_links_registration', 'links', ['registration'], unique=False)
    # Added with "file" as default, as every stored meter came from the file, then made plain.
    with op.batch_alter_table('meters') as batch:
        batch.add_column(sa.Column('managed_by', sa.String(length=8), nullable=False, server_default='file'))
        batch.add_column(sa.Column('definition', sa.Text(), nullable=True))
    with op.batch_alter_table('meters') as batch:
        batch.alter_column('managed_by', server_default=None)


def downgrade() -> None:
    with op.batch_alter_table('meters') as batch:
        batch.drop_column('definition')
        batch.drop_column('managed_by')
    op.drop_index('ix_links_registration', table_name='links')
    op.drop_index('ix_links_account_id', table_name='links')
    op.drop_table('links')
