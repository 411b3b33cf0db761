"""The database schema's Alembic migrations; run them through :mod:`dtucenter.store.schema`.

``env.py`` and ``versions/`` are read by Alembic, not imported by the center.
``python -m dtucenter.store.migrations "what changed"`` writes a new revision
(docs/deployment.md, "Changing the schema").
"""
