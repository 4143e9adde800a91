"""Reference measurements taken in the same run, so every figure of ours is a ratio.

* the physical floor of data movement: plain ``COPY FROM STDIN`` / ``COPY TO STDOUT`` of the same rows into
  and out of the same server (``raw.order_lines`` for the load, the published frames for publish);
* itemset mining on ``../shared/data/fimi_retail.dat.gz`` at 1 % / 0.2 % / 0.1 % support: our miner
  (``ml.baskets.FrequentItemsets``), pyfim's ``fpgrowth`` (Borgelt's C) and mlxtend's ``fpgrowth``, each in its
  own subprocess (its peak RSS is its own) with a timeout (mlxtend at 0.1 % can be slow);
* the dbt models built by one ``dbt build`` against the same models built the way the DAG runs them
  (Cosmos ``ExecutionMode.LOCAL`` + ``InvocationMode.DBT_RUNNER`` + ``TestBehavior.BUILD``: one
  ``dbt build --select <model>`` per model, dbt imported once): the orchestration overhead;
* DAG parse time: a timed ``DagBag`` load of ``dags/`` in a fresh interpreter.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
import uuid

from bench.harness import StepResult
from bench.pipeline import DBT_VARS, LOAD, PUBLISH, Bench, _as_of, log, publish_all
from ml.config import PROJECT_ROOT, Settings
from ml.warehouse import connect, copy_in, copy_out

FIMI = PROJECT_ROOT.parent / "shared" / "data" / "fimi_retail.dat.gz"
SUPPORTS = (0.01, 0.002, 0.001)
MINERS = ("ours", "pyfim", "mlxtend")
FLOOR_COPY_IN = "floor: COPY FROM STDIN order lines"
FLOOR_COPY_OUT = "floor: COPY TO STDOUT order lines"
FLOOR_PUBLISH = "floor: COPY FROM STDIN ml.* frames"
# ours, measured beside the floor: the same frames published again with nothing else running
PUBLISH_ALONE = "publish ml.* (alone, same frames)"
DBT_ONE = "dbt build, one invocation"
DBT_PER_MODEL = "dbt build per model (as the DAG runs it)"
DAG_PARSE = "DAG parse (DagBag)"


def mining_step(miner: str, support: float) -> str:
    return f"itemsets {support:.1%} {miner}"


def step_names() -> list[str]:
    return [FLOOR_COPY_IN, FLOOR_COPY_OUT, PUBLISH_ALONE, FLOOR_PUBLISH,
            *(mining_step(m, s) for s in SUPPORTS for m in MINERS), DBT_ONE, DBT_PER_MODEL, DAG_PARSE]


# ---------------------------------------------------------------------------------------------------------
# COPY floors
# ---------------------------------------------------------------------------------------------------------
def copy_floors(bench: Bench, settings: Settings) -> None:
    """COPY the order lines out (TO STDOUT) and back into a plain table of the same shape (FROM STDIN)."""
    columns = "order_id, line_no, product_id, quantity, unit_price, discount, _batch_id"
    with connect(settings) as conn:
        with bench.step(FLOOR_COPY_OUT, kind="reference") as step:
            lines = copy_out(conn, f"select {columns} from raw.order_lines")
            step.rows = lines.num_rows
        conn.execute("create table public.floor_order_lines (like raw.order_lines including defaults)")
        conn.commit()
        with bench.step(FLOOR_COPY_IN, kind="reference") as step:
            step.rows = copy_in(conn, "public.floor_order_lines", lines)
            conn.commit()
        del lines
        conn.execute("drop table public.floor_order_lines")
        conn.commit()
    load = bench.get(LOAD)
    if load is not None:
        load.reference = FLOOR_COPY_IN


def publish_floor(bench: Bench, settings: Settings, frames: dict) -> None:
    """The same frames publish wrote, published again alone, then COPYed into plain tables with the same
    columns (one commit each). The night's own publishes run inside the training tasks while the other tasks
    train (two cores for three processes), so their rate measures the contention, not publish; the ratio
    pairs this quiet publish with the COPY right after it. It publishes the day before as_of: a new history
    partition as on any night (the pointer stays: a backfill), where as_of itself would be a rerun, which
    stages and replaces the day's rows (twice the work, and not what a night does)."""
    from ml.publish import column_types, to_arrow  # the exact column types publish gives them

    publish_all(bench, settings, frames, _as_of(settings) - dt.timedelta(days=1), name=PUBLISH_ALONE)
    bench.get(PUBLISH_ALONE).notes["kind"] = "reference"
    prepared = []
    with connect(settings) as conn:
        for table, (frame, _keys) in frames.items():
            arrow = to_arrow(frame)
            name = f"public.floor_{table}_{uuid.uuid4().hex[:6]}"
            cols = ", ".join(f'"{c}" {t}' for c, t in column_types(arrow).items())
            conn.execute(f"create table {name} ({cols})")
            prepared.append((name, arrow))
        conn.commit()
        with bench.step(FLOOR_PUBLISH, kind="reference") as step:
            rows = 0
            for name, arrow in prepared:
                rows += copy_in(conn, name, arrow)
                conn.commit()
            step.rows = rows
        for name, _ in prepared:
            conn.execute(f"drop table {name}")
        conn.commit()
    for name in (PUBLISH, PUBLISH_ALONE):
        if (publish := bench.get(name)) is not None:
            publish.reference = FLOOR_PUBLISH


