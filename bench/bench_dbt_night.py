"""dbt alone, full build against the incremental night, on a generated warehouse (issue 7, bounds 1 and 2).

    CRM_STATE_DIR=/tmp/dbt-bench CRM_PG_PORT=55441 .venv/bin/python -m bench.bench_dbt_night --customers 100000

Uses the embedded server of CRM_STATE_DIR / CRM_PG_PORT and a database of its own (``crm_bench_dbt_<N>``),
generated once and kept between runs (``--fresh`` regenerates). Then: ``dbt build --full-refresh``, one new
day of orders (bench.pipeline.one_new_day), ``dbt build`` (incremental). Prints wall and CPU seconds of
both builds (dbt's process, and the server's CPU from pg_stat / the server process tree), the slowest nodes
and the load average, so that the ratio is measured within one run.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import psutil

from bench.pipeline import DBT_VARS, age_history, one_new_day, replay_web_events
from ml.config import Settings
from ml.dbt import dbt_build
from ml.warehouse import connect, create_database, init_schemas, start_embedded


def _server_cpu(settings: Settings) -> float:
    """CPU seconds of the PostgreSQL server tree so far (postmaster and every backend)."""
    pid_file = settings.state_dir / "pgdata" / "postmaster.pid"
    root = psutil.Process(int(pid_file.read_text().split()[0]))
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def _timed_build(settings: Settings, label: str, **kwargs) -> dict:
    load = os.getloadavg()[0]
    cpu0 = psutil.Process().cpu_times()
    server0 = _server_cpu(settings)
    started = time.perf_counter()
    result = dbt_build(settings, **DBT_VARS, **kwargs)
    wall = time.perf_counter() - started
    cpu1 = psutil.Process().cpu_times()
    dbt_cpu = (cpu1.children_user + cpu1.children_system) - (cpu0.children_user + cpu0.children_system)
    slowest = sorted(result.nodes, key=lambda n: -n.execution_time)[:12]
    print(f"\n{label}: wall {wall:.1f} s, dbt CPU {dbt_cpu:.1f} s, server CPU ~{_server_cpu(settings) - server0:.1f} s, "
          f"load average {load:.2f} -> {os.getloadavg()[0]:.2f}, nodes {result.status_counts()}")
    for node in slowest:
        print(f"   {node.execution_time:7.2f} s  {node.unique_id}")
    return {"wall": wall, "result": result}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=730)
    parser.add_argument("--fresh", action="store_true", help="drop and regenerate the database")
    parser.add_argument("--skip-full", action="store_true", help="only the incremental night")
    parser.add_argument("--database", default=None,
                        help="an already built warehouse to run the nights on (e.g. a copy of the 1M template: "
                             "create database <name> template crm1m), instead of crm_bench_dbt_<customers>")
    parser.add_argument("--age-hours", type=int, default=24,
                        help="move the existing raw rows' _loaded_at back this many hours first (0: do not)")
    args = parser.parse_args()

    base = Settings.from_env()
    start_embedded(base)
    settings = base.with_database(args.database or f"crm_bench_dbt_{args.customers}")
    with connect(replace(base), autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_database where datname = %s",
                              (settings.warehouse.database,)).fetchone()
        if exists and args.fresh:
            conn.execute(f'drop database "{settings.warehouse.database}" with (force)')
            exists = None
    if not exists:
        from ml.ingest.generator import GeneratorParams, generate

        create_database(settings)
        with connect(settings) as conn:
            init_schemas(conn)
        started = time.perf_counter()
        with connect(settings) as conn:
            generate(conn, GeneratorParams(customers=args.customers, days=args.days, seed=42))
        print(f"generated {args.customers:,} customers in {time.perf_counter() - started:.1f} s")

    if args.age_hours:
        # The generator loads the whole history a minute before the build, so every row is inside the
        # incremental look-back (6 h) and an incremental run would re-process all of it.
        age_history(settings, hours=args.age_hours)
    if not args.skip_full:
        full = _timed_build(settings, "dbt build --full-refresh", full_refresh=True)
    # Two nights: the look-back (6 h before the newest load processed) always re-processes the previous
    # night's batch; in production that is one day, here the first night's previous batch is the whole
    # generated history. So the first night catches up and the second one is the steady state.
    for night in ("first night (re-processes the history batch)", "second night (steady state)"):
        with connect(settings) as conn:
            # the last real day of trading (stray future-dated orders lie beyond it)
            end = conn.execute("select latest_valid_order_date from staging.int_as_of").fetchone()[0]
        started = time.perf_counter()
        loaded = one_new_day(settings, end)
        loaded["raw.web_events"] = replay_web_events(settings)
        print(f"\nloaded one new day ({loaded}) in {time.perf_counter() - started:.1f} s")
        incremental = _timed_build(settings, f"dbt build (incremental), {night}")
    if not args.skip_full:
        print(f"\nincremental / full = {incremental['wall'] / full['wall']:.3f}")


if __name__ == "__main__":
    main()
