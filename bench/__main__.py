"""The benchmark: the whole nightly pipeline and its references, at one scale, in one run.

    .venv/bin/python -m bench --customers 10000            # 10k, 100k or 1M (any number works)
    .venv/bin/python -m bench --customers 100000 --steps pipeline,incremental,floors

Starts its own embedded PostgreSQL (a temporary state folder, a free port; removed afterwards), then runs
the steps of :mod:`bench.pipeline` and the references of :mod:`bench.reference`. Prints one table (wall
seconds, rows, rows/s, peak PSS of this process tree and of the PostgreSQL server tree and of both at one
instant, the ratio to the reference) and appends one JSON line to ``--results`` (default ``bench/results.jsonl``, git-ignored).

Step groups (``--steps``, comma separated; default all):
  pipeline     generate + load, dbt build (full), the three training tasks at once (each in its own
               process, training and publishing its families, as the DAG), the night's real wall time
  incremental  one new day, dbt build (incremental), score + publish   (needs pipeline)
  floors       COPY FROM STDIN / TO STDOUT of the same rows            (needs pipeline)
  mining       FIMI retail itemsets at 1 % / 0.2 % / 0.1 %: ours, pyfim, mlxtend (no warehouse needed)
  dbt          one dbt build against one build per model, as the DAG runs it (needs pipeline)
  dagparse     timed DagBag load of dags/
"""

from __future__ import annotations

import argparse
import json
import os
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
    parser.add_argument("--pg-options", default="", metavar="OPTS",
                        help="PGOPTIONS for every connection of the run (an experiment, e.g. "
                             "'-c enable_nestloop=off'); recorded with the results")
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


def _by_name(results) -> dict:
    return {(r["step"] if isinstance(r, dict) else r.step): (r if isinstance(r, dict) else vars(r) | {
        "rows_per_s": r.rows_per_s}) for r in results}


def target_rows(results, customers: int | None = None) -> list[tuple[str, str, str, str, str]]:
    """Issue 7's targets against this run's figures: (target, ours, reference, ratio, verdict).

    ``results`` are StepResults or the step dicts of a results.jsonl line, so RESULTS.md can be rebuilt
    from any recorded run. A figure that this run did not measure says so.
    """
    s = _by_name(results)
    rows = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "NOT met")

    full, inc = s.get(pipeline.NIGHTLY_FULL), s.get(pipeline.NIGHTLY_INCREMENTAL)
    if full:
        at_scale = customers is None or customers >= 1_000_000  # the 10 minutes are for 1M customers
        rows.append(("whole nightly, raw to published (<= 10 min at 1M)", f"{full['seconds']:.0f} s", "600 s",
                     f"{full['seconds'] / 600:.2f}",
                     verdict(full["seconds"] <= 600) if at_scale else "(1M target)"))
        # the largest python + server sum at one instant (older records: the two peaks of one step added)
        steps = [v for v in s.values() if v["notes"].get("kind") == "pipeline"]
        peak = max(v.get("peak_total_mb") or v["peak_rss_python_mb"] + v["peak_rss_server_mb"] for v in steps)
        rows.append(("peak memory of the night, all processes + server (<= 6 GB)", f"{peak:,.0f} MB", "6,144 MB",
                     f"{peak / 6144:.2f}", verdict(peak <= 6144)))
    if full and inc:
        ratio = inc["seconds"] / full["seconds"]
        rows.append(("incremental night (<= 10 % of the full run)", f"{inc['seconds']:.1f} s",
                     f"{full['seconds']:.1f} s", f"{ratio:.2f}", verdict(ratio <= 0.10)))
    # the quiet republish beside the floor when the run has it (the night's publishes share the cores with
    # the other training tasks); older records only have the night's
    pub = s.get(reference.PUBLISH_ALONE) or s.get(pipeline.PUBLISH)
    floor = s.get(reference.FLOOR_PUBLISH)
    if pub and floor and pub["rows_per_s"] and floor["rows_per_s"]:
        ratio = pub["rows_per_s"] / floor["rows_per_s"]
        rows.append(("publish rows/s (>= 70 % of raw COPY)", f"{pub['rows_per_s']:,.0f}/s",
                     f"{floor['rows_per_s']:,.0f}/s", f"{ratio:.2f}", verdict(ratio >= 0.70)))
    ours, pyfim = s.get(reference.mining_step("ours", 0.001)), s.get(reference.mining_step("pyfim", 0.001))
    if ours and pyfim and pyfim["seconds"] > 0:
        ratio = ours["seconds"] / pyfim["seconds"]
        rows.append(("itemsets 0.1 % retail.dat, time (<= 2x pyfim)", f"{ours['seconds']:.2f} s",
                     f"{pyfim['seconds']:.2f} s", f"{ratio:.1f}", verdict(ratio <= 2)))
        rows.append(("itemsets 0.1 % retail.dat, peak memory (<= 300 MB)", f"{ours['peak_rss_python_mb']:.0f} MB",
                     f"pyfim {pyfim['peak_rss_python_mb']:.0f} MB", f"{ours['peak_rss_python_mb'] / 300:.2f}",
                     verdict(ours["peak_rss_python_mb"] <= 300)))
    dag = s.get(reference.DAG_PARSE)
    if dag and "error" not in dag["notes"]:
        rows.append(("DAG parse (<= 1 s)", f"{dag['seconds']:.2f} s", "1 s", f"{dag['seconds']:.2f}",
                     verdict(dag["seconds"] <= 1)))
    load, copy = s.get(pipeline.LOAD), s.get(reference.FLOOR_COPY_IN)
    if load and load["rows_per_s"]:
        floor_rate = f"COPY floor {copy['rows_per_s']:,.0f}/s" if copy and copy["rows_per_s"] else "500,000/s"
        rows.append(("generator + loader (>= 500k order lines/s)", f"{load['rows_per_s']:,.0f}/s", floor_rate,
                     f"{load['rows_per_s'] / 500_000:.2f}", verdict(load["rows_per_s"] >= 500_000)))
    one, per_model = s.get(reference.DBT_ONE), s.get(reference.DBT_PER_MODEL)
    if one and per_model and one["seconds"] > 0:
        rows.append(("dbt via the DAG's tasks vs one dbt build (overhead)", f"{per_model['seconds']:.0f} s",
                     f"{one['seconds']:.0f} s", f"{per_model['seconds'] / one['seconds']:.1f}", "(no target)"))
    return rows


