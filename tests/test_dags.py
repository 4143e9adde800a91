"""The nightly DAG: it imports cleanly and cheaply, is wired as documented, and runs under ``airflow dags test``.

Airflow reads its configuration once per process, at import, so everything Airflow runs in a child process
with the environment ``ml.airflow_env`` computes (a temporary AIRFLOW_HOME per module, the test warehouse).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest
from helpers_warehouse import unique_index_columns

from ml import airflow_env as ae
from ml.config import Settings
from ml.dbt import dbt_parse
from ml.warehouse import connect

DAG_ID = "crm_nightly"


@pytest.fixture(scope="module")
def manifest(server_settings: Settings):
    """The dbt manifest the DAG loads (``dbt parse``, no database work)."""
    return dbt_parse(server_settings)


@pytest.fixture(scope="module")
def af_home(tmp_path_factory) -> ae.AirflowHome:
    return ae.AirflowHome(tmp_path_factory.mktemp("airflow"))


def _env(settings: Settings, home: ae.AirflowHome, **extra: str) -> dict[str, str]:
    env = ae.airflow_env(settings, home=home)
    env.update(extra)
    return env


def _python(env: dict[str, str], code: str) -> dict:
    """Run ``code`` in a fresh interpreter with ``env``; it prints one JSON line last."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# Loads the DAG folder the way the dag-processor does, with every way to reach the warehouse or dbt
# recorded and refused, then describes the DAG.
_INSPECT = """
    import json, socket, subprocess
    touched = []
    _connect = socket.socket.connect
    def connect(self, address, *a, **k):
        if isinstance(address, tuple) and address[1] == WAREHOUSE_PORT:
            touched.append(f"socket connect {address}")
            raise OSError("no database at DAG parse time")
        return _connect(self, address, *a, **k)
    socket.socket.connect = connect
    _popen = subprocess.Popen.__init__
    def popen(self, args, *a, **k):
        # (platform.architecture() runs `file`, harmlessly; dbt and PostgreSQL tools are what must not run)
        if any(word in repr(args) for word in ("dbt", "psql", "pg_ctl", "postgres")):
            touched.append(f"subprocess {args!r}")
            raise OSError("no dbt or database tool at DAG parse time")
        return _popen(self, args, *a, **k)
    subprocess.Popen.__init__ = popen
    import dbt.cli.main
    def invoke(*a, **k):
        touched.append("dbtRunner.invoke")
        raise RuntimeError("no dbt at DAG parse time")
    dbt.cli.main.dbtRunner.invoke = invoke

    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization
    bag = DagBag(dag_folder=DAGS_FOLDER)
    dag = bag.dags.get("crm_nightly")
    out = {"errors": {k: str(v) for k, v in bag.import_errors.items()}, "touched": touched}
    if dag is not None:
        out.update(
            task_ids=list(dag.task_ids),
            upstream={t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks},
            timetable=repr(dag.timetable),
            cron=dag.timetable.expression,
            timezone=str(dag.timezone),
            timetable_timezone=str(dag.timetable.timezone),
            catchup=dag.catchup,
            max_active_runs=dag.max_active_runs,
            params={k: dag.params.get_param(k).description for k in dag.params},
            retries={t.task_id: t.retries for t in dag.tasks},
            backoff={t.task_id: bool(t.retry_exponential_backoff) for t in dag.tasks},
            timeouts={t.task_id: t.execution_timeout.total_seconds() if t.execution_timeout else None
                      for t in dag.tasks},
            outlets=sorted(o.name for t in dag.tasks for o in t.outlets if hasattr(o, "name")),
            trigger_rules={t.task_id: getattr(t.trigger_rule, "value", t.trigger_rule) for t in dag.tasks},
            serialized=json.dumps(DagSerialization.to_dict(dag), default=str),
        )
    print(json.dumps(out))
"""


def _inspect(env: dict[str, str], warehouse_port: int) -> dict:
    code = f"WAREHOUSE_PORT = {warehouse_port}\nDAGS_FOLDER = {str(ae.DAGS_FOLDER)!r}\n" + textwrap.dedent(_INSPECT)
    return _python(env, code)


