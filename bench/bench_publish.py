"""Publish throughput against the floor: a raw COPY of the same rows into a plain table.

    .venv/bin/python -m bench.bench_publish --rows 1000000

Steps (each on the same frame, in a scratch database on the warehouse server):

* ``raw_copy``            ``warehouse.copy_in`` of the frame into an empty plain table (no index) with the
                          same columns, committed: what moving these rows into PostgreSQL costs at least
                          (the floor the bench pipeline compares ``publish ml.*`` with).
* ``publish_first``       the first publish: creates the history, the view and the first partition.
* ``publish_next_as_of``  the nightly steady state: a new ``as_of`` COPYed into a new partition and
                          swapped in (target ≥ 70 % of ``raw_copy`` rows/s).
* ``publish_rerun``       the same ``as_of`` again: MVCC delete + insert of that partition's rows via
                          a temporary staging table (rows written twice plus dead tuples: slower, rare).
* ``publish_backfill``    an older ``as_of``: a new partition, the current table untouched.
* ``publish_carry``       the incremental scoring night: the next ``as_of`` with 1 % of the rows from
                          the frame (re-scored customers) and 99 % carried server-side from the previous
                          as_of (``CarryForward``, keys in a temporary table): rows/s counts all rows.
* ``indexed_*``           the same four with ``index_keys=True`` (a primary key on (keys, as_of) built on
                          every partition): what the database-enforced key costs.

Besides wall seconds, every step records the CPU seconds of this process and of the server (the
postmaster's reaped children plus its live ones), so a ratio can be read on a machine shared with
other work, where wall time mostly measures waiting.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import threading
import time
import uuid

import numpy as np
import pandas as pd

from bench import harness
from bench.harness import StepResult, append_results, format_table, postmaster_pid
from ml.config import Settings
from ml.publish import publish
from ml.warehouse import connect, copy_in, create_database, drop_database, ensure_warehouse


@contextlib.contextmanager
def measure(step: str, *, server_pid: int | None = None, reference: str | None = None):
    """``harness.measure`` when its sampler works; otherwise the same timing with peak RSS sampled here.

    (harness._Sampler names its stop event ``_stop``, which shadows ``Thread._stop`` and makes
    ``join()`` raise; until that is fixed this keeps the benchmark running.)
    """
    result = StepResult(step=step, reference=reference)
    done = threading.Event()
    peaks = {"py": 0, "pg": 0}

    def sample() -> None:
        import os

        while not done.is_set():
            peaks["py"] = max(peaks["py"], harness._tree_rss(os.getpid()))
            if server_pid:
                peaks["pg"] = max(peaks["pg"], harness._tree_rss(server_pid))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    server_cpu = _server_cpu_seconds(server_pid) if server_pid else 0.0
    cpu, started = time.process_time(), time.perf_counter()
    try:
        yield result
    finally:
        result.seconds = time.perf_counter() - started
        result.notes["cpu_seconds"] = round(time.process_time() - cpu, 3)
        if server_pid:
            result.notes["server_cpu_seconds"] = round(_server_cpu_seconds(server_pid) - server_cpu, 3)
        done.set()
        sampler.join()
        result.peak_rss_python_mb = peaks["py"] / 2**20
        result.peak_rss_server_mb = peaks["pg"] / 2**20


def _server_cpu_seconds(postmaster: int) -> float:
    """CPU seconds of the server so far: the postmaster's own and its reaped children's (backends that
    have exited) plus its live children's. Linux /proc only; 0 where it cannot be read."""
    def fields(pid: int | str) -> list[str]:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()

    try:
        total = sum(int(x) for x in fields(postmaster)[11:15])  # utime stime cutime cstime
        with open(f"/proc/{postmaster}/task/{postmaster}/children") as fh:
            children = fh.read().split()
    except OSError:
        return 0.0
    for child in children:
        with contextlib.suppress(OSError):
            total += sum(int(x) for x in fields(child)[11:13])
    return total / os.sysconf("SC_CLK_TCK")


