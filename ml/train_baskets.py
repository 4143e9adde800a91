"""Train the basket family: association rules and recommenders, tracked in MLflow, published to schema ``ml``.

One call, one MLflow parent run (experiment ``baskets``)::

    train_baskets(settings, as_of=date(2025, 12, 31), min_support=0.005, min_confidence=0.2)

1. read ``marts.basket_lines`` (up to ``as_of``) and ``marts.dim_products`` by COPY;
2. mine frequent itemsets and rules at product and category level (``ml.baskets``); a threshold that
   gives no itemset, no product rule or too many itemsets fails here, before any run is opened;
3. parent run: params, the input dataset (``marts.basket_lines@<as_of>``), the rules as CSV artifacts;
4. every recommender evaluated with the one protocol (``ml.evaluation.evaluate_recommender``: hide each
   repeat customer's last order, rank 10 unbought items), each in its own child run with the same metric
   names; a bar chart of the metrics on the parent;
5. the best recommender by hit-rate@10 is refitted on all baskets, logged as a ``pyfunc`` model
   (``ml.recommender_model``) and registered as ``crm_recommender``; ``registry.decide_promotion``
   re-scores the current champion's recipe on today's holdout and moves ``@champion`` only if beaten;
6. publish ``ml.association_rules`` and ``ml.product_recommendations`` (recommendations of the model that
   is champion after the decision), citing the run id that already exists in the store.

``score_baskets(settings, as_of=...)`` is the score-only path of the incremental night: no mining, no
evaluation, no new model version; the registered champion scores today's customers from today's lines and
``ml.product_recommendations`` is published citing a small ``kind=scoring`` run and the champion's version.

Why the champion is re-scored as a *recipe* (its estimator's parameters refitted under the protocol) and
not as its frozen fitted state: the frozen model has seen today's hidden last orders when its as_of is
today's (a rerun), and excluding bought items would then hide exactly the targets; refitting on the same
history is the only comparison that judges both models on the same, unseen orders.
"""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
from psycopg import sql
from sklearn.base import clone

from ml import registry
from ml.baskets import AssociationRules, BasketError, FrequentItemsets
from ml.config import Settings
from ml.evaluation import evaluate_recommender
from ml.memory import release_freed_memory
from ml.publish import PublishReport, publish
from ml.recommend import (
    BaseRecommender,
    ContentRecommender,
    HybridRecommender,
    ItemKNNRecommender,
    PopularityRecommender,
    RecommenderError,
    RuleRecommender,
    UserKNNRecommender,
)
from ml.recommender_model import fitted_recommender, log_recommender
from ml.warehouse import connect, read_frame

log = logging.getLogger(__name__)

EXPERIMENT = "baskets"
MODEL_NAME = "crm_recommender"
METRICS = ("hit_rate_at_10", "precision_at_10", "recall_at_10", "ndcg_at_10", "catalogue_coverage")
PROMOTION_METRIC = "hit_rate_at_10"
RULE_COLUMNS = ["level", "antecedent", "consequent", "antecedent_names", "consequent_name", "antecedent_len",
                "support", "confidence", "lift", "leverage", "conviction", "antecedent_support",
                "consequent_support", "n_baskets_with_rule", "rule_text"]
EVAL_MAX_CUSTOMERS = 20_000  # customers ranked per candidate under the protocol (bounded at 1M; see evaluation)
RECOMMENDATION_COLUMNS = ["customer_id", "rank", "product_id", "product_name", "score", "method", "reason",
                          "recommender"]


@dataclass(frozen=True)
class BasketTrainingResult:
    """What one training run did: the run, the rules, the comparison, the decision and the publishes."""

    as_of: dt.date
    run_id: str
    experiment_id: str
    model_name: str
    model_version: str  # registered by this run (the challenger)
    challenger: str  # recommender name of the challenger
    champion_version: str | None  # after the promotion decision
    promoted: bool
    promotion_reason: str
    published_model_version: str  # the version whose recommendations were published
    metrics: pd.DataFrame  # one row per recommender, METRICS columns
    rules: dict[str, pd.DataFrame]  # level -> rules
    n_itemsets: dict[str, int]
    n_baskets: int
    n_customers: int
    reports: dict[str, PublishReport] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Building and reading the marts
# ---------------------------------------------------------------------------------------------------------
BASKET_MARTS = ("+basket_lines", "+dim_products")


def build_basket_marts(settings: Settings, as_of: dt.date):
    """``dbt build`` of only the marts basket training reads, and their parents, with their tests.

    Cautious indirect selection: a test that also reads a model outside the selection (a relationship to
    ``dim_customers``) is left for the full build, instead of failing on a table this build did not make.
    The nightly DAG builds everything; this is for tests, benchmarks and a quick retrain.
    """
    from ml.dbt import run_dbt

    return run_dbt(settings, ["build", "--select", *BASKET_MARTS, "--indirect-selection", "cautious"],
                   vars={"as_of": as_of.isoformat()})


