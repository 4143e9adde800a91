"""Customer value: CLV regression (spend over the next horizon) and churn / no-purchase propensity.

Pure maths over the contract frames (``marts.clv_training_set`` / ``marts.clv_scoring_set``): no database, no
MLflow. The caller (``train_value``) reads the marts, logs every candidate of :class:`ValueResult` as a child
run and publishes :func:`score_customers`.

Design choices, and why:

* **Temporal validation only.** Candidates are fitted on older snapshots and scored on a newer one
  (:func:`temporal_split`); a random split would leak the future of a customer into its own past.
* **Horizon-normalised targets.** Generic regressors learn spend *per day* of the horizon and multiply by the
  row's ``horizon_days`` at prediction (:class:`PerDayRegressor`). With the contract's constant horizon this
  changes nothing; when the training windows are shorter than the scoring window (CDNOW: labels inside the
  calibration period cover at most a few months, the holdout 273 days) it is what makes the scores usable.
* **BG/NBD as a feature and as an offset.** :func:`add_btyd_features` fits BG/NBD + Gamma-Gamma per cutoff
  (only data up to that cutoff) and adds the expected purchases / spend over the row's own horizon. The BTYD
  model knows how purchasing decays with the horizon; :class:`BtydBoostedRegressor` then learns a
  multiplicative correction to it with a Poisson gradient-boosting model (Poisson deviance on ``y / base``
  with weights ``base`` is exactly a Poisson model with offset ``log(base)``).
* **Zero-inflated spend.** Most customers spend nothing in a horizon; the tree candidates use Poisson loss,
  which models the mean of such a target without a log-transform bias. Negative net spend (returns larger
  than purchases) is clipped to 0 for the Poisson losses only.
* **Identical metric names** across every candidate and baseline (:func:`value_metrics`,
  :func:`churn_metrics`) so MLflow's compare view lines them up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn.base import BaseEstimator, RegressorMixin, clone
from sklearn.calibration import calibration_curve
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestRegressor,
)
from sklearn.impute import SimpleImputer
from sklearn.inspection import permutation_importance
from sklearn.linear_model import LinearRegression, LogisticRegression, TweedieRegressor
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from ml import tree_predict
from ml.btyd import BetaGeoFitter, BtydInputError, GammaGammaFitter
from ml.errors import CrmError

NON_FEATURE_COLUMNS = frozenset(
    {
        "customer_id",
        "snapshot",
        "feature_cutoff_date",
        "as_of_date",
        "future_spend",
        "has_future_purchase",
        # text columns of customer_features: not used by the value models
        "gender",
        "country",
        "acquisition_channel",
        # Behaviour-mix features added to the marts for segmentation (how a customer buys, not how much or
        # how often). On CDNOW's marts path the trees used avg_units_per_line to fit the short label windows
        # and the champion's 273-day top-decile capture fell from 0.519 to 0.512 (below BG/NBD's 0.516);
        # without them it is unchanged. They stay out of the value models until a benchmark shows a gain.
        "discount_line_share",
        "avg_price_index",
        "q4_spend_share",
        "avg_units_per_line",
    }
)
BTYD_COLUMNS = ("btyd_expected_purchases", "btyd_expected_avg_value", "btyd_expected_spend", "btyd_p_alive")
REGRESSION_METRICS = ("rmse", "mae", "r2", "spearman", "top_decile_capture", "total_spend_error")
CHURN_METRICS = ("roc_auc", "pr_auc", "brier", "log_loss", "churn_rate")
# BG/NBD needs a cross-section to fit; below this many customers a cutoff reuses the last fitted parameters.
MIN_BTYD_CUSTOMERS = 200
# BG/NBD + Gamma-Gamma have 4 + 3 scalar parameters: a random sample of 50k customers pins them down to
# well under 1 % (standard errors shrink as 1/sqrt(n)), and keeps each Nelder-Mead fit at ~15 CPU s whatever
# the population (1M customers would take ~20x that). CDNOW (23,570 customers) is fitted in full.
BTYD_FIT_SAMPLE = 50_000
# Rows the tree / GLM candidates are fitted and validated on. 250k rows give every leaf of the boosted trees
# (<= 15 leaves, >= 50 rows each) thousands of rows. `bench/bench_models.py --fit-rows-check` at 1M simulated
# customers (same 250k validation rows): Poisson GBM RMSE 50.89 / 50.95 / 50.72 and top-decile capture
# 0.574 / 0.575 / 0.575 fitted on 100k / 250k / 500k rows: no gain past 100k. CDNOW (141k rows) and
# 100k customers x 2 training snapshots stay unsampled.
MAX_FIT_ROWS = 250_000
# Rows the candidates are *compared* on (the champion alone is then refitted on MAX_FIT_ROWS of every
# snapshot). The same measurement shows no candidate gains past 100k rows; 150k keeps CDNOW's training
# snapshots (< 150k rows) unsampled, so its benchmark figures are unchanged.
MAX_SELECT_ROWS = 150_000
MAX_VALID_ROWS = 250_000  # validation rows: RMSE / top-decile capture on 250k rows vary in the 3rd digit
# BtydBoostedRegressor's floor of the BTYD base, as a share of the mean training label (see its fit).
BASE_FLOOR_SHARE = 0.01
# Rows each tree of the random-forest candidate may draw (SubsampledForestRegressor); None = half the rows, as
# before. A 20k cap made the forest 3.5x cheaper (200k synthetic customers: fit + predict ~10 instead of ~35
# CPU s; RMSE 50.06 -> 50.16, not the champion) but on CDNOW's marts path the capped forest won the inner
# 30-day validation (RMSE 17.33 vs 17.46 for btyd_boosted_poisson) and then missed the 273-day holdout by far
# (RMSE 270): so no cap until the selection guards against such horizon extrapolation.
MAX_ROWS_PER_TREE: int | None = None
SCORE_CHUNK = 200_000  # scoring in chunks bounds the memory of the tree predictions at 1M customers


class ValueInputError(CrmError):
    """The CLV / churn input cannot be modelled as given (empty, missing columns, one snapshot, bad labels)."""


# ---------------------------------------------------------------------------------------------------------
# Input checks and feature columns
# ---------------------------------------------------------------------------------------------------------
def numeric_feature_columns(frame: pd.DataFrame) -> list[str]:
    """The model inputs: every numeric column that is not an id, a date or a label (``horizon_days`` included)."""
    cols = [
        c
        for c in frame.columns
        if c not in NON_FEATURE_COLUMNS and (pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c]))
    ]
    return cols


def _check_frame(frame: pd.DataFrame, *, name: str, labels: bool) -> None:
    if frame is None or len(frame) == 0:
        raise ValueInputError(
            f"{name} is empty: no customer has an order on or before the feature cutoff. "
            "Load orders and run dbt (or pick a later as_of) before training."
        )
    need = ["customer_id", "horizon_days", "recency_days", "tenure_days", "n_orders", "net_spend"]
    if labels:
        need += ["future_spend"]
    missing = [c for c in need if c not in frame.columns]
    if missing:
        raise ValueInputError(f"{name} lacks the contract columns {missing}; is it marts.clv_training_set / clv_scoring_set?")
    if labels and frame["future_spend"].isna().any():
        n = int(frame["future_spend"].isna().sum())
        raise ValueInputError(f"{name} has {n} rows with a NULL future_spend label; the mart must label every row.")
    if frame["horizon_days"].isna().any() or (frame["horizon_days"] <= 0).any():
        raise ValueInputError(f"{name}: horizon_days must be a positive number on every row.")


# ---------------------------------------------------------------------------------------------------------
# BG/NBD + Gamma-Gamma features
# ---------------------------------------------------------------------------------------------------------
def rfm_from_features(frame: pd.DataFrame) -> pd.DataFrame:
    """BTYD summary (frequency, recency, T, monetary_value) derived from contract feature columns.

    frequency = n_purchase_days − 1 (repeat purchase days, the BG/NBD convention; n_orders − 1 for frames
    without that column), T = tenure_days (first order → cutoff), recency = T − recency_days (first → last
    order). The contract has no repeat-only spend, so the Gamma-Gamma monetary value is the average spend per
    purchase occasion (``repeat_spend`` is used instead when a frame carries it).
    """
    n = _purchase_occasions(frame)
    t_cal = frame["tenure_days"].to_numpy(float)
    recency = np.clip(t_cal - frame["recency_days"].to_numpy(float), 0, None)
    x = np.clip(n - 1, 0, None)
    if "repeat_spend" in frame.columns:
        m = np.where(x > 0, frame["repeat_spend"].to_numpy(float) / np.maximum(x, 1), 0.0)
    elif "n_purchase_days" in frame.columns:
        m = np.where(x > 0, frame["net_spend"].to_numpy(float) / np.maximum(n, 1), 0.0)
    else:
        m = np.where(x > 0, frame["avg_order_value"].to_numpy(float), 0.0)
    m = np.nan_to_num(m, nan=0.0)
    return pd.DataFrame({"frequency": x, "recency": np.minimum(recency, t_cal), "T": t_cal, "monetary_value": m}, index=frame.index)


def _purchase_occasions(frame: pd.DataFrame) -> np.ndarray:
    """Purchase occasions per customer: distinct purchase days when the frame has them (a source that writes
    one order per line, like CDNOW, has several orders per customer-day, which would inflate the repeat
    count BG/NBD and rate extrapolation are calibrated on), else orders."""
    col = "n_purchase_days" if "n_purchase_days" in frame.columns else "n_orders"
    return frame[col].to_numpy(float)


@dataclass
class BtydParams:
    bgnbd: dict
    gamma_gamma: dict


def _btyd_predict(rfm: pd.DataFrame, horizon: np.ndarray, params: BtydParams) -> pd.DataFrame:
    bg = BetaGeoFitter()
    bg.params_ = params.bgnbd
    gg = GammaGammaFitter()
    gg.params_ = params.gamma_gamma
    n = bg.conditional_expected_number_of_purchases_up_to_time(horizon, rfm["frequency"], rfm["recency"], rfm["T"])
    # Gamma-Gamma needs positive spend; refunds-only customers get the population mean.
    v = gg.conditional_expected_average_profit(rfm["frequency"], np.clip(rfm["monetary_value"], 0, None))
    return pd.DataFrame(
        {
            "btyd_expected_purchases": n,
            "btyd_expected_avg_value": v,
            "btyd_expected_spend": n * v,
            "btyd_p_alive": bg.conditional_probability_alive(rfm["frequency"], rfm["recency"], rfm["T"]),
        },
        index=rfm.index,
    )


def fit_btyd(frame: pd.DataFrame, *, max_customers: int = BTYD_FIT_SAMPLE, random_state: int = 0) -> BtydParams:
    """Fit BG/NBD + Gamma-Gamma on one cross-section of customers (one cutoff), on a random sample of at
    most ``max_customers`` of them (see :data:`BTYD_FIT_SAMPLE`)."""
    if "customer_id" in frame.columns:
        # The fit must not depend on the order the database returned the rows in: a table rebuilt by dbt comes
        # back in another order, the sums then differ in their last bits, and the optimiser's gradients turn
        # that into parameters (and published scores) that differ at 1e-10: a rerun would not be identical.
        frame = frame.sort_values("customer_id", kind="stable")
    rfm = _bounded(rfm_from_features(frame), max_customers, random_state)
    bg = BetaGeoFitter().fit(rfm["frequency"], rfm["recency"], rfm["T"])
    gg = GammaGammaFitter().fit(rfm["frequency"], rfm["monetary_value"])
    return BtydParams(bg.params_, gg.params_)


def _bounded(frame: pd.DataFrame, cap: int, random_state: int = 0) -> pd.DataFrame:
    """At most ``cap`` rows: a seeded random sample in the frame's own order (deterministic for a frame)."""
    if len(frame) <= cap:
        return frame
    keep = np.sort(np.random.default_rng(random_state).choice(len(frame), cap, replace=False))
    return frame.iloc[keep]


