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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--threads", type=int, default=1, help="native threads per fit (0 = library default)")
    parser.add_argument("--skip-value", action="store_true")
    args = parser.parse_args(argv)
    threads = None if args.threads == 0 else args.threads

    from test_segmentation import planted_features

    from ml.segmentation import segment_customers
    from ml.value import fit_churn, fit_value, score_customers

    results = []
    for n in args.sizes:
        features = planted_features(n=n, seed=11).drop(columns="planted")
        for family in FAMILIES:
            with measure(f"segmentation {family} n={n:,}") as r:
                results.append(r)
                res = segment_customers(features, families=[family], k_range=range(3, 9), n_threads=threads)
                r.rows = n
                r.notes = {"champion": res.champion, "n_candidates": len(res.candidates)}
        if args.skip_value:
            continue
        train, scoring = _value_frames(n)
        with measure(f"clv fit_value n={n:,} ({len(train):,} rows)") as r:
            results.append(r)
            clv = fit_value(train, n_threads=threads)
            r.rows = len(train)
            r.notes = {"champion": clv.champion, **{f"fit_s_{k}": round(v, 2) for k, v in clv.metrics["fit_seconds"].items()}}
        with measure(f"churn fit_churn n={n:,}") as r:
            results.append(r)
            churn = fit_churn(train, n_threads=threads)
            r.rows = len(train)
            r.notes = {"champion": churn.champion}
        with measure(f"score_customers n={n:,}") as r:
            results.append(r)
            score_customers(scoring, clv.model, churn.model)
            r.rows = len(scoring)

    print(format_table(results))
    append_results(results, {"benchmark": "models", "sizes": args.sizes, "threads": args.threads})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