def read_basket_marts(settings: Settings, as_of: dt.date) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``marts.basket_lines`` up to ``as_of`` and the products of ``marts.dim_products`` (COPY out, ordered so
    a rerun sees identical frames and fits identical models)."""
    lines_query = sql.SQL(
        "select basket_id, customer_id, product_id, category, ordered_at, quantity from marts.basket_lines "
        "where ordered_at < {} order by basket_id, product_id"
    ).format(sql.Literal(as_of + dt.timedelta(days=1)))
    # is_product is filtered in SQL: COPY's CSV booleans would arrive as 't'/'f' text
    products_query = ("select product_id, product_name, category, subcategory, brand, price_band "
                      "from marts.dim_products where is_product order by product_id")
    with connect(settings) as conn:
        lines = read_frame(conn, lines_query)
        products = read_frame(conn, products_query)
    if lines.empty:
        raise BasketError(
            f"no baskets to learn from: marts.basket_lines has no line on or before as_of {as_of}; load orders "
            "and run `dbt build` (crm run) for this as_of first"
        )
    lines = lines.astype({"basket_id": "str", "product_id": "str", "category": "str"})
    lines["customer_id"] = lines["customer_id"].astype("str")  # nulls stay missing (pandas 3 str dtype)
    lines["ordered_at"] = pd.to_datetime(lines["ordered_at"])
    products = products.astype({c: "str" for c in products.columns})
    release_freed_memory()  # the Arrow table as read and the text before conversion (GBs at 1M customers)
    return lines, products


# ---------------------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------------------
def mine_levels(
    lines: pd.DataFrame,
    *,
    algorithm: str,
    min_support: float,
    category_min_support: float,
    min_confidence: float,
    min_lift: float,
    max_len: int | None,
    max_itemsets: int,
) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """Rules at product and category level. No product rule at all is an error (it names the counts)."""
    rules, counts = {}, {}
    for level, support in (("product", min_support), ("category", category_min_support)):
        itemsets = FrequentItemsets(algorithm=algorithm, min_support=support, max_len=max_len, level=level,
                                    max_itemsets=max_itemsets).fit(lines)
        found = AssociationRules(min_confidence=min_confidence, min_lift=min_lift).fit(itemsets)
        rules[level], counts[level] = found.rules_, len(itemsets.itemsets_)
        if level == "product" and found.rules_.empty:
            multi = int((itemsets.itemsets_["length"] >= 2).sum())
            raise BasketError(
                f"no product rules at min_support={support}, min_confidence={min_confidence}, "
                f"min_lift={min_lift}: {len(itemsets.itemsets_):,} frequent itemsets of which {multi:,} have two "
                f"or more items ({found.n_candidates_:,} candidate rules, {found.n_redundant_:,} redundant) over "
                f"{itemsets.n_baskets_:,} baskets; lower min_support"
                + (" or min_confidence / min_lift" if found.n_candidates_ else "")
            )
    return rules, counts


def rules_for_publish(rules: dict[str, pd.DataFrame], products: pd.DataFrame) -> pd.DataFrame:
    """One table of both levels: items as text (ids joined by ' + '), names beside them, a readable sentence."""
    names = pd.Series(products["product_name"].to_numpy(), index=products["product_id"].to_numpy())
    frames = []
    for level, frame in rules.items():
        if frame.empty:
            continue
        flat = frame["antecedent"].explode()
        label = flat.astype(str).to_numpy(dtype=object)
        consequent_name = frame["consequent"].astype(str).to_numpy(dtype=object)
        if level == "product":  # product names where the catalogue knows them, the id otherwise
            label = _named(label, names)
            consequent_name = _named(consequent_name, names)
        antecedent_names = pd.Series(label, index=flat.index).groupby(level=0).agg(" + ".join)
        out = pd.DataFrame({
            "level": level,
            "antecedent": frame["antecedent"].map(lambda items: " + ".join(map(str, items))),
            "consequent": frame["consequent"].astype(str),
            "antecedent_names": antecedent_names.reindex(frame.index).to_numpy(),
            "consequent_name": consequent_name,
        })
        for col in ("antecedent_len", "support", "confidence", "lift", "leverage", "conviction",
                    "antecedent_support", "consequent_support", "n_baskets_with_rule"):
            out[col] = frame[col].to_numpy()
        out["antecedent_len"] = out["antecedent_len"].astype(np.int64)
        out["n_baskets_with_rule"] = out["n_baskets_with_rule"].astype(np.int64)
        out["rule_text"] = ("customers who buy " + out["antecedent_names"] + " also buy " + out["consequent_name"]
                            + " in " + (100 * out["confidence"]).round(0).astype(int).astype(str)
                            + "% of baskets (lift " + out["lift"].round(1).astype(str) + ")")
        frames.append(out)
    table = pd.concat(frames, ignore_index=True)[RULE_COLUMNS]
    return table.sort_values(["level", "lift", "antecedent", "consequent"], ascending=[False, False, True, True],
                             kind="stable").reset_index(drop=True)


def _named(ids: np.ndarray, names: pd.Series) -> np.ndarray:
    found = names.reindex(ids).to_numpy(dtype=object)
    return np.where(pd.isna(found), ids, found)


# ---------------------------------------------------------------------------------------------------------
# Recommenders
# ---------------------------------------------------------------------------------------------------------
def recommenders(*, min_support: float, min_confidence: float, min_lift: float, max_len: int | None,
                 rule_min_support: float | None = None) -> dict[str, BaseRecommender]:
    """The candidates compared offline, unfitted. The rule-based one mines its rules inside ``fit`` with the
    run's thresholds, so under the protocol it never sees the hidden orders."""
    rule_support = rule_min_support if rule_min_support is not None else min_support
    rules = RuleRecommender(min_support=rule_support, min_confidence=min_confidence, min_lift=min_lift,
                            max_len=max_len or 3)
    components = {
        "popularity_recent": PopularityRecommender(window_days=30),
        "item_knn": ItemKNNRecommender(weighting="bm25", k=200),
        "user_knn": UserKNNRecommender(weighting="bm25", k=50),
        "content": ContentRecommender(),
        "rules": clone(rules),
    }
    return {
        "popularity": PopularityRecommender(),
        "rules": rules,
        "item_knn": ItemKNNRecommender(weighting="bm25", k=200),
        "user_knn": UserKNNRecommender(weighting="bm25", k=50),
        "content": ContentRecommender(),
        "hybrid": HybridRecommender(components=components),
    }