@pytest.fixture(scope="module")
def described(manifest, server_settings: Settings, af_home) -> dict:
    # A password in the URL: it must not end up in the serialized DAG (the dbt connection is set at run time).
    settings = Settings.from_env({
        "CRM_STATE_DIR": str(server_settings.state_dir),
        "WAREHOUSE_URL": f"postgresql://crm_user:s3cret-pw@127.0.0.1:{server_settings.warehouse.port}/crm",  # not-a-secret
    })
    return _inspect(_env(settings, af_home), server_settings.warehouse.port)


def test_dag_imports_without_errors_and_without_touching_database_or_dbt(described):
    assert described["errors"] == {}
    assert "task_ids" in described, "the DAG crm_nightly is not in the DagBag"
    assert described["touched"] == []


def test_schedule_and_run_policy(described):
    assert described["cron"] == "0 2 * * *"
    assert described["timetable"].startswith("CronTriggerTimetable(")
    assert described["timezone"] == described["timetable_timezone"] == "UTC"  # CRM_TIMEZONE unset
    assert described["catchup"] is False
    assert described["max_active_runs"] == 1


def test_timezone_comes_from_settings(manifest, server_settings, af_home):
    env = _env(server_settings, af_home, CRM_TIMEZONE="Europe/Paris")
    out = _inspect(env, server_settings.warehouse.port)
    assert out["errors"] == {}
    assert out["timezone"] == out["timetable_timezone"] == "Europe/Paris"  # 02:00 Paris time


def test_params_form_has_every_run_parameter_with_a_description(described):
    from ml.params import param_specs

    assert set(described["params"]) == set(param_specs())
    assert all(d and d.strip() for d in described["params"].values())


def test_every_task_retries_with_backoff_and_has_a_timeout_except_validation(described):
    for task_id, retries in described["retries"].items():
        assert described["timeouts"][task_id], f"{task_id} has no execution_timeout"
        if task_id == "validate_params":
            assert retries == 0  # bad parameters do not get better by retrying
        else:
            assert retries >= 1 and described["backoff"][task_id], task_id


def test_every_dbt_model_is_a_task_after_load_and_before_the_marts_gate(described, manifest):
    nodes = json.loads(manifest.read_text())["nodes"].values()
    models = {n["name"]: n for n in nodes if n["resource_type"] == "model"
              and n["path"].split("/")[0] in ("staging", "intermediate", "marts")}
    assert models, "the dbt project has no models"
    tasks = set(described["task_ids"])
    for model, node in models.items():
        group = "dbt_training_marts" if "training" in node["tags"] else "dbt_marts"
        assert f"{group}.{model}_model_build" in tasks, model
    upstream = described["upstream"]
    assert upstream["load_raw"] == ["validate_params"]
    roots = [t for t in tasks if t.startswith("dbt_marts.") and not any(
        u.startswith("dbt_marts.") for u in upstream[t])]
    assert roots and all(upstream[t] == ["load_raw"] for t in roots)
    gate = upstream["check_marts"]
    assert any(u.startswith("dbt_marts.") for u in gate)
    assert {u for u in gate if not u.startswith("dbt_marts.")} == {"load_raw"}  # (its as_of, via XCom)
    for training in ("train_segments", "train_baskets", "train_value"):
        assert "check_marts" in upstream[training], training
        assert not any(u.startswith("train_") for u in upstream[training])  # the three run in parallel
        assert training in upstream["summarize"]