def add_btyd_features(
    frame: pd.DataFrame, *, cutoff_col: str | None = None, fallback: BtydParams | None = None
) -> tuple[pd.DataFrame, BtydParams | None]:
    """Add the :data:`BTYD_COLUMNS` for each row's own horizon, fitting BG/NBD + Gamma-Gamma per cutoff.

    ``cutoff_col`` defaults to ``snapshot`` (else ``feature_cutoff_date``). Each cutoff's model sees only the features at that cutoff, so no future leaks in. A cutoff with too few
    customers (or no repeat buyers) to fit uses ``fallback`` (the parameters of the previous fit); with no
    fallback the BTYD columns are left out — the callers' models then work without them.
    Returns the enriched frame and the parameters of the latest cutoff (for scoring single customers later).
    """
    if cutoff_col is None:  # one fit per snapshot (a cross-section at one cutoff), else per cutoff date
        cutoff_col = next((c for c in ("snapshot", "feature_cutoff_date") if c in frame.columns), None)
    # Newest cutoff last, so the returned parameters are the most recent ones.
    groups = frame.groupby(cutoff_col, sort=True) if cutoff_col is not None else [(None, frame)]
    if cutoff_col == "snapshot":
        groups = reversed(list(groups))
    parts, last = [], fallback
    for _, part in groups:
        params = None
        if len(part) >= MIN_BTYD_CUSTOMERS:
            try:
                params = fit_btyd(part)
            except BtydInputError:
                params = None
        params = params or last
        if params is None:
            return frame, None
        last = params
        parts.append(_btyd_predict(rfm_from_features(part), part["horizon_days"].to_numpy(float), params))
    extra = pd.concat(parts).reindex(frame.index)
    out = frame.drop(columns=[c for c in BTYD_COLUMNS if c in frame.columns]).join(extra)
    return out, last


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------
def top_decile_capture(y_true, y_pred, share: float = 0.1) -> float:
    """Share of the actual total spend captured by the ``share`` of customers with the highest prediction.

    Ties in the prediction are broken by input order (a stable sort), which is what the published CDNOW
    figures use.
    """
    y_true = np.asarray(y_true, float)
    y_pred = np.asarray(y_pred, float)
    total = y_true.sum()
    if total <= 0:
        return float("nan")
    n_top = int(np.ceil(share * len(y_true)))
    top = np.argsort(-y_pred, kind="stable")[:n_top]
    return float(y_true[top].sum() / total)


def value_metrics(y_true, y_pred) -> dict[str, float]:
    """RMSE, MAE, R², Spearman, top-decile capture and relative total-spend error (pred total / actual − 1).

    Spearman of a constant prediction is undefined; it is reported as 0.0 (no ranking information).
    """
    y_true = np.asarray(y_true, float)
    y_pred = np.asarray(y_pred, float)
    rho = spearmanr(y_pred, y_true).statistic if np.ptp(y_pred) > 0 and np.ptp(y_true) > 0 else 0.0
    total = y_true.sum()
    return {
        "rmse": float(np.sqrt(mean_squared_error(y_true, y_pred))),
        "mae": float(mean_absolute_error(y_true, y_pred)),
        "r2": float(r2_score(y_true, y_pred)) if len(y_true) > 1 else float("nan"),
        "spearman": float(rho),
        "top_decile_capture": top_decile_capture(y_true, y_pred),
        "total_spend_error": float(y_pred.sum() / total - 1) if total != 0 else float("nan"),
    }