def _loggable_params(model: BaseRecommender) -> dict[str, Any]:
    params = {}
    for key, value in model.get_params(deep=False).items():
        if isinstance(value, dict):
            params[key] = ",".join(f"{k}={type(v).__name__}" for k, v in value.items())
        elif value is None or isinstance(value, (str, int, float, bool)):
            params[key] = value
    return params


def _same_recipe(a: Any, b: Any) -> bool:
    """Same estimator class and the same parameters, nested estimators compared the same way."""
    if isinstance(a, BaseRecommender) or isinstance(b, BaseRecommender):
        if type(a) is not type(b):
            return False
        try:
            pa, pb = a.get_params(deep=False), b.get_params(deep=False)
        except AttributeError:  # a model pickled by an older version of its class: not comparable
            return False
        return pa.keys() == pb.keys() and all(_same_recipe(pa[k], pb[k]) for k in pa)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_recipe(a[k], b[k]) for k in a)
    if isinstance(a, pd.DataFrame) or isinstance(b, pd.DataFrame):
        return isinstance(a, pd.DataFrame) and isinstance(b, pd.DataFrame) and a.equals(b)
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


def _log_blend(fitted: BaseRecommender) -> None:
    """A hybrid's learned blends and their validation metrics (next order, cold customers, basket completion)."""
    validation = getattr(fitted, "validation_", None)
    if not validation:
        return
    mlflow.log_metrics({f"blend_{k}": float(v) for k, v in validation.items() if np.isfinite(float(v))})
    for label, attr in (("next_order", "weights_"), ("cold", "cold_weights_"), ("basket", "basket_weights_")):
        weights = getattr(fitted, attr, None)
        if weights:
            mlflow.log_param(f"blend_weights_{label}", ",".join(f"{k}={v:g}" for k, v in weights.items()))


def _metrics_chart(metrics: pd.DataFrame):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    table = metrics[list(METRICS)]
    width = 0.8 / len(table)
    x = np.arange(len(METRICS))
    for i, (name, row) in enumerate(table.iterrows()):
        ax.bar(x + i * width, row.to_numpy(), width, label=name)
    ax.set_xticks(x + 0.4 - width / 2, [m.replace("_at_10", "@10") for m in METRICS])
    ax.set_ylabel("mean over evaluated customers")
    ax.set_title("Recommenders on the hidden last order (cross-sell, k=10)")
    ax.legend(fontsize=8, ncols=3)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------
def _recommendation_table(recs: pd.DataFrame, serving, serving_name: str) -> pd.DataFrame:
    """A recommender's ranked picks as the published ``product_recommendations`` columns."""
    # names looked up once per distinct product, not once per row
    product = recs["product_id"].astype("category")
    names = pd.Series(serving.names_, index=serving.items_).reindex(product.cat.categories)
    name_codes, distinct_names = pd.factorize(names)  # a missing name is code -1, NaN in the Categorical
    recs = recs.assign(
        product_id=product,
        product_name=pd.Categorical.from_codes(name_codes[product.cat.codes.to_numpy()], distinct_names),
        recommender=pd.Categorical.from_codes(np.zeros(len(recs), dtype=np.int8), [serving_name]),
    )[RECOMMENDATION_COLUMNS]
    recs["rank"] = recs["rank"].astype(np.int64)
    return recs


