"""The nightly run's steps: one function per DAG task, each a thin call into the module that does the work.

The DAG file (``dags/crm_nightly.py``) only wires these; tests and ``crm`` can call them directly.
Every step takes the :class:`~ml.config.Settings` and the validated run parameters as a plain dict (what
travels between Airflow tasks through XCom) and returns a small JSON-safe dict for the run summary.

Idempotence per ``as_of``: loads are idempotent by content hash, dbt rebuilds its tables, publish
replaces the rows of the same ``as_of``, so a rerun or a backfill of a date never duplicates anything.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from ml.config import Settings
from ml.params import RunParams

log = logging.getLogger(__name__)

# The demo CRM generated into an empty warehouse (same figures as `crm demo`).
DEMO_CUSTOMERS = 5000
DEMO_DAYS = 730
DEMO_SEED = 42


def validate(raw_params: Mapping[str, Any]) -> dict[str, Any]:
    """First task: check every parameter (raises :class:`~ml.params.InvalidParams` listing each problem)."""
    params = RunParams.from_mapping(raw_params)
    log.info("run parameters: %s", params.to_dict())
    return params.to_dict()


def load_raw(settings: Settings, params: Mapping[str, Any], *, run_after: datetime | None = None) -> dict[str, Any]:
    """Load new raw data, then fix the run's ``as_of``.

    An empty raw layer gets the demo CRM from the generator (so a fresh clone runs end to end); a raw
    layer that already holds data is left alone (new files are loaded by ``crm ingest``; the loader is
    idempotent by content hash, so loading a file twice is harmless).
    """
    from ml.warehouse import connect, init_schemas

    with connect(settings) as conn:
        init_schemas(conn)
        n_orders = conn.execute("select count(*) from raw.orders").fetchone()[0]
        loaded: dict[str, Any] = {"generated": False}
        if n_orders == 0:
            from ml.ingest.generator import GeneratorParams, generate

            report = generate(conn, GeneratorParams(customers=DEMO_CUSTOMERS, days=DEMO_DAYS, seed=DEMO_SEED))
            log.info("raw layer was empty: generated the demo CRM: %s", report.summary())
            loaded = {"generated": True, "report": report.summary()}
        as_of = resolve_as_of(conn, params, run_after=run_after, timezone=settings.timezone)
    return {**loaded, "as_of": as_of.isoformat()}


def resolve_as_of(conn, params: Mapping[str, Any], *, run_after: datetime | None, timezone: str) -> date:
    """The business date of the run.

    An explicit ``as_of`` wins. Otherwise the latest order date on or before the day before the run
    (in the DAG's timezone): a 02:00 nightly run covers yesterday, a backfill of an old date covers that
    date, and a demo warehouse whose data ends in the past uses its last day of orders.
    """
    if params.get("as_of"):
        return date.fromisoformat(params["as_of"])
    moment = run_after or datetime.now(tz=ZoneInfo(timezone))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo("UTC"))
    cutoff = moment.astimezone(ZoneInfo(timezone)).date() - timedelta(days=1)
    latest = conn.execute(
        "select max(ordered_at)::date from raw.orders where ordered_at < %s::date + 1", [cutoff]
    ).fetchone()[0]
    return latest or cutoff