def churn_metrics(is_churn, p_churn) -> dict[str, float]:
    """ROC-AUC, PR-AUC (average precision), Brier score, log loss and the base churn rate."""
    y = np.asarray(is_churn, bool)
    p = np.clip(np.asarray(p_churn, float), 1e-9, 1 - 1e-9)
    both = 0 < y.sum() < len(y)
    return {
        "roc_auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "pr_auc": float(average_precision_score(y, p)) if both else float("nan"),
        "brier": float(brier_score_loss(y, p)),
        "log_loss": float(log_loss(y, p, labels=[False, True])),
        "churn_rate": float(y.mean()),
    }


def calibration_table(is_churn, p_churn, n_bins: int = 10) -> pd.DataFrame:
    """Calibration curve data: mean predicted vs observed churn rate per quantile bin."""
    prob_true, prob_pred = calibration_curve(np.asarray(is_churn, bool), np.asarray(p_churn, float), n_bins=n_bins, strategy="quantile")
    return pd.DataFrame({"mean_predicted": prob_pred, "observed_rate": prob_true})


# ---------------------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------------------
def rate_extrapolation(repeat_spend, tenure_days, horizon_days) -> np.ndarray:
    """Past repeat spend per day since the first purchase × the horizon (the classic naive CLV baseline).

    The first purchase is excluded because every customer in the cohort has one by construction: it says
    nothing about the buying rate. ``tenure_days`` below 1 counts as 1.
    """
    return np.asarray(repeat_spend, float) / np.maximum(np.asarray(tenure_days, float), 1.0) * np.asarray(horizon_days, float)


def baseline_predictions(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """All-zero, rate extrapolation and (when the frame carries them) BG/NBD + Gamma-Gamma predictions.

    Without a ``repeat_spend`` column the repeat spend is approximated from contract columns as
    net_spend × (n − 1) / n with n the purchase occasions (n_purchase_days, else n_orders): the first
    occasion valued at the average one.
    """
    n = _purchase_occasions(frame)
    if "repeat_spend" in frame.columns:
        repeat = frame["repeat_spend"].to_numpy(float)
    else:
        repeat = frame["net_spend"].to_numpy(float) * np.clip(n - 1, 0, None) / np.maximum(n, 1)
    out = {
        "all_zero": np.zeros(len(frame)),
        "rate_extrapolation": rate_extrapolation(repeat, frame["tenure_days"], frame["horizon_days"]),
    }
    if "btyd_expected_spend" in frame.columns:
        out["bgnbd_gamma_gamma"] = frame["btyd_expected_spend"].to_numpy(float)
    return out


# ---------------------------------------------------------------------------------------------------------
# Estimators
# ---------------------------------------------------------------------------------------------------------
def _signed_log1p(x):
    x = np.asarray(x, dtype=float)
    out = np.log1p(np.abs(x))
    np.copysign(out, x, out=out)
    out += 0.0  # -0.0 -> 0.0, as sign(-0.0) * 0 gives: the plain formula bit for bit, without its temporaries
    return out


def _linear_preprocess() -> Pipeline:
    """Skewed spend/count features → signed log1p; NULLs (e.g. avg_days_between_orders) → median + indicator."""
    return make_pipeline(
        SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True),
        FunctionTransformer(_signed_log1p, feature_names_out="one-to-one"),
        StandardScaler(),
    )


class PerDayRegressor(RegressorMixin, BaseEstimator):
    """Wraps a regressor to learn spend per day of the horizon; predicts rate × the row's ``horizon_days``."""

    def __init__(self, estimator, clip_negative: bool = False):
        self.estimator = estimator
        self.clip_negative = clip_negative

    def fit(self, X: pd.DataFrame, y, sample_weight=None):
        h = X["horizon_days"].to_numpy(float)
        target = np.asarray(y, float) / h
        if self.clip_negative:
            target = np.clip(target, 0, None)
        self.feature_names_in_ = np.asarray(X.columns, dtype=object)
        self.estimator_ = clone(self.estimator)
        if sample_weight is None:
            self.estimator_.fit(X, target)
        else:
            self.estimator_.fit(X, target, **{_weight_param(self.estimator_): sample_weight})
        return self

    def predict(self, X: pd.DataFrame):
        return tree_predict.predict(self.estimator_, X) * X["horizon_days"].to_numpy(float)


def _weight_param(est) -> str:
    if isinstance(est, Pipeline):
        return f"{est.steps[-1][0]}__sample_weight"
    return "sample_weight"


class BtydBoostedRegressor(RegressorMixin, BaseEstimator):
    """BG/NBD + Gamma-Gamma expected spend × a learned correction factor (Poisson gradient boosting).

    Fits ``HistGradientBoostingRegressor(loss="poisson")`` on ``y / base`` with weights ``base`` where
    ``base = btyd_expected_spend`` — the Poisson likelihood with ``log(base)`` as offset. The correction is
    a function of the customer's features (not of the horizon), so the BTYD model carries the horizon and the
    trees the customer detail it misses (basket size, order value, recency beyond what BG/NBD uses).
    """

    def __init__(self, learning_rate: float = 0.05, max_iter: int = 200, max_leaf_nodes: int = 15,
                 min_samples_leaf: int = 100, l2_regularization: float = 0.0, random_state: int = 0):
        self.learning_rate = learning_rate
        self.max_iter = max_iter
        self.max_leaf_nodes = max_leaf_nodes
        self.min_samples_leaf = min_samples_leaf
        self.l2_regularization = l2_regularization
        self.random_state = random_state

    def _inputs(self, X: pd.DataFrame) -> pd.DataFrame:
        # The horizon and the BTYD outputs that scale with it are excluded: the correction must not depend on
        # the window length, or it could not transfer from the short training windows to the scoring window.
        drop = ["horizon_days", "btyd_expected_spend", "btyd_expected_purchases"]
        return X.drop(columns=[c for c in drop if c in X.columns])

    def fit(self, X: pd.DataFrame, y, sample_weight=None):
        if "btyd_expected_spend" not in X.columns:
            raise ValueInputError("BtydBoostedRegressor needs the btyd_expected_spend column (add_btyd_features).")
        y = np.clip(np.asarray(y, float), 0, None)
        # The base is floored at a share of the mean label. With the old 1e-6 floor, customers whom BG/NBD
        # gives ~0 expected spend but who did buy had targets y / base of ~1e8 on weights ~1e-6; a leaf of
        # such rows has a near-zero hessian, its Newton step (-G / H) is ~1e8 x the learning rate, and the
        # exponentiated prediction overflowed: RMSE = inf fitted on 500k rows of the 1M frame. The floor
        # bounds every leaf step to ~1 / BASE_FLOOR_SHARE x the learning rate.
        self.base_floor_ = max(1e-6, BASE_FLOOR_SHARE * float(y.mean()) if len(y) else 1e-6)
        base = self._base(X)
        self.feature_names_in_ = np.asarray(X.columns, dtype=object)
        self.estimator_ = HistGradientBoostingRegressor(
            loss="poisson", learning_rate=self.learning_rate, max_iter=self.max_iter,
            max_leaf_nodes=self.max_leaf_nodes, min_samples_leaf=self.min_samples_leaf,
            l2_regularization=self.l2_regularization, random_state=self.random_state,
            early_stopping=False,  # its validation split is random, not temporal
        )
        w = base if sample_weight is None else base * np.asarray(sample_weight, float)
        self.estimator_.fit(self._inputs(X), y / base, sample_weight=w)
        return self

    def _base(self, X: pd.DataFrame) -> np.ndarray:
        return np.maximum(X["btyd_expected_spend"].to_numpy(float), getattr(self, "base_floor_", 1e-6))

    def predict(self, X: pd.DataFrame):
        return self._base(X) * tree_predict.predict(self.estimator_, self._inputs(X))