def train_baskets(
    settings: Settings,
    *,
    as_of: dt.date,
    algorithm: str = "fpgrowth",
    min_support: float = 0.01,
    category_min_support: float | None = None,
    min_confidence: float = 0.2,
    min_lift: float = 1.0,
    max_len: int | None = 3,
    max_itemsets: int = 2_000_000,
    rule_recommender_min_support: float | None = None,
    n_recommendations: int = 10,
    promotion_policy: str = "auto",
    promotion_margin: float = 0.0,
    model_name: str = MODEL_NAME,
    experiment_name: str = EXPERIMENT,
    orchestrator_run_id: str | None = None,
) -> BasketTrainingResult:
    """Mine rules, compare the recommenders, register and promote the best, publish rules and recommendations.

    ``min_support`` is the product-level threshold (share of baskets); ``category_min_support`` defaults to
    it. ``rule_recommender_min_support`` is the rule-based recommender's own threshold (defaults to
    ``min_support``). Raises :class:`ml.baskets.BasketError` (a ``CrmError``) for empty marts or thresholds
    that give nothing or too much, before any MLflow run is opened or anything is published.
    """
    if isinstance(as_of, dt.datetime) or not isinstance(as_of, dt.date):
        raise BasketError(f"as_of must be a datetime.date, got {as_of!r}")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    lines, products = read_basket_marts(settings, as_of)
    timings["read_marts"] = time.perf_counter() - started

    started = time.perf_counter()
    cat_support = category_min_support if category_min_support is not None else min_support
    rules, n_itemsets = mine_levels(lines, algorithm=algorithm, min_support=min_support,
                                    category_min_support=cat_support, min_confidence=min_confidence,
                                    min_lift=min_lift, max_len=max_len, max_itemsets=max_itemsets)
    rules_table = rules_for_publish(rules, products)
    timings["mine_rules"] = time.perf_counter() - started

    known = lines["customer_id"].notna()
    # no copy of 10M+ lines when every basket has its customer (the generator's and most nights' case)
    customer_lines = lines if known.all() else lines[known]
    del known
    if customer_lines.empty:
        raise RecommenderError("no basket line has a customer: recommendations need known customers")
    candidates = recommenders(min_support=min_support, min_confidence=min_confidence, min_lift=min_lift,
                              max_len=max_len, rule_min_support=rule_recommender_min_support)
    params = {
        "as_of": as_of.isoformat(), "algorithm": algorithm, "min_support": min_support,
        "category_min_support": cat_support, "min_confidence": min_confidence, "min_lift": min_lift,
        "max_len": max_len, "max_itemsets": max_itemsets, "n_recommendations": n_recommendations,
        "promotion_policy": promotion_policy, "promotion_margin": promotion_margin,
        "recommenders": ",".join(candidates),
    }

    registry.configure(settings)
    # registry.child_run starts nested runs without an experiment id: MLflow puts them in the *active*
    # experiment (Default unless set), not the parent's. Making ours active keeps the children beside it.
    mlflow.set_experiment(experiment_id=registry.experiment(experiment_name))
    with registry.parent_run(experiment_name, as_of=as_of, run_name=f"baskets {as_of.isoformat()}",
                             orchestrator_run_id=orchestrator_run_id, tags={"family": "baskets"}) as parent:
        run_id = parent.info.run_id
        mlflow.log_params(params)
        registry.log_dataset(lines, "marts.basket_lines", as_of)
        registry.log_dataset(products, "marts.dim_products", as_of)
        n_baskets = int(lines["basket_id"].nunique())
        n_customers = int(customer_lines["customer_id"].nunique())
        mlflow.log_metrics({
            "n_basket_lines": len(lines), "n_baskets": n_baskets, "n_customers": n_customers,
            **{f"n_itemsets_{level}": n for level, n in n_itemsets.items()},
            **{f"n_rules_{level}": len(frame) for level, frame in rules.items()},
            "mine_seconds": timings["mine_rules"],
        })
        del lines  # anonymous baskets served the rules; the recommenders need the customers' lines only
        with tempfile.TemporaryDirectory() as tmp:
            for level in rules:
                path = Path(tmp) / f"{level}_rules.csv"
                rules_table[rules_table["level"] == level].to_csv(path, index=False)
                mlflow.log_artifact(str(path), artifact_path="rules")

        # one protocol, one child run per recommender, identical metric names
        started = time.perf_counter()
        rows = {}
        for name, model in candidates.items():
            with registry.child_run(name, tags={"recommender": name}):
                mlflow.log_params({"recommender": name, **_loggable_params(model)})
                scores = evaluate_recommender(model, customer_lines, k=10, products=products,
                                              max_customers=EVAL_MAX_CUSTOMERS)
                mlflow.log_metrics({k: float(v) for k, v in scores.items()})
                rows[name] = scores
        metrics = pd.DataFrame.from_dict(rows, orient="index")
        timings["evaluate"] = time.perf_counter() - started
        registry.log_figure_png(_metrics_chart(metrics), "plots/recommender_metrics.png")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "recommender_metrics.csv"
            metrics.to_csv(path, index_label="recommender")
            mlflow.log_artifact(str(path), artifact_path="metrics")

        # the challenger: best hit-rate@10 (NDCG breaks ties), refitted on every basket
        ranked = metrics.sort_values([PROMOTION_METRIC, "ndcg_at_10"], ascending=False, kind="stable")
        challenger = str(ranked.index[0])
        challenger_score = float(ranked[PROMOTION_METRIC].iloc[0])
        mlflow.log_metric(f"challenger_{PROMOTION_METRIC}", challenger_score)
        mlflow.set_tag("challenger", challenger)
        started = time.perf_counter()
        fitted = clone(candidates[challenger]).fit(customer_lines, products)
        timings["fit_challenger"] = time.perf_counter() - started
        _log_blend(fitted)
        example_customer = str(fitted.customers_[0])
        example_basket = [str(p) for p in rules["product"]["antecedent"].iloc[0]]
        info = log_recommender(fitted, recommender_name=challenger, registered_model_name=model_name,
                               example_customer=example_customer, example_basket=example_basket)
        version = str(info.registered_model_version)

        def rescore(uri: str, lines: pd.DataFrame = customer_lines) -> float:
            recipe = fitted_recommender(mlflow.pyfunc.load_model(uri))
            if _same_recipe(recipe, candidates[challenger]):
                # the protocol is deterministic: the same recipe on the same lines scores what it just scored
                # (saves refitting the champion at 1M customers on most nights)
                return challenger_score
            return float(evaluate_recommender(clone(recipe), lines, k=10, products=products,
                                              max_customers=EVAL_MAX_CUSTOMERS)[PROMOTION_METRIC])

        decision = registry.decide_promotion(
            model_name, version, challenger_score=challenger_score, score_fn=rescore, greater_is_better=True,
            margin=promotion_margin, policy=promotion_policy, metric_name=PROMOTION_METRIC)
        log.info("promotion of %s v%s: %s", model_name, version, decision.reason)

        # publish what the champion recommends: the registered champion's own fitted state (the challenger
        # just logged, or the kept champion as registered) scoring today's lines, exactly what a scoring
        # night computes with it, so the next scoring night can carry these rows for unchanged customers
        started = time.perf_counter()
        champion = decision.champion_version_after
        if champion is None or champion == version:
            serving, published_version, serving_name = fitted, version, challenger
        else:
            kept = mlflow.pyfunc.load_model(f"models:/{model_name}/{champion}")
            serving = fitted_recommender(kept)
            published_version, serving_name = champion, kept.unwrap_python_model().recommender_name
        recs = recommendation_frame(settings, serving, serving_name, customer_lines, as_of=as_of, run_id=run_id,
                                    n=n_recommendations)
        timings["recommend_all"] = time.perf_counter() - started
        # the lines and the models are not needed for the publish: let them go first (GBs at 1M customers)
        del customer_lines, rescore, fitted, serving
        release_freed_memory()
        mlflow.log_metrics({"n_recommendations": len(recs), "n_rules_published": len(rules_table),
                            **{f"{k}_seconds": v for k, v in timings.items()}})

        # nothing is published without its run: the run exists (checked) before the first row is written
        registry.require_run(run_id)
        reports = {
            "association_rules": publish(settings, "association_rules", rules_table, as_of=as_of, run_id=run_id,
                                         model_name=model_name, model_version=version,
                                         key_columns=["level", "antecedent", "consequent"]),
            "product_recommendations": publish(settings, "product_recommendations", recs, as_of=as_of,
                                               run_id=run_id, model_name=model_name,
                                               model_version=published_version,
                                               key_columns=["customer_id", "rank"]),
        }
        mlflow.set_tags({"published": "ml.association_rules,ml.product_recommendations",
                         "published_model_version": published_version})
        experiment_id = parent.info.experiment_id

    return BasketTrainingResult(
        as_of=as_of, run_id=run_id, experiment_id=experiment_id, model_name=model_name, model_version=version,
        challenger=challenger, champion_version=decision.champion_version_after, promoted=decision.promoted,
        promotion_reason=decision.reason, published_model_version=published_version, metrics=metrics,
        rules=rules, n_itemsets=n_itemsets, n_baskets=n_baskets, n_customers=n_customers, reports=reports,
        seconds=timings,
    )


