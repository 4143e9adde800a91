"""The nightly run's steps: one function per DAG task, each a thin call into the module that does the work.

The DAG file (``dags/crm_nightly.py``) only wires these; tests and ``crm`` can call them directly.
Every step takes the :class:`~ml.config.Settings` and the validated run parameters as a plain dict (what
travels between Airflow tasks through XCom) and returns a small JSON-safe dict for the run summary.

Idempotence per ``as_of``: loads are idempotent by content hash, dbt rebuilds its tables, publish
replaces the rows of the same ``as_of``, so a rerun or a backfill of a date never duplicates anything.

What a scoring night (retrain policy says "score") recomputes, per published table, and why:

* ``ml.product_recommendations``: only customers whose basket lines up to ``as_of`` changed since the
  published table (``ml.train_baskets.score_baskets``: a per-customer fingerprint of the lines the
  recommender reads, compared in SQL); the others' rows are carried forward server-side, saying which run and
  as_of scored them (``scored_run_id``, ``scored_as_of``). Exact, not an approximation: a customer's top-10 is
  a function of the champion's fitted state and of that customer's own lines only. A changed champion, a
  training night or a backfill re-scores everyone. This was the expensive table (top-10 with reasons for
  every customer: minutes at 1M).
* ``ml.customer_segments`` / ``ml.segment_profiles``: every customer, every night. The segmentation
  features include recency and tenure, which move with ``as_of`` for everyone: a customer who buys nothing
  drifts towards the lapsed segments, which is exactly what campaigns target, so carrying segments forward
  would leave them stale. Assignment is a nearest-centroid lookup (cheap); profiles are population means.
* ``ml.customer_scores`` (CLV, churn): every customer, every night. Expected spend and churn depend on
  recency and tenure (as_of) for everyone, the BG/NBD features are fitted on tonight's cross-section and
  the value decile is a rank over the whole population.
* ``ml.association_rules``: not republished on a scoring night (the champion's rules; see score_baskets).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from ml.config import DBT_TRAINING_SELECTOR, Settings
from ml.memory import use_system_allocator
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
        tests = data_test_scope(conn, params)
    log.info("as_of for this run: %s", as_of)
    log.info("dbt data tests read %s", tests["reason"])
    variables = {**dbt_vars(params, as_of), **({"tested_through": tests["tested_through"]} if tests["tested_through"] else {})}
    return {**loaded, "as_of": as_of.isoformat(), "data_tests": tests, "dbt_vars": variables}


# Under data_tests=auto every row is tested at least this often; the nights between test their new rows.
FULL_DATA_TESTS_EVERY_DAYS = 7
# The staged tables whose newest load time a passing night's tests covered (each indexed on _loaded_at).
STAGED_TABLES = ("stg_crm__customers", "stg_crm__products", "stg_crm__orders", "stg_crm__order_lines",
                 "stg_crm__web_events")


def data_test_scope(conn, params: Mapping[str, Any]) -> dict[str, Any]:
    """Which rows tonight's dbt data tests read: every row (``scope`` "all"), or on tables with a load time the
    rows loaded after ``tested_through`` less the incremental look-back (``scope`` "new": the dbt var of the
    same name, read by the macro ``postgres__get_where_subquery``).

    Every row on a full refresh, under ``data_tests="all"``, when no earlier night's tests passed (nothing
    recorded in ``audit.data_test_runs``, e.g. the first night) and when the last night that tested every
    row was recorded :data:`FULL_DATA_TESTS_EVERY_DAYS` days ago or more. Otherwise the newest load time the
    recorded nights covered: a night whose tests failed records nothing, so the next night tests its rows too.
    """
    def every_row(reason: str) -> dict[str, Any]:
        return {"scope": "all", "tested_through": None, "reason": f"every row ({reason})"}

    if params.get("full_refresh"):
        return every_row("full refresh")
    if params.get("data_tests", "auto") == "all":
        return every_row("data_tests=all")
    tested_through, last_full, full_due = conn.execute(
        "select max(tested_through), max(recorded_at) filter (where scope = 'all'), "
        "coalesce(max(recorded_at) filter (where scope = 'all') <= now() - make_interval(days => %s), true) "
        "from audit.data_test_runs",
        (FULL_DATA_TESTS_EVERY_DAYS,),
    ).fetchone()
    if tested_through is None:
        return every_row("no earlier night's tests recorded")
    if full_due:
        return every_row(f"the last night that tested every row was recorded at {last_full}, "
                         f"{FULL_DATA_TESTS_EVERY_DAYS} days ago or more")
    return {"scope": "new", "tested_through": tested_through.isoformat(),
            "reason": f"the rows loaded after {tested_through.isoformat()} less the look-back (where a table has "
                      "a load time; every row of the others)"}


def record_data_tests(conn, as_of: date, scope: str) -> None:
    """After every dbt data test of the night passed: record how far the staged data's load times reached, so
    the next night tests the rows loaded after it (:func:`data_test_scope`)."""
    newest = " union all ".join(f"select max(_loaded_at) from staging.{t}" for t in STAGED_TABLES)  # noqa: S608
    conn.execute(
        f"insert into audit.data_test_runs (as_of, scope, tested_through) select %s, %s, max(m) from ({newest}) as t (m)",  # noqa: S608 (fixed names)
        (as_of, scope),
    )
    conn.commit()


# CLV temporal validation trains on older snapshots and validates on snapshot 1 (ml.value): two at least.
TRAINING_SNAPSHOTS = 2


def dbt_vars(params: Mapping[str, Any], as_of: date) -> dict[str, Any]:
    """The dbt vars of this run: always a concrete as_of, so every model of the run sees the same date."""
    return {"as_of": as_of.isoformat(), "horizon_days": int(params["horizon_days"]),
            "training_snapshots": TRAINING_SNAPSHOTS}


def dbt_runtime(settings: Settings, params: Mapping[str, Any], loaded: Mapping[str, Any]) -> dict[str, Any]:
    """What each Cosmos dbt task needs at run time and never at parse time: vars, the --full-refresh flag
    and the profile's connection variables (kept out of the serialized DAG, which must hold no secrets)."""
    from ml.dbt import dbt_env

    env = {k: v for k, v in dbt_env(settings).items() if k.startswith(("CRM_DBT_", "DBT_"))}
    return {"vars": dict(loaded["dbt_vars"]), "full_refresh": bool(params["full_refresh"]), "env": env}