def test_the_value_training_marts_are_built_after_the_gate_only_when_value_retrains(described, manifest):
    """clv_training_set and its snapshots (dbt tag `training`) are their own group, after check_marts and the
    short-circuit that skips it on scoring-only nights; train_value waits for it and runs when it is skipped."""
    nodes = json.loads(manifest.read_text())["nodes"].values()
    training = {n["name"] for n in nodes if n["resource_type"] == "model" and "training" in n["tags"]}
    assert {"clv_training_set", "int_customer_features_snapshots"} <= training
    upstream = described["upstream"]
    group = [t for t in described["task_ids"] if t.startswith("dbt_training_marts.")]
    roots = [t for t in group if not any(u.startswith("dbt_training_marts.") for u in upstream[t])]
    assert roots and all(upstream[t] == ["value_training_needed"] for t in roots)
    assert "check_marts" in upstream["value_training_needed"]
    assert any(u.startswith("dbt_training_marts.") for u in upstream["train_value"])
    assert described["trigger_rules"]["train_value"] == "none_failed"
    for other in ("train_segments", "train_baskets"):  # they do not wait for the value family's marts
        assert not any(u.startswith("dbt_training_marts.") for u in upstream[other])


def test_downstream_marts_are_built_after_the_trainings(described, manifest):
    nodes = json.loads(manifest.read_text())["nodes"].values()
    audiences = {n["name"] for n in nodes if n["resource_type"] == "model" and n["path"].startswith("audiences/")}
    if not audiences:
        pytest.fail("no models under dbt_project/models/audiences (campaign_audiences) yet")
    upstream = described["upstream"]
    for model in audiences:
        task = f"dbt_audiences.{model}_model_build"
        assert task in upstream, task
    roots = [t for t in upstream if t.startswith("dbt_audiences.") and not any(
        u.startswith("dbt_audiences.") for u in upstream[t])]
    for root in roots:
        assert {"train_segments", "train_baskets", "train_value"} <= set(upstream[root]), root
    assert any(u.startswith("dbt_audiences.") for u in upstream["summarize"])


def test_marts_are_declared_assets(described):
    for table in ("marts.customer_features", "marts.basket_lines", "marts.clv_scoring_set",
                  "ml.customer_segments", "ml.association_rules", "ml.customer_scores"):
        assert table in described["outlets"]


def test_no_secret_in_the_serialized_dag(described):
    assert "s3cret-pw" not in described["serialized"]


# ---------------------------------------------------------------------------------------------------------
# Runs (airflow dags test: the scheduler-less, one-process run the README's main command uses)
# ---------------------------------------------------------------------------------------------------------
def _raw_orders(settings: Settings) -> int:
    with connect(settings) as conn:
        return conn.execute("select count(*) from raw.orders").fetchone()[0]


def test_invalid_combination_fails_in_the_first_task_before_any_data(manifest, warehouse, tmp_path):
    home = ae.AirflowHome(tmp_path / "airflow")
    env = _env(warehouse, home)
    ae.migrate(env)
    with pytest.raises(Exception) as err:
        ae.dags_test(warehouse, {"k_min": 9, "k_max": 4}, env=env, timeout=600)
    assert "k_min (9) is greater than k_max (4)" in str(err.value)
    runs = ae.dag_runs(env)
    assert [r["state"] for r in runs] == ["failed"]
    states = ae.task_states(env, runs[0]["run_id"])
    assert states.pop("validate_params") == "failed"
    assert not [t for t, s in states.items() if s in ("success", "running", "failed")], states
    assert _raw_orders(warehouse) == 0  # the empty warehouse was not given the demo data


def test_out_of_range_value_is_refused_at_trigger_time(manifest, warehouse, tmp_path):
    home = ae.AirflowHome(tmp_path / "airflow")
    env = _env(warehouse, home)
    ae.migrate(env)
    with pytest.raises(Exception) as err:
        ae.dags_test(warehouse, {"min_support": 2}, env=env, timeout=600)
    assert "min_support" in str(err.value)
    assert ae.dag_runs(env) == []  # the form's schema refused it: no run was created


# The ml tables the three trainings publish.
PUBLISHED = ("customer_segments", "segment_profiles", "association_rules", "product_recommendations",
             "customer_scores")


def _published(settings: Settings) -> dict[str, tuple[str, int, int]]:
    """table -> (checksum of current contents, current rows, history rows), without run-specific columns."""
    from ml.publish import content_checksum

    out = {}
    with connect(settings) as conn:
        for table in PUBLISHED:
            rows = conn.execute(f"select count(*) from ml.{table}").fetchone()[0]
            history = conn.execute(f"select count(*) from ml.{table}_history").fetchone()[0]
            out[table] = (content_checksum(conn, table), rows, history)
    return out