# ---------------------------------------------------------------------------------------------------------
# Itemset mining, one subprocess per (miner, support)
# ---------------------------------------------------------------------------------------------------------
_MINER_CHILD = textwrap.dedent("""
    import gzip, json, math, sys, time
    miner, support, limit = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])

    def high_water_mb():
        # VmHWM is this process's own peak (getrusage's ru_maxrss would carry the parent's size across exec)
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024

    # imports first, outside the timed part: every miner pays its library's import once per process
    if miner == "ours":
        from ml.baskets import FrequentItemsets
    elif miner == "pyfim":
        from fim import fpgrowth
    elif miner == "mlxtend":
        import pandas as pd
        from mlxtend.frequent_patterns import fpgrowth
        from mlxtend.preprocessing import TransactionEncoder
    else:
        raise SystemExit("unknown miner " + miner)
    with gzip.open(sys.argv[4], "rt") as fh:
        tx = [line.split() for line in fh if line.strip()]
    if limit:
        tx = tx[:limit]
    before_mb = high_water_mb()
    started, cpu_started = time.perf_counter(), time.process_time()
    if miner == "ours":
        n = len(FrequentItemsets(algorithm="fpgrowth", min_support=support).fit(tx).itemsets_)
    elif miner == "pyfim":
        n = len(fpgrowth(tx, target="s", supp=-math.ceil(round(support * len(tx), 9)), report="a"))
    else:
        enc = TransactionEncoder()
        onehot = enc.fit(tx).transform(tx, sparse=True)  # dense 88k x 16k booleans would be 1.4 GB
        frame = pd.DataFrame.sparse.from_spmatrix(onehot, columns=enc.columns_)
        n = len(fpgrowth(frame, min_support=support))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(json.dumps({"itemsets": n, "seconds": seconds, "cpu_seconds": cpu, "baskets": len(tx),
                      "peak_rss_mb": high_water_mb(),
                      "rss_before_mining_mb": before_mb}))
""")


def itemset_mining(bench: Bench, *, timeout: float = 600, fimi_baskets: int = 0) -> None:
    """Each miner at each support in a fresh interpreter: wall time of the mining call (after reading the
    file) and the child's own peak RSS (the file's transactions included, identical for all three)."""
    for support in SUPPORTS:
        for miner in MINERS:
            name = mining_step(miner, support)
            log(f"start  {name}")
            result = StepResult(step=name, reference=None if miner == "pyfim" else mining_step("pyfim", support),
                                notes={"kind": "reference" if miner != "ours" else "ours"})
            try:
                done = subprocess.run([sys.executable, "-c", _MINER_CHILD, miner, str(support), str(fimi_baskets),
                                       str(FIMI)], capture_output=True, text=True, timeout=timeout,
                                      cwd=PROJECT_ROOT, check=False)
                if done.returncode != 0:
                    result.notes["error"] = (done.stderr.strip().splitlines() or ["?"])[-1][:300]
                else:
                    out = json.loads(done.stdout.strip().splitlines()[-1])
                    result.seconds = out["seconds"]
                    result.rows = out["itemsets"]  # rows/s here = itemsets/s
                    result.peak_rss_python_mb = out["peak_rss_mb"]
                    result.notes.update(itemsets=out["itemsets"], baskets=out["baskets"],
                                        cpu_seconds=round(out["cpu_seconds"], 2),
                                        rss_before_mining_mb=round(out["rss_before_mining_mb"]))
            except subprocess.TimeoutExpired:
                result.seconds = timeout
                result.notes["timeout"] = f"stopped after {timeout:g} s (time shown is the cap, not a result)"
            bench.add(result)
            log(f"end    {name}: {result.seconds:.2f} s, {result.rows} itemsets, "
                f"peak {result.peak_rss_python_mb:.0f} MB {result.notes.get('timeout') or result.notes.get('error') or ''}")


# ---------------------------------------------------------------------------------------------------------
# dbt: one invocation against one task per model
# ---------------------------------------------------------------------------------------------------------
_PER_MODEL_CHILD = textwrap.dedent("""
    import json, sys, time
    from dbt.cli.main import dbtRunner
    project, models, vars_json = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    timings = {}
    started = time.perf_counter()
    for model in models:
        t0 = time.perf_counter()
        res = dbtRunner().invoke(["build", "--select", model, "--project-dir", project, "--profiles-dir", project,
                                  "--vars", vars_json, "--quiet"])
        timings[model] = time.perf_counter() - t0
        if not res.success:
            print(json.dumps({"failed": model, "error": str(res.exception)[:300]}))
            sys.exit(1)
    print(json.dumps({"seconds": time.perf_counter() - started, "per_model": timings}))
""")