# The marts training reads: an empty one means the run has nothing to learn from, which is an error.
# (marts.clv_training_set is not among them: it is built after this gate, and only when the value family
# retrains; see value_training_needed.)
REQUIRED_MARTS = ("marts.customer_features", "marts.basket_lines", "marts.clv_scoring_set",
                  "marts.dim_customers", "marts.dim_products")


def check_marts(settings: Settings, loaded: Mapping[str, Any]) -> dict[str, Any]:
    """Gate between dbt and training: the marts are built for this run's as_of and are not empty, and the
    MLflow tracking store is usable."""
    from ml.errors import CrmError
    from ml.warehouse import connect, table_counts

    with connect(settings) as conn:
        counts = table_counts(conn, ("marts",))
        built_as_of = conn.execute("select max(as_of_date) from marts.customer_features").fetchone()[0]
        empty = [t for t in REQUIRED_MARTS if counts.get(t, 0) == 0]
        if empty:
            raise CrmError(f"marts empty or missing after dbt build: {', '.join(empty)} (as_of {loaded['as_of']})")
        if built_as_of is None or built_as_of.isoformat() != loaded["as_of"]:
            raise CrmError(
                f"marts.customer_features is as of {built_as_of}, expected {loaded['as_of']}: "
                "the dbt build did not run with this run's as_of"
            )
        # every dbt task (models and their data tests) succeeded, or this task would not run
        record_data_tests(conn, built_as_of, (loaded.get("data_tests") or {}).get("scope", "all"))
    # The tracking store is opened (and a fresh SQLite one created) here, once: the three trainings start
    # in parallel and would otherwise race to create its tables. An unreachable store fails here, clearly,
    # before any training.
    from ml import registry

    registry.configure(settings)
    return {"as_of": loaded["as_of"], "marts": counts}


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
    latest = _latest_valid_order_date(conn)
    return min(latest, cutoff) if latest else cutoff


def _latest_valid_order_date(conn) -> date | None:
    """dbt's definition (``int_as_of.latest_valid_order_date``: skips sparse clock-error dates) when a
    previous build left its view; on the very first run, the latest order not stamped after its load."""
    has_view = conn.execute("select to_regclass('staging.int_as_of') is not null").fetchone()[0]
    if has_view:
        try:
            with conn.transaction():
                return conn.execute("select latest_valid_order_date from staging.int_as_of").fetchone()[0]
        except Exception as err:  # a view broken by a model change: the fallback below is still correct
            log.warning("staging.int_as_of unreadable (%s); using raw.orders", err)
    return conn.execute("select max(ordered_at)::date from raw.orders where ordered_at <= _loaded_at").fetchone()[0]