class SubsampledForestRegressor(RegressorMixin, BaseEstimator):
    """A random forest (NULLs imputed with the median) whose trees each draw ``max_samples`` of the rows but at
    most ``max_rows_per_tree`` of them.

    Fitted on 150k selection rows, half of them per tree (75k) made the forest ~70 % of ``fit_value``; a
    cap keeps its cost flat in the row count (off by default: see :data:`MAX_ROWS_PER_TREE`). Each tree still
    draws its own rows from all of them. Without a cap it is the former imputer + forest pipeline, prediction
    for prediction. Fed float32 (the trees' own dtype: no second copy of the matrix).
    """

    def __init__(self, n_estimators: int = 60, min_samples_leaf: int = 20, max_features: float = 0.5,
                 max_samples: float = 0.5, max_rows_per_tree: int | None = MAX_ROWS_PER_TREE, random_state: int = 0):
        self.n_estimators = n_estimators
        self.min_samples_leaf = min_samples_leaf
        self.max_features = max_features
        self.max_samples = max_samples
        self.max_rows_per_tree = max_rows_per_tree
        self.random_state = random_state

    def fit(self, X, y, sample_weight=None):
        self.feature_names_in_ = np.asarray(getattr(X, "columns", range(np.shape(X)[1])), dtype=object)
        self.imputer_ = SimpleImputer(strategy="median", keep_empty_features=True).fit(X)
        Z = self.imputer_.transform(X).astype(np.float32)
        share = float(self.max_samples)
        if self.max_rows_per_tree is not None:
            share = min(share, self.max_rows_per_tree / max(len(Z), 1))
        self.forest_ = RandomForestRegressor(
            n_estimators=self.n_estimators, min_samples_leaf=self.min_samples_leaf, max_features=self.max_features,
            max_samples=max(share, 1 / max(len(Z), 1)), n_jobs=1, random_state=self.random_state,
        ).fit(Z, y, sample_weight=sample_weight)
        return self

    def predict(self, X):
        return self.forest_.predict(self.imputer_.transform(X).astype(np.float32))


class MeanEnsembleRegressor(RegressorMixin, BaseEstimator):
    """The plain average of several regressors' predictions.

    Their errors are only partly correlated (a GLM, trees on the per-day rate, trees correcting BG/NBD), so the
    average is steadier than any one of them when the scoring horizon is longer than the training windows.
    """

    def __init__(self, estimators: tuple[tuple[str, BaseEstimator], ...] = ()):
        self.estimators = estimators

    def fit(self, X: pd.DataFrame, y, sample_weight=None):
        if not self.estimators:
            raise ValueInputError("MeanEnsembleRegressor needs at least one estimator.")
        self.feature_names_in_ = np.asarray(X.columns, dtype=object)
        self.estimators_ = [(name, clone(est).fit(X, y)) for name, est in self.estimators]
        return self

    def predict(self, X: pd.DataFrame):
        return np.mean([est.predict(X) for _, est in self.estimators_], axis=0)


def regression_candidates(random_state: int = 0, *, with_btyd: bool = True) -> dict[str, BaseEstimator]:
    """From a linear baseline to gradient boosting; all predict spend over the row's horizon."""
    cands: dict[str, BaseEstimator] = {
        "linear_regression": PerDayRegressor(make_pipeline(_linear_preprocess(), LinearRegression())),
        "tweedie_glm": PerDayRegressor(
            make_pipeline(_linear_preprocess(), TweedieRegressor(power=1.5, alpha=1e-3, link="log", max_iter=1000)),
            clip_negative=True,
        ),
        "random_forest": PerDayRegressor(SubsampledForestRegressor(random_state=random_state)),
        "hist_gbm_poisson": PerDayRegressor(
            HistGradientBoostingRegressor(loss="poisson", learning_rate=0.05, max_iter=300, max_leaf_nodes=15,
                                          min_samples_leaf=50, early_stopping=False,
                                          random_state=random_state),
            clip_negative=True,
        ),
    }
    if with_btyd:
        cands["btyd_boosted_poisson"] = BtydBoostedRegressor(random_state=random_state)
        cands["blend_glm_gbm_btyd"] = MeanEnsembleRegressor(
            (
                ("tweedie_glm", cands["tweedie_glm"]),
                ("hist_gbm_poisson", cands["hist_gbm_poisson"]),
                ("btyd_boosted_poisson", cands["btyd_boosted_poisson"]),
            )
        )
    return cands


def churn_candidates(random_state: int = 0) -> dict[str, BaseEstimator]:
    """Churn = no purchase within the horizon."""
    return {
        "logistic_regression": make_pipeline(_linear_preprocess(), LogisticRegression(max_iter=2000, C=1.0)),
        "hist_gbm_classifier": HistGradientBoostingClassifier(
            learning_rate=0.05, max_iter=300, max_leaf_nodes=15, min_samples_leaf=50, random_state=random_state
        ),
    }


