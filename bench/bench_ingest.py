"""Benchmark of the synthetic CRM generator and loader: ``python -m bench.bench_ingest --customers 100000``.

Starts its own embedded PostgreSQL (a temporary data folder, a free port), generates and loads a CRM as one
batch, and prints rows/s per table next to the floor: the same rows of every raw table COPYed again by the
server from files it reads itself (what PostgreSQL alone costs for that volume). Wall time and CPU seconds
(this process; the server backend) of both. Appends the run to ``bench/results.jsonl``.
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

import psutil
from psycopg import sql

from bench.harness import StepResult, append_results, format_table
from ml.config import PROJECT_ROOT, Settings
from ml.ingest.generator import GeneratorParams, generate
from ml.warehouse import connect, init_schemas, qualified, start_embedded, stop_embedded


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


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


@contextmanager
def _cpu(step: StepResult, backend_pid: int):
    """CPU seconds of this process (every thread: generation and the COPY writer) and of the one server
    backend doing the COPY, in ``step.notes``: on a shared machine wall time says little, CPU does."""
    client, server = time.process_time(), _cpu_seconds(backend_pid)
    yield
    step.notes["cpu_client_s"] = round(time.process_time() - client, 3)
    step.notes["cpu_server_s"] = round(_cpu_seconds(backend_pid) - server, 3)


def _server_floor(conn, tables: list[str]) -> list[StepResult]:
    """The floor: each table's rows COPYed again by the server from a CSV file it reads itself (written
    beforehand by COPY TO, in the data folder), so neither generation nor the client is in it: PostgreSQL's
    own cost for the same rows. One transaction, like the batch. The floor parses CSV: the batch itself sends
    web events, orders and the planted truth in binary, which costs the server less (so it can beat this)."""
    backend = conn.execute("select pg_backend_pid()").fetchone()[0]
    folder = conn.execute("show data_directory").fetchone()[0]  # writable by the server's OS user
    prepared = []
    for table in tables:
        name = table.split(".")[1]
        columns = sql.SQL(", ").join(sql.Identifier(r[0]) for r in conn.execute(
            "select column_name from information_schema.columns where table_schema = %s and table_name = %s "
            "and column_name <> '_loaded_at' order by ordinal_position", table.split(".")))
        path = sql.Literal(f"{folder}/floor_{name}.csv")
        scratch = sql.Identifier("public", f"floor_{name}")
        conn.execute(sql.SQL("copy (select {} from {}) to {} (format csv)").format(columns, qualified(table), path))
        conn.execute(sql.SQL("create table {} (like {} including defaults)").format(scratch, qualified(table)))
        prepared.append((table, scratch, columns, path))
    conn.commit()
    results = []
    with conn.transaction():
        for table, scratch, columns, path in prepared:
            with _measure(f"  floor: server COPY {table}") as floor, _cpu(floor, backend):
                floor.rows = conn.execute(sql.SQL("copy {} ({}) from {} (format csv)").format(
                    scratch, columns, path)).rowcount
            results.append(floor)
    total = StepResult(step="floor: server COPY of all raw rows", seconds=sum(r.seconds for r in results),
                       rows=sum(r.rows for r in results), notes={
                           "cpu_server_s": round(sum(r.notes["cpu_server_s"] for r in results), 3)})
    for _, scratch, _, _ in prepared:  # the CSV files go with the temporary data folder
        conn.execute(sql.SQL("drop table {}").format(scratch))
    conn.commit()
    return [total, *results]


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
            backend = conn.execute("select pg_backend_pid()").fetchone()[0]
            timings: dict[str, float] = {}
            with _measure("generate + load (one batch)") as step, _cpu(step, backend):
                report = generate(conn, params, timings=timings)
                step.rows = report.lines_read
            step.notes.update(rows_by_table=report.rows_loaded, **{k: round(v, 3) for k, v in timings.items()})
            results.append(step)
            total = step.seconds
            for table, rows in report.rows_loaded.items():
                # Each table's own COPY time inside the batch (CSV writing + PostgreSQL), overlapping generation.
                seconds = timings.get(f"copy {table}", total)
                results.append(StepResult(step=f"  COPY {table}", seconds=seconds, rows=rows))
            all_rows = sum(report.rows_loaded.values())
            results.append(StepResult(step="  all raw rows", seconds=total, rows=all_rows))
            floor = _server_floor(conn, list(report.rows_loaded))
            results.extend(floor)
            step.reference = floor[0].step
        stop_embedded(settings)
    finally:
        if not keep:
            stop_embedded(settings)
            shutil.rmtree(state, ignore_errors=True)
    return results


def _cpu_summary(results: list[StepResult]) -> str:
    """Order lines per CPU second: what a quiet machine could reach, and which side bounds it."""
    gen, floor = results[0], next(r for r in results if r.step.startswith("floor: server COPY of all"))
    lines = gen.rows or 0
    client, server = gen.notes.get("cpu_client_s", 0), gen.notes.get("cpu_server_s", 0)
    floor_server = floor.notes.get("cpu_server_s", 0)
    rate = lambda s: f"{lines / s:,.0f}" if s else "n/a"  # noqa: E731
    # On 2 idle cores the one server backend cannot go faster than its own CPU, and client + server cannot
    # go faster than their CPU spread over both cores: the larger of the two bounds the wall time.
    bound = max(server, (client + server) / 2)
    return "\n".join([
        f"CPU s: client (generation + CSV/binary encoding + sending) {client:.2f}, server backend {server:.2f}; "
        f"server floor for the same rows {floor_server:.2f}",
        f"order lines per CPU s: client {rate(client)}/s, server {rate(server)}/s, server floor "
        f"{rate(floor_server)}/s; on 2 idle cores at best {rate(bound)}/s "
        f"(bound by {'the server backend' if bound == server else 'the CPU of both sides over 2 cores'})",
    ])


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
    print(_cpu_summary(results))
    append_results(results, {"benchmark": "ingest", "customers": args.customers, "days": args.days,
                             "seed": args.seed, "web_events": not args.no_web_events})
    print(f"(total {time.perf_counter() - started:.1f} s; appended to bench/results.jsonl)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