def test_full_nightly_run_end_to_end_and_a_rerun_of_the_same_as_of_is_identical(manifest, warehouse, tmp_path):
    from ml.ingest.generator import GeneratorParams, generate

    with connect(warehouse) as conn:
        generate(conn, GeneratorParams(customers=1500, days=730, seed=5))
    env = _env(warehouse, ae.AirflowHome(tmp_path / "airflow"))
    ae.migrate(env)

    # Small and quick: two families, a narrow k range, short itemsets.
    conf = {"max_len": 2, "min_support": 0.002, "segmentation_families": ["kmeans", "gmm"], "k_min": 3, "k_max": 4}
    ae.dags_test(warehouse, conf, env=env, timeout=2400)
    runs = ae.dag_runs(env)
    states = ae.task_states(env, runs[0]["run_id"])
    assert set(states.values()) == {"success"}, {t: s for t, s in states.items() if s != "success"}
    first = _published(warehouse)
    for table, (_, rows, history) in first.items():
        assert rows > 0 and history == rows, table
    with connect(warehouse) as conn:
        as_of = conn.execute("select max(as_of_date) from marts.customer_features").fetchone()[0]
        # the first night tested every row, and recorded it for the next night (which tests the new rows)
        assert conn.execute("select as_of, scope from audit.data_test_runs").fetchall() == [(as_of, "all")]
        # built after the trainings, unique by customer as the other per-customer tables (test_dbt_project)
        assert conn.execute("select count(*) from marts.campaign_audiences").fetchone()[0] > 0
        assert unique_index_columns(conn, "marts.campaign_audiences") == [["customer_id"]]

    # The same as_of again (explicitly, as a backfill of that date would), retraining every family:
    # replaced, never duplicated, and the retrained models publish exactly the same tables.
    rerun = {**conf, "as_of": as_of.isoformat()}
    done = ae.dags_test(warehouse, {**rerun, "retrain": "always"}, env=env, timeout=2400)
    assert ae.dag_runs(env)[0]["state"] == "success"
    assert "dbt data tests read the rows loaded after" in done.stdout + done.stderr
    assert _published(warehouse) == first
    versions = _model_versions(warehouse)

    # A third time, scoring with the champions (the incremental night's path): still the same tables, and
    # a family that scored registered no new model version.
    done = ae.dags_test(warehouse, {**rerun, "retrain": "never"}, env=env, timeout=2400)
    assert ae.dag_runs(env)[0]["state"] == "success"
    assert _published(warehouse) == first
    # the value family only scored: its training marts were not built (skipped, visibly), it still ran
    states = ae.task_states(env, ae.dag_runs(env)[0]["run_id"])
    skipped = {t for t, s in states.items() if s == "skipped"}
    assert skipped and all(t.startswith("dbt_training_marts.") for t in skipped), skipped
    assert states["train_value"] == "success"
    # and a retraining on a training set that is not tonight's is refused, clearly
    from ml.errors import CrmError
    from ml.nightly import check_training_set

    check_training_set(warehouse, as_of)
    with pytest.raises(CrmError, match="clv_training_set is not built for as_of"):
        check_training_set(warehouse, as_of + timedelta(days=1))
    output = done.stdout + done.stderr
    after = _model_versions(warehouse)
    for family, models in FAMILY_MODELS.items():
        if _has_scorer(family):
            assert f"{'/'.join(models)}: scored (retrain=never" in output, family
            assert all(after[m] == versions[m] for m in models), (family, versions, after)


# Each family's module, its score-only function and its registered models.
FAMILY_MODELS = {"segmentation": ("crm_segmentation",), "value": ("crm_clv", "crm_churn"),
                 "baskets": ("crm_recommender",)}
_SCORE_FUNCTIONS = {"segmentation": ("ml.segmentation", "score_segmentation"),
                    "value": ("ml.value", "score_value"), "baskets": ("ml.train_baskets", "score_baskets")}


