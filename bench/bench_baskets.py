"""Benchmark: itemset mining on FIMI retail and recommenders on UCI Online Retail.

    .venv/bin/python bench/bench_baskets.py            # everything, prints two tables
    .venv/bin/python bench/bench_baskets.py --mining   # only the itemset miners

Itemset mining at 0.1 % support (7,589 itemsets): our ``FrequentItemsets`` (FP-Growth via pyfim, with
the encoding and pattern-spectrum guard), plain pyfim ``fpgrowth``, and mlxtend's ``fpgrowth`` on a
sparse one-hot DataFrame. Each runs in its own subprocess, which reports its wall and CPU time and its own
peak RSS (``VmHWM``; ``ru_maxrss`` would carry the parent's size across exec), so one miner's memory does
not hide another's. Each miner's library is imported before the file is read, as in ``bench/reference.py``.

Recommenders: fit and scoring time (all 2,498 evaluated customers) with the evaluation protocol's
metrics, and the request-time latency of ``recommend_for_basket`` on the hybrid.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
FIMI = ROOT.parent / "shared" / "data" / "fimi_retail.dat.gz"
SUPPORT = 0.001
MINERS = ("ours_fpgrowth", "ours_eclat", "pyfim_fpgrowth", "mlxtend_fpgrowth")


def _read_fimi() -> list[list[str]]:
    with gzip.open(FIMI, "rt") as fh:
        return [line.split() for line in fh if line.strip()]


def _high_water_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024


def run_miner(name: str) -> dict:
    """Runs inside the child process: read the file, mine, report count, seconds and peak memory."""
    if name.startswith("ours_"):
        from ml.baskets import FrequentItemsets  # the import is part of the miner's memory, not its time
    tx = _read_fimi()
    before_mb = _high_water_mb()
    started, cpu_started = time.perf_counter(), time.process_time()
    if name.startswith("ours_"):
        n = len(FrequentItemsets(algorithm=name.removeprefix("ours_"), min_support=SUPPORT).fit(tx).itemsets_)
    elif name == "pyfim_fpgrowth":
        import math

        from fim import fpgrowth

        n = len(fpgrowth(tx, target="s", supp=-math.ceil(round(SUPPORT * len(tx), 9)), report="a"))
    elif name == "mlxtend_fpgrowth":
        import pandas as pd
        from mlxtend.frequent_patterns import fpgrowth
        from mlxtend.preprocessing import TransactionEncoder

        enc = TransactionEncoder()
        onehot = enc.fit(tx).transform(tx, sparse=True)  # a dense 88k x 16k frame would be ~1.4 GB
        frame = pd.DataFrame.sparse.from_spmatrix(onehot, columns=enc.columns_)
        n = len(fpgrowth(frame, min_support=SUPPORT))
    else:
        raise SystemExit(f"unknown miner {name}")
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {"miner": name, "itemsets": n, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
            "peak_rss_mb": round(_high_water_mb()), "rss_before_mining_mb": round(before_mb)}


def bench_mining(timeout: float = 1800) -> list[dict]:
    results = []
    for name in MINERS:
        try:
            out = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True,
                                 timeout=timeout, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        except subprocess.TimeoutExpired:
            results.append({"miner": name, "itemsets": None, "seconds": f">{timeout:g}", "peak_rss_mb": None})
        except subprocess.CalledProcessError as err:
            results.append({"miner": name, "itemsets": None, "seconds": "failed", "peak_rss_mb": err.stderr[-200:]})
    return results


def bench_recommenders() -> tuple[list[dict], dict]:
    import numpy as np
    from helpers_online_retail import load_online_retail, products_from_lines

    from ml.evaluation import evaluate_recommender
    from ml.recommend import (
        ContentRecommender,
        HybridRecommender,
        ItemKNNRecommender,
        PopularityRecommender,
        RuleRecommender,
        UserKNNRecommender,
        holdout_last_order,
    )

    lines = load_online_retail()
    products = products_from_lines(lines)
    models = {
        "popularity": PopularityRecommender(),
        "popularity (last 30 days)": PopularityRecommender(window_days=30),
        "rules": RuleRecommender(min_support=0.003),
        "item_knn bm25 k=20": ItemKNNRecommender(weighting="bm25", k=20),
        "item_knn bm25 k=200": ItemKNNRecommender(weighting="bm25", k=200),
        "item_knn cosine k=200": ItemKNNRecommender(weighting="cosine", k=200),
        "user_knn bm25 k=50": UserKNNRecommender(weighting="bm25", k=50),
        "content": ContentRecommender(),
        "hybrid (champion)": HybridRecommender(),
    }
    rows = []
    for name, model in models.items():
        m = evaluate_recommender(model, lines, products=products)
        rows.append({"model": name, **{k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}})
    history, targets = holdout_last_order(lines)
    hybrid = HybridRecommender().fit(history, products)
    baskets = history.groupby("basket_id")["product_id"].agg(list).sample(200, random_state=0).tolist()
    customers = targets.index[:200]
    hybrid.recommend_for_basket(baskets[0], n=10)  # warm-up
    times = []
    for basket, customer in zip(baskets, customers, strict=True):
        started = time.perf_counter()
        hybrid.recommend_for_basket(basket, customer_id=customer, n=10)
        times.append(time.perf_counter() - started)
    latency = {"requests": len(times), "p50_ms": round(1000 * float(np.median(times)), 1),
               "p95_ms": round(1000 * float(np.percentile(times, 95)), 1)}
    return rows, latency


def _table(rows: list[dict]) -> str:
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r.get(c))) for r in rows)) for c in cols}
    line = " | ".join(c.ljust(width[c]) for c in cols)
    sep = "-|-".join("-" * width[c] for c in cols)
    body = "\n".join(" | ".join(str(r.get(c)).ljust(width[c]) for c in cols) for r in rows)
    return f"{line}\n{sep}\n{body}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mining", action="store_true", help="only the itemset miners")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_miner(args.child)))
        return
    print(f"Itemset mining, FIMI retail, min_support {SUPPORT:.1%} (reference: 7,589 itemsets)\n")
    print(_table(bench_mining()))
    if args.mining:
        return
    rows, latency = bench_recommenders()
    print("\nRecommenders, UCI Online Retail, evaluation protocol (hide last order; new items; k=10)\n")
    print(_table(rows))
    print(f"\nrecommend_for_basket (hybrid, known customer + current basket): {latency}")


if __name__ == "__main__":
    main()
