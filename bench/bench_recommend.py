"""Benchmark: recommender fit and scoring at 10k / 100k (/ 1M) generated customers, and request latency.

    .venv/bin/python bench/bench_recommend.py                         # 10k and 100k customers
    .venv/bin/python bench/bench_recommend.py --customers 10000       # one scale
    .venv/bin/python bench/bench_recommend.py --customers 1000000 --models popularity,item_knn

Per scale: a temporary embedded warehouse (``bench.pipeline.temp_warehouse``), the generator, the dbt
marts basket training reads, then ``ml.train_baskets.read_basket_marts`` (COPY out). Each recommender is
fitted on every customer's baskets and scores every customer (top 10, with reasons, nothing already
bought) — the nightly ``ml.product_recommendations`` workload, ``recommend_from_lines`` as the nightly calls
it — with wall and CPU time and peak RSS of this process (sampled, ``bench.harness.measure``). Scoring uses
two threads on two cores; ``CRM_SCORING_THREADS=1`` measures the serial loop.

``--parquet DIR``: read the marts from parquet exports of a built warehouse (the 1M template's
``/work/bench1m/parquet``); ``--customers`` then only labels the rows.

``--synthetic``: skip the warehouse and dbt and draw order lines in memory (``synthetic_lines``: customers
with a category taste, Zipf item popularity, ~10 lines per customer as the generator's marts have) — for the
1M scale, where generating and building the marts would dominate the session.

Request latency: the fitted champion recipe (``--latency-model``, default hybrid) is saved as the same
``pyfunc`` model ``ml.train_baskets`` registers, loaded with ``mlflow.pyfunc.load_model``, and asked for
one basket at a time (a real basket of the data, with its customer): p50 / p95 over ``--requests``
requests, plus the in-process ``recommend_for_basket`` call without the pyfunc layer for comparison.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import measure  # noqa: E402
from bench.pipeline import log, temp_warehouse  # noqa: E402

MODELS = ("popularity", "rules", "item_knn", "user_knn", "content", "hybrid")


def build_marts(settings, customers: int, seed: int, days: int):
    from ml.ingest.generator import GeneratorParams, generate
    from ml.train_baskets import build_basket_marts, read_basket_marts
    from ml.warehouse import connect

    params = GeneratorParams(customers=customers, days=days, seed=seed)
    started = time.perf_counter()
    with connect(settings) as conn:
        generate(conn, params)
    log(f"  generated {customers:,} customers in {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    build_basket_marts(settings, params.resolved_end_date)
    log(f"  dbt marts in {time.perf_counter() - started:.0f} s")
    lines, products = read_basket_marts(settings, params.resolved_end_date)
    return lines[lines["customer_id"].notna()].reset_index(drop=True), products


def synthetic_lines(customers: int, seed: int, n_products: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Order lines drawn in memory, shaped like ``marts.basket_lines`` (vectorised, no per-customer loop)."""
    rng = np.random.default_rng(seed)
    n_products = n_products or int(np.clip(20 * np.sqrt(customers), 200, 2000))  # as the generator
    n_cat = 20
    category = rng.integers(0, n_cat, n_products)
    popularity = 1.0 / np.arange(1, n_products + 1) ** 0.9
    orders_per = 1 + rng.poisson(1.5, customers)
    order_customer = np.repeat(np.arange(customers), orders_per)
    lines_per = 1 + rng.poisson(2.5, len(order_customer))
    line_order = np.repeat(np.arange(len(order_customer)), lines_per)
    line_customer = order_customer[line_order]
    # each customer prefers two categories: half of their lines come from them
    favourite = rng.integers(0, n_cat, (customers, 2))
    by_cat = [np.flatnonzero(category == c) for c in range(n_cat)]
    cum = [np.cumsum(popularity[ix]) / popularity[ix].sum() for ix in by_cat]
    product = rng.choice(n_products, size=len(line_order), p=popularity / popularity.sum())
    themed = rng.random(len(line_order)) < 0.5
    cat = favourite[line_customer, rng.integers(0, 2, len(line_order))]
    for c in range(n_cat):
        m = themed & (cat == c)
        product[m] = by_cat[c][np.minimum(np.searchsorted(cum[c], rng.random(m.sum())), len(by_cat[c]) - 1)]
    day = rng.integers(0, 730, len(order_customer))

    def ids(prefix, values, width):
        return pd.Series(np.char.add(prefix, np.char.zfill(values.astype(str), width)), dtype="str")

    lines = pd.DataFrame({
        "basket_id": ids("O", line_order, 8),
        "customer_id": ids("C", line_customer, 7),
        "product_id": ids("P", product, 5),
        "category": ids("cat", category[product], 2),
        "ordered_at": pd.Timestamp("2024-01-01") + pd.to_timedelta(day[line_order], unit="D"),
        "quantity": 1,
    })
    idx = np.arange(n_products)
    products = pd.DataFrame({
        "product_id": ids("P", idx, 5),
        "product_name": [f"item {i % 97} cat{category[i]:02d} style{i % 13}" for i in idx],
        "category": ids("cat", category, 2), "subcategory": pd.Series(idx % 50).astype("str"),
        "brand": ids("brand", idx % 30, 2), "price_band": ids("band", idx % 4, 1),
    })
    return lines.drop_duplicates(["basket_id", "product_id"]).reset_index(drop=True), products


