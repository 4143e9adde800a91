"""Nightly CRM pipeline (Airflow DAG): load raw data → dbt build → train → publish → downstream marts.

The file only wires tasks; each task body is one call into ``ml/`` (``ml/nightly.py``).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, Param, dag, task

from ml.config import Settings
from ml.params import param_specs

SETTINGS = Settings.from_env()  # reads environment variables only: no database, no dbt at import
TZ = pendulum.timezone(SETTINGS.timezone)


def _asset(table: str) -> Asset:
    """An Airflow Asset for one warehouse table, named ``schema.table`` so other DAGs can schedule on it."""
    schema, name = table.split(".")
    return Asset(name=table, uri=f"crm://warehouse/{schema}/{name}", group=schema)


MARTS = [_asset(f"marts.{t}") for t in (
    "dim_customers", "dim_products", "fct_orders", "fct_order_lines", "customer_features",
    "basket_lines", "clv_training_set", "clv_scoring_set",
)]
SEGMENTS = [_asset("ml.customer_segments"), _asset("ml.segment_profiles")]
RULES = [_asset("ml.association_rules"), _asset("ml.product_recommendations")]
SCORES = [_asset("ml.customer_scores")]
AUDIENCES = [_asset("marts.campaign_audiences")]

DEFAULT_ARGS = {
    "owner": "crm",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(minutes=60),
}


@dag(
    dag_id="crm_nightly",
    description="Nightly CRM: load raw → dbt staging/marts → segmentation, rules, CLV → publish ml.* → audiences",
    schedule="0 2 * * *",
    start_date=pendulum.datetime(2024, 1, 1, tz=TZ),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={name: Param(**spec) for name, spec in param_specs().items()},
    tags=["crm", "dbt", "ml"],
    doc_md=__doc__,
)
def crm_nightly():
    # Invalid parameters are a user error: retrying cannot fix them, so fail at once.
    @task(retries=0, execution_timeout=timedelta(minutes=2))
    def validate_params(**context) -> dict:
        from ml.nightly import validate

        return validate({**dict(context["params"]), **(context["dag_run"].conf or {})})

    @task(execution_timeout=timedelta(minutes=30))
    def load_raw(params: dict, **context) -> dict:
        from ml.nightly import load_raw

        return load_raw(Settings.from_env(), params, run_after=context["dag_run"].run_after)

    params = validate_params()
    loaded = load_raw(params)
    params >> loaded


crm_nightly()