# ---------------------------------------------------------------------------------------------------------
# Score-only: today's customers with the champion, no retraining (the incremental night)
# ---------------------------------------------------------------------------------------------------------
def score_baskets(
    settings: Settings,
    *,
    as_of: dt.date,
    orchestrator_run_id: str | None = None,
    n_recommendations: int = 10,
    model_name: str = MODEL_NAME,
    experiment_name: str = EXPERIMENT,
    incremental: bool = True,
) -> BasketTrainingResult:
    """Publish ``ml.product_recommendations`` for ``as_of`` from the registered champion, without retraining.

    The champion's fitted state (similarities, rules, neighbour pool, blends) is used as it is; each
    customer's history and recent baskets are read from today's ``marts.basket_lines``
    (``recommend_from_lines``), so what a customer bought since the champion was trained is not offered
    again and fires its rules. One lightweight MLflow run (tags ``kind=scoring``, ``as_of``,
    ``champion_version``, orchestrator run id) is what the published rows cite, with the champion's version.

    **Only customers whose inputs changed are scored** (``incremental``, the default; see
    :func:`plan_scoring`): a customer's top-10 is a function of the champion's fitted state and of that
    customer's own basket lines only (no population statistic, nothing that depends on ``as_of`` itself),
    so a customer whose lines up to ``as_of`` hash to the same ``input_fingerprint`` as in the published
    table, under the same champion version, would get exactly the same rows again. Those rows are carried
    forward server-side (``ml.publish.CarryForward``), keeping their ``scored_as_of`` / ``scored_run_id``;
    everyone else (new lines, late or re-delivered lines, lines that entered the as_of window, new
    customers) is scored. A changed champion, a backfill or a table without fingerprints scores everyone.

    ``ml.association_rules`` is carried over, not re-mined: mining is the costly, data-sized part of the
    basket family (a full pass of FP-Growth over every basket), rules move slowly from one day to the next,
    and the champion's rule-based scores and reasons come from the rules it was trained with — freshly
    mined rules the champion does not use would make the table disagree with the recommendations.
    The table keeps the as_of and run of the last training night.

    Raises :class:`ml.errors.CrmError` when ``model_name`` has no champion (run the training night first).
    """
    from ml.errors import CrmError
    from ml.publish import CarryForward

    if isinstance(as_of, dt.datetime) or not isinstance(as_of, dt.date):
        raise BasketError(f"as_of must be a datetime.date, got {as_of!r}")
    timings: dict[str, float] = {}
    registry.configure(settings)
    champion = registry.champion_version(model_name)
    if champion is None:
        raise CrmError(f"no champion recommender to score with: {model_name!r} has no @champion version in "
                       "the MLflow registry; run the full nightly (train_baskets) first")
    with connect(settings) as conn:
        started = time.perf_counter()
        plan = plan_scoring(conn, as_of=as_of, model_name=model_name, champion_version=champion,
                            incremental=incremental)
        n_inputs, n_carried = _stage_inputs(conn, as_of, plan)
        if n_inputs == 0:
            raise RecommenderError("no basket line has a customer: recommendations need known customers")
        lines = _read_lines(conn, sql.SQL(
            "select basket_id, customer_id, product_id, category, ordered_at, quantity from marts.basket_lines "
            "where ordered_at < {} and customer_id in (select customer_id from {}) "
            "order by basket_id, product_id").format(sql.Literal(as_of + dt.timedelta(days=1)),
                                                     sql.Identifier(_SCORED_TABLE)))
        fingerprints = read_frame(conn, sql.SQL("select customer_id, input_fingerprint from {}").format(
            sql.Identifier(_SCORED_TABLE)))
        timings["plan_and_read"] = time.perf_counter() - started
        log.info("score_baskets %s: %s; %d customers to score, %d carried", as_of, plan.reason,
                 n_inputs - n_carried, n_carried)

        started = time.perf_counter()
        loaded = mlflow.pyfunc.load_model(f"models:/{model_name}/{champion}")
        serving = fitted_recommender(loaded)
        serving_name = loaded.unwrap_python_model().recommender_name
        timings["load_champion"] = time.perf_counter() - started

        mlflow.set_experiment(experiment_id=registry.experiment(experiment_name))
        with registry.parent_run(experiment_name, as_of=as_of, run_name=f"baskets scoring {as_of.isoformat()}",
                                 orchestrator_run_id=orchestrator_run_id,
                                 tags={"family": "baskets", "kind": "scoring", "champion_version": champion,
                                       "recommender": serving_name, "carried_from": str(plan.carry_from or "")}
                                 ) as run:
            run_id = run.info.run_id
            started = time.perf_counter()
            picks = (serving.recommend_from_lines(lines, n=n_recommendations, compact=True) if len(lines)
                     else pd.DataFrame(columns=list(RECOMMENDATION_COLUMNS)))
            recs = _scored_table(picks, serving, serving_name, fingerprints, as_of, run_id)
            timings["recommend_changed"] = time.perf_counter() - started
            known = (int((serving.customers_.get_indexer(pd.Index(lines["customer_id"].unique())) >= 0).sum())
                     if len(lines) else 0)
            mlflow.log_params({"as_of": as_of.isoformat(), "model_name": model_name, "champion_version": champion,
                               "n_recommendations": n_recommendations, "scoring_plan": plan.reason[:500]})
            mlflow.log_metrics({"n_customers": n_inputs, "n_customers_scored": n_inputs - n_carried,
                                "n_customers_carried": n_carried, "n_customers_known_to_champion": known,
                                "n_basket_lines_read": len(lines), "n_recommendations_scored": len(recs),
                                **{f"{k}_seconds": v for k, v in timings.items()}})
            registry.require_run(run_id)
            carry = (CarryForward(plan.carry_from, "customer_id", _CHANGED_TABLE) if plan.carry_from is not None
                     else None)
            report = publish(conn, "product_recommendations", recs, as_of=as_of, run_id=run_id,
                             model_name=model_name, model_version=champion, key_columns=["customer_id", "rank"],
                             carry=carry, allow_empty=carry is not None)
            conn.commit()
            mlflow.log_metric("n_recommendations", report.rows)
            mlflow.set_tags({"published": "ml.product_recommendations", "published_model_version": champion,
                             "association_rules": "carried over from the last training run"})
            experiment_id = run.info.experiment_id
    timings["rows_carried"] = float(report.rows_carried)

    return BasketTrainingResult(
        as_of=as_of, run_id=run_id, experiment_id=experiment_id, model_name=model_name, model_version=champion,
        challenger=serving_name, champion_version=champion, promoted=False,
        promotion_reason=f"scored with champion {model_name} v{champion} ({serving_name}); no retraining; "
                         f"{plan.reason}: {n_inputs - n_carried} customers scored, {n_carried} carried",
        published_model_version=champion, metrics=pd.DataFrame(columns=list(METRICS)), rules={}, n_itemsets={},
        n_baskets=int(lines["basket_id"].nunique()) if len(lines) else 0, n_customers=n_inputs,
        reports={"product_recommendations": report}, seconds=timings,
    )


