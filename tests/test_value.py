"""CLV regression and churn propensity on synthetic clv_training_set / clv_scoring_set frames (no database).

TEST HELPER: the frames are built from a simulated buy-'til-you-die transaction log (Poisson purchasing while
alive, dropout after each purchase, gamma spend per order) with the contract's column names and definitions;
the production path reads them from the dbt marts.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ml.errors import CrmError
from ml.value import (
    CHURN_METRICS,
    REGRESSION_METRICS,
    ValueInputError,
    calibration_table,
    fit_churn,
    fit_value,
    plot_calibration,
    plot_clv_deciles,
    plot_feature_importances,
    plot_pred_vs_actual,
    score_customers,
    top_decile_capture,
    value_metrics,
)

START = pd.Timestamp("2023-01-01")
AS_OF = pd.Timestamp("2025-03-31")
HORIZON = 90


def simulate_transactions(n: int = 2500, seed: int = 3) -> pd.DataFrame:
    """BTYD world: first purchase in the first 500 days, rate λ ~ Gamma, dropout p ~ Beta after each order."""
    rng = np.random.default_rng(seed)
    first = rng.uniform(0, 500, n)
    lam = rng.gamma(1.2, 1 / 40, n)  # orders per day while alive (mean one order every ~33 days)
    p_drop = rng.beta(1.0, 5.0, n)
    mean_value = np.exp(rng.normal(3.6, 0.5, n))
    end = (AS_OF - START).days + HORIZON + 1
    t = first.copy()
    alive = np.ones(n, bool)
    rows = [(np.arange(n), t.copy())]
    for _ in range(200):  # vectorised over customers, one purchase index at a time
        t = t + rng.exponential(1 / lam)
        alive &= t < end
        if not alive.any():
            break
        rows.append((np.flatnonzero(alive), t[alive].copy()))
        alive &= rng.random(n) >= p_drop
    cust = np.concatenate([r[0] for r in rows])
    day = np.concatenate([r[1] for r in rows])
    value = rng.gamma(4.0, mean_value[cust] / 4.0)
    return pd.DataFrame({"customer_id": [f"C{c:05d}" for c in cust], "date": START + pd.to_timedelta(np.floor(day), unit="D"),
                         "value": np.round(value, 2)})


def features_at(tx: pd.DataFrame, cutoff: pd.Timestamp) -> pd.DataFrame:
    """customer_features numeric columns at ``cutoff`` (an order = a customer's purchases of one day)."""
    orders = tx[tx["date"] <= cutoff].groupby(["customer_id", "date"], as_index=False)["value"].sum()
    g = orders.groupby("customer_id")
    first, last, n = g["date"].min(), g["date"].max(), g.size()
    spend = g["value"].sum()
    f = pd.DataFrame({
        "recency_days": (cutoff - last).dt.days, "tenure_days": (cutoff - first).dt.days, "n_orders": n,
        "net_spend": spend, "gross_spend": spend, "avg_order_value": spend / n,
        "avg_days_between_orders": ((last - first).dt.days / (n - 1)).where(n > 1),
    }).astype(float)
    f.index.name = "customer_id"
    return f.reset_index()


def training_set(tx: pd.DataFrame, snapshots: int = 3) -> pd.DataFrame:
    parts = []
    for s in range(1, snapshots + 1):
        cutoff = AS_OF - pd.Timedelta(days=s * HORIZON)
        f = features_at(tx, cutoff)
        window = tx[(tx["date"] > cutoff) & (tx["date"] <= cutoff + pd.Timedelta(days=HORIZON))]
        f["future_spend"] = f["customer_id"].map(window.groupby("customer_id")["value"].sum()).fillna(0.0).to_numpy()
        f["has_future_purchase"] = f["future_spend"] > 0
        f.insert(1, "snapshot", s)
        f.insert(2, "feature_cutoff_date", cutoff)
        f.insert(3, "horizon_days", float(HORIZON))
        parts.append(f)
    return pd.concat(parts, ignore_index=True)


def scoring_set(tx: pd.DataFrame) -> pd.DataFrame:
    f = features_at(tx, AS_OF)
    f.insert(1, "feature_cutoff_date", AS_OF)
    f.insert(2, "horizon_days", float(HORIZON))
    return f


@pytest.fixture(scope="module")
def tx():
    return simulate_transactions()


@pytest.fixture(scope="module")
def train(tx):
    return training_set(tx)


@pytest.fixture(scope="module")
def clv(train):
    return fit_value(train)


@pytest.fixture(scope="module")
def churn(train):
    return fit_churn(train)


# ------------------------------------------------------------------------------------------------ metrics
def test_metric_definitions_on_a_hand_example():
    y = np.array([100.0, 0, 0, 0, 0, 0, 0, 0, 0, 50.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 50.0])
    p = np.zeros(20)
    p[9], p[19] = 5.0, 4.0  # the top 10 % (2 customers) by prediction are customers 9 and 19
    assert top_decile_capture(y, p) == pytest.approx(0.5)
    m = value_metrics(y, p)
    assert list(m) == list(REGRESSION_METRICS)
    assert m["total_spend_error"] == pytest.approx(9 / 200 - 1)
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((y - p) ** 2)))
    assert value_metrics(y, np.zeros(20))["spearman"] == 0.0  # constant prediction: no ranking information


