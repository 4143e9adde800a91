"""Segmentation maths on a synthetic customer_features frame with planted segments (no database needed).

The frame mimics ``ml/ingest/generator.py``'s behavioural segments as they appear in ``marts.customer_features``
(recency, tenure, orders, spend, basket, category taste); each customer's planted segment is known.
"""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from ml.errors import CrmError
from ml.segmentation import (
    SegmentationInputError,
    name_segment,
    plot_k_selection,
    plot_segment_profiles,
    segment_customers,
)

# name: (share, recency_days median, tenure_days median, orders median, aov median, top category)
PLANTED = {
    "Loyal big spenders": (0.15, 12, 900, 30, 160.0, 1),
    "Regular shoppers": (0.25, 35, 700, 10, 45.0, 2),
    "One-time buyers": (0.30, 400, 420, 1, 30.0, 3),
    "New customers": (0.15, 20, 40, 2, 55.0, 4),
    "Lapsed spenders": (0.15, 500, 1100, 8, 120.0, 5),
}
FEATURE_CATEGORIES = {1: "Jewellery", 2: "Home & Kitchen", 3: "Books", 4: "Beauty", 5: "Electronics",
                      6: "Garden", 7: "Toys & Games", 8: "Grocery"}
ARI_THRESHOLD = 0.70  # well-separated planted behaviours: the champion must recover them clearly
# Generator → dbt → train_segmentation (1,500 customers, seed 7, kmeans/ward/som, k 3..6): measured ARI 0.398
# (ward_k5) with the behaviour profile (ml.segmentation.PROFILE_COLUMNS, category weight 8, square-root
# shares); 0.154 with every numeric column. The bar is the measurement minus 0.10.
# Why not ~1: 60 % of the planted customers (one-time buyers, occasional browsers, seasonal gift buyers) have
# one or two orders of about two lines in two years, so their discount share, price index, Q4 share and
# category shares are read off a handful of lines; occasional browsers and one-time buyers differ only in
# purchase rate and drop-out (1.5 vs 0.8 orders a year), which one order cannot reveal, and seasonal buyers
# differ from them mainly in December orders, which most of them did not place in the window. Even a
# supervised classifier given the labels (random forest, 5-fold CV, every numeric feature, 4,000 generated
# customers, seed 11) reaches only ARI 0.48 (accuracy 0.73), confusing exactly those three; an unsupervised
# ARI of 0.5 would be above what these features can carry.
GENERATOR_ARI_THRESHOLD = 0.30