# ---------------------------------------------------------------------------------------------------------
# What changed since the published recommendations (the incremental scoring night)
# ---------------------------------------------------------------------------------------------------------
# Session temporary tables of the scoring connection: every customer's input fingerprint tonight, the
# customers who changed or are gone (not carried), and the ones to score.
_INPUTS_TABLE = "_recommendation_inputs"
_CHANGED_TABLE = "_recommendation_changed"
_SCORED_TABLE = "_recommendation_scored"


@dataclass(frozen=True)
class ScoringPlan:
    """Where tonight's unchanged customers' rows come from: ``carry_from`` (an as_of of the published table)
    or nowhere (None: every customer is scored), and why."""

    carry_from: dt.date | None
    reason: str


def _input_fingerprints(as_of: dt.date) -> sql.Composed:
    """Per customer, a 64-bit digest of exactly what ``recommend_from_lines`` reads of them: the
    (basket, product, time) of every basket line up to ``as_of``, and how many there are. Order-independent
    (xor of row hashes), so it is one hash aggregate over ``marts.basket_lines``, no sort."""
    return sql.SQL(
        "select customer_id, "
        "bit_xor(hashtextextended(basket_id || '|' || product_id || '|' || ordered_at::text, 0)) "
        "# hashint8extended(count(*), 0) as input_fingerprint "
        "from marts.basket_lines where ordered_at < {} and customer_id is not null group by customer_id"
    ).format(sql.Literal(as_of + dt.timedelta(days=1)))