def train_baskets(settings: Settings, params: Mapping[str, Any], loaded: Mapping[str, Any], *,
                  orchestrator_run_id: str | None = None) -> dict[str, Any]:
    """Rules and recommenders: mine, compare, register, decide the champion, publish (ml.train_baskets);
    or, when the retrain policy keeps the champion, score with it (``score_baskets``)."""
    # freed memory goes back to the OS between the big steps (ml.memory): at 1M customers the other two
    # tasks peaked higher on the C heap than on Arrow's own pool, and do not need it
    use_system_allocator()
    from ml import train_baskets as module

    as_of = date.fromisoformat(loaded["as_of"])
    decision = _scorable(retrain_decision(settings, params, loaded, (module.MODEL_NAME,)), module, "score_baskets")
    if decision.retrain:
        result = module.train_baskets(
            settings,
            as_of=as_of,
            min_support=float(params["min_support"]),
            min_confidence=float(params["min_confidence"]),
            min_lift=float(params["min_lift"]),
            max_len=int(params["max_len"]),
            promotion_policy=params["promotion_policy"],
            orchestrator_run_id=orchestrator_run_id,
        )
    else:
        result = module.score_baskets(settings, as_of=as_of, orchestrator_run_id=orchestrator_run_id)
    return {
        "family": "baskets",
        **_decision_fields(settings, decision, result.run_id, loaded),
        "mlflow_run_id": result.run_id,
        "model_name": result.model_name,
        "challenger_version": result.model_version,
        "champion_version": result.champion_version,
        "promoted": bool(result.promoted),
        "reason": result.promotion_reason,
        "published": {name: int(getattr(r, "rows", 0) or 0) for name, r in result.reports.items()},
        # rows carried forward unchanged from the previous night (customers whose lines did not change)
        "carried": {name: int(getattr(r, "rows_carried", 0) or 0) for name, r in result.reports.items()},
        "n_itemsets": {k: int(v) for k, v in result.n_itemsets.items()},
        "n_baskets": int(result.n_baskets),
    }