def dbt_orchestration(bench: Bench, settings: Settings) -> None:
    """One ``dbt build`` of all models against the same models one ``dbt build --select <model>`` each, in
    the DAG's order, in one Python process (what Cosmos' LOCAL + DBT_RUNNER tasks cost, minus Airflow)."""
    from ml.dbt import dbt_build, dbt_env, run_paths

    with bench.step(DBT_ONE, kind="reference") as step:
        result = dbt_build(settings, **DBT_VARS)
        step.notes.update(nodes=result.status_counts())
    models = _models_in_order(run_paths(settings)[0] / "manifest.json")
    as_of = _as_of_var(settings)
    env = dbt_env(settings)
    target, logs = run_paths(settings)
    env.update(DBT_TARGET_PATH=str(target.parent / "target-per-model"), DBT_LOG_PATH=str(logs))
    with bench.step(DBT_PER_MODEL, kind="ours", reference=DBT_ONE) as step:
        done = subprocess.run([sys.executable, "-c", _PER_MODEL_CHILD, str(settings.dbt_project_dir),
                               json.dumps(models), json.dumps({"as_of": as_of, **DBT_VARS})], env=env, capture_output=True,
                              text=True, cwd=PROJECT_ROOT, check=False)
        lines = done.stdout.strip().splitlines()
        out = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"error": done.stderr[-300:]}
        step.notes.update(models=len(models), **{k: v for k, v in out.items() if k != "per_model"})
        if "per_model" in out:
            step.notes["slowest"] = dict(sorted(out["per_model"].items(), key=lambda kv: -kv[1])[:5])
            step.notes["mean_per_model_s"] = round(sum(out["per_model"].values()) / len(models), 2)


def _as_of_var(settings: Settings) -> str | None:
    with connect(settings) as conn:
        value = conn.execute("select max(as_of_date) from marts.customer_features").fetchone()[0]
    return value.isoformat() if value else None


def _models_in_order(manifest_path) -> list[str]:
    """Model names of the manifest in dependency order (the order the DAG's tasks run in)."""
    manifest = json.loads(manifest_path.read_text())
    models = {uid: node for uid, node in manifest["nodes"].items() if node["resource_type"] == "model"}
    order, seen = [], set()

    def visit(uid: str) -> None:
        if uid in seen or uid not in models:
            return
        seen.add(uid)
        for parent in models[uid]["depends_on"]["nodes"]:
            visit(parent)
        order.append(models[uid]["name"])

    for uid in sorted(models):
        visit(uid)
    return order


# ---------------------------------------------------------------------------------------------------------
# DAG parse
# ---------------------------------------------------------------------------------------------------------
_DAGBAG_CHILD = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:
        from airflow.models.dagbag import DagBag
    t1, c1 = time.perf_counter(), time.process_time()
    bag = DagBag(dag_folder=sys.argv[1])  # examples are off: AIRFLOW__CORE__LOAD_EXAMPLES=False
    t2, c2 = time.perf_counter(), time.process_time()
    stats = [{"file": s.file, "duration_s": getattr(s.duration, "total_seconds", lambda: s.duration)()}
             for s in bag.dagbag_stats]
    print(json.dumps({"import_airflow_s": t1 - t0, "dagbag_s": t2 - t1, "dagbag_cpu_s": c2 - c1,
                      "dags": sorted(bag.dag_ids),
                      "errors": {k: v[:300] for k, v in bag.import_errors.items()}, "files": stats}))
""")


def dag_parse(bench: Bench, settings: Settings) -> None:
    """Time a ``DagBag`` of ``dags/`` in a fresh interpreter (Airflow imported first, timed apart): the
    figure Airflow's dag-processor pays for our file on every parse loop."""
    from ml.airflow_env import DAGS_FOLDER, airflow_env, ensure_dbt_manifest

    ensure_dbt_manifest(settings)  # the DAG reads dbt_project/target/manifest.json
    env = airflow_env(settings)
    os.makedirs(env["AIRFLOW_HOME"], exist_ok=True)
    log(f"start  {DAG_PARSE}")
    done = subprocess.run([sys.executable, "-c", _DAGBAG_CHILD, str(DAGS_FOLDER)], env=env, capture_output=True,
                          text=True, cwd=PROJECT_ROOT, timeout=300, check=False)
    result = StepResult(step=DAG_PARSE, notes={"kind": "ours"})
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines and lines[-1].startswith("{"):
        out = json.loads(lines[-1])
        result.seconds = out["dagbag_s"]
        result.rows = len(out["dags"])
        result.notes.update(out, cpu_seconds=round(out["dagbag_cpu_s"], 2))
    else:
        result.notes["error"] = done.stderr.strip()[-500:]
    bench.add(result)
    log(f"end    {DAG_PARSE}: {result.seconds:.2f} s (airflow import {result.notes.get('import_airflow_s', 0):.2f} s "
        f"apart) {result.notes.get('errors') or result.notes.get('error') or ''}")

