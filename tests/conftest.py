"""Shared fixtures: a real PostgreSQL for every test that needs one.

By default the tests start their own embedded PostgreSQL (separate data folder and port from the user's
demo warehouse) and give each test a fresh database. With ``WAREHOUSE_URL`` set they use that server
instead, still creating one database per test.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from ml.config import PROJECT_ROOT, Settings
from ml.warehouse import connect, create_database, drop_database, init_schemas, start_embedded, stop_embedded

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def _test_env(tmp_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["CRM_STATE_DIR"] = os.environ.get("CRM_TEST_STATE_DIR", str(PROJECT_ROOT / ".state" / "test"))
    env["CRM_PG_PORT"] = os.environ.get("CRM_TEST_PG_PORT", "55439")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_root / 'mlflow.db'}"
    return env


@pytest.fixture(scope="session")
def server_settings(tmp_path_factory) -> Settings:
    """Settings pointing at a running server (embedded, started here, or the external WAREHOUSE_URL)."""
    settings = Settings.from_env(_test_env(tmp_path_factory.mktemp("state")))
    started_here = False
    if settings.embedded:
        from ml.warehouse import embedded_is_running

        started_here = not embedded_is_running(settings)
        start_embedded(settings)
    yield settings
    if started_here:
        stop_embedded(settings)


@pytest.fixture
def warehouse(server_settings: Settings, tmp_path) -> Settings:
    """A fresh, empty warehouse database with schemas and raw tables, dropped after the test.

    Each test also gets its own MLflow store, so registered model versions do not depend on test order.
    """
    settings = replace(
        server_settings.with_database(f"crm_test_{uuid.uuid4().hex[:10]}"),
        mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        mlflow_artifact_root=tmp_path / "mlartifacts",
    )
    create_database(settings)
    with connect(settings) as conn:
        init_schemas(conn)
    yield settings
    drop_database(settings)


@pytest.fixture
def shared_data() -> Path:
    """The real public data files beside the project (``../shared/data``)."""
    assert SHARED_DATA.is_dir(), f"expected the shared data folder at {SHARED_DATA}"
    return SHARED_DATA
