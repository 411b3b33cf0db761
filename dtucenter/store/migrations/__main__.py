"""``python -m dtucenter.store.migrations "what changed"``: write the next revision from the models.

Alembic compares ``models.Base.metadata`` with a scratch SQLite database
brought to the current head and writes the difference as
``versions/NNNN_what_changed.py`` (numbered after the head). Read and edit
it before committing: autogenerate misses renames and data changes.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

from alembic import command
from sqlalchemy import create_engine

from dtucenter.store import schema


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dtucenter.store.migrations", description=__doc__)
    parser.add_argument("message", help="what the revision changes, in a few words")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        engine = create_engine(f"sqlite:///{Path(scratch) / 'head.db'}")
        try:
            schema.upgrade(engine)
            with engine.connect() as connection:
                command.revision(
                    schema._config(connection), args.message, autogenerate=True, rev_id=_next_revision(),
                )
        finally:
            engine.dispose()


def _next_revision() -> str:
    # Revisions are numbered, maybe with a name after the number (0008_retention).
    return f"{int(schema.head().partition('_')[0]) + 1:04d}"


if __name__ == "__main__":
    main()
