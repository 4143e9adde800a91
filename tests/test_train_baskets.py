"""Basket training end to end: generated CRM -> dbt marts -> rules + recommenders in MLflow -> published ml.*.

One small generated warehouse (1,500 customers, ~5k baskets) and one real MLflow SQLite store per module:
generation and dbt run once, the first training run is shared by the tests that only read its results.
"""

from __future__ import annotations

import itertools
import uuid

import pytest
from helpers_warehouse import generated_warehouse
from mlflow import MlflowClient

from ml import registry
from ml.baskets import BasketError, NoFrequentItemsets, TooManyItemsets
from ml.errors import CrmError
from ml.ingest.generator import GeneratorParams
from ml.publish import content_checksum, current_as_of
from ml.train_baskets import (
    EXPERIMENT,
    METRICS,
    MODEL_NAME,
    BasketTrainingResult,
    build_basket_marts,
    score_baskets,
    train_baskets,
)
from ml.warehouse import connect, read_table

GENERATED = GeneratorParams(customers=1500, days=730, seed=7)
AS_OF = GENERATED.resolved_end_date
# The thresholds the planted bundles are recovered at: a pair is frequent from 2 of ~5,000 baskets
# (the rarest bundle of this seed sits in 2), and any rule with lift > 1 counts as "goes together".
PARAMS = {"min_support": 0.0003, "category_min_support": 0.01, "min_confidence": 0.1, "min_lift": 1.0,
          "max_len": 3, "rule_recommender_min_support": 0.001}
MODEL = f"{MODEL_NAME}_{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def built(server_settings, tmp_path_factory):
    """Generated raw layer, the marts basket training reads, and the first training run."""
    root = tmp_path_factory.mktemp("baskets_mlflow")
    with generated_warehouse(server_settings, root, GENERATED) as settings:
        build_basket_marts(settings, AS_OF)
        first = train_baskets(settings, as_of=AS_OF, model_name=MODEL, **PARAMS)
        yield settings, first


def test_rules_recover_the_planted_bundles(built):
    settings, first = built
    with connect(settings) as conn:
        bundles = [ids for (ids,) in conn.execute("select product_ids from audit.planted_bundles order by bundle_id")]
        published = read_table(conn, "ml.association_rules")
    assert 5 <= len(bundles) <= 10
    rules = first.rules["product"]
    pairs = rules[rules["antecedent"].map(len) == 1].assign(item=lambda r: r["antecedent"].map(lambda a: a[0]))
    lift = pairs.set_index(["item", "consequent"])["lift"]
    product_rules = published[published["level"] == "product"].set_index(["antecedent", "consequent"])["lift"]
    for ids in bundles:
        for a, b in itertools.permutations(ids, 2):  # every planted pair, in both directions
            assert (a, b) in lift.index, f"planted pair {a} -> {b} (bundle {ids}) is not a rule"
            assert lift[(a, b)] > 1.0
            assert product_rules[(a, b)] == pytest.approx(lift[(a, b)])
    # both levels are published, every metric present
    assert set(published["level"]) == {"product", "category"}
    for column in ("support", "confidence", "lift", "leverage", "conviction"):
        assert published[column].notna().all(), column
    assert (published["confidence"] >= PARAMS["min_confidence"]).all()
    assert published["rule_text"].str.startswith("customers who buy ").all()