# ---------------------------------------------------------------------------------------------------------
# Temporal validation and training
# ---------------------------------------------------------------------------------------------------------
def temporal_split(training_set: pd.DataFrame, valid_snapshot: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train on the snapshots older than ``valid_snapshot``; validate on ``valid_snapshot``.

    Older snapshots have larger numbers (snapshot 1 = latest fully labelled window). Training rows whose label
    window reaches past the validation cutoff are dropped, so the validation period is never seen.
    """
    train_pos, valid_pos = _split_positions(training_set, valid_snapshot)
    return training_set.iloc[train_pos], training_set.iloc[valid_pos]


def _split_positions(training_set: pd.DataFrame, valid_snapshot: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """:func:`temporal_split` as row positions: the fits take a sample of them, so at 1M customers the two
    sides are never copied whole (~0.7 GB of frames, twice per run)."""
    _check_frame(training_set, name="clv_training_set", labels=True)
    if "snapshot" not in training_set.columns:
        raise ValueInputError("clv_training_set has no snapshot column; temporal validation needs it.")
    snapshot = training_set["snapshot"].to_numpy()
    valid = np.flatnonzero(snapshot == valid_snapshot)
    older = np.flatnonzero(snapshot > valid_snapshot)
    if len(valid) == 0 or len(older) == 0:
        snaps = sorted(training_set["snapshot"].unique().tolist())
        raise ValueInputError(
            f"Temporal validation needs snapshot {valid_snapshot} and an older one; the training set has snapshots "
            f"{snaps}. Rebuild the marts with dbt var training_snapshots >= {valid_snapshot + 1}."
        )
    if "feature_cutoff_date" in training_set.columns:
        cutoff = training_set["feature_cutoff_date"]
        valid_cutoff = pd.Timestamp(cutoff.iloc[valid].min())
        label_end = (pd.to_datetime(cutoff.iloc[older]) + pd.to_timedelta(training_set["horizon_days"].iloc[older], unit="D"))
        older = older[(label_end <= valid_cutoff).to_numpy()]
        if len(older) == 0:
            raise ValueInputError(
                "Every older snapshot's label window overlaps the validation cutoff; use snapshots spaced by at "
                "least horizon_days."
            )
    return older, valid


@dataclass
class ValueModel:
    """A fitted CLV or churn model that scores contract frames (features at a cutoff + ``horizon_days``).

    Adds the BG/NBD features itself: refitted on the scoring frame when it is a large enough cross-section,
    otherwise with the parameters learnt at training time (so one customer can be scored alone). A frame that
    already carries every BTYD column (:func:`score_customers` fits them once for the value and the churn
    model) is used as it is.
    """

    name: str
    estimator: BaseEstimator
    feature_columns: list[str]
    kind: str  # "regression" | "churn"
    btyd_params: BtydParams | None = None

    @property
    def needs_btyd(self) -> bool:
        return any(c in self.feature_columns for c in BTYD_COLUMNS)

    def prepare(self, frame: pd.DataFrame) -> pd.DataFrame:
        if self.needs_btyd and not all(c in frame.columns for c in BTYD_COLUMNS):
            frame, _ = add_btyd_features(frame, fallback=self.btyd_params)
        missing = [c for c in self.feature_columns if c not in frame.columns]
        if missing:
            raise ValueInputError(f"Cannot score with model {self.name}: the frame lacks columns {missing}.")
        return frame[self.feature_columns].astype(float)

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        _check_frame(frame, name="scoring frame", labels=False)
        X = self.prepare(frame)
        if self.kind == "churn":
            return tree_predict.predict_proba(self.estimator, X)[:, 1]
        return tree_predict.predict(self.estimator, X)


@dataclass
class ValueResult:
    """Everything the caller logs: one metrics row per candidate/baseline, the champion and its refit model."""

    metrics: pd.DataFrame  # index candidate; columns REGRESSION_METRICS/CHURN_METRICS + kind + fit_seconds
    champion: str
    model: ValueModel
    validation: pd.DataFrame  # customer_id, actual, one prediction column per candidate
    feature_importances: pd.DataFrame  # feature, importance (champion, on validation)
    params: dict = field(default_factory=dict)
    kind: str = "regression"


@dataclass
class PreparedTraining:
    """``clv_training_set`` in a fixed row order with the BTYD features of every snapshot, fitted once.

    :func:`train_value` prepares it once and hands it to both :func:`fit_value` and :func:`fit_churn`
    (each BG/NBD fit is a maximum-likelihood optimisation; they used to be repeated per model).
    """

    frame: pd.DataFrame
    btyd_params: BtydParams | None
    use_btyd: bool


def prepare_training(training_set: pd.DataFrame, use_btyd: bool = True) -> PreparedTraining:
    """Check, sort and (``use_btyd``) add the per-snapshot BG/NBD + Gamma-Gamma features."""
    _check_frame(training_set, name="clv_training_set", labels=True)
    frame, btyd_params = _sorted(training_set), None
    if use_btyd:
        frame, btyd_params = add_btyd_features(frame)
    return PreparedTraining(frame, btyd_params, use_btyd)


def _prepare_training(training_set: pd.DataFrame | PreparedTraining, use_btyd: bool):
    prepared = training_set if isinstance(training_set, PreparedTraining) else prepare_training(training_set, use_btyd)
    return prepared.frame, prepared.btyd_params


def _fit_rows(frame: pd.DataFrame, valid_snapshot: int, random_state: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows the candidates are compared on (:func:`temporal_split`'s sides, sampled): at most
    :data:`MAX_SELECT_ROWS` (and :data:`MAX_FIT_ROWS`) fitted, :data:`MAX_VALID_ROWS` validated. The same
    rows as sampling the split frames (:func:`_bounded`), but only the sampled rows are ever copied."""
    train_pos, valid_pos = _split_positions(frame, valid_snapshot)
    return (frame.iloc[_bounded_positions(train_pos, min(MAX_SELECT_ROWS, MAX_FIT_ROWS), random_state)],
            frame.iloc[_bounded_positions(valid_pos, MAX_VALID_ROWS, random_state + 1)])


def _bounded_positions(positions: np.ndarray, cap: int, random_state: int = 0) -> np.ndarray:
    """:func:`_bounded` of ``frame.iloc[positions]``, as positions of ``frame``."""
    if len(positions) <= cap:
        return positions
    return positions[np.sort(np.random.default_rng(random_state).choice(len(positions), cap, replace=False))]


def validation_rows(prepared: PreparedTraining, valid_snapshot: int = 1, random_state: int = 0) -> pd.DataFrame:
    """The (BTYD-enriched) rows fit_value / fit_churn validate on: the champion is re-scored on the same."""
    return _fit_rows(prepared.frame, valid_snapshot, random_state)[1]


def fit_value(
    training_set: pd.DataFrame | PreparedTraining,
    *,
    valid_snapshot: int = 1,
    candidates: Mapping[str, BaseEstimator] | None = None,
    selection_metric: str = "rmse",
    use_btyd: bool = True,
    refit: bool = True,
    random_state: int = 0,
    n_threads: int | None = 1,
) -> ValueResult:
    """Fit every CLV candidate on older snapshots, score all (and the baselines) on ``valid_snapshot``, pick the
    champion by ``selection_metric`` (lower is better for rmse/mae, higher for the others) among the models,
    and refit it on every snapshot (``refit``). ``n_threads`` caps OpenMP/BLAS threads (see :func:`_threads`).
    ``training_set`` may be a :class:`PreparedTraining` (BTYD features already fitted; ``use_btyd`` is then
    ignored). Above :data:`MAX_FIT_ROWS` rows, fits and validation use a seeded sample of that many rows.
    """
    with _threads(n_threads):
        return _fit_value(training_set, valid_snapshot, candidates, selection_metric, use_btyd, refit, random_state)


def _threads(n_threads: int | None):
    """Cap the native thread pools (OpenMP of the tree models, BLAS). Default 1: the nightly job runs several
    trainings side by side, and oversubscribed OpenMP threads spin — measured 9× slower for a gradient-boosting
    fit on a busy 2-core box. ``None`` leaves the libraries' defaults (all cores) for a dedicated machine."""
    from contextlib import nullcontext

    from threadpoolctl import threadpool_limits

    return nullcontext() if n_threads is None else threadpool_limits(limits=n_threads)


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in a fixed order: the database returns them in any order, and results must not depend on it."""
    keys = [c for c in ("snapshot", "customer_id") if c in frame.columns]
    return frame.sort_values(keys, kind="stable", ignore_index=True) if keys else frame


def _fit_value(training_set, valid_snapshot, candidates, selection_metric, use_btyd, refit, random_state):
    import time

    data, btyd_params = _prepare_training(training_set, use_btyd)
    has_btyd = "btyd_expected_spend" in data.columns
    cands = dict(candidates) if candidates is not None else regression_candidates(random_state, with_btyd=has_btyd)
    if not has_btyd:
        cands = {k: v for k, v in cands.items() if not _needs_btyd(v)}
    train, valid = _fit_rows(data, valid_snapshot, random_state)
    features = numeric_feature_columns(data)
    y_valid = valid["future_spend"].to_numpy(float)

    rows, preds, fitted = {}, {}, {}
    for name, pred in baseline_predictions(valid).items():
        rows[name] = {**value_metrics(y_valid, pred), "kind": "baseline", "fit_seconds": 0.0}
        preds[name] = pred
    X_train, X_valid = train[features].astype(float), valid[features].astype(float)
    for name, est in cands.items():
        t0 = time.perf_counter()
        parts = _fitted_parts(est, cands, fitted)
        if parts is not None:  # a blend of candidates already fitted on these rows: average them, no refit
            model = clone(est)
            model.feature_names_in_, model.estimators_ = np.asarray(features, dtype=object), parts
            pred = np.mean([preds[n] for n, _ in parts], axis=0)
            seconds = sum(rows[n]["fit_seconds"] for n, _ in parts)
        else:
            model = clone(est).fit(X_train, train["future_spend"].to_numpy(float))
            seconds = time.perf_counter() - t0
            pred = model.predict(X_valid)
        rows[name] = {**value_metrics(y_valid, pred), "kind": "model", "fit_seconds": seconds}
        preds[name] = pred
        fitted[name] = model
    metrics = pd.DataFrame.from_dict(rows, orient="index")
    metrics.index.name = "candidate"
    champion = _select(metrics[metrics["kind"] == "model"], selection_metric)
    validation = pd.DataFrame({"customer_id": valid["customer_id"].to_numpy(), "actual": y_valid, **preds})
    importances = _importances(fitted[champion], X_valid, y_valid, random_state)
    every = _bounded(data, MAX_FIT_ROWS, random_state + 2)
    final = clone(cands[champion]).fit(every[features].astype(float), every["future_spend"].to_numpy(float)) if refit else fitted[champion]
    return ValueResult(
        metrics=metrics,
        champion=champion,
        model=ValueModel(champion, final, features, "regression", btyd_params),
        validation=validation,
        feature_importances=importances,
        params={"valid_snapshot": valid_snapshot, "selection_metric": selection_metric, "use_btyd": has_btyd,
                "n_train": len(train), "n_valid": len(valid), "n_features": len(features), "n_rows": len(data)},
    )


def fit_churn(
    training_set: pd.DataFrame | PreparedTraining,
    *,
    valid_snapshot: int = 1,
    candidates: Mapping[str, BaseEstimator] | None = None,
    selection_metric: str = "log_loss",
    use_btyd: bool = True,
    refit: bool = True,
    random_state: int = 0,
    n_threads: int | None = 1,
) -> ValueResult:
    """Churn (no purchase within the horizon) propensity: candidates and a base-rate baseline, temporal split.

    The champion is chosen by log loss (a proper score: rewards calibration as well as ranking).
    """
    with _threads(n_threads):
        return _fit_churn(training_set, valid_snapshot, candidates, selection_metric, use_btyd, refit, random_state)


def _fit_churn(training_set, valid_snapshot, candidates, selection_metric, use_btyd, refit, random_state):
    import time

    data, btyd_params = _prepare_training(training_set, use_btyd)
    train, valid = _fit_rows(data, valid_snapshot, random_state)
    churn_train = _churn_label(train)
    if churn_train.all() or not churn_train.any():
        raise ValueInputError(
            "Churn needs both buyers and non-buyers in the training snapshots; every customer is "
            f"{'a non-buyer' if churn_train.all() else 'a buyer'}. Use a longer horizon or more data."
        )
    features = numeric_feature_columns(data)
    cands = dict(candidates) if candidates is not None else churn_candidates(random_state)
    y_valid = _churn_label(valid)
    rows, preds, fitted = {}, {}, {}
    base = np.full(len(valid), churn_train.mean())
    rows["base_rate"] = {**churn_metrics(y_valid, base), "kind": "baseline", "fit_seconds": 0.0}
    preds["base_rate"] = base
    for name, est in cands.items():
        t0 = time.perf_counter()
        model = clone(est).fit(train[features].astype(float), churn_train)
        seconds = time.perf_counter() - t0
        p = model.predict_proba(valid[features].astype(float))[:, 1]
        rows[name] = {**churn_metrics(y_valid, p), "kind": "model", "fit_seconds": seconds}
        preds[name] = p
        fitted[name] = model
    metrics = pd.DataFrame.from_dict(rows, orient="index")
    metrics.index.name = "candidate"
    champion = _select(metrics[metrics["kind"] == "model"], selection_metric)
    validation = pd.DataFrame({"customer_id": valid["customer_id"].to_numpy(), "actual": y_valid, **preds})
    importances = _importances(fitted[champion], valid[features].astype(float), y_valid, random_state, churn=True)
    every = _bounded(data, MAX_FIT_ROWS, random_state + 2)
    final = clone(cands[champion]).fit(every[features].astype(float), _churn_label(every)) if refit else fitted[champion]
    return ValueResult(
        metrics=metrics,
        champion=champion,
        model=ValueModel(champion, final, features, "churn", btyd_params),
        validation=validation,
        feature_importances=importances,
        params={"valid_snapshot": valid_snapshot, "selection_metric": selection_metric,
                "n_train": len(train), "n_valid": len(valid), "n_features": len(features)},
        kind="churn",
    )


def _fitted_parts(est, cands: Mapping[str, BaseEstimator], fitted: dict) -> list | None:
    """The fitted components of a :class:`MeanEnsembleRegressor` whose every component is, by identity, a
    candidate already fitted on the same rows (the default blend); ``None`` otherwise (fit it as it is)."""
    if not isinstance(est, MeanEnsembleRegressor) or not est.estimators:
        return None
    if not all(name in fitted and cands.get(name) is comp for name, comp in est.estimators):
        return None
    return [(name, fitted[name]) for name, _ in est.estimators]


def _needs_btyd(est) -> bool:
    if isinstance(est, MeanEnsembleRegressor):
        return any(_needs_btyd(e) for _, e in est.estimators)
    return isinstance(est, BtydBoostedRegressor)


def _churn_label(frame: pd.DataFrame) -> np.ndarray:
    if "has_future_purchase" in frame.columns:
        return ~frame["has_future_purchase"].astype(bool).to_numpy()
    return frame["future_spend"].to_numpy(float) <= 0


def _select(metrics: pd.DataFrame, metric: str) -> str:
    lower_is_better = metric in {"rmse", "mae", "brier", "log_loss"} or metric == "abs_total_spend_error"
    col = metrics[metric].abs() if metric == "total_spend_error" else metrics[metric]
    col = col.fillna(np.inf if lower_is_better else -np.inf)
    return str(col.idxmin() if lower_is_better or metric == "total_spend_error" else col.idxmax())


def _importances(model, X: pd.DataFrame, y, random_state: int, churn: bool = False) -> pd.DataFrame:
    """Permutation importance on (a sample of) the validation rows: model-agnostic, same scale for all."""
    n = min(len(X), 5000)
    idx = np.random.default_rng(random_state).choice(len(X), n, replace=False)
    scoring = "neg_log_loss" if churn else "neg_root_mean_squared_error"
    res = permutation_importance(model, X.iloc[idx], np.asarray(y)[idx], scoring=scoring, n_repeats=3,
                                 random_state=random_state, n_jobs=1)
    return (
        pd.DataFrame({"feature": X.columns, "importance": res.importances_mean, "std": res.importances_std})
        .sort_values("importance", ascending=False, ignore_index=True)
    )


def score_customers(
    scoring_set: pd.DataFrame,
    value_model: ValueModel,
    churn_model: ValueModel | None = None,
    *,
    btyd_params: BtydParams | None = None,
    decile_edges: np.ndarray | None = None,
) -> pd.DataFrame:
    """Per customer: predicted spend over the horizon, churn probability and value decile (10 = most valuable).

    The BG/NBD + Gamma-Gamma features of the scoring cross-section are fitted once here and shared by both
    models (each would otherwise refit them); the models then predict in chunks of :data:`SCORE_CHUNK` rows.

    Scoring a SUBSET of the customers (e.g. only those touched tonight): pass ``btyd_params`` (e.g. the
    champion's ``value_model.btyd_params``, or the parameters fitted on the whole population) so the BG/NBD
    features use population parameters instead of a refit on the subset, which is a biased cross-section
    (recent buyers); and ``decile_edges`` (:func:`value_decile_edges` of the whole population's predicted
    spend, e.g. the published ``ml.customer_scores``) so the deciles are the population's, not the subset's.
    """
    _check_frame(scoring_set, name="clv_scoring_set", labels=False)
    scoring_set = _with_btyd_once(scoring_set, value_model, churn_model, params=btyd_params)
    spend = np.clip(_predict_chunked(value_model, scoring_set), 0, None)
    out = pd.DataFrame(
        {
            "customer_id": scoring_set["customer_id"].to_numpy(),
            "horizon_days": scoring_set["horizon_days"].to_numpy(),
            "predicted_spend": spend,
        }
    )
    out["churn_probability"] = _predict_chunked(churn_model, scoring_set) if churn_model is not None else np.nan
    if decile_edges is not None:
        edges = np.asarray(decile_edges, float)
        out["value_decile"] = (np.searchsorted(edges, spend, side="right") + 1).clip(1, 10)
    else:
        # Ranks first so ties (many identical low predictions) do not break qcut's unique-edges requirement.
        ranks = pd.Series(spend).rank(method="first")
        out["value_decile"] = (np.ceil(ranks / len(out) * 10)).astype(int).clip(1, 10).to_numpy()
    return out


def value_decile_edges(predicted_spend) -> np.ndarray:
    """The 9 inner edges of the deciles of a population's predicted spend (for :func:`score_customers` of a
    subset): a customer's decile is 1 + the number of edges at or below her prediction."""
    return np.quantile(np.clip(np.asarray(predicted_spend, float), 0, None), np.arange(1, 10) / 10)


def _with_btyd_once(frame: pd.DataFrame, *models, params: BtydParams | None = None) -> pd.DataFrame:
    """``frame`` with the BTYD columns, if any model uses them: from ``params`` when given (no fit), else
    fitted once on the frame (the models' training-time parameters as the fallback for a cross-section too
    small to fit)."""
    users = [m for m in models if m is not None and getattr(m, "needs_btyd", False)]
    if not users or all(c in frame.columns for c in BTYD_COLUMNS):
        return frame
    if params is not None:
        extra = _btyd_predict(rfm_from_features(frame), frame["horizon_days"].to_numpy(float), params)
        return frame.drop(columns=[c for c in BTYD_COLUMNS if c in frame.columns]).join(extra)
    enriched, _ = add_btyd_features(frame, fallback=users[0].btyd_params)
    return enriched


def _predict_chunked(model, frame: pd.DataFrame, chunk: int = SCORE_CHUNK) -> np.ndarray:
    if len(frame) <= chunk:
        return np.asarray(model.predict(frame), float)
    return np.concatenate([np.asarray(model.predict(frame.iloc[i:i + chunk]), float) for i in range(0, len(frame), chunk)])


# ---------------------------------------------------------------------------------------------------------
# Plots (PNG files; matplotlib's Agg backend, no display needed)
# ---------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_clv_deciles(y_true, y_pred, path: str | Path, title: str = "CLV by predicted decile") -> Path:
    """Mean predicted vs mean actual spend per decile of the prediction."""
    plt = _plt()
    y_true = np.asarray(y_true, float)
    y_pred = np.asarray(y_pred, float)
    decile = np.ceil(pd.Series(y_pred).rank(method="first").to_numpy() / len(y_pred) * 10).clip(1, 10)
    table = pd.DataFrame({"decile": decile, "actual": y_true, "predicted": y_pred}).groupby("decile").mean()
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(table))
    ax.bar(x - 0.2, table["predicted"], 0.4, label="predicted")
    ax.bar(x + 0.2, table["actual"], 0.4, label="actual")
    ax.set_xticks(x, [str(int(d)) for d in table.index])
    ax.set_xlabel("decile of predicted spend (10 = highest)")
    ax.set_ylabel("mean spend")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def plot_pred_vs_actual(y_true, y_pred, path: str | Path, title: str = "Predicted vs actual spend") -> Path:
    plt = _plt()
    y_true = np.asarray(y_true, float)
    y_pred = np.asarray(y_pred, float)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(np.log1p(np.clip(y_pred, 0, None)), np.log1p(np.clip(y_true, 0, None)), s=3, alpha=0.3)
    hi = float(np.log1p(max(np.clip(y_true, 0, None).max(initial=0), np.clip(y_pred, 0, None).max(initial=0), 1)))
    ax.plot([0, hi], [0, hi], color="grey", lw=1)
    ax.set_xlabel("log1p(predicted)")
    ax.set_ylabel("log1p(actual)")
    ax.set_title(title)
    return _save(fig, path)


