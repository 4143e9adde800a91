"""Nightly CRM pipeline (Airflow DAG): load raw data → dbt build → train → publish → downstream marts.

The file only wires tasks; each task body is one call into ``ml/`` (``ml/nightly.py``).

dbt in Airflow — how and why (Cosmos 1.15)
-------------------------------------------
* The dbt graph is loaded from ``dbt_project/target/manifest.json`` (``LoadMode.DBT_MANIFEST``), written
  by ``dbt parse`` before Airflow starts (``ml.airflow_env.prepare``). Parsing this file runs no dbt and
  touches no database: it reads one JSON file, so the DAG parses in well under a second.
* Execution: ``ExecutionMode.LOCAL`` with ``TestBehavior.BUILD`` — one task per model running
  ``dbt build --select <model>``, i.e. the model *and its data and unit tests* in one task. A failing test
  fails that model's task, so nothing downstream of it (other models, training, publishing) runs, and the
  graph shows exactly which model's tests failed. A test over two models (``relationships``) gets its own
  task after both models (``should_detach_multiple_parents_tests``). Each task is retried on its own (a database restart in
  the middle of the build costs one model's retry, not the whole build).
* Why not ``ExecutionMode.WATCHER`` (one ``dbt build`` producer + one sensor per model, Cosmos' answer to
  the per-task start-up cost): we tried it. Its consumer sensors are not downstream of the producer inside
  a ``DbtTaskGroup``, so ``airflow dags test`` / ``dag.test()`` — our main command and the CI test, which
  run tasks one at a time — starts a sensor first and waits forever for a producer that never starts. Its
  retry semantics are also still marked experimental (producer retries dropped model failures in 1.14).
* The start-up cost is kept small instead: ``InvocationMode.DBT_RUNNER`` runs dbt in the task's own
  Python process (no second interpreter, no re-import of dbt), ``TestBehavior.BUILD`` halves the number of
  tasks against run+test pairs, and Cosmos caches dbt's partial parse between tasks. ``bench/`` measures
  the remaining overhead against one plain ``dbt build``.
* The connection comes from ``dbt_project/profiles.yml`` (``CRM_DBT_*`` variables, TCP host), set on each
  dbt task at run time by an interceptor: no password is ever part of the serialized DAG.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, Param, dag, task
from cosmos import DbtTaskGroup, ExecutionConfig, ProfileConfig, ProjectConfig, RenderConfig
from cosmos.constants import ExecutionMode, InvocationMode, LoadMode, TestBehavior

from ml.config import DBT_TRAINING_SELECTOR, Settings
from ml.params import param_specs

SETTINGS = Settings.from_env()  # reads environment variables only: no database, no dbt at import
TZ = pendulum.timezone(SETTINGS.timezone)
DBT_DIR = SETTINGS.dbt_project_dir
MANIFEST = DBT_DIR / "target" / "manifest.json"
# Downstream marts read the published ml.* tables, so they are built after training, in their own group.
AUDIENCE_MODELS = DBT_DIR / "models" / "audiences"
if not MANIFEST.exists():
    raise FileNotFoundError(
        f"dbt manifest not found at {MANIFEST}: the DAG loads the dbt graph from it. Create it with "
        "`dbt parse` (ml.dbt.dbt_parse; `crm run` and `crm ui` do it before starting Airflow)."
    )


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


def _dbt_runtime(context, operator) -> None:
    """Cosmos interceptor: give each dbt task this run's vars, --full-refresh and connection variables."""
    from ml.nightly import dbt_runtime

    ti = context["ti"]
    runtime = dbt_runtime(
        Settings.from_env(), ti.xcom_pull(task_ids="validate_params"), ti.xcom_pull(task_ids="load_raw")
    )
    operator.vars = runtime["vars"]
    operator.full_refresh = runtime["full_refresh"]
    operator.env = {**(operator.env or {}), **runtime["env"]}


def _project_config() -> ProjectConfig:
    config = ProjectConfig(dbt_project_path=DBT_DIR, manifest_path=MANIFEST)
    # Cosmos wraps every manifest path in an ObjectStoragePath (for s3:// and friends); opening one starts
    # Airflow's lineage collector, which loads every plugin (and FastAPI with them): 0.7 s of a 1 s parse
    # budget spent on a local file. A local manifest is read as the plain Path it is.
    config.manifest_path = MANIFEST
    return config