# -------------------------------------------------------------------------------------------------- CLV
def test_clv_beats_all_zero_and_linear_on_temporal_holdout(clv):
    m = clv.metrics
    assert set(REGRESSION_METRICS) <= set(m.columns)
    assert {"all_zero", "rate_extrapolation", "linear_regression", "random_forest", "hist_gbm_poisson"} <= set(m.index)
    assert m.loc[m["kind"] == "model", list(REGRESSION_METRICS)].notna().all().all()
    champ = m.loc[clv.champion]
    assert clv.champion != "linear_regression"
    assert champ["rmse"] < m.loc["all_zero", "rmse"]
    assert champ["rmse"] < m.loc["linear_regression", "rmse"]
    assert champ["top_decile_capture"] > m.loc["linear_regression", "top_decile_capture"] - 0.02
    assert champ["top_decile_capture"] > 0.3  # random ranking would capture ~0.1
    assert abs(champ["total_spend_error"]) < 0.3
    # validated on snapshot 1 only, trained on older snapshots
    assert clv.params["n_valid"] == len(clv.validation)


def test_churn_model_ranks_clearly_better_than_chance(churn):
    m = churn.metrics
    assert set(CHURN_METRICS) <= set(m.columns)
    champ = m.loc[churn.champion]
    assert champ["roc_auc"] > 0.7
    assert champ["brier"] < m.loc["base_rate", "brier"]
    assert champ["pr_auc"] > champ["churn_rate"]
    cal = calibration_table(churn.validation["actual"], churn.validation[churn.champion])
    assert len(cal) >= 5 and cal["observed_rate"].between(0, 1).all()


def test_scores_for_the_scoring_set_and_a_single_customer(tx, clv, churn):
    scoring = scoring_set(tx)
    scores = score_customers(scoring, clv.model, churn.model)
    assert len(scores) == len(scoring) and scores["customer_id"].is_unique
    assert (scores["predicted_spend"] >= 0).all() and scores["churn_probability"].between(0, 1).all()
    assert set(scores["value_decile"]) == set(range(1, 11))
    # Higher deciles hold higher predictions.
    assert scores.groupby("value_decile")["predicted_spend"].mean().is_monotonic_increasing
    # One customer alone (too few to refit BG/NBD): the parameters learnt at training time are used.
    one = score_customers(scoring.iloc[[0]], clv.model, churn.model)
    assert np.isfinite(one["predicted_spend"]).all() and one["churn_probability"].between(0, 1).all()
    # A NULL feature (e.g. avg_days_between_orders of a one-order customer) is handled by the models.
    assert np.isfinite(clv.model.predict(scoring.iloc[:50].assign(avg_order_value=np.nan))).all()


