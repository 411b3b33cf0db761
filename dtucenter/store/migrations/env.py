"""Alembic's environment: the center passes the connection in, there is no alembic.ini."""

from __future__ import annotations

from typing import Any, Literal

from alembic import context

from dtucenter.store.models import Base, UTCDateTime
from dtucenter.store.schema import include_name


def render_item(kind: str, item: Any, _autogen_context: Any) -> str | Literal[False]:
    # A revision must not import the models: it has to run unchanged after they change.
    if kind == "type" and isinstance(item, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError("run the migrations through dtucenter.store.schema (dtucenter db upgrade), not alembic")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite alters most things only by copying the table; batch mode writes that for us.
    render_as_batch=True,
    compare_type=True,
    render_item=render_item,
    include_name=include_name,
)
with context.begin_transaction():
    context.run_migrations()