def _dbt_group(group_id: str, select: list[str], exclude: list[str] | None = None) -> DbtTaskGroup:
    return DbtTaskGroup(
        group_id=group_id,
        project_config=_project_config(),
        profile_config=ProfileConfig(
            profile_name="crm", target_name="embedded", profiles_yml_filepath=DBT_DIR / "profiles.yml"
        ),
        render_config=RenderConfig(
            load_method=LoadMode.DBT_MANIFEST,
            select=select,
            exclude=exclude or [],
            test_behavior=TestBehavior.BUILD,
            # A test over two models (relationships) runs as its own task once both are built; left
            # inside one model's `dbt build` it would query the other model before it exists.
            should_detach_multiple_parents_tests=True,
        ),
        execution_config=ExecutionConfig(
            execution_mode=ExecutionMode.LOCAL, invocation_mode=InvocationMode.DBT_RUNNER
        ),
        operator_args={"install_deps": False, "interceptors": [_dbt_runtime]},
        # A retry is for a lost connection or a restarted database; a failing data test fails again at
        # once, so the first retry comes quickly.
        default_args={"execution_timeout": timedelta(minutes=30), "retry_delay": timedelta(seconds=10)},
    )


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
    def load_raw(run_params: dict, **context) -> dict:
        from ml.nightly import load_raw

        return load_raw(Settings.from_env(), run_params, run_after=context["dag_run"].run_after)

    @task(outlets=MARTS, execution_timeout=timedelta(minutes=5))
    def check_marts(loaded: dict) -> dict:
        from ml.nightly import check_marts

        return check_marts(Settings.from_env(), loaded)

    # Each training logs its MLflow runs, decides champion/challenger and publishes its ml.* tables.
    @task(outlets=RULES, execution_timeout=timedelta(minutes=45))
    def train_baskets(run_params: dict, loaded: dict, **context) -> dict:
        from ml.nightly import train_baskets

        return train_baskets(Settings.from_env(), run_params, loaded, orchestrator_run_id=context["run_id"])

    @task(outlets=SEGMENTS, execution_timeout=timedelta(minutes=45))
    def train_segments(run_params: dict, loaded: dict, **context) -> dict:
        from ml.nightly import train_segments

        return train_segments(Settings.from_env(), run_params, loaded, orchestrator_run_id=context["run_id"])

    # The value family's training marts (dbt tag `training`) are built only on the nights it retrains: the
    # group after this task is skipped otherwise (and train_value scores with its champions). Only the
    # tasks right after it are skipped here; train_value runs whether the group ran or was skipped.
    @task.short_circuit(ignore_downstream_trigger_rules=False, execution_timeout=timedelta(minutes=5))
    def value_training_needed(run_params: dict, loaded: dict) -> bool:
        from ml.nightly import value_training_needed

        return value_training_needed(Settings.from_env(), run_params, loaded)

    @task(outlets=SCORES, execution_timeout=timedelta(minutes=45), trigger_rule="none_failed")
    def train_value(run_params: dict, loaded: dict, **context) -> dict:
        from ml.nightly import train_value

        return train_value(Settings.from_env(), run_params, loaded, orchestrator_run_id=context["run_id"])

    @task(execution_timeout=timedelta(minutes=10))
    def summarize(run_params: dict, loaded: dict, marts: dict, *trainings: dict) -> dict:
        from ml.nightly import summarize

        return summarize(Settings.from_env(), run_params, loaded, marts, list(trainings))

    params = validate_params()
    loaded = load_raw(params)
    dbt_marts = _dbt_group(
        "dbt_marts",
        select=["path:models/staging", "path:models/intermediate", "path:models/marts"],
        exclude=[DBT_TRAINING_SELECTOR],
    )
    marts = check_marts(loaded)
    params >> loaded >> dbt_marts >> marts
    value = train_value(params, loaded)
    marts >> value_training_needed(params, loaded) >> _dbt_group("dbt_training_marts", select=[DBT_TRAINING_SELECTOR]) >> value
    trainings = [train_segments(params, loaded), train_baskets(params, loaded), value]
    marts >> trainings
    summary = summarize(params, loaded, marts, *trainings)
    if AUDIENCE_MODELS.is_dir():  # (a file-system check, no dbt: the group appears once the models exist)
        audiences = _dbt_group("dbt_audiences", select=["path:models/audiences"])
        trainings >> audiences >> summary


crm_nightly()
