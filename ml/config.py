"""The one typed place for configuration: every setting is read from the environment here, once.

Nothing else in the project reads ``os.environ`` for these settings; callers receive a
:class:`Settings` and pass it down.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Not 5432: a system PostgreSQL often listens there; the embedded server must not fight it.
DEFAULT_EMBEDDED_PORT = 55432
EMBEDDED_DATABASE = "crm"
WAREHOUSE_SCHEMAS = ("raw", "staging", "marts", "ml", "audit")
# dbt selector of what only a training of the value family reads (clv_training_set and its feature snapshots):
# the nightly builds it after the other marts, and only on the nights that family retrains (ml.nightly).
DBT_TRAINING_SELECTOR = "tag:training"


@dataclass(frozen=True)
class Settings:
    """Where the warehouse, MLflow and local state live.

    ``warehouse_url`` is a libpq URL (``postgresql://user@host:port/db``, password allowed). When the user does not
    set ``WAREHOUSE_URL`` the embedded PostgreSQL under ``state_dir`` is used and ``embedded`` is true.
    """

    state_dir: Path
    warehouse_url: str
    embedded: bool
    embedded_port: int
    mlflow_tracking_uri: str
    mlflow_artifact_root: Path
    dbt_project_dir: Path
    timezone: str = "UTC"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        state_dir = Path(env.get("CRM_STATE_DIR") or PROJECT_ROOT / ".state").expanduser().resolve()
        port = _int_setting(env, "CRM_PG_PORT", DEFAULT_EMBEDDED_PORT)
        url = env.get("WAREHOUSE_URL", "").strip()
        embedded = not url
        if embedded:
            url = f"postgresql://postgres@127.0.0.1:{port}/{EMBEDDED_DATABASE}"
        artifact_root = state_dir / "mlartifacts"
        tracking = env.get("MLFLOW_TRACKING_URI", "").strip() or f"sqlite:///{state_dir / 'mlflow.db'}"
        return cls(
            state_dir=state_dir,
            warehouse_url=url,
            embedded=embedded,
            embedded_port=port,
            mlflow_tracking_uri=tracking,
            mlflow_artifact_root=artifact_root,
            dbt_project_dir=PROJECT_ROOT / "dbt_project",
            timezone=env.get("CRM_TIMEZONE", "UTC"),
        )

    @property
    def pgdata(self) -> Path:
        """Data folder of the embedded server."""
        return self.state_dir / "pgdata"

    def with_database(self, database: str) -> Settings:
        """The same server, another database (tests use one database each)."""
        parts = urlsplit(self.warehouse_url)
        return replace(self, warehouse_url=urlunsplit(parts._replace(path="/" + database)))

    @property
    def warehouse(self) -> WarehouseAddress:
        return WarehouseAddress.parse(self.warehouse_url)


@dataclass(frozen=True)
class WarehouseAddress:
    """The parts of a warehouse URL, as dbt's profile and Airflow connections want them."""

    host: str
    port: int
    user: str
    password: str
    database: str

    @classmethod
    def parse(cls, url: str) -> WarehouseAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError(
                f"WAREHOUSE_URL must start with postgresql:// (got {parts.scheme or 'no scheme'}://…)"
            )
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5432,
            user=parts.username or "postgres",
            password=parts.password or "",
            database=(parts.path or "/").lstrip("/") or "postgres",
        )

    def redacted(self) -> str:
        """The URL for messages: never print a password."""
        auth = f"{self.user}:***" if self.password else self.user
        return f"postgresql://{auth}@{self.host}:{self.port}/{self.database}"


def _int_setting(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