def test_a_subset_of_customers_scores_as_in_the_full_scoring(tx, clv, churn):
    """Incremental nights re-score only the customers touched: with the population's BTYD parameters and
    decile edges, a subset gets exactly the scores and deciles it has in the full scoring."""
    from ml.value import value_decile_edges

    scoring = scoring_set(tx)
    params = clv.model.btyd_params
    full = score_customers(scoring, clv.model, churn.model, btyd_params=params)
    edges = value_decile_edges(full["predicted_spend"])
    some = np.sort(np.random.default_rng(1).choice(len(scoring), 300, replace=False))
    sub = score_customers(scoring.iloc[some], clv.model, churn.model, btyd_params=params, decile_edges=edges)
    np.testing.assert_allclose(sub["predicted_spend"], full["predicted_spend"].to_numpy()[some], rtol=1e-9)
    np.testing.assert_allclose(sub["churn_probability"], full["churn_probability"].to_numpy()[some], rtol=1e-9)
    whole = score_customers(scoring, clv.model, churn.model, btyd_params=params, decile_edges=edges)
    assert (sub["value_decile"].to_numpy() == whole["value_decile"].to_numpy()[some]).all()
    # the population's deciles by edges agree with its rank deciles but for ties at the edges
    assert (whole["value_decile"] == full["value_decile"]).mean() > 0.95


def test_scores_do_not_depend_on_the_order_the_rows_arrive_in(tx, clv, churn):
    """A table rebuilt by dbt comes back from the database in another row order. The BG/NBD fit on the
    scoring cross-section must give bit-identical scores anyway, or a rerun of a night publishes different
    tables (seen: churn probabilities differing at 1e-10 after a rerun)."""
    scoring = scoring_set(tx)
    shuffled = scoring.sample(frac=1.0, random_state=7).reset_index(drop=True)
    first = score_customers(scoring, clv.model, churn.model).set_index("customer_id").sort_index()
    again = score_customers(shuffled, clv.model, churn.model).set_index("customer_id").sort_index()
    for column in ("predicted_spend", "churn_probability", "value_decile"):
        assert (first[column].to_numpy() == again[column].to_numpy()).all(), column