def plan_scoring(conn, *, as_of: dt.date, model_name: str, champion_version: str,
                 incremental: bool = True) -> ScoringPlan:
    """Carry unchanged customers only from a published table of the same champion version (a changed
    champion, or a retrain night, scores everyone), for an as_of not after tonight's (a backfill scores
    everyone), and that has input fingerprints (tables of earlier versions do not)."""
    if not incremental:
        return ScoringPlan(None, "full rescore requested")
    published = None
    if conn.execute("select to_regclass('ml.published_tables') is not null").fetchone()[0]:
        published = conn.execute("select as_of, model_name, model_version from ml.published_tables "
                                 "where table_name = 'product_recommendations'").fetchone()
    if published is None:
        return ScoringPlan(None, "no published recommendations yet: every customer scored")
    prev_as_of, prev_model, prev_version = published
    if prev_as_of > as_of:
        return ScoringPlan(None, f"backfill of {as_of} before the published {prev_as_of}: every customer scored")
    if prev_model != model_name or str(prev_version) != str(champion_version):
        return ScoringPlan(None, f"published rows are of {prev_model} v{prev_version}, the champion is "
                                 f"{model_name} v{champion_version}: every customer scored")
    has_fingerprints = conn.execute(
        "select exists (select 1 from information_schema.columns where table_schema = 'ml' "
        "and table_name = 'product_recommendations_history' and column_name = 'input_fingerprint')").fetchone()[0]
    if not has_fingerprints:
        return ScoringPlan(None, "published rows have no input fingerprints: every customer scored")
    return ScoringPlan(prev_as_of, f"unchanged customers carried from {prev_as_of} (champion v{champion_version})")