def planted_features(n: int = 2000, seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    names = list(PLANTED)
    shares = np.array([PLANTED[s][0] for s in names])
    seg = rng.choice(len(names), n, p=shares / shares.sum())
    par = np.array([PLANTED[s][1:5] for s in names], dtype=float)[seg]
    top = np.array([PLANTED[s][5] for s in names])[seg]
    noise = lambda s: np.exp(rng.normal(0, s, n))  # noqa: E731 - log-normal spread within a segment
    recency = np.round(par[:, 0] * noise(0.45))
    tenure = np.maximum(recency, np.round(par[:, 1] * noise(0.3)))
    orders = np.maximum(1, np.round(par[:, 2] * noise(0.35)))
    aov = par[:, 3] * noise(0.35)
    shares_cat = rng.dirichlet(np.full(8, 0.6), n) * 0.7
    shares_cat[np.arange(n), top - 1] += 0.3
    f = pd.DataFrame(
        {
            "customer_id": [f"C{i:06d}" for i in range(n)],
            "as_of_date": pd.Timestamp("2025-12-31"),
            "recency_days": recency,
            "tenure_days": tenure,
            "n_orders": orders,
            "net_spend": orders * aov,
            "gross_spend": orders * aov * 1.05,
            "avg_order_value": aov,
            "avg_basket_size": 2 + rng.gamma(2, 0.5, n),
            "return_rate": rng.beta(1, 20, n),
            "avg_days_between_orders": np.where(orders > 1, (tenure - recency) / np.maximum(orders - 1, 1), np.nan),
            "n_web_events": 0.0,  # constant: must be dropped, not crash the scaler
            "gender": rng.choice(["M", "F", "U"], n),
        }
    )
    for k in range(8):
        f[f"category_share_{k + 1}"] = shares_cat[:, k]
    f["planted"] = np.array(names)[seg]
    return f


@pytest.fixture(scope="module")
def planted():
    return planted_features()


@pytest.fixture(scope="module")
def result(planted):
    return segment_customers(planted.drop(columns="planted"), k_range=range(3, 7), n_bootstrap=2,
                             category_names=FEATURE_CATEGORIES, fit_sample=1500, silhouette_sample=1500)


def test_recovers_planted_segments(planted, result):
    ari = adjusted_rand_score(planted["planted"], result.assignments["segment_id"])
    assert ari >= ARI_THRESHOLD, (ari, result.champion, result.candidates.to_string())


def test_every_family_is_a_candidate_with_all_metrics(result):
    c = result.candidates
    assert set(c["family"]) == {"kmeans", "gmm", "ward", "hdbscan", "som"}
    for metric in ["silhouette", "davies_bouldin", "calinski_harabasz", "stability_ari", "n_segments",
                   "min_segment_share", "fit_seconds", "rank_score", "eligible", "selected"]:
        assert metric in c.columns
    assert c["selected"].sum() == 1
    assert c.loc[c["selected"], "candidate"].item() == result.champion
    ok = c[c["failed"].isna()]
    assert ok["silhouette"].between(-1, 1).all() and (ok["davies_bouldin"] > 0).all()
    assert ok["stability_ari"].between(-1, 1).all()
    # The champion is the best mean rank among the eligible candidates.
    assert result.champion == c.loc[c["eligible"].astype(bool)].sort_values("rank_score")["candidate"].iloc[0]


def test_names_and_profiles_are_readable(planted, result):
    prof = result.profiles
    assert prof["share"].sum() == pytest.approx(1.0)
    assert prof["revenue_share"].sum() == pytest.approx(1.0)
    assert prof["n_customers"].sum() == len(planted)
    assert prof["segment_name"].is_unique
    # Segment 1 carries the most revenue; in this world it is the loyal big spenders, buying Jewellery.
    assert prof["revenue"].iloc[0] == prof["revenue"].max()
    top = prof.iloc[0]
    assert top["segment_name"].startswith("High-value loyal"), prof[["segment_name", "mean_net_spend"]]
    assert "Jewellery" in top["top_categories"]
    # The planted one-time buyers are named lapsed/low.
    one_time = result.assignments.loc[planted["planted"] == "One-time buyers", "segment_name"].mode()[0]
    assert one_time.startswith("Lapsed") and "big" not in one_time, one_time
    new = result.assignments.loc[planted["planted"] == "New customers", "segment_name"].mode()[0]
    assert new.startswith("New"), new


def test_model_assigns_new_customers_like_the_fit(planted, result):
    X = planted.drop(columns="planted")
    model = pickle.loads(pickle.dumps(result.model))  # it is registered as an MLflow pyfunc later
    assert (model.predict(X) == result.assignments["segment_id"].to_numpy()).all()
    one = X.iloc[[5]]
    assert model.predict(one)[0] == result.assignments["segment_id"].iloc[5]
    assert model.predict_names(one)[0] == result.assignments["segment_name"].iloc[5]
    # A NULL feature is imputed with the training median rather than failing.
    one_null = one.assign(avg_days_between_orders=np.nan)
    assert model.predict(one_null)[0] in set(result.profiles["segment_id"])
    with pytest.raises(SegmentationInputError, match="lacks the feature columns"):
        model.predict(one.drop(columns="n_orders"))


def test_large_population_path_measures_on_a_sample_and_assigns_everyone(planted, monkeypatch):
    """Above METRIC_ROWS the candidates are labelled and measured on a seeded sample and k-means is fitted on
    a sample (KMEANS_FIT_ROWS); the champion still assigns every customer and recovers the planted segments,
    and a SUBSET of customers is assigned by the model exactly as in the full assignment."""
    import ml.segmentation as seg

    monkeypatch.setattr(seg, "METRIC_ROWS", 800)
    monkeypatch.setattr(seg, "MINIBATCH_ABOVE", 1000)
    monkeypatch.setattr(seg, "KMEANS_FIT_ROWS", 900)
    X = planted.drop(columns="planted")
    res = segment_customers(X, families=["kmeans", "gmm"], k_range=range(4, 7), n_bootstrap=2, fit_sample=600,
                            silhouette_sample=500)
    assert res.params["metric_rows"] == 800 and len(res.assignments) == len(planted)
    assert adjusted_rand_score(planted["planted"], res.assignments["segment_id"]) >= ARI_THRESHOLD
    some = np.random.default_rng(0).choice(len(X), 137, replace=False)
    assert (res.model.predict(X.iloc[some]) == res.assignments["segment_id"].to_numpy()[some]).all()


def test_plots_are_written(planted, result, tmp_path):
    a = plot_k_selection(result.candidates, tmp_path / "k.png")
    b = plot_segment_profiles(planted, result.assignments, tmp_path / "profiles.png")
    for p in (a, b):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_name_rules():
    assert name_segment(r=0.9, f=0.9, m=0.9, t=0.8) == "High-value loyal"
    assert name_segment(r=0.1, f=0.5, m=0.9, t=0.8) == "Lapsed big spenders"
    assert name_segment(r=0.8, f=0.2, m=0.2, t=0.1) == "New low spenders"
    assert name_segment(r=0.8, f=0.2, m=0.2, t=0.1, category="Books") == "New low spenders · Books"


# ----------------------------------------------------------------------------------------------- bad input
def test_empty_frame_is_a_clear_error(planted):
    with pytest.raises(SegmentationInputError, match="empty"):
        segment_customers(planted.iloc[:0])


def test_single_customer_is_a_clear_error(planted):
    with pytest.raises(SegmentationInputError, match="at least 20 customers"):
        segment_customers(planted.drop(columns="planted").iloc[:1])


def test_identical_features_are_a_clear_error(planted):
    same = pd.concat([planted.drop(columns="planted").iloc[[0]]] * 50, ignore_index=True)
    same["customer_id"] = [f"X{i}" for i in range(50)]
    with pytest.raises(SegmentationInputError, match="identical features"):
        segment_customers(same)


def test_nan_features_are_imputed_and_all_nan_columns_dropped(planted):
    X = planted.drop(columns="planted").iloc[:300].copy()
    X.loc[X.index[::7], "avg_order_value"] = np.nan
    X["return_rate"] = np.nan
    res = segment_customers(X, families=["kmeans"], k_range=[3, 4], n_bootstrap=1)
    assert "return_rate" not in res.model.feature_columns
    assert len(res.assignments) == 300 and res.assignments["segment_id"].notna().all()


def test_infinite_values_and_unknown_family_are_clear_errors(planted):
    X = planted.drop(columns="planted").iloc[:100].copy()
    with pytest.raises(SegmentationInputError, match="Unknown segmentation families"):
        segment_customers(X, families=["kmeans", "spectral"])
    X.loc[X.index[3], "avg_order_value"] = np.inf  # a column of the behaviour profile
    with pytest.raises(CrmError, match="infinite"):
        segment_customers(X)


def test_duplicate_names_are_made_unique():
    from ml.segmentation import _deduplicate

    prof = pd.DataFrame({"top_categories": ["Books, Beauty", "Garden", "Books", "Books"]})
    out = _deduplicate(["Loyal regulars", "Loyal regulars", "Lapsed low spenders · Books", "Lapsed low spenders · Books"], prof)
    assert out == ["Loyal regulars · Books", "Loyal regulars · Garden",
                   "Lapsed low spenders · Books #1", "Lapsed low spenders · Books #2"]


# ------------------------------------------------------------------- end to end: generator → dbt → MLflow → ml
def test_train_segmentation_end_to_end(warehouse):
    """Generated CRM → dbt marts → train_segmentation: MLflow parent/child runs, registered model, published
    tables citing the run, and agreement with the generator's planted segments."""
    import mlflow
    from mlflow import MlflowClient

    from ml import registry
    from ml.dbt import dbt_build
    from ml.ingest.generator import GeneratorParams, generate
    from ml.segmentation import MODEL_NAME, score_segmentation, train_segmentation
    from ml.warehouse import connect, read_table

    with connect(warehouse) as conn:
        generate(conn, GeneratorParams(customers=1500, days=730, seed=7))
    dbt_build(warehouse, horizon_days=90)
    report = train_segmentation(warehouse, families=["kmeans", "ward", "som"], k_range=range(3, 7), n_bootstrap=2,
                                fit_sample=1500, silhouette_sample=1500)
    assert report.promoted and report.model_version == "1"

    with connect(warehouse) as conn:
        segments = read_table(conn, "ml.customer_segments")
        profiles = read_table(conn, "ml.segment_profiles")
        features = read_table(conn, "marts.customer_features")
        planted = read_table(conn, "audit.planted_customers")
    assert len(segments) == len(features) == report.rows_published["customer_segments"]
    assert set(segments["mlflow_run_id"]) == {report.run_id} == set(profiles["mlflow_run_id"])
    assert set(segments["segment_id"]) == set(profiles["segment_id"])

    registry.configure(warehouse)
    run = MlflowClient().get_run(report.run_id)
    assert run.data.tags["champion_candidate"] == report.champion_candidate
    children = mlflow.search_runs(experiment_ids=[run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{report.run_id}'")
    assert len(children) == 3 * 4 and "metrics.silhouette" in children.columns
    loaded = mlflow.pyfunc.load_model(registry.champion_uri(MODEL_NAME))
    assert (loaded.predict(features.head(20))["segment_id"].to_numpy() == segments.set_index("customer_id")
            .loc[features["customer_id"].head(20).astype(str), "segment_id"].to_numpy()).all()

    # Agreement with the generator's planted segments. PLANTED_ARI_NOTE below says what is measured and why
    # the ceiling is low: most planted customers have one or two orders, so their features cannot tell them apart.
    truth = planted.drop_duplicates("customer_id").set_index("customer_id")["segment"]
    joined = segments.assign(customer_id=segments["customer_id"].astype(str)).join(truth, on="customer_id", how="inner")
    ari = adjusted_rand_score(joined["segment"], joined["segment_id"])
    print(f"\ngenerator ARI {ari:.3f} champion {report.champion_candidate}")
    assert ari >= GENERATOR_ARI_THRESHOLD, (ari, report.champion_candidate)

    # The incremental night: assign today's customers with the champion, no training. The rows cite a new
    # scoring run and the champion's version, and match what the training run published.
    scored = score_segmentation(warehouse, orchestrator_run_id="manual__incremental")
    assert not scored.promoted and scored.reason.startswith("scored with champion"), scored.reason
    assert scored.model_version == "1" and scored.run_id != report.run_id
    assert scored.champion_candidate == report.champion_candidate
    assert scored.rows_published == report.rows_published
    with connect(warehouse) as conn:
        rescored = read_table(conn, "ml.customer_segments")
        reprofiled = read_table(conn, "ml.segment_profiles")
    assert set(rescored["mlflow_run_id"]) == {scored.run_id} == set(reprofiled["mlflow_run_id"])
    assert set(rescored["model_version"].astype(str)) == {"1"}
    tags = MlflowClient().get_run(scored.run_id).data.tags
    assert tags["kind"] == "scoring" and tags["orchestrator_run_id"] == "manual__incremental"
    assert tags["champion_version"] == "1"
    same = rescored.set_index("customer_id").loc[segments["customer_id"], ["segment_id", "segment_name"]]
    assert (same.to_numpy() == segments[["segment_id", "segment_name"]].to_numpy()).all()

    # A second run: the champion is re-scored on today's data and the decision is recorded.
    again = train_segmentation(warehouse, families=["kmeans"], k_range=[2], n_bootstrap=1, fit_sample=1500,
                               silhouette_sample=1500)
    version = MlflowClient().get_model_version(MODEL_NAME, "2")
    assert str(version.version) == "2" and again.reason
    assert registry.champion_version(MODEL_NAME) == ("2" if again.promoted else "1")


def test_score_segmentation_without_a_champion_is_a_clear_error(warehouse):
    from ml.segmentation import score_segmentation

    with pytest.raises(CrmError, match="No champion registered"):
        score_segmentation(warehouse)
