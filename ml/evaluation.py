"""The one offline evaluation protocol for every recommender and data set (cross-sell, next order).

For each customer with at least two orders (orders ordered by time, basket id breaking ties) the last
order is hidden; its *targets* are the items the customer had never bought before. Customers whose
last order holds no new item have nothing to cross-sell and are not evaluated (on UCI Online Retail,
cleaned as in the tests, this leaves exactly 2,498 of 2,829 repeat customers). The recommender is
fitted on everything except the hidden orders, then ranks ``k`` items each evaluated customer has not
bought. Metrics are means over evaluated customers:

- ``hit_rate_at_k``: share of customers with at least one target in the top k;
- ``precision_at_k``: hits / k;  ``recall_at_k``: hits / number of targets;
- ``ndcg_at_k``: binary-relevance DCG / ideal DCG (ideal = min(k, n targets) hits on top);
- ``catalogue_coverage``: distinct recommended items / distinct items in the history;
- ``n_customers_evaluated``.

``max_customers`` bounds the evaluation at scale: the model is still fitted on every history, but only a
reproducible random sample of that many evaluated customers is ranked (at 1M customers ranking every
repeat customer would cost as much as the nightly scoring itself, for a metric whose standard error at
20,000 customers is already ~0.003).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from sklearn.base import clone

from ml.recommend import BaseRecommender, RecommenderError, holdout_last_order


def evaluate_recommender(
    recommender: BaseRecommender | Callable[[], BaseRecommender],
    order_lines: pd.DataFrame,
    k: int = 10,
    products: pd.DataFrame | None = None,
    max_customers: int | None = None,
    random_state: int = 0,
) -> dict[str, float]:
    """Fit a fresh copy of ``recommender`` on the history and score it on the hidden last orders.

    ``recommender`` is an (unfitted or fitted — it is cloned either way) estimator or a zero-argument
    factory. ``order_lines`` is ``fct_order_lines``/``basket_lines``-shaped (customer_id, basket_id or
    order_id, product_id, ordered_at). Returns the metrics named in the module docstring plus
    ``fit_seconds`` and ``recommend_seconds``.
    """
    import time

    history, targets = holdout_last_order(order_lines)
    if len(targets) == 0:
        raise RecommenderError(
            "nothing to evaluate: no customer has a second order containing an item they had not bought "
            "before (evaluation needs repeat customers)"
        )
    if max_customers is not None and len(targets) > max_customers:
        targets = targets.sample(max_customers, random_state=random_state).sort_index()
    model = recommender() if callable(recommender) and not isinstance(recommender, BaseRecommender) else clone(recommender)
    started = time.perf_counter()
    model.fit(history, products)
    fitted = time.perf_counter()
    recs = model.recommend(targets.index, n=k, exclude_purchased=True)
    done = time.perf_counter()
    metrics = score_recommendations(recs, targets, k=k, n_catalogue=history["product_id"].nunique())
    metrics["fit_seconds"] = fitted - started
    metrics["recommend_seconds"] = done - fitted
    return metrics


def score_recommendations(recs: pd.DataFrame, targets: pd.Series, k: int, n_catalogue: int) -> dict[str, float]:
    """Metrics of ranked recommendations (customer_id, rank, product_id) against target sets."""
    recs = recs[recs["rank"] <= k]
    exploded = targets.apply(list).explode()
    truth = pd.DataFrame({"customer_id": exploded.index.astype(str), "product_id": exploded.astype(str).to_numpy(),
                          "is_target": True})
    joined = recs.astype({"customer_id": "str", "product_id": "str"}).merge(
        truth, on=["customer_id", "product_id"], how="left")
    hit = joined["is_target"].fillna(False).astype(bool).to_numpy()
    joined["hit"] = hit
    joined["gain"] = np.where(hit, 1.0 / np.log2(joined["rank"].to_numpy() + 1.0), 0.0)
    per = joined.groupby("customer_id").agg(hits=("hit", "sum"), dcg=("gain", "sum"))
    ids = targets.index.astype(str)
    per = per.reindex(ids, fill_value=0)
    n_targets = targets.apply(len).to_numpy()
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(discounts)[np.minimum(n_targets, k) - 1]
    hits = per["hits"].to_numpy(dtype=np.float64)
    return {
        "hit_rate_at_10" if k == 10 else f"hit_rate_at_{k}": float((hits > 0).mean()),
        "precision_at_10" if k == 10 else f"precision_at_{k}": float((hits / k).mean()),
        "recall_at_10" if k == 10 else f"recall_at_{k}": float((hits / n_targets).mean()),
        "ndcg_at_10" if k == 10 else f"ndcg_at_{k}": float((per["dcg"].to_numpy() / ideal).mean()),
        "catalogue_coverage": float(recs["product_id"].nunique() / max(n_catalogue, 1)),
        "n_customers_evaluated": int(len(targets)),
    }