def parquet_marts(directory: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``marts.basket_lines`` and ``marts.dim_products`` from parquet exports (lines with a customer only)."""
    lines = pd.read_parquet(directory / "marts.basket_lines.parquet")
    products = pd.read_parquet(directory / "marts.dim_products.parquet")
    log(f"  {len(lines):,} basket lines, {len(products):,} products from {directory}")
    return lines[lines["customer_id"].notna()].reset_index(drop=True), products


def bench_models(lines: pd.DataFrame, products: pd.DataFrame, names: list[str], customers: int) -> tuple[list, dict]:
    from sklearn.base import clone

    from ml.recommend import _scoring_threads
    from ml.train_baskets import recommenders

    candidates = recommenders(min_support=0.001, min_confidence=0.1, min_lift=1.0, max_len=3)
    ids = pd.Index(np.sort(lines["customer_id"].unique()))
    rows, fitted = [], {}
    for name in names:
        model = clone(candidates[name])
        # CPU seconds beside wall seconds: on a shared machine wall time measures the neighbours too
        cpu = time.process_time()
        with measure(f"fit {name}") as fit:
            model.fit(lines, products)
        fit_cpu, cpu = time.process_time() - cpu, time.process_time()
        with measure(f"score {name}") as score:
            # the nightly path (ml.train_baskets.recommendation_frame): every customer from their lines,
            # chunks scored on ml.recommend._scoring_threads() threads
            recs = model.recommend_from_lines(lines, ids, n=10)
        score_cpu = time.process_time() - cpu
        fitted[name] = model
        rows.append({
            "customers": f"{customers:,}", "model": name, "lines": f"{len(lines):,}",
            "fit_s": round(fit.seconds, 2), "fit_cpu_s": round(fit_cpu, 2), "score_s": round(score.seconds, 2),
            "score_cpu_s": round(score_cpu, 2),
            "scored": f"{recs['customer_id'].nunique():,}", "threads": _scoring_threads(),
            "per_1k_customers_ms": round(1000 * score.seconds / max(len(ids), 1) * 1000, 1),
            "peak_rss_mb": round(max(fit.peak_rss_python_mb, score.peak_rss_python_mb)),
        })
        log(f"  {name}: fit {fit.seconds:.1f} s ({fit_cpu:.1f} CPU), score {score.seconds:.1f} s ({score_cpu:.1f} CPU), "
            f"peak {rows[-1]['peak_rss_mb']} MB")
    return rows, fitted


def bench_latency(model, lines: pd.DataFrame, requests: int, customers: int, name: str) -> dict:
    import joblib
    import mlflow

    from ml.recommender_model import ARTIFACT_KEY, RecommenderModel, signature

    baskets = lines.groupby("basket_id").agg(customer_id=("customer_id", "first"), basket=("product_id", list))
    sample = baskets.sample(min(requests, len(baskets)), random_state=0)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "recommender.joblib"
        joblib.dump(model, artifact)
        mlflow.pyfunc.save_model(str(Path(tmp) / "model"), python_model=RecommenderModel(recommender_name=name),
                                 artifacts={ARTIFACT_KEY: str(artifact)}, signature=signature())
        started = time.perf_counter()
        pyfunc = mlflow.pyfunc.load_model(str(Path(tmp) / "model"))
        load_s = time.perf_counter() - started
        first = sample.iloc[0]
        pyfunc.predict(pd.DataFrame({"customer_id": [first["customer_id"]], "basket": [first["basket"]]}))  # warm
        via_pyfunc, direct = [], []
        for customer, basket in zip(sample["customer_id"], sample["basket"], strict=True):
            request = pd.DataFrame({"customer_id": [customer], "basket": [basket]})
            started = time.perf_counter()
            pyfunc.predict(request)
            via_pyfunc.append(time.perf_counter() - started)
            started = time.perf_counter()
            model.recommend_for_basket(basket, customer_id=customer, n=10)
            direct.append(time.perf_counter() - started)

    def ms(values, q):
        return round(1000 * float(np.percentile(values, q)), 1)

    return {"customers": f"{customers:,}", "model": name, "requests": len(via_pyfunc),
            "load_s": round(load_s, 2), "pyfunc_p50_ms": ms(via_pyfunc, 50), "pyfunc_p95_ms": ms(via_pyfunc, 95),
            "direct_p50_ms": ms(direct, 50), "direct_p95_ms": ms(direct, 95)}


def _table(rows: list[dict]) -> str:
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r.get(c))) for r in rows)) for c in cols}
    head = " | ".join(c.ljust(width[c]) for c in cols)
    sep = "-|-".join("-" * width[c] for c in cols)
    body = "\n".join(" | ".join(str(r.get(c)).ljust(width[c]) for c in cols) for r in rows)
    return f"{head}\n{sep}\n{body}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--days", type=int, default=730)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--latency-model", default="hybrid", help="the recipe whose pyfunc latency is measured")
    parser.add_argument("--requests", type=int, default=200, help="baskets asked one at a time")
    parser.add_argument("--synthetic", action="store_true", help="order lines drawn in memory (no warehouse/dbt)")
    parser.add_argument("--parquet", type=Path, default=None,
                        help="a directory of mart exports (marts.basket_lines.parquet, marts.dim_products.parquet), "
                             "e.g. /work/bench1m/parquet: the real marts of a built warehouse, no generation")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    latency_model = args.latency_model if args.latency_model in names else names[-1]

    fit_rows, latency_rows = [], []
    for customers in args.customers:
        log(f"{customers:,} customers")
        if args.parquet is not None:
            lines, products = parquet_marts(args.parquet)
        elif args.synthetic:
            lines, products = synthetic_lines(customers, args.seed)
        else:
            with temp_warehouse() as settings:
                lines, products = build_marts(settings, customers, args.seed, args.days)
        rows, fitted = bench_models(lines, products, names, customers)
        fit_rows += rows
        latency_rows.append(bench_latency(fitted[latency_model], lines, args.requests, customers, latency_model))
        del fitted
    print("\nRecommender fit and scoring (every customer, top 10 with reasons)\n")
    print(_table(fit_rows))
    print("\nRequest latency: one basket (+ its customer) per request\n")
    print(_table(latency_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
