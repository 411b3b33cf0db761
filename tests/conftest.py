from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from dtucenter.store.models import Base

#: A PostgreSQL URL the tests may wipe; .ci/run starts a server and sets it.
POSTGRES_URL = os.environ.get("DTUCENTER_TEST_POSTGRES")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test against the embedded default and the production database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'center.db'}"
    if not POSTGRES_URL:
        if os.environ.get("CI"):
            pytest.fail("CI must run the PostgreSQL tests: DTUCENTER_TEST_POSTGRES is not set")
        pytest.skip("set DTUCENTER_TEST_POSTGRES to a scratch database URL to run against PostgreSQL")
    engine = create_engine(POSTGRES_URL)
    with engine.begin() as connection:
        Base.metadata.drop_all(connection)
        connection.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")  # else the next test's is at head
    engine.dispose()
    return POSTGRES_URL