def plot_feature_importances(importances: pd.DataFrame, path: str | Path, top: int = 20) -> Path:
    plt = _plt()
    imp = importances.head(top).iloc[::-1]
    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.3 * len(imp))))
    ax.barh(imp["feature"], imp["importance"], xerr=imp.get("std"))
    ax.set_xlabel("permutation importance")
    ax.set_title("Feature importances")
    return _save(fig, path)


def plot_calibration(table: pd.DataFrame, path: str | Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    ax.plot(table["mean_predicted"], table["observed_rate"], marker="o")
    ax.set_xlabel("mean predicted churn probability")
    ax.set_ylabel("observed churn rate")
    ax.set_title("Calibration")
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# Training entry: marts → CLV + churn → MLflow → ml.customer_scores (the I/O edge)
# ---------------------------------------------------------------------------------------------------------
CLV_MODEL_NAME = "crm_clv"
CHURN_MODEL_NAME = "crm_churn"
EXPERIMENT = "value"


@dataclass
class ValueTrainReport:
    run_id: str
    clv_champion: str
    churn_champion: str
    clv_version: str | None
    churn_version: str | None
    clv_promoted: bool
    churn_promoted: bool
    rows_published: int
    reason: str = ""


def read_value_marts(conn) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``marts.clv_training_set`` and ``marts.clv_scoring_set`` via COPY, with Python types fixed
    (text ids, dates, booleans that CSV spells t/f)."""
    from ml.memory import release_freed_memory

    training = _read_mart(conn, "marts.clv_training_set")
    # each read's Arrow buffers are freed but kept by Arrow's pool (~0.5 GB at 1M): hand them back before
    # the next read, or the pool's high-water mark is both reads'
    release_freed_memory()
    scoring = _read_mart(conn, "marts.clv_scoring_set")
    release_freed_memory()
    return training, scoring


def _read_mart(conn, table: str) -> pd.DataFrame:
    from ml.warehouse import read_frame

    frame = read_frame(conn, f"select * from {table}")  # noqa: S608 - fixed table names
    if "customer_id" in frame.columns:
        frame["customer_id"] = frame["customer_id"].astype(str)
    if "feature_cutoff_date" in frame.columns:
        frame["feature_cutoff_date"] = pd.to_datetime(frame["feature_cutoff_date"])
    if "has_future_purchase" in frame.columns and frame["has_future_purchase"].dtype != bool:
        frame["has_future_purchase"] = frame["has_future_purchase"].astype(str).isin(["t", "true", "True"])
    return frame


def _value_pyfunc(model: ValueModel):
    import mlflow.pyfunc

    class ValuePyfunc(mlflow.pyfunc.PythonModel):
        def __init__(self, value_model):
            self.value_model = value_model

        def predict(self, context, model_input, params=None):  # noqa: ARG002 - pyfunc signature
            return pd.Series(self.value_model.predict(model_input), name=self.value_model.kind)

    return ValuePyfunc(model)


def train_value(
    settings,
    *,
    orchestrator_run_id: str | None = None,
    valid_snapshot: int = 1,
    margin: float = 0.0,
    policy: str = "auto",
    n_threads: int | None = 1,
) -> ValueTrainReport:
    """Read the CLV marts, fit CLV and churn candidates with temporal validation, log parent + child runs,
    register both champions (promoted only if they beat the current champion re-scored on today's holdout),
    and publish ``ml.customer_scores``."""
    import tempfile

    import mlflow

    from ml import registry
    from ml.publish import publish
    from ml.warehouse import connect

    registry.configure(settings)
    with connect(settings) as conn:
        training, scoring = read_value_marts(conn)
    _check_frame(scoring, name="clv_scoring_set", labels=False)
    as_of = pd.Timestamp(scoring["feature_cutoff_date"].max()).date()

    # The run spans the fits (its duration is the training's). The marts are logged as read, then the read
    # training frame is let go: the fits use its sorted, BTYD-enriched copy, and both at once were ~0.5 GB
    # more at 1M customers, at the night's memory peak.
    with registry.parent_run(EXPERIMENT, as_of=as_of, run_name=f"value {as_of}",
                             orchestrator_run_id=orchestrator_run_id) as parent:
        registry.log_dataset(training, "marts.clv_training_set", as_of, targets="future_spend")
        registry.log_dataset(scoring, "marts.clv_scoring_set", as_of, context="scoring")
        prepared = prepare_training(training)  # the per-snapshot BTYD fits, once for both models
        del training
        clv = fit_value(prepared, valid_snapshot=valid_snapshot, n_threads=n_threads)
        churn = fit_churn(prepared, valid_snapshot=valid_snapshot, n_threads=n_threads)
        # The champion is re-scored on exactly the rows the challenger was validated on, BTYD columns included.
        holdout = validation_rows(prepared, valid_snapshot)
        y_holdout = holdout["future_spend"].to_numpy(float)
        del prepared
        mlflow.log_params({**{f"clv_{k}": v for k, v in clv.params.items()}, "horizon_days": int(scoring["horizon_days"].iloc[0])})
        for family, res, names in (("clv", clv, REGRESSION_METRICS), ("churn", churn, CHURN_METRICS)):
            for name, row in res.metrics.iterrows():
                with registry.child_run(f"{family}/{name}", tags={"family": family, "kind": row["kind"]}):
                    mlflow.log_metrics({m: float(row[m]) for m in (*names, "fit_seconds") if np.isfinite(float(row[m]))})
            champ = res.metrics.loc[res.champion]
            mlflow.log_metrics({m: float(champ[m]) for m in names if np.isfinite(float(champ[m]))})
            mlflow.set_tag(f"{family}_champion_candidate", res.champion)
        with tempfile.TemporaryDirectory() as tmp:
            v, c = clv.validation, churn.validation
            registry.log_figure_png(plot_clv_deciles(v["actual"], v[clv.champion], Path(tmp) / "d.png"), "plots/clv_deciles.png")
            registry.log_figure_png(plot_pred_vs_actual(v["actual"], v[clv.champion], Path(tmp) / "s.png"), "plots/clv_pred_vs_actual.png")
            registry.log_figure_png(plot_feature_importances(clv.feature_importances, Path(tmp) / "i.png"), "plots/clv_importances.png")
            registry.log_figure_png(plot_calibration(calibration_table(c["actual"], c[churn.champion]), Path(tmp) / "c.png"),
                                    "plots/churn_calibration.png")

        decisions = {}
        for model_name, res, metric, better in ((CLV_MODEL_NAME, clv, "rmse", False), (CHURN_MODEL_NAME, churn, "log_loss", False)):
            example = scoring.head(5)
            info = registry.log_pyfunc_model(_value_pyfunc(res.model), input_example=example, name=model_name,
                                             registered_model_name=model_name)

            def rescore(uri: str, res=res, metric=metric) -> float:
                pred = np.asarray(mlflow.pyfunc.load_model(uri).predict(holdout), float)
                if res.kind == "churn":
                    return churn_metrics(_churn_label(holdout), pred)[metric]
                return value_metrics(y_holdout, pred)[metric]

            decisions[model_name] = registry.decide_promotion(
                model_name, info.registered_model_version, challenger_score=float(res.metrics.loc[res.champion, metric]),
                score_fn=rescore, greater_is_better=better, margin=margin, policy=policy, metric_name=metric,
            )

        def serving(model_name: str, res: ValueResult):
            if decisions[model_name].promoted:
                return res.model
            return load_champion(model_name, res.kind)

        scores = score_customers(scoring, serving(CLV_MODEL_NAME, clv), serving(CHURN_MODEL_NAME, churn))
        report = publish(settings, "customer_scores", scores, as_of=as_of, run_id=parent.info.run_id,
                         model_name=CLV_MODEL_NAME, model_version=decisions[CLV_MODEL_NAME].champion_version_after,
                         key_columns=["customer_id"])
    return ValueTrainReport(
        parent.info.run_id, clv.champion, churn.champion,
        decisions[CLV_MODEL_NAME].champion_version_after, decisions[CHURN_MODEL_NAME].champion_version_after,
        decisions[CLV_MODEL_NAME].promoted, decisions[CHURN_MODEL_NAME].promoted, report.rows,
    )


def load_champion(model_name: str, kind: str):
    """The registered champion as a :class:`ValueModel` (unwrapped from its pyfunc, so scoring can share one
    BTYD fit between models), or a predict-only wrapper for a pyfunc of another shape."""
    import mlflow

    from ml import registry

    loaded = mlflow.pyfunc.load_model(registry.champion_uri(model_name))
    try:
        inner = loaded.unwrap_python_model().value_model
    except AttributeError:
        return _LoadedModel(loaded, kind)
    return inner


@dataclass
class _LoadedModel:
    """A champion loaded from the registry, with ValueModel's ``predict(frame)``."""

    pyfunc: object
    kind: str

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        return np.asarray(self.pyfunc.predict(frame), float)


def score_value(settings, *, orchestrator_run_id: str | None = None) -> ValueTrainReport:
    """Score today's ``marts.clv_scoring_set`` with the registered CLV and churn champions (no training) and
    publish ``ml.customer_scores``, citing a new lightweight MLflow run (tags ``kind=scoring``, ``as_of``, the
    champion versions, the orchestrator run id) so the published rows always match a run.

    Returns the same report as :func:`train_value`, with nothing promoted. Raises :class:`CrmError` when a
    family has no champion yet (the first night must train).
    """
    import mlflow

    from ml import registry
    from ml.publish import publish
    from ml.warehouse import connect

    registry.configure(settings)
    versions = {name: registry.champion_version(name) for name in (CLV_MODEL_NAME, CHURN_MODEL_NAME)}
    missing = [name for name, v in versions.items() if v is None]
    if missing:
        raise CrmError(f"No champion registered for {missing}: run train_value (the full nightly) before scoring.")
    with connect(settings) as conn:
        scoring = _read_mart(conn, "marts.clv_scoring_set")
    _check_frame(scoring, name="clv_scoring_set", labels=False)
    clv_model = load_champion(CLV_MODEL_NAME, "regression")
    churn_model = load_champion(CHURN_MODEL_NAME, "churn")
    as_of = pd.Timestamp(scoring["feature_cutoff_date"].max()).date()
    names = {CLV_MODEL_NAME: getattr(clv_model, "name", "champion"), CHURN_MODEL_NAME: getattr(churn_model, "name", "champion")}
    tags = {"kind": "scoring", "clv_champion_version": versions[CLV_MODEL_NAME],
            "churn_champion_version": versions[CHURN_MODEL_NAME]}
    with registry.parent_run(EXPERIMENT, as_of=as_of, run_name=f"value scoring {as_of}",
                             orchestrator_run_id=orchestrator_run_id, tags=tags) as run:
        registry.log_dataset(scoring, "marts.clv_scoring_set", as_of, context="scoring")
        scores = score_customers(scoring, clv_model, churn_model)
        mlflow.log_metrics({"n_scored": float(len(scores)), "mean_predicted_spend": float(scores["predicted_spend"].mean()),
                            "mean_churn_probability": float(scores["churn_probability"].mean())})
        report = publish(settings, "customer_scores", scores, as_of=as_of, run_id=run.info.run_id,
                         model_name=CLV_MODEL_NAME, model_version=versions[CLV_MODEL_NAME], key_columns=["customer_id"])
    reason = (f"scored with champion {CLV_MODEL_NAME} v{versions[CLV_MODEL_NAME]} and "
              f"{CHURN_MODEL_NAME} v{versions[CHURN_MODEL_NAME]} (no training)")
    return ValueTrainReport(
        run.info.run_id, names[CLV_MODEL_NAME], names[CHURN_MODEL_NAME], versions[CLV_MODEL_NAME],
        versions[CHURN_MODEL_NAME], False, False, report.rows, reason,
    )
