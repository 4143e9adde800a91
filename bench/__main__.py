"""The benchmark: the whole nightly pipeline and its references, at one scale, in one run.

    .venv/bin/python -m bench --customers 10000            # 10k, 100k or 1M (any number works)
    .venv/bin/python -m bench --customers 100000 --steps pipeline,incremental,floors

Starts its own embedded PostgreSQL (a temporary state folder, a free port; removed afterwards), then runs
the steps of :mod:`bench.pipeline` and the references of :mod:`bench.reference`. Prints one table (wall
seconds, rows, rows/s, peak RSS of this process tree and of the PostgreSQL server tree, the ratio to the
reference) and appends one JSON line to ``--results`` (default ``bench/results.jsonl``, git-ignored).

Step groups (``--steps``, comma separated; default all):
  pipeline     generate + load, dbt build (full), train each family, publish
  incremental  one new day, dbt build (incremental), score + publish   (needs pipeline)
  floors       COPY FROM STDIN / TO STDOUT of the same rows            (needs pipeline)
  mining       FIMI retail itemsets at 1 % / 0.2 % / 0.1 %: ours, pyfim, mlxtend (no warehouse needed)
  dbt          one dbt build against one build per model, as the DAG runs it (needs pipeline)
  dagparse     timed DagBag load of dags/
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psutil

from bench import harness, pipeline, reference
from bench.harness import append_results, format_table

GROUPS = ("pipeline", "incremental", "floors", "mining", "dbt", "dagparse")
NEEDS_WAREHOUSE = {"pipeline", "incremental", "floors", "dbt", "dagparse"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[11:]))
    parser.add_argument("--customers", type=int, default=10_000, help="generated customers (10000, 100000, 1000000)")
    parser.add_argument("--days", type=int, default=730, help="days of history (default 730)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--steps", default=",".join(GROUPS), help=f"comma-separated groups of {', '.join(GROUPS)}")
    parser.add_argument("--results", type=Path, default=harness.RESULTS_FILE, help="JSON lines file to append to")
    parser.add_argument("--mining-timeout", type=float, default=600, help="seconds per miner run before it is stopped")
    parser.add_argument("--fimi-baskets", type=int, default=0,
                        help="mine only the first N baskets of the FIMI file (0 = all; smoke tests use a slice)")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="write a pyinstrument profile of every in-process step into DIR (needs pyinstrument)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary warehouse folder")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.steps.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown step group(s) {unknown}; choose from {', '.join(GROUPS)}")
    if {"incremental", "floors", "dbt"} & set(groups) and "pipeline" not in groups:
        print("note: incremental, floors and dbt run on the pipeline's warehouse: adding 'pipeline'", flush=True)
        groups.insert(0, "pipeline")
    args.groups = groups
    return args


def run(args: argparse.Namespace) -> pipeline.Bench:
    bench = pipeline.Bench(profile_dir=args.profile)
    groups = set(args.groups)
    if groups & NEEDS_WAREHOUSE:
        with pipeline.temp_warehouse(keep=args.keep) as settings:
            bench.server_pid = pipeline.server_pid(settings)
            pipeline.log(f"warehouse {settings.warehouse.redacted()} in {settings.state_dir}")
            if "pipeline" in groups:
                params, _report = pipeline.generate_and_load(bench, settings, args.customers, args.days, args.seed)
                pipeline.dbt_full(bench, settings)
                trained = pipeline.train_families(bench, settings)
                frames = trained["frames"]
                as_of = pipeline._as_of(settings)
                if frames:
                    pipeline.publish_all(bench, settings, frames, as_of)
                if "floors" in groups:
                    reference.copy_floors(bench, settings)
                    if frames:
                        reference.publish_floor(bench, settings, frames)
                if "incremental" in groups:
                    pipeline.incremental_night(bench, settings, params.resolved_end_date, trained)
                if "dbt" in groups:
                    reference.dbt_orchestration(bench, settings)
            if "dagparse" in groups:
                reference.dag_parse(bench, settings)
    if "mining" in groups:
        reference.itemset_mining(bench, timeout=args.mining_timeout, fimi_baskets=args.fimi_baskets)
    pipeline.add_totals(bench)
    return bench


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    load_before = psutil.getloadavg()
    pipeline.log(f"benchmark: {args.customers:,} customers, {args.days} days, seed {args.seed}, "
                 f"steps {','.join(args.groups)}; load average {load_before[0]:.2f}")
    bench = run(args)
    load_after = psutil.getloadavg()
    total = time.perf_counter() - started
    print(f"\nbenchmark: {args.customers:,} customers, {args.days} days, seed {args.seed} "
          f"(total {total:.0f} s; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after)")
    print(format_table(bench.results))
    for name in bench.skipped:
        print(f"skipped: {name} (its entry point does not exist yet)")
    meta = {"benchmark": "pipeline", "customers": args.customers, "days": args.days, "seed": args.seed,
            "groups": args.groups, "skipped": bench.skipped, "total_seconds": round(total, 1),
            "load_average_before": round(load_before[0], 2), "load_average_after": round(load_after[0], 2)}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    append_results(bench.results, meta, path=args.results)
    print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
