"""Benchmark: segmentation families and value (CLV / churn) models at 10k / 100k (/ 1M) customers.

    .venv/bin/python bench/bench_models.py                    # 10k and 100k, prints a table
    .venv/bin/python bench/bench_models.py --sizes 10000 1000000
    .venv/bin/python bench/bench_models.py --threads 0        # libraries' own thread pools (all cores)

The frames are synthetic (the generator-like planted frame of tests/test_segmentation.py for
customer_features, a simulated buy-'til-you-die log of tests/test_value.py turned into clv_training_set
snapshots), so the benchmark measures the maths alone, not the database. Each step is timed with the
shared harness (wall seconds, peak RSS of this process); one segmentation family per step, over k = 3..8
with the same settings the nightly job uses (bootstrap stability included).
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench.harness import append_results, format_table, measure  # noqa: E402

FAMILIES = ("kmeans", "gmm", "ward", "hdbscan", "som")


def _value_frames(n: int, seed: int = 3):
    """clv_training_set with 3 snapshots and the scoring set, from simulated transactions of n customers."""
    from test_value import scoring_set, simulate_transactions, training_set

    tx = simulate_transactions(n=n, seed=seed)
    return training_set(tx, snapshots=3), scoring_set(tx)


@contextmanager
def _step(results, name: str):
    """measure() plus the CPU seconds of this process (the machine is shared: wall time is inflated)."""
    cpu0 = time.process_time()
    with measure(name) as r:
        results.append(r)
        yield r
        r.notes["cpu_s"] = round(time.process_time() - cpu0, 2)
    print(f"{name}: {r.seconds:.1f} s wall, peak RSS {r.peak_rss_python_mb:.0f} MB, {r.notes}", flush=True)


def _fit_rows_check(prepared, n: int, threads, caps=(100_000, 250_000, 500_000)):
    """Evidence for ml.value.MAX_FIT_ROWS: the validation RMSE of the boosted candidates fitted on samples of
    the training rows (all validated on the same rows), one step per cap."""
    import ml.value as value

    out, default = [], value.MAX_FIT_ROWS
    cands = {k: v for k, v in value.regression_candidates().items() if k in ("hist_gbm_poisson", "btyd_boosted_poisson")}
    try:
        for cap in caps:
            value.MAX_FIT_ROWS = cap
            with _step(out, f"clv fit rows cap {cap:,} n={n:,}") as r:
                res = value.fit_value(prepared, candidates=cands, refit=False, n_threads=threads)
                r.rows = res.params["n_train"]
                r.notes.update({f"rmse_{k}": round(float(res.metrics.loc[k, "rmse"]), 4) for k in cands})
                r.notes.update({f"top10_{k}": round(float(res.metrics.loc[k, "top_decile_capture"]), 4) for k in cands})
    finally:
        value.MAX_FIT_ROWS = default
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--threads", type=int, default=1, help="native threads per fit (0 = library default)")
    parser.add_argument("--skip-value", action="store_true")
    parser.add_argument("--skip-segmentation", action="store_true")
    parser.add_argument("--fit-rows-check", action="store_true",
                        help="validation RMSE with the candidates fitted on 100k / 250k / 500k rows")
    args = parser.parse_args(argv)
    threads = None if args.threads == 0 else args.threads

    from test_segmentation import planted_features

    from ml.segmentation import segment_customers
    from ml.value import fit_churn, fit_value, prepare_training, score_customers

    results = []
    for n in args.sizes:
        features = planted_features(n=n, seed=11).drop(columns="planted")
        for family in ([] if args.skip_segmentation else FAMILIES):
            with _step(results, f"segmentation {family} n={n:,}") as r:
                res = segment_customers(features, families=[family], k_range=range(3, 9), n_threads=threads)
                r.rows = n
                r.notes.update({"champion": res.champion, "n_candidates": len(res.candidates)})
        if args.skip_value:
            continue
        train, scoring = _value_frames(n)
        # As train_value runs them: the per-snapshot BTYD fits once, then both families reuse them.
        with _step(results, f"value prepare (BTYD per snapshot) n={n:,}") as r:
            prepared = prepare_training(train)
            r.rows = len(train)
        with _step(results, f"clv fit_value n={n:,} ({len(train):,} rows)") as r:
            clv = fit_value(prepared, n_threads=threads)
            r.rows = len(train)
            r.notes.update({"champion": clv.champion, "n_train": clv.params["n_train"],
                            **{f"fit_s_{k}": round(v, 2) for k, v in clv.metrics["fit_seconds"].items()}})
        with _step(results, f"churn fit_churn n={n:,}") as r:
            churn = fit_churn(prepared, n_threads=threads)
            r.rows = len(train)
            r.notes.update({"champion": churn.champion})
        with _step(results, f"score_customers n={n:,}") as r:
            score_customers(scoring, clv.model, churn.model)
            r.rows = len(scoring)
        if args.fit_rows_check:
            results.extend(_fit_rows_check(prepared, n, threads))

    print(format_table(results))
    for r in results:
        print(r.step, r.notes)
    append_results(results, {"benchmark": "models", "sizes": args.sizes, "threads": args.threads})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