def test_every_recommender_is_a_child_run_with_the_same_metrics_and_the_run_is_complete(built):
    settings, first = built
    registry.configure(settings)
    client = MlflowClient()
    parent = client.get_run(first.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["as_of"] == AS_OF.isoformat()
    assert float(parent.data.params["min_support"]) == PARAMS["min_support"]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{first.run_id}'")
    names = {run.data.tags["mlflow.runName"]: run for run in children}
    assert set(names) == {"popularity", "rules", "item_knn", "user_knn", "content", "hybrid"}
    for name, run in names.items():
        assert set(METRICS) <= set(run.data.metrics), name
        assert run.data.metrics["hit_rate_at_10"] == pytest.approx(first.metrics.loc[name, "hit_rate_at_10"])
    # the protocol means something on this data: CF and the hybrid beat the popularity baseline
    assert names["hybrid"].data.metrics["hit_rate_at_10"] > names["popularity"].data.metrics["hit_rate_at_10"]
    datasets = {d.dataset.name for d in parent.inputs.dataset_inputs}
    assert f"marts.basket_lines@{AS_OF.isoformat()}" in datasets
    artifacts = {a.path for folder in ("rules", "plots") for a in client.list_artifacts(first.run_id, folder)}
    assert {"rules/product_rules.csv", "rules/category_rules.csv", "plots/recommender_metrics.png"} <= artifacts
    assert client.get_experiment(parent.info.experiment_id).name == EXPERIMENT


def test_published_tables_cite_an_existing_run_and_the_champion_alias_is_set(built):
    settings, first = built
    registry.configure(settings)
    client = MlflowClient()
    assert first.promoted and first.champion_version == first.model_version == "1"
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == first.model_version
    version = client.get_model_version(MODEL, first.model_version)
    assert version.run_id == first.run_id
    with connect(settings) as conn:
        for table in ("association_rules", "product_recommendations"):
            meta = conn.execute(
                f"select distinct mlflow_run_id, model_name, model_version, as_of from ml.{table}"  # noqa: S608
            ).fetchall()
            assert len(meta) == 1, table
            run_id, model_name, model_version, as_of = meta[0]
            assert client.get_run(run_id).info.status == "FINISHED"  # the run exists in the store
            assert (model_name, model_version, as_of) == (MODEL, first.model_version, AS_OF)
        recs = read_table(conn, "ml.product_recommendations")
        bought = read_table(conn, "marts.basket_lines")[["customer_id", "product_id"]].dropna().drop_duplicates()
    # every customer with a basket gets 10 ranked items, each with a reason, none already bought
    assert recs["customer_id"].nunique() == first.n_customers
    assert recs.groupby("customer_id")["rank"].agg(list).map(lambda r: r == list(range(1, 11))).all()
    assert recs["reason"].str.len().gt(0).all()
    assert recs.merge(bought, on=["customer_id", "product_id"]).empty


def test_rerun_of_the_same_as_of_publishes_identical_tables(built):
    settings, first = built
    with connect(settings) as conn:
        before = {t: content_checksum(conn, t) for t in ("association_rules", "product_recommendations")}
    second = train_baskets(settings, as_of=AS_OF, model_name=MODEL, **PARAMS)
    with connect(settings) as conn:
        after = {t: content_checksum(conn, t) for t in ("association_rules", "product_recommendations")}
        run_ids = {t: conn.execute(f"select distinct mlflow_run_id from ml.{t}").fetchall()  # noqa: S608
                   for t in before}
        history = conn.execute("select count(*) from ml.product_recommendations_history").fetchone()[0]
        current = conn.execute("select count(*) from ml.product_recommendations").fetchone()[0]
    assert after == before
    assert second.run_id != first.run_id
    assert all(ids == [(second.run_id,)] for ids in run_ids.values())
    assert history == current  # the same as_of replaced, never duplicated
    # the same recipe scores the same: a challenger that does not beat the champion leaves the alias alone
    assert second.model_version == "2" and not second.promoted
    assert second.champion_version == "1" and second.published_model_version == "1"
    registry.configure(settings)
    assert str(MlflowClient().get_model_version_by_alias(MODEL, "champion").version) == "1"


def test_bad_input_fails_clearly_before_any_run_or_publish(built):
    settings, _ = built
    registry.configure(settings)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs_before = len(client.search_runs([experiment.experiment_id]))
    with connect(settings) as conn:
        published_before = current_as_of(conn, "product_recommendations")
        checksum_before = content_checksum(conn, "association_rules")

    with pytest.raises(BasketError, match=r"no baskets to learn from.*2000-01-01"):
        train_baskets(settings, as_of=GENERATED.start_date.replace(year=2000, month=1, day=1), **PARAMS)
    with pytest.raises(NoFrequentItemsets, match=r"no frequent itemsets at min_support=0.9 .*lower min_support"):
        train_baskets(settings, as_of=AS_OF, **{**PARAMS, "min_support": 0.9})
    with pytest.raises(BasketError, match=r"no product rules at .*min_confidence=1.0.*lower"):
        train_baskets(settings, as_of=AS_OF, **{**PARAMS, "min_confidence": 1.0, "min_lift": 1e6})
    with pytest.raises(TooManyItemsets, match=r"gives [\d,]+ frequent itemsets, more than max_itemsets=100"):
        train_baskets(settings, as_of=AS_OF, max_itemsets=100, **PARAMS)

    assert len(client.search_runs([experiment.experiment_id])) == runs_before
    with connect(settings) as conn:
        assert current_as_of(conn, "product_recommendations") == published_before
        assert content_checksum(conn, "association_rules") == checksum_before


def test_score_only_publishes_the_champions_recommendations_without_retraining(built):
    """The incremental night's path: today's customers scored by the registered champion, no new version."""
    settings, first = built
    registry.configure(settings)
    client = MlflowClient()
    champion = str(client.get_model_version_by_alias(MODEL, "champion").version)
    versions_before = {v.version for v in client.search_model_versions(f"name = '{MODEL}'")}

    scored = score_baskets(settings, as_of=AS_OF, orchestrator_run_id="manual__score_only", model_name=MODEL)

    assert isinstance(scored, BasketTrainingResult)
    assert not scored.promoted and scored.promotion_reason.startswith("scored with champion")
    assert scored.model_version == scored.published_model_version == scored.champion_version == champion
    assert {v.version for v in client.search_model_versions(f"name = '{MODEL}'")} == versions_before
    run = client.get_run(scored.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["kind"] == "scoring"
    assert run.data.tags["as_of"] == AS_OF.isoformat()
    assert run.data.tags["champion_version"] == champion
    assert run.data.tags[registry.TAG_ORCHESTRATOR_RUN] == "manual__score_only"
    with connect(settings) as conn:
        meta = conn.execute("select distinct mlflow_run_id, model_name, model_version, as_of "
                            "from ml.product_recommendations").fetchall()
        recs = read_table(conn, "ml.product_recommendations")
        bought = read_table(conn, "marts.basket_lines")[["customer_id", "product_id"]].dropna().drop_duplicates()
        rules_run = conn.execute("select distinct mlflow_run_id from ml.association_rules").fetchall()
    assert meta == [(scored.run_id, MODEL, champion, AS_OF)]
    assert rules_run != [(scored.run_id,)]  # rules carried over from the training run, not re-mined
    assert recs["customer_id"].nunique() == scored.n_customers == first.n_customers
    # sorted: a table read without ORDER BY comes back in whatever order the replaced table holds
    assert recs.groupby("customer_id")["rank"].agg(sorted).map(lambda r: r == list(range(1, 11))).all()
    assert recs["reason"].str.len().gt(0).all()
    assert recs.merge(bought, on=["customer_id", "product_id"]).empty


def test_score_only_without_a_champion_is_a_clear_error(built):
    settings, _ = built
    with pytest.raises(CrmError, match=r"no champion recommender.*has no @champion"):
        score_baskets(settings, as_of=AS_OF, model_name=f"{MODEL}_never_trained")
