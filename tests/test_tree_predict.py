"""ml.tree_predict: binned predictions of histogram gradient boosting are scikit-learn's own, bit for bit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestRegressor,
)

from ml import tree_predict
from ml.value import _signed_log1p


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "recency": rng.integers(0, 700, n).astype(float),
        "spend": rng.lognormal(4, 1.5, n),
        "share": rng.random(n),
        # few distinct values: thresholds fall exactly on values the scoring rows hold
        "orders": rng.integers(1, 6, n).astype(float),
    })
    frame.loc[rng.random(n) < 0.1, "share"] = np.nan  # missing at fit time: learnt direction
    return frame


def _scoring(seed: int) -> pd.DataFrame:
    frame = _frame(5_000, seed)
    frame.loc[:50, "recency"] = np.nan  # missing where training had none
    frame.loc[51:100, "spend"] = frame["spend"].max() * 10  # beyond the training range
    frame.loc[101:150, "recency"] = -5.0
    frame.loc[151:200, "orders"] = np.inf
    return frame


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binned_predictions_equal_scikit_learns_bit_for_bit(seed):
    train = _frame(20_000, seed)
    target = np.exp(train["share"].fillna(0.5) * 2 - train["recency"] / 500) * train["orders"]
    regressor = HistGradientBoostingRegressor(loss="poisson", max_iter=60, max_leaf_nodes=15,
                                              random_state=seed).fit(train, target)
    classifier = HistGradientBoostingClassifier(max_iter=60, random_state=seed).fit(train, target > target.median())
    scoring = _scoring(seed + 10)
    assert np.array_equal(tree_predict.predict(regressor, scoring), regressor.predict(scoring))
    assert np.array_equal(tree_predict.predict_proba(classifier, scoring), classifier.predict_proba(scoring))
    # and the binned path was taken, not the fallback
    assert tree_predict._binnable(regressor) and tree_predict._binnable(classifier)


def test_the_same_validation_as_predict():
    train = _frame(2_000, 0)
    model = HistGradientBoostingRegressor(max_iter=10).fit(train, train["spend"])
    with pytest.raises(ValueError, match="feature names"):
        tree_predict.predict(model, train[["spend", "recency", "share", "orders"]])
    with pytest.raises(ValueError):
        tree_predict.predict(model, train.drop(columns="orders"))


def test_models_it_does_not_cover_go_through_their_own_methods():
    train = _frame(2_000, 0).fillna(0)
    forest = RandomForestRegressor(n_estimators=5, random_state=0).fit(train, train["spend"])
    assert np.array_equal(tree_predict.predict(forest, train), forest.predict(train))
    with_categories = train.assign(orders=train["orders"].astype(int))
    categorical = HistGradientBoostingRegressor(max_iter=10, categorical_features=["orders"]).fit(
        with_categories, train["spend"])
    assert not tree_predict._binnable(categorical)
    assert np.array_equal(tree_predict.predict(categorical, with_categories), categorical.predict(with_categories))


def test_signed_log1p_is_the_plain_formula_bit_for_bit():
    x = np.array([[0.0, -0.0, 1e-300, -1e-300, 3.5, -3.5, 1e300, -1e300, np.nan]])
    expected = np.sign(x) * np.log1p(np.abs(x))
    got = _signed_log1p(x)
    assert np.array_equal(got, expected, equal_nan=True)
    assert np.array_equal(np.signbit(got), np.signbit(expected))