def _has_scorer(family: str) -> bool:
    """(The score-only functions land separately; until a family has one, the nightly trains it, says so.)"""
    import importlib

    module, function = _SCORE_FUNCTIONS[family]
    return hasattr(importlib.import_module(module), function)


def _model_versions(settings: Settings) -> dict[str, int]:
    """Registered model -> number of versions, in the test's MLflow store."""
    from mlflow import MlflowClient

    from ml import registry

    registry.configure(settings)
    client = MlflowClient()
    return {m.name: len(client.search_model_versions(f"name = '{m.name}'"))
            for m in client.search_registered_models()}


# ---------------------------------------------------------------------------------------------------------
# Data-quality gate: a dirty batch stops the run in dbt, before any training or publishing
# ---------------------------------------------------------------------------------------------------------
DIRTY_TEST = "assert_order_line_quantities_are_plausible"


def _dirty_online_retail_batch(settings: Settings, folder) -> dict:
    """An Online Retail file with one sane line and two sentinel quantities (2147483647 = "unknown"):
    every line is well-formed, so it loads; the plausibility test of the staged lines must stop the build."""
    from ml.ingest.online_retail import load_online_retail

    with connect(settings) as conn:
        day = conn.execute("select max(ordered_at)::date - 1 from raw.orders where ordered_at <= _loaded_at").fetchone()[0]
        customer = conn.execute("select min(customer_id) from raw.customers").fetchone()[0]
    moment = f"{day.isoformat()} 10:00:00"
    path = folder / "dirty-batch.csv"
    path.write_text(
        "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
        f"DQ1,85123A,WHITE HANGING HEART,6,{moment},2.55,{customer},United Kingdom\n"
        f"DQ2,85123A,WHITE HANGING HEART,2147483647,{moment},2.55,{customer},United Kingdom\n"
        f"DQ2,22633,HAND WARMER UNION JACK,2147483647,{moment},1.85,{customer},United Kingdom\n"
    )
    with connect(settings) as conn:
        report = load_online_retail(conn, path)
    assert report.rows_quarantined == 0 and report.rows_loaded["raw.order_lines"] == 3, report.summary()
    return report.rows_loaded


def _mlflow_runs(settings: Settings) -> int:
    from mlflow import MlflowClient

    from ml import registry

    registry.configure(settings)
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(experiments)) if experiments else 0


def test_a_dirty_batch_fails_its_dbt_test_and_stops_the_run_before_training(manifest, warehouse, tmp_path):
    from ml.ingest.generator import GeneratorParams, generate
    from ml.warehouse import table_counts

    with connect(warehouse) as conn:
        generate(conn, GeneratorParams(customers=300, days=400, seed=11))
    _dirty_online_retail_batch(warehouse, tmp_path)
    env = _env(warehouse, ae.AirflowHome(tmp_path / "airflow"))
    ae.migrate(env)

    with pytest.raises(Exception) as err:
        ae.dags_test(warehouse, {"max_len": 2, "k_min": 3, "k_max": 3}, env=env, timeout=1800)
    # The report names the test and how many rows failed it (the two sentinel lines).
    message = str(err.value)
    assert DIRTY_TEST in message, message
    assert "Got 2 results" in message, message

    runs = ae.dag_runs(env)
    assert [r["state"] for r in runs] == ["failed"]
    states = ae.task_states(env, runs[0]["run_id"])
    assert states["dbt_marts.stg_crm__order_lines_model_build"] == "failed", states
    for task in ("check_marts", "train_segments", "train_baskets", "train_value", "summarize"):
        assert states[task] not in ("success", "running", "failed"), (task, states[task])
    # Nothing was trained or published: no MLflow run, no ml.* row.
    assert _mlflow_runs(warehouse) == 0
    with connect(warehouse) as conn:
        published = {t: n for t, n in table_counts(conn, ("ml",)).items() if n}
        # and no night's tests are recorded as passed: the next night tests these rows again
        assert conn.execute("select count(*) from audit.data_test_runs").fetchone()[0] == 0
    assert published == {}