def _stage_inputs(conn, as_of: dt.date, plan: ScoringPlan) -> tuple[int, int]:
    """Fill the session's temporary tables (set-based, on the server): tonight's fingerprints, the customers
    whose fingerprint differs from (or is missing in) the published rows of ``plan.carry_from`` or who are
    gone since, and of those the ones to score. One hash join of tonight's customers with the published
    first picks; the carry itself is then an anti-join against the small changed set (ml.publish).
    Returns (customers with lines, customers carried). Committed, so scoring runs outside a transaction."""
    inputs, changed, scored = map(sql.Identifier, (_INPUTS_TABLE, _CHANGED_TABLE, _SCORED_TABLE))
    conn.execute(sql.SQL("drop table if exists {}, {}, {}").format(inputs, changed, scored))
    conn.execute(sql.SQL("create temp table {} as {}").format(inputs, _input_fingerprints(as_of)))
    if plan.carry_from is not None:
        # rank 1: one row per customer of the published table (every customer there has a first pick)
        conn.execute(sql.SQL(
            "create temp table {changed} as "
            "select coalesce(i.customer_id, h.customer_id) as customer_id, i.input_fingerprint "
            "from {inputs} i full join (select customer_id, input_fingerprint "
            "from ml.product_recommendations_history where as_of = %s and rank = 1) h "
            "on h.customer_id = i.customer_id "
            "where i.input_fingerprint is distinct from h.input_fingerprint"
        ).format(changed=changed, inputs=inputs), [plan.carry_from])
    else:
        conn.execute(sql.SQL("create temp table {} as select * from {}").format(changed, inputs))
    # the changed customers who still have lines (the others are gone: neither scored nor carried)
    conn.execute(sql.SQL("create temp table {} as select * from {} where input_fingerprint is not null").format(
        scored, changed))
    # statistics for the semi-join reading the scored customers' lines and the carry's anti-join (temp tables get none)
    conn.execute(sql.SQL("analyze {}, {}").format(scored, changed))
    counts = conn.execute(sql.SQL("select (select count(*) from {}), (select count(*) from {})").format(
        inputs, scored)).fetchone()
    conn.commit()
    return int(counts[0]), int(counts[0]) - int(counts[1])


def recommendation_frame(settings: Settings, serving, serving_name: str, lines: pd.DataFrame, *, as_of: dt.date,
                         run_id: str, n: int = 10) -> pd.DataFrame:
    """Every customer of ``lines`` (all of ``marts.basket_lines`` up to ``as_of``) scored by ``serving`` as a
    scoring night would, as the published frame with each customer's input fingerprint: what a training
    night publishes (and the benchmark's full night). Callers release the scoring's freed memory once they
    have let the lines go too (one trim for both)."""
    def read_fingerprints() -> pd.DataFrame:
        with connect(settings) as conn:
            return read_frame(conn, _input_fingerprints(as_of))

    release_freed_memory()  # what the fit freed, before the scoring's own peak
    # the server aggregates the fingerprints (~8 s over 10M lines at 1M customers) while this process scores
    with ThreadPoolExecutor(1, thread_name_prefix="crm-fingerprints") as pool:
        fingerprints = pool.submit(read_fingerprints)
        picks = serving.recommend_from_lines(lines, n=n, compact=True)
        return _scored_table(picks, serving, serving_name, fingerprints.result(), as_of, run_id)


def _read_lines(conn, query: sql.Composable) -> pd.DataFrame:
    lines = read_frame(conn, query)
    if lines.empty:
        return pd.DataFrame({c: pd.Series(dtype="str") for c in ("basket_id", "customer_id", "product_id",
                                                                  "category")})
    lines = lines.astype({"basket_id": "str", "product_id": "str", "category": "str"})
    lines["customer_id"] = lines["customer_id"].astype("str")
    lines["ordered_at"] = pd.to_datetime(lines["ordered_at"])
    return lines


def _scored_table(picks: pd.DataFrame, serving, serving_name: str, fingerprints: pd.DataFrame, as_of: dt.date,
                  run_id: str) -> pd.DataFrame:
    """The published frame: the picks (``_recommendation_table``) plus what scored them and on which inputs
    (``scored_as_of``, ``scored_run_id``, ``input_fingerprint``), with fixed column types so that an empty
    frame (a rerun with nothing changed) publishes into the same columns."""
    if len(picks):
        recs = _recommendation_table(picks, serving, serving_name)
        fp = pd.Series(fingerprints["input_fingerprint"].to_numpy(np.int64),
                       index=fingerprints["customer_id"].astype("str").to_numpy())
        # looked up once per customer, not per row: to_numpy() of 10M ids made 10M Python strings (~0.6 GB)
        codes, customers = pd.factorize(recs["customer_id"])
        found = fp.reindex(np.asarray(customers, dtype=object))
        if found.isna().any():
            raise RecommenderError("a recommended customer has no input fingerprint (lines read inconsistently)")
        recs["input_fingerprint"] = found.to_numpy(np.int64)[codes]
    else:
        recs = pd.DataFrame({c: pd.Series(dtype="str") for c in RECOMMENDATION_COLUMNS})
        recs["input_fingerprint"] = pd.Series(dtype="int64")
    # Columns with few distinct values are categorical (published as text all the same): as one string per
    # row they were most of the frame (~1 GB of product and method names, ~0.6 GB of reasons at 1M customers).
    recs = recs.astype({"customer_id": "str", "rank": "int64", "product_id": "category", "product_name": "category",
                        "score": "float64", "method": "category", "reason": "category", "recommender": "category"})
    recs = recs.reset_index(drop=True)
    recs.insert(len(RECOMMENDATION_COLUMNS), "scored_as_of", pd.arrays.ArrowExtensionArray(
        pa.array(np.full(len(recs), np.datetime64(as_of, "D")), type=pa.date32())))
    recs.insert(len(RECOMMENDATION_COLUMNS) + 1, "scored_run_id",
                pd.Categorical.from_codes(np.zeros(len(recs), dtype=np.int8), categories=pd.Index([run_id], dtype="str")))
    return recs