def test_btyd_boosted_with_near_zero_bases_stays_finite_and_sane(train):
    """Buyers to whom BG/NBD gives ~0 expected spend made the Poisson correction's leaf steps explode (RMSE =
    inf fitted on 500k rows of the 1M frame): the base is floored at a share of the mean label."""
    import ml.value as value

    prepared = value.prepare_training(train)
    fit_rows, valid = value.temporal_split(prepared.frame)
    feats = value.numeric_feature_columns(prepared.frame)
    X, y = fit_rows[feats].astype(float), fit_rows["future_spend"].to_numpy(float)
    buyers = np.flatnonzero(y > 0)
    X.iloc[np.random.default_rng(0).choice(buyers, len(buyers) // 2, replace=False), X.columns.get_loc("btyd_expected_spend")] = 1e-9
    Xv, yv = valid[feats].astype(float), valid["future_spend"].to_numpy(float)
    Xv.iloc[::3, Xv.columns.get_loc("btyd_expected_spend")] = 1e-9
    model = value.BtydBoostedRegressor().fit(X, y)
    assert model.base_floor_ == pytest.approx(value.BASE_FLOOR_SHARE * np.clip(y, 0, None).mean())
    pred = model.predict(Xv)
    assert np.isfinite(pred).all()
    assert value_metrics(yv, pred)["rmse"] < 1.5 * value_metrics(yv, np.zeros_like(yv))["rmse"]


def test_btyd_likelihoods_by_distinct_values_equal_the_per_customer_formulas():
    """The BG/NBD and Gamma-Gamma fits evaluate their special functions once per distinct day count and
    gather them; every customer's log-likelihood must equal the per-customer formula to the last bit (so the
    optimiser's path and the fitted parameters are unchanged)."""
    from ml.btyd import BetaGeoFitter, GammaGammaFitter

    rng = np.random.default_rng(5)
    t_cal = rng.integers(1, 700, 20_000).astype(float) * 0.0137  # whole days on the fit's scaled unit
    x = rng.poisson(rng.gamma(0.8, 3.0, t_cal.size)).astype(float)
    tx = np.where(x > 0, np.floor(rng.uniform(0, 1, t_cal.size) * t_cal / 0.0137) * 0.0137, 0.0)
    for params in ([0.24, 4.4, 0.79, 2.4], [1.7, 0.3, 1.9, 11.0], [0.01, 90.0, 0.05, 0.2]):
        fast = BetaGeoFitter._loglik_terms(x, tx, t_cal)(np.array(params))
        assert np.array_equal(fast, BetaGeoFitter._loglik(np.array(params), x, tx, t_cal))
    rep, ms = x[x > 0], np.exp(rng.normal(0, 0.6, int((x > 0).sum())))
    for params in ((6.2, 3.9, 15.4), (0.4, 1.2, 0.03)):
        assert np.array_equal(GammaGammaFitter._loglik_terms(rep, ms)(params), GammaGammaFitter._loglik(params, rep, ms))


def test_the_forest_candidate_caps_the_rows_each_tree_draws():
    """Below its cap the forest is the former imputer + RandomForestRegressor pipeline, prediction for
    prediction; above it each tree draws max_rows_per_tree rows (the forest was ~70 % of fit_value at 150k
    selection rows)."""
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline

    from ml.value import SubsampledForestRegressor

    rng = np.random.default_rng(2)
    X = pd.DataFrame(rng.normal(size=(3000, 6)), columns=[f"f{i}" for i in range(6)])
    X.loc[X.index[::7], "f2"] = np.nan
    y = np.exp(X["f0"].to_numpy()) + rng.gamma(1.0, 1.0, len(X))
    old = make_pipeline(
        SimpleImputer(strategy="median", keep_empty_features=True),
        RandomForestRegressor(n_estimators=12, min_samples_leaf=20, max_features=0.5, max_samples=0.5, n_jobs=1,
                              random_state=0),
    ).fit(X, y)
    same = SubsampledForestRegressor(n_estimators=12, max_rows_per_tree=10**9).fit(X, y)
    assert np.array_equal(same.predict(X), old.predict(X))
    capped = SubsampledForestRegressor(n_estimators=12, max_rows_per_tree=500).fit(X, y)
    assert {t.tree_.weighted_n_node_samples[0] for t in capped.forest_.estimators_} == {500.0}
    assert np.isfinite(capped.predict(X)).all()


def test_the_blend_reuses_its_fitted_components(clv):
    """The default blend is the mean of candidates already fitted on the same rows (not refitted)."""
    v = clv.validation
    np.testing.assert_allclose(v["blend_glm_gbm_btyd"], v[["tweedie_glm", "hist_gbm_poisson", "btyd_boosted_poisson"]].mean(axis=1))
    parts = clv.metrics.loc[["tweedie_glm", "hist_gbm_poisson", "btyd_boosted_poisson"], "fit_seconds"].sum()
    assert clv.metrics.loc["blend_glm_gbm_btyd", "fit_seconds"] == pytest.approx(parts)


def test_plots_are_written(clv, churn, tmp_path):
    v = clv.validation
    paths = [
        plot_clv_deciles(v["actual"], v[clv.champion], tmp_path / "deciles.png"),
        plot_pred_vs_actual(v["actual"], v[clv.champion], tmp_path / "scatter.png"),
        plot_feature_importances(clv.feature_importances, tmp_path / "imp.png"),
        plot_calibration(calibration_table(churn.validation["actual"], churn.validation[churn.champion]), tmp_path / "cal.png"),
    ]
    for p in paths:
        assert p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 3000
    assert clv.feature_importances["importance"].iloc[0] > 0


def test_large_inputs_are_fitted_on_a_bounded_sample_and_btyd_is_prepared_once(train, monkeypatch):
    """Above the row caps the candidates see a seeded sample; the champion is re-scored on exactly the rows
    the challenger was validated on; one prepared frame (BTYD fitted once) serves CLV and churn."""
    import ml.value as value

    monkeypatch.setattr(value, "MAX_FIT_ROWS", 1000)
    monkeypatch.setattr(value, "MAX_SELECT_ROWS", 1000)
    monkeypatch.setattr(value, "MAX_VALID_ROWS", 800)
    prepared = value.prepare_training(train)
    assert set(value.BTYD_COLUMNS) <= set(prepared.frame.columns) and prepared.btyd_params is not None
    glm = {"tweedie_glm": value.regression_candidates()["tweedie_glm"]}
    clv = value.fit_value(prepared, candidates=glm)
    churn = value.fit_churn(prepared)
    assert clv.params["n_train"] == 1000 and clv.params["n_valid"] == 800 == len(clv.validation)
    assert churn.params["n_train"] == 1000 and len(churn.validation) == 800
    rows = value.validation_rows(prepared)
    assert (rows["customer_id"].to_numpy() == clv.validation["customer_id"].to_numpy()).all()
    assert clv.model.btyd_params is prepared.btyd_params is churn.model.btyd_params


# ------------------------------------------------------------------------------------------------ bad input
def test_empty_training_set_is_a_clear_error(train):
    with pytest.raises(ValueInputError, match="empty"):
        fit_value(train.iloc[:0])


def test_one_snapshot_cannot_be_validated_temporally(train):
    with pytest.raises(ValueInputError, match="training_snapshots"):
        fit_value(train[train["snapshot"] == 1], use_btyd=False)


def test_null_labels_and_missing_columns_are_clear_errors(train):
    bad = train.copy()
    bad.loc[bad.index[:3], "future_spend"] = np.nan
    with pytest.raises(ValueInputError, match="NULL future_spend"):
        fit_value(bad)
    with pytest.raises(ValueInputError, match="lacks the contract columns"):
        fit_value(train.drop(columns="tenure_days"))


def test_churn_with_one_class_is_a_clear_error(train):
    everyone_buys = train.assign(future_spend=10.0, has_future_purchase=True)
    with pytest.raises(ValueInputError, match="both buyers and non-buyers"):
        fit_churn(everyone_buys, use_btyd=False)


def test_identical_features_give_a_documented_flat_prediction():
    """All customers alike: no model can rank them; the fit succeeds and predicts (nearly) one value."""
    rows = []
    for s in (1, 2):
        rows.append(pd.DataFrame({
            "customer_id": [f"C{i}" for i in range(300)], "snapshot": s,
            "feature_cutoff_date": AS_OF - pd.Timedelta(days=s * HORIZON), "horizon_days": float(HORIZON),
            "recency_days": 10.0, "tenure_days": 100.0, "n_orders": 3.0, "net_spend": 90.0, "avg_order_value": 30.0,
            "future_spend": np.tile([0.0, 0.0, 60.0], 100), "has_future_purchase": np.tile([False, False, True], 100),
        }))
    res = fit_value(pd.concat(rows, ignore_index=True))
    pred = res.validation[res.champion].to_numpy()
    assert np.isfinite(pred).all() and np.ptp(pred) < 1e-6 * max(1.0, abs(pred).max())
    assert pred.mean() == pytest.approx(20.0, rel=0.05)  # the mean spend: the best flat prediction


# ------------------------------------------------------------------- end to end: generator → dbt → MLflow → ml
def test_train_value_end_to_end(warehouse):
    """Generated CRM → dbt marts (3 snapshots) → train_value: child runs with identical metric names,
    champion beats all-zero and linear on the temporal holdout, ml.customer_scores cites the run."""
    import mlflow
    from mlflow import MlflowClient

    from ml import registry
    from ml.dbt import dbt_build
    from ml.ingest.generator import GeneratorParams, generate
    from ml.value import CLV_MODEL_NAME, score_value, train_value
    from ml.warehouse import connect, read_table

    with connect(warehouse) as conn:
        generate(conn, GeneratorParams(customers=1500, days=730, seed=7))
    dbt_build(warehouse, horizon_days=90, training_snapshots=3)
    report = train_value(warehouse)
    assert report.clv_promoted and report.churn_promoted

    with connect(warehouse) as conn:
        scores = read_table(conn, "ml.customer_scores")
        scoring = read_table(conn, "marts.clv_scoring_set")
    assert len(scores) == len(scoring) == report.rows_published
    assert set(scores["mlflow_run_id"]) == {report.run_id}
    assert scores["churn_probability"].between(0, 1).all() and (scores["predicted_spend"] >= 0).all()

    registry.configure(warehouse)
    run = MlflowClient().get_run(report.run_id)
    children = mlflow.search_runs(experiment_ids=[run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{report.run_id}'")
    clv_children = children[children["tags.family"] == "clv"].set_index("tags.mlflow.runName")
    for metric in REGRESSION_METRICS:
        assert clv_children[f"metrics.{metric}"].notna().all(), metric  # same names on every candidate
    champ = clv_children.loc[f"clv/{report.clv_champion}"]
    assert champ["metrics.rmse"] < clv_children.loc["clv/all_zero", "metrics.rmse"]
    assert champ["metrics.rmse"] <= clv_children.loc["clv/linear_regression", "metrics.rmse"]
    churn_children = children[children["tags.family"] == "churn"].set_index("tags.mlflow.runName")
    assert churn_children.loc[f"churn/{report.churn_champion}", "metrics.roc_auc"] > 0.6
    assert registry.champion_version(CLV_MODEL_NAME) == report.clv_version == "1"

    # The incremental night: score today's customers with the champions, no training. The published rows cite
    # a new scoring run (not the training run) and the champion versions; same models, same marts → same scores.
    scored = score_value(warehouse, orchestrator_run_id="manual__incremental")
    assert not scored.clv_promoted and not scored.churn_promoted
    assert scored.reason.startswith("scored with champion"), scored.reason
    assert (scored.clv_version, scored.churn_version) == ("1", "1") and scored.run_id != report.run_id
    assert scored.clv_champion == report.clv_champion and scored.rows_published == len(scoring)
    with connect(warehouse) as conn:
        rescored = read_table(conn, "ml.customer_scores")
    assert set(rescored["mlflow_run_id"]) == {scored.run_id} and set(rescored["model_version"].astype(str)) == {"1"}
    tags = MlflowClient().get_run(scored.run_id).data.tags
    assert tags["kind"] == "scoring" and tags["orchestrator_run_id"] == "manual__incremental"
    assert tags["clv_champion_version"] == "1" and tags["as_of"] == str(rescored["as_of"].iloc[0])[:10]
    before = scores.set_index("customer_id")[["predicted_spend", "churn_probability"]].astype(float)
    after = rescored.set_index("customer_id")[["predicted_spend", "churn_probability"]].astype(float).loc[before.index]
    np.testing.assert_allclose(after.to_numpy(), before.to_numpy(), rtol=1e-9, atol=1e-9)


def test_score_value_without_a_champion_is_a_clear_error(warehouse):
    from ml.value import score_value

    with pytest.raises(CrmError, match="No champion registered"):
        score_value(warehouse)


@pytest.mark.parametrize(("preset", "spin_count"), [(None, "0"), ("ACTIVE", "30000000000")])
def test_openmp_threads_sleep_when_idle_unless_the_deployment_says_otherwise(preset, spin_count):
    """Importing our code sets OMP_WAIT_POLICY=PASSIVE before scikit-learn loads its OpenMP runtime, so idle
    threads of a scoring task do not spin on cores the night's other tasks need; libgomp's own report of its
    settings (OMP_DISPLAY_ENV) shows what it took. A policy set by the deployment is kept."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"OMP_DISPLAY_ENV": "VERBOSE"}
    if preset is not None:
        env["OMP_WAIT_POLICY"] = preset
    done = subprocess.run([sys.executable, "-c", "import ml.value"], env=env, capture_output=True, text=True,
                          check=True, timeout=120)
    report = done.stdout + done.stderr
    assert "OPENMP DISPLAY ENVIRONMENT" in report  # scikit-learn's OpenMP runtime was loaded by the import
    assert f"GOMP_SPINCOUNT = '{spin_count}'" in report