def customer_scores(n: int, seed: int = 0) -> pd.DataFrame:
    """A frame shaped like ``ml.customer_scores``."""
    rng = np.random.default_rng(seed)
    spend = rng.gamma(0.6, 120.0, n)
    return pd.DataFrame(
        {
            "customer_id": np.char.add("C", np.arange(n).astype("U12")),
            "predicted_spend": spend,
            "churn_probability": rng.random(n),
            "value_decile": (np.argsort(np.argsort(-spend)) * 10 // n + 1).astype("int16"),
            "segment_name": rng.choice(["Champions", "Loyal", "At risk", "Hibernating", "Lost"], n),
        }
    )


def run(settings: Settings, rows: int, repeats: int) -> list:
    frame = customer_scores(rows)
    server = postmaster_pid(settings.pgdata) if settings.embedded else None
    scratch = settings.with_database(f"bench_publish_{uuid.uuid4().hex[:8]}")
    create_database(scratch)
    results = []
    as_of = dt.date(2024, 6, 30)
    common = dict(run_id="bench", model_name="clv", model_version=1, key_columns=["customer_id"])
    try:
        with connect(scratch) as conn:
            conn.execute("create schema if not exists ml")
            conn.commit()
        for attempt in range(repeats):
            suffix = "" if repeats == 1 else f"#{attempt + 1}"
            with connect(scratch) as conn:
                conn.execute("drop table if exists public.raw_copy")
                conn.execute(
                    "create table public.raw_copy (customer_id text, predicted_spend double precision,"
                    " churn_probability double precision, value_decile smallint, segment_name text)"
                )
                conn.commit()
                with measure(f"raw_copy{suffix}", server_pid=server) as step:
                    step.rows = copy_in(conn, "public.raw_copy", frame)
                    conn.commit()
                results.append(step)
            for prefix, index_keys in (("publish", False), ("indexed", True)):
                with connect(scratch) as conn:
                    conn.execute("drop view if exists ml.customer_scores")
                    conn.execute("drop table if exists ml.customer_scores_history")
                    conn.commit()
                next_day = as_of + dt.timedelta(days=1)
                for name, day in (("first", as_of), ("next_as_of", next_day), ("rerun", next_day),
                                  ("backfill", as_of - dt.timedelta(days=1))):
                    with measure(f"{prefix}_{name}{suffix}", server_pid=server,
                                 reference=f"raw_copy{suffix}") as step:
                        report = publish(scratch, "customer_scores", frame, as_of=day, index_keys=index_keys,
                                         **common)
                        step.rows = report.rows
                    results.append(step)
                if not index_keys:
                    results.append(_carry_step(scratch, frame, next_day, server, suffix, common))
    finally:
        drop_database(scratch)
    return results


def _carry_step(scratch: Settings, frame: pd.DataFrame, previous: dt.date, server: int | None, suffix: str,
                common: dict) -> StepResult:
    """The next as_of after ``previous``: every 100th customer re-scored (the frame), the rest carried."""
    from ml.publish import CarryForward

    rescored = frame.iloc[::100]
    with measure(f"publish_carry{suffix}", server_pid=server, reference=f"raw_copy{suffix}") as step:
        report = publish(scratch, "customer_scores", rescored, as_of=previous + dt.timedelta(days=1),
                         carry=CarryForward(previous, "customer_id"), **common)
        step.rows = report.rows
        step.notes["rows_carried"] = report.rows_carried
    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    ensure_warehouse(settings)
    results = run(settings, args.rows, args.repeats)
    print(format_table(results))
    raw = [r for r in results if r.step.startswith("raw_copy")]
    for r in results:
        if r.step.startswith(("publish_", "indexed_")):
            ref = next(x for x in raw if x.step == r.reference)
            target = " (target >= 70%: the nightly path)" if r.step.startswith("publish_next_as_of") else ""
            cpu = _cpu_share(ref, r)
            print(f"{r.step}: {r.rows_per_s / ref.rows_per_s:.0%} of raw COPY rows/s{target}"
                  + (f"; {cpu:.0%} by CPU seconds (client + server)" if cpu else ""))
    append_results(results, {"bench": "publish", "rows": args.rows})


def _cpu_share(reference: StepResult, step: StepResult) -> float | None:
    """The reference's client + server CPU seconds over the step's: the rows/s share on an idle machine."""
    def cpu(r: StepResult) -> float:
        return r.notes.get("cpu_seconds", 0.0) + r.notes.get("server_cpu_seconds", 0.0)

    return cpu(reference) / cpu(step) if cpu(step) and cpu(reference) else None


if __name__ == "__main__":
    main()
