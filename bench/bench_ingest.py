"""Benchmark of the synthetic CRM generator and loader: ``python -m bench.bench_ingest --customers 100000``.

Starts its own embedded PostgreSQL (a temporary data folder, a free port), generates and loads a CRM as one
batch, and prints rows/s per table next to the floor: a plain COPY of the same order lines into a scratch
table (what PostgreSQL alone costs for that volume). Appends the run to ``bench/results.jsonl``.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from bench.harness import StepResult, append_results, format_table
from ml.config import PROJECT_ROOT, Settings
from ml.ingest.generator import GeneratorParams, generate
from ml.warehouse import connect, copy_in, copy_out, init_schemas, start_embedded, stop_embedded


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def _measure(step: str):
    """Wall time of a block, and this process's peak RSS so far (bench.harness.measure's sampler thread
    cannot be joined on Python 3.11: its ``_stop`` attribute shadows ``Thread._stop``)."""
    result = StepResult(step=step)
    started = time.perf_counter()
    try:
        yield result
    finally:
        result.seconds = time.perf_counter() - started
        result.peak_rss_python_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(customers: int, days: int, seed: int, web_events: bool, keep: bool) -> list[StepResult]:
    (PROJECT_ROOT / ".state").mkdir(exist_ok=True)  # a fresh checkout has no state folder yet
    state = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=PROJECT_ROOT / ".state"))
    settings = Settings.from_env({"CRM_STATE_DIR": str(state), "CRM_PG_PORT": str(_free_port())})
    results: list[StepResult] = []
    try:
        start_embedded(settings)
        params = GeneratorParams(customers=customers, days=days, seed=seed, web_events=web_events)
        with connect(settings) as conn:
            init_schemas(conn)
            timings: dict[str, float] = {}
            with _measure("generate + load (one batch)") as step:
                report = generate(conn, params, timings=timings)
                step.rows = report.lines_read
                step.notes = {"rows_by_table": report.rows_loaded, **{k: round(v, 3) for k, v in timings.items()}}
            results.append(step)
            total = step.seconds
            for table, rows in report.rows_loaded.items():
                # Each table's own COPY time inside the batch (CSV writing + PostgreSQL), overlapping generation.
                seconds = timings.get(f"copy {table}", total)
                results.append(StepResult(step=f"  COPY {table}", seconds=seconds, rows=rows))
            all_rows = sum(report.rows_loaded.values())
            results.append(StepResult(step="  all raw rows", seconds=total, rows=all_rows))

            # The floor: the same order lines, already in Arrow, COPYed into a plain table of the same shape.
            lines = copy_out(conn, "select order_id, line_no, product_id, quantity, unit_price, discount, "
                                   "_batch_id from raw.order_lines")
            conn.execute("create table public.scratch_order_lines (like raw.order_lines including defaults)")
            with _measure("floor: plain COPY of the order lines") as floor:
                with conn.transaction():
                    floor.rows = copy_in(conn, "public.scratch_order_lines", lines)
            results.append(floor)
            step.reference = floor.step
            conn.execute("drop table public.scratch_order_lines")
        stop_embedded(settings)
    finally:
        if not keep:
            stop_embedded(settings)
            shutil.rmtree(state, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=730)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-web-events", action="store_true", help="generate without raw.web_events")
    parser.add_argument("--keep", action="store_true", help="keep the temporary warehouse folder")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = run(args.customers, args.days, args.seed, not args.no_web_events, args.keep)
    gen = results[0]
    print(f"\nbench_ingest: {args.customers:,} customers, {args.days} days, seed {args.seed}"
          f"{'' if not args.no_web_events else ', no web events'}")
    print(f"order lines {gen.rows:,} in {gen.seconds:.2f} s = {gen.rows_per_s:,.0f} order lines/s "
          f"(numpy/Arrow {gen.notes.get('generate', 0):.2f} s, waiting for COPY {gen.notes.get('wait_copy', 0):.2f} s)")
    print(format_table(results))
    append_results(results, {"benchmark": "ingest", "customers": args.customers, "days": args.days,
                             "seed": args.seed, "web_events": not args.no_web_events})
    print(f"(total {time.perf_counter() - started:.1f} s; appended to bench/results.jsonl)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