def format_targets(rows) -> str:
    header = ("target", "ours", "reference", "ratio", "")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_report(record: dict) -> str:
    """One recorded run (a results.jsonl line) as the Markdown RESULTS.md holds: targets, then every step."""
    out = [f"### {record['customers']:,} customers",
           "",
           f"{record['date']} · commit `{record['commit']}` · {record['cores']} cores, {record['memory_gb']} GiB · "
           f"Python {record['python']} · load average {record.get('load_average_before', '?')} at start, "
           f"{record.get('load_average_after', '?')} at end · total {record.get('total_seconds', '?')} s"
           + (f" · **experiment: PGOPTIONS=`{record['pg_options']}`**" if record.get("pg_options") else ""),
           "",
           "| target | ours | reference (same run) | ratio | |",
           "|---|---|---|---|---|"]
    out += [f"| {' | '.join(row)} |" for row in target_rows(record["steps"], record["customers"])]
    out += ["", "| step | seconds | CPU s (python + children) | rows | rows/s | peak PSS python MB | "
            "peak PSS server MB | peak python + server MB (one instant) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for st in record["steps"]:
        rows = f"{st['rows']:,}" if st.get("rows") is not None else ""
        rate = f"{st['rows_per_s']:,.0f}" if st.get("rows_per_s") else ""
        flag = " (timeout)" if "timeout" in st["notes"] else " (error)" if "error" in st["notes"] else ""
        cpu = st["notes"].get("cpu_seconds", "")
        out.append(f"| {st['step'].strip()}{flag} | {st['seconds']:.2f} | {cpu} | {rows} | {rate} | "
                   f"{st['peak_rss_python_mb']:.0f} | {st['peak_rss_server_mb']:.0f} | "
                   f"{st.get('peak_total_mb') or 0:.0f} |")
    return "\n".join(out)


def run(args: argparse.Namespace) -> pipeline.Bench:
    bench = pipeline.Bench(profile_dir=args.profile)
    groups = set(args.groups)
    if groups & NEEDS_WAREHOUSE:
        with pipeline.temp_warehouse(keep=args.keep) as settings:
            bench.server_pid = pipeline.server_pid(settings)
            pipeline.log(f"warehouse {settings.warehouse.redacted()} in {settings.state_dir}")
            if "pipeline" in groups:
                with pipeline.loaded_earlier(settings, hours=48):  # see pipeline.previous_night
                    params, _report = pipeline.generate_and_load(bench, settings, args.customers, args.days,
                                                                 args.seed)
                if "incremental" in groups:
                    pipeline.previous_night(bench, settings, params.resolved_end_date)
                pipeline.dbt_full(bench, settings)
                trained = pipeline.train_families(bench, settings, keep_frames="floors" in groups,
                                                  keep_models="incremental" in groups)
                frames = trained["frames"]
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
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["report"]:  # python -m bench report [results.jsonl]: the runs as RESULTS.md tables
        path = Path(argv[1]) if len(argv) > 1 else harness.RESULTS_FILE
        records = [json.loads(line) for line in path.read_text().splitlines() if '"pipeline"' in line]
        for record in records:
            print(markdown_report(record) + "\n")
        return 0
    args = parse_args(argv)
    if args.pg_options:
        # libpq reads PGOPTIONS on every connection: ours (psycopg) and dbt's child processes alike
        os.environ["PGOPTIONS"] = args.pg_options
        pipeline.log(f"experiment: PGOPTIONS={args.pg_options!r} for every connection")
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
    print("\ntargets (issue 7):")
    print(format_targets(target_rows(bench.results, args.customers)))
    for name in bench.skipped:
        print(f"skipped: {name} (its entry point does not exist yet)")
    meta = {"benchmark": "pipeline", "customers": args.customers, "days": args.days, "seed": args.seed,
            "groups": args.groups, "pg_options": args.pg_options, "skipped": bench.skipped, "total_seconds": round(total, 1),
            "load_average_before": round(load_before[0], 2), "load_average_after": round(load_after[0], 2)}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    append_results(bench.results, meta, path=args.results)
    print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