def summarize(settings: Settings, params: Mapping[str, Any], loaded: Mapping[str, Any],
              marts: Mapping[str, Any], trainings: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The run summary: parameters, as_of, row counts of the marts and ml tables, each family's decision.

    Logged, returned (XCom, visible in the UI) and attached as ``run_summary.json`` to every MLflow run
    this nightly run produced, so the summary sits beside the models it describes.
    """
    import json

    from ml.warehouse import connect, table_counts

    with connect(settings) as conn:
        counts = table_counts(conn, ("marts", "ml"))
    summary = {
        "as_of": loaded["as_of"],
        "params": dict(params),
        "generated_demo_data": bool(loaded.get("generated")),
        "tables": counts,
        "trainings": [dict(t) for t in trainings if t],
    }
    text = json.dumps(summary, indent=2, default=str)
    log.info("nightly run summary:\n%s", text)
    run_ids = [t["mlflow_run_id"] for t in summary["trainings"] if t.get("mlflow_run_id")]
    if run_ids:
        from mlflow import MlflowClient

        from ml import registry

        registry.configure(settings)
        client = MlflowClient()
        for run_id in run_ids:
            client.log_text(run_id, text, "run_summary.json")
    return summary


def run_nightly(settings: Settings, conf: Mapping[str, Any] | None = None) -> int:
    """``crm run``: the whole nightly DAG once, end to end, in one process (``airflow dags test``), on the
    configured warehouse; then where the results are. Parameters are checked before Airflow starts."""
    import time

    from ml.airflow_env import dags_test, prepare
    from ml.warehouse import connect, ensure_warehouse, table_counts

    RunParams.from_mapping(conf)
    started = time.perf_counter()
    print(f"warehouse: {settings.warehouse.redacted()}", flush=True)
    ensure_warehouse(settings)
    print("preparing Airflow (metadata database, dbt manifest) ...", flush=True)
    env = prepare(settings)
    print("running the nightly DAG crm_nightly (airflow dags test) ...", flush=True)
    dags_test(settings, conf, env=env)
    with connect(settings) as conn:
        counts = table_counts(conn, ("marts", "ml"))
    print(f"\nnightly run done in {time.perf_counter() - started:.0f} s. Tables:")
    for table, n in counts.items():
        print(f"  {table:<40} {n:>12,} rows")
    print(f"\nMLflow: {settings.mlflow_tracking_uri}  (`crm ui` opens it)")
    for name, version in champion_versions(settings).items():
        print(f"  {name:<32} @champion = version {version}")
    return 0


def champion_versions(settings: Settings) -> dict[str, str]:
    """Registered model -> version holding the ``champion`` alias."""
    from mlflow import MlflowClient

    from ml import registry

    registry.configure(settings)
    out: dict[str, str] = {}
    for model in MlflowClient().search_registered_models():
        aliases = getattr(model, "aliases", {}) or {}
        if registry.CHAMPION_ALIAS in aliases:
            out[model.name] = str(aliases[registry.CHAMPION_ALIAS])
    return out


def train_segments(settings: Settings, params: Mapping[str, Any], loaded: Mapping[str, Any], *,
                   orchestrator_run_id: str | None = None) -> dict[str, Any]:
    """Segmentation: candidates (families × k), champion/challenger, publish (ml.segmentation); or, when the
    retrain policy keeps the champion, assign today's customers with it (``score_segmentation``)."""
    from ml import segmentation as module

    decision = _scorable(retrain_decision(settings, params, loaded, (module.MODEL_NAME,)), module,
                         "score_segmentation")
    if decision.retrain:
        report = module.train_segmentation(
            settings,
            orchestrator_run_id=orchestrator_run_id,
            policy=params["promotion_policy"],
            families=tuple(params["segmentation_families"]),
            k_range=range(int(params["k_min"]), int(params["k_max"]) + 1),
        )
    else:
        report = module.score_segmentation(settings, orchestrator_run_id=orchestrator_run_id)
    return {
        "family": "segmentation",
        **_decision_fields(settings, decision, report.run_id, loaded),
        "as_of": loaded["as_of"],
        "mlflow_run_id": report.run_id,
        "champion_candidate": report.champion_candidate,
        "challenger_version": report.model_version,
        "promoted": bool(report.promoted),
        "reason": report.reason,
        "published": {k: int(v) for k, v in report.rows_published.items()},
    }


def train_value(settings: Settings, params: Mapping[str, Any], loaded: Mapping[str, Any], *,
                orchestrator_run_id: str | None = None) -> dict[str, Any]:
    """CLV and churn: candidates with temporal validation, champion/challenger, publish (ml.value).
    The horizon is the marts' (dbt var ``horizon_days``, set from the run's parameters)."""
    from ml import value as module

    # Both models come from one training run; either one missing or stale retrains the pair.
    decision = _scorable(retrain_decision(settings, params, loaded, (module.CLV_MODEL_NAME, module.CHURN_MODEL_NAME)),
                         module, "score_value")
    if decision.retrain:
        check_training_set(settings, date.fromisoformat(loaded["as_of"]))
        report = module.train_value(settings, orchestrator_run_id=orchestrator_run_id,
                                    policy=params["promotion_policy"])
    else:
        report = module.score_value(settings, orchestrator_run_id=orchestrator_run_id)
    return {
        "family": "value",
        **_decision_fields(settings, decision, report.run_id, loaded),
        "as_of": loaded["as_of"],
        "mlflow_run_id": report.run_id,
        "clv_champion": report.clv_champion,
        "churn_champion": report.churn_champion,
        "clv_version": report.clv_version,
        "churn_version": report.churn_version,
        "promoted": {"clv": bool(report.clv_promoted), "churn": bool(report.churn_promoted)},
        "published": {"customer_scores": int(report.rows_published)},
    }


def value_training_needed(settings: Settings, params: Mapping[str, Any], loaded: Mapping[str, Any]) -> bool:
    """Whether tonight's value family retrains, so that its training marts (``DBT_TRAINING_SELECTOR``) must be
    built: on a scoring-only night nothing reads them, and at 1M customers they were the longest path of the
    incremental dbt build (the training snapshots, clv_training_set and its point-in-time test). The same
    decision ``train_value`` takes afterwards, from the same facts (the marts are built by then)."""
    from ml import value as module

    decision = _scorable(retrain_decision(settings, params, loaded, (module.CLV_MODEL_NAME, module.CHURN_MODEL_NAME)),
                         module, "score_value")
    log.info("value training marts (%s): %s", DBT_TRAINING_SELECTOR,
             "built tonight" if decision.retrain else "not needed tonight, the champions only score")
    return decision.retrain


def check_training_set(settings: Settings, as_of: date) -> None:
    """``marts.clv_training_set`` is tonight's: its newest snapshot's label window ends on ``as_of``.

    The value family retrains from it, and the nightly builds it only when value_training_needed says so: a
    training on a stale set (last week's, say) would register a champion of old data under tonight's date.
    """
    from ml.errors import CrmError
    from ml.warehouse import connect

    with connect(settings) as conn:
        exists = conn.execute("select to_regclass('marts.clv_training_set') is not null").fetchone()[0]
        ends = conn.execute(
            "select max(feature_cutoff_date + horizon_days) from marts.clv_training_set where snapshot = 1"
        ).fetchone()[0] if exists else None
    if ends != as_of:
        raise CrmError(
            f"marts.clv_training_set is not built for as_of {as_of} (its labels end on {ends}): the value "
            f"family retrains from it, so build it first (dbt build --select {DBT_TRAINING_SELECTOR}, with this "
            "run's vars)"
        )


# ---------------------------------------------------------------------------------------------------------
# Retrain or score (issue 7): the decision is ml.retrain_policy's; here, the facts it needs from the warehouse
# and from MLflow, and the record of what was done.
# ---------------------------------------------------------------------------------------------------------
# Metric logged on every training run by the nightly: the customers it was trained on (the policy compares it).
N_CUSTOMERS_METRIC = "nightly_n_customers"


def current_customers(settings: Settings) -> int:
    """Customers with a purchase on or before this run's as_of: the population every family models."""
    from ml.warehouse import connect

    with connect(settings) as conn:
        return int(conn.execute("select count(*) from marts.customer_features").fetchone()[0])


def champion_facts(model_names: tuple[str, ...]):
    """The champion of a family for the policy: its version, training as_of and customer count.

    A family with several models (value: CLV and churn) has a champion only if every model has one; the
    facts are the first model's (they were trained in the same run).
    """
    from mlflow import MlflowClient

    from ml import registry
    from ml.retrain_policy import ChampionFacts

    versions = [registry.champion_version(name) for name in model_names]
    if any(v is None for v in versions):
        return ChampionFacts(version=None)
    client = MlflowClient()
    run = client.get_run(client.get_model_version(model_names[0], versions[0]).run_id)
    # The model may be logged in a child run: the metric sits on the parent, the as_of tag on both.
    parent_id = run.data.tags.get("mlflow.parentRunId")
    parent = client.get_run(parent_id) if parent_id else run
    as_of = run.data.tags.get(registry.TAG_AS_OF) or parent.data.tags.get(registry.TAG_AS_OF)
    n = run.data.metrics.get(N_CUSTOMERS_METRIC, parent.data.metrics.get(N_CUSTOMERS_METRIC))
    return ChampionFacts(
        version=versions[0],
        trained_as_of=date.fromisoformat(as_of) if as_of else None,
        n_customers=int(n) if n is not None else None,
    )


def retrain_decision(settings: Settings, params: Mapping[str, Any], loaded: Mapping[str, Any],
                     model_names: tuple[str, ...]):
    """Retrain or score tonight, for the family whose registered models are ``model_names``."""
    from ml import registry
    from ml.retrain_policy import decide

    registry.configure(settings)
    decision = decide(
        str(params.get("retrain", "auto")),
        champion_facts(model_names),
        as_of=date.fromisoformat(loaded["as_of"]),
        n_customers=current_customers(settings),
        retrain_every_days=int(params.get("retrain_every_days", 7)),
    )
    log.info("%s: %s (%s)", "/".join(model_names), decision.action, decision.reason)
    return decision


def _scorable(decision, module, function: str):
    """A "score" decision needs the family's score-only function; a checkout without it trains instead
    (and says so) rather than failing the night."""
    if decision.retrain or hasattr(module, function):
        return decision
    from ml.retrain_policy import Decision

    return Decision(True, f"{decision.reason}; but {module.__name__}.{function} does not exist: retrained")


def _decision_fields(settings: Settings, decision, run_id: str | None, loaded: Mapping[str, Any]) -> dict[str, Any]:
    """The summary's record of the decision; a training run also gets the customer count it was trained on,
    which tomorrow's decision compares with."""
    n_customers = current_customers(settings)
    if decision.retrain and run_id:
        from mlflow import MlflowClient

        MlflowClient().log_metric(run_id, N_CUSTOMERS_METRIC, float(n_customers))
    return {"action": decision.action, "action_reason": decision.reason, "n_customers": n_customers}
