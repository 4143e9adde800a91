"""The whole nightly pipeline, timed step by step on a fresh embedded warehouse.

Steps (``python -m bench`` runs them; each is one :class:`bench.harness.StepResult` with wall seconds, rows
and the peak RSS of this process tree and of the PostgreSQL server tree):

* ``generate + load``           the synthetic CRM generator COPYing into ``raw.*`` as one batch (rows = order lines)
* ``dbt build (full)``          ``ml.dbt.dbt_build`` of every model, data test and unit test on an empty warehouse
* ``train + publish (3 tasks at once)``  the DAG's three training tasks (``train_segments``, ``train_value``,
                                ``train_baskets`` = rules + recommendations), each in its own spawned process, all
                                at once, as the LocalExecutor runs them after the dbt marts; each process reads its
                                marts, fits and publishes its own ``ml.*`` tables. Wall time until the last one has
                                published; memory: the summed PSS of every process (this one, the three, the server)
* ``task <name> (own process)``  one task's process: wall from its start (interpreter, imports) to its last
                                publish, its own peak PSS
* ``train <family>``            inside its task's process: read the family's marts (COPY out) and fit it:
                                segmentation, value (CLV + churn), baskets (itemsets + rules), recommendations
                                (hybrid fit + top-10 for every customer)
* ``publish ml.*``              ``ml.publish.publish`` of every output table, inside each task's process (rows = all
                                published rows; seconds = the sum of the tasks' publishes, which overlap other work)
* ``load one new day``          one more day of orders on top of the built warehouse (see :func:`one_new_day`)
* ``dbt build (incremental)``   the same ``dbt build`` again: incremental models only process the new batch
* ``score + publish (incremental)``  the nightly's own scoring path, its three tasks at once in their own
                                processes (``ml.nightly.train_segments`` / ``train_value`` / ``train_baskets``
                                under ``retrain=auto``, whose policy keeps the day-old champions): segments and
                                values for every customer, recommendations only for customers whose basket lines
                                changed (the rest carried forward)
* ``nightly (full)``            the real wall time of the night: from the start of the load to the last task's
                                publish (load, dbt, then the three tasks at once); peak: the largest summed PSS
* ``nightly (incremental)``     the sum of the incremental steps

A family whose module or entry point does not exist is skipped with a printed note.
"""

from __future__ import annotations

import datetime as dt
import importlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bench.harness import StepResult, measure, postmaster_pid
from ml.config import DBT_TRAINING_SELECTOR, PROJECT_ROOT, Settings
from ml.warehouse import connect, init_schemas, read_table, start_embedded, stop_embedded

RUN_ID = "bench"  # publish wants an MLflow run id; the benchmark trains without MLflow
# dbt vars of every build: the value family validates on the newest training snapshot and trains on older ones.
DBT_VARS = {"training_snapshots": 2}

# Step names, in order. The smoke test checks that the table and the JSON line hold each of them.
LOAD = "generate + load"
DBT_FULL = "dbt build (full)"
TRAIN_SEGMENTATION = "train segmentation"
TRAIN_VALUE = "train value (clv + churn)"
TRAIN_BASKETS = "train baskets (rules)"
TRAIN_RECOMMEND = "train recommendations (fit + top-10)"
PUBLISH = "publish ml.*"
TRAIN_PUBLISH = "train + publish (3 tasks at once)"
NEW_DAY = "load one new day"
DBT_INCREMENTAL = "dbt build (incremental)"
RESCORE = "score + publish (incremental)"
NIGHTLY_FULL = "nightly (full)"
NIGHTLY_INCREMENTAL = "nightly (incremental)"

# The family entry points this benchmark calls: (module, attribute). Missing ones are skipped with a note.
ENTRY_POINTS = {
    TRAIN_SEGMENTATION: ("ml.segmentation", "segment_customers"),
    TRAIN_VALUE: ("ml.value", "fit_value"),
    TRAIN_BASKETS: ("ml.baskets", "mine_rules"),
    TRAIN_RECOMMEND: ("ml.recommend", "HybridRecommender"),
}
# The DAG's training tasks (dags/crm_nightly.py) and the benchmark steps each runs, in its own process.
TASKS = {"train_segments": (TRAIN_SEGMENTATION,), "train_value": (TRAIN_VALUE,),
         "train_baskets": (TRAIN_BASKETS, TRAIN_RECOMMEND)}
RULES_MIN_SUPPORT = 0.003  # the support the hybrid's rule component mines at (ml.recommend.default_components)


def log(message: str) -> None:
    """One progress line, with the wall clock, flushed at once (long steps must show they are alive)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Bench:
    """Collects the steps of one benchmark run; ``step`` prints a line at each start and end."""

    server_pid: int | None = None
    results: list[StepResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    profile_dir: Path | None = None  # pyinstrument text profiles of every in-process step go here
    night_started: float | None = None  # perf_counter at the start of the load (the night's real wall time)
    night_ended: float | None = None  # ... and when the last training task had published

    @contextmanager
    def step(self, name: str, *, kind: str = "pipeline", reference: str | None = None) -> Iterator[StepResult]:
        log(f"start  {name}")
        cpu_before = _cpu_seconds()
        with measure(name, server_pid=self.server_pid, reference=reference) as result, self._profiled(name, result):
            result.notes["kind"] = kind
            yield result
        # CPU seconds of this process and its finished children (dbt): on a shared machine wall time is
        # inflated by other people's work, CPU time much less so
        result.notes["cpu_seconds"] = round(_cpu_seconds() - cpu_before, 2)
        self.results.append(result)
        rate = f", {result.rows_per_s:,.0f} rows/s" if result.rows_per_s else ""
        log(f"end    {name}: {result.seconds:.2f} s{rate}, peak RSS python {result.peak_rss_python_mb:.0f} MB, "
            f"server {result.peak_rss_server_mb:.0f} MB")

    @contextmanager
    def _profiled(self, name: str, result: StepResult) -> Iterator[None]:
        """A statistical profile of the step (pyinstrument, ~1 ms sampling) when ``profile_dir`` is set:
        the evidence of what bounds a step that misses its target."""
        if self.profile_dir is None:
            yield
            return
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.005)
        profiler.start()
        try:
            yield
        finally:
            profiler.stop()
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            path = self.profile_dir / (re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + ".txt")
            path.write_text(profiler.output_text(unicode=False, color=False, show_all=False))
            result.notes["profile"] = str(path)

    def add(self, result: StepResult) -> None:
        self.results.append(result)

    def get(self, name: str) -> StepResult | None:
        return next((r for r in self.results if r.step == name), None)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# ---------------------------------------------------------------------------------------------------------
# A fresh warehouse of its own
# ---------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def temp_warehouse(keep: bool = False) -> Iterator[Settings]:
    """An embedded PostgreSQL in a new temporary state folder on a free port, stopped and removed after.

    The folder is under the project's ``.state`` (the same disk the real warehouse uses, not a tmpfs).
    MLflow and dbt's target folders land in the same state folder, so nothing leaks into the user's state.
    """
    base = PROJECT_ROOT / ".state"
    base.mkdir(exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="bench-", dir=base))
    settings = Settings.from_env({"CRM_STATE_DIR": str(state), "CRM_PG_PORT": str(free_port())})
    try:
        start_embedded(settings)
        with connect(settings) as conn:
            init_schemas(conn)
        yield settings
    finally:
        try:
            stop_embedded(settings)
        finally:
            if not keep:
                shutil.rmtree(state, ignore_errors=True)
            else:
                log(f"kept the benchmark warehouse folder {state}")


# ---------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------
def generate_and_load(bench: Bench, settings: Settings, customers: int, days: int, seed: int):
    from ml.ingest.generator import GeneratorParams, generate

    params = GeneratorParams(customers=customers, days=days, seed=seed)
    timings: dict[str, float] = {}
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] > 5:  # a line every 5 s at most: 1M customers is 20 chunks
            last[0] = now
            log(f"       generated {done:,} / {total:,} customers")

    bench.night_started = time.perf_counter()
    with connect(settings) as conn, bench.step(LOAD) as step:
        report = generate(conn, params, timings=timings, progress=progress)
        step.rows = report.lines_read
        step.notes.update(rows_by_table=report.rows_loaded, raw_rows=sum(report.rows_loaded.values()),
                          **{k: round(v, 2) for k, v in timings.items()})
    return params, report


def dbt_full(bench: Bench, settings: Settings) -> None:
    from ml.dbt import dbt_build

    with bench.step(DBT_FULL) as step:
        result = dbt_build(settings, **DBT_VARS)
        step.rows = _order_lines(settings, "marts.fct_order_lines")
        step.notes.update(nodes=result.status_counts(), slowest=_slowest(result))
    _keep_run_results(result, "full")
    # what the DAG's check_marts records after a night whose tests passed (every row was tested)
    from ml.nightly import record_data_tests

    with connect(settings) as conn:
        record_data_tests(conn, _as_of(settings), "all")


def _keep_run_results(result, name: str) -> None:
    """Keep the build's run_results.json beside it (the next build overwrites it): every node's timing, for
    reading where a build's time went after a ``--keep`` run."""
    source = result.target_path / "run_results.json"
    if source.exists():
        shutil.copyfile(source, result.target_path / f"run_results.{name}.json")


def _slowest(result, n: int = 6) -> dict[str, float]:
    """The nodes that took longest: where a dbt build's time goes."""
    nodes = sorted(result.nodes, key=lambda node: -node.execution_time)[:n]
    return {node.name: round(node.execution_time, 2) for node in nodes}


def _order_lines(settings: Settings, table: str) -> int:
    with connect(settings) as conn:
        return conn.execute(f"select count(*) from {table}").fetchone()[0]  # noqa: S608 - our own table name


def _as_of(settings: Settings) -> dt.date:
    with connect(settings) as conn:
        return conn.execute("select max(as_of_date) from marts.customer_features").fetchone()[0]


def _entry_point(step: str) -> Callable | None:
    module, name = ENTRY_POINTS[step]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _read(settings: Settings, table: str) -> pd.DataFrame:
    """A mart as a DataFrame, booleans as booleans.

    ``ml.warehouse.copy_out`` parses PostgreSQL's CSV booleans (``t``/``f``) as text, and ``"f"`` is truthy:
    ``has_future_purchase`` would read as all-true. Converted here until copy_out passes
    ``true_values=["t"], false_values=["f"]`` to Arrow.
    """
    with connect(settings) as conn:
        boolean = [name for (name,) in conn.execute(
            "select column_name from information_schema.columns where table_schema || '.' || table_name = %s "
            "and data_type = 'boolean'", [table]).fetchall()]
        frame = read_table(conn, table)
    for column in boolean:
        if frame[column].dtype != bool:
            frame[column] = frame[column].map({"t": True, "f": False, True: True, False: False}).astype("boolean")
    return frame


def task_step(task: str) -> str:
    """The step of one DAG training task's own process."""
    return f"task {task} (own process)"


def train_families(bench: Bench, settings: Settings, *, keep_frames: bool = False,
                   keep_models: bool = False) -> dict:
    """The DAG's three training tasks at once, each in its own spawned process that reads its marts, fits
    its families and publishes their tables (as the LocalExecutor runs ``train_segments``, ``train_value``
    and ``train_baskets`` after the dbt marts). Records the phase (wall until the last task has published;
    the summed PSS of every process and the server), each task's process, each family's training and the
    publishes (summed into ``publish ml.*``).

    Returns what later steps need, read back from files the tasks write after they have published (outside
    the timing): the frames they published (``keep_frames``, for the publish floor) and the fitted models
    (``keep_models``, registered as champions before the incremental night).
    """
    dump_dir = Path(tempfile.mkdtemp(prefix="trained-", dir=settings.state_dir)) \
        if keep_frames or keep_models else None
    jobs = {task: ("_task_job", {"task": task, "settings": settings, "profile_dir": bench.profile_dir,
                                 "dump_dir": dump_dir, "keep_frames": keep_frames, "keep_models": keep_models})
            for task in TASKS}
    reports = run_processes(bench, TRAIN_PUBLISH, jobs)
    bench.night_ended = time.perf_counter()
    publishes = []
    for task, (status, seconds, payload) in reports.items():
        row = StepResult(step=task_step(task), seconds=seconds, notes={"kind": "task"})
        if status != "done":
            row.notes["error"] = payload
            bench.add(row)
            continue
        row.peak_rss_python_mb = payload["peak_mb"]  # its own process tree, sampled by this process
        row.notes.update(cpu_seconds=payload["cpu_seconds"], in_task_seconds=round(payload["seconds"], 2),
                         published=sum(r.rows or 0 for r in payload["results"] if r.step.startswith("publish")))
        bench.skipped.extend(payload["skipped"])
        for result in payload["results"]:
            result.notes["kind"] = "family"
            result.notes["task"] = task
            (publishes if result.step.startswith("publish") else bench.results).append(result)
        bench.add(row)
    phase = bench.get(TRAIN_PUBLISH)  # after the tasks' own rows in the table
    bench.results.remove(phase)
    bench.add(phase)
    if publishes:
        bench.add(StepResult(
            step=PUBLISH, seconds=sum(r.seconds for r in publishes), rows=sum(r.rows or 0 for r in publishes),
            peak_rss_python_mb=max(r.peak_rss_python_mb for r in publishes),
            peak_rss_server_mb=max(r.peak_rss_server_mb for r in publishes),
            peak_total_mb=max(r.peak_total_mb for r in publishes),
            notes={"kind": "family", "cpu_seconds": round(sum(r.notes.get("cpu_seconds", 0) for r in publishes), 2),
                   "as_of": publishes[0].notes.get("as_of"),
                   "tables": {k: v for r in publishes for k, v in r.notes.get("tables", {}).items()},
                   "seconds_by_task": {r.notes["task"]: round(r.seconds, 2) for r in publishes},
                   **({"error": err} if (err := {k: v for r in publishes for k, v in r.notes.get("error", {}).items()})
                      else {}),
                   "measured": "inside each task's process, while the other tasks train"}))
    trained: dict = {"frames": {}}
    if dump_dir is not None:
        for task in TASKS:
            path = dump_dir / f"{task}.pkl"
            if path.exists():
                with open(path, "rb") as handle:
                    part = pickle.load(handle)  # noqa: S301 - our own child process's file
                trained["frames"].update(part.pop("frames", {}))
                trained.update(part)
        shutil.rmtree(dump_dir, ignore_errors=True)
    return trained


def _task_job(*, done: Callable[[dict], None], task: str, settings: Settings, profile_dir: Path | None, dump_dir: Path | None, keep_frames: bool, keep_models: bool) -> None:
    """One DAG training task, in its own process: fit its families, publish their tables, report; then
    (after the report, untimed) leave the frames / models for the parent in ``dump_dir``. Its memory is
    sampled by the parent (the server too: not here, each reading of the server tree costs CPU)."""
    from ml.memory import use_system_allocator

    if task == "train_baskets":
        use_system_allocator()  # as ml.nightly's baskets task
    started = time.perf_counter()
    bench = Bench(server_pid=None, profile_dir=profile_dir)
    trained: dict = {"frames": {}}
    for step_name in TASKS[task]:
        entry = _entry_point(step_name)
        if entry is None:
            module, name = ENTRY_POINTS[step_name]
            log(f"note   {step_name}: skipped, {module}.{name} does not exist yet")
            bench.skipped.append(step_name)
            continue
        with bench.step(step_name) as step:
            try:
                _TRAINERS[step_name](settings, entry, step, trained)
            except Exception as err:  # one family failing must not hide the others' figures
                step.notes["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                log(f"ERROR  {step_name}: {step.notes['error']}")
    if trained["frames"]:
        publish_all(bench, settings, trained["frames"], _as_of(settings), name=f"publish ({task})")
    seconds = time.perf_counter() - started
    done({"results": bench.results, "skipped": bench.skipped, "seconds": seconds,
          "cpu_seconds": round(_cpu_seconds(), 2)})
    if dump_dir is not None:
        trained.pop("basket_lines", None)
        trained.pop("basket_products", None)
        part = {k: v for k, v in trained.items() if k != "frames" and keep_models}
        if keep_frames:
            part["frames"] = trained["frames"]
        with open(dump_dir / f"{task}.pkl", "wb") as handle:
            pickle.dump(part, handle, protocol=pickle.HIGHEST_PROTOCOL)


# ---------------------------------------------------------------------------------------------------------
# Concurrent processes, as the LocalExecutor runs parallel tasks
# ---------------------------------------------------------------------------------------------------------
def _child(job: str, kwargs: dict, conn) -> None:
    """A spawned process's entry: run ``job`` (a function of this module); it calls ``done(payload)`` once
    its timed work is over, which sends ``("done", payload)`` to the parent; an exception sends
    ``("error", text)``."""
    reported = []

    def done(payload: dict) -> None:
        conn.send(("done", payload))
        reported.append(True)

    try:
        globals()[job](done=done, **kwargs)
    except BaseException as err:
        if not reported:
            conn.send(("error", f"{type(err).__name__}: {str(err)[:300]}"))
        raise
    finally:
        conn.close()


def run_processes(bench: Bench, step_name: str, jobs: dict[str, tuple[str, dict]]) -> dict[str, tuple]:
    """Start one spawned process per job, all at once, and measure them as one step: wall time until the
    last one has reported done; peak memory summed over this process, all of them and the server at the
    same instant (``peak_total_mb``). Returns job -> (status, seconds from its start to its report,
    payload or error text). Processes are joined after the step (their untimed after-work)."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per task, like an Airflow task
    processes, reports = {}, {}
    with bench.step(step_name) as phase:
        cpu_before = _cpu_seconds()
        for name, (job, kwargs) in jobs.items():
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=_child, args=(job, kwargs, sender), name=f"bench-{name}")
            process.start()
            sender.close()
            processes[name] = (process, receiver, time.perf_counter())
        pending = set(processes)
        while pending:
            waitables = [processes[n][1] for n in pending] + [processes[n][0].sentinel for n in pending]
            multiprocessing.connection.wait(waitables, timeout=1.0)
            for name in sorted(pending):
                process, receiver, started = processes[name]
                message = None
                if receiver.poll():
                    try:
                        message = receiver.recv()
                    except EOFError:
                        message = ("error", f"process exited with code {process.exitcode} before reporting")
                elif not process.is_alive():
                    message = ("error", f"process exited with code {process.exitcode} before reporting")
                if message is not None:
                    reports[name] = (message[0], time.perf_counter() - started, message[1])
                    pending.discard(name)
                    log(f"       {name}: {message[0]} after {reports[name][1]:.1f} s")
        cpu_children = sum(r[2]["cpu_seconds"] for r in reports.values() if r[0] == "done")
        phase.notes.update(processes=len(jobs), cpu_seconds_processes=round(cpu_children, 2),
                           cpu_seconds_parent=round(_cpu_seconds() - cpu_before, 2),
                           seconds_by_process={n: round(r[1], 1) for n, r in reports.items()})
    phase.notes["cpu_seconds"] = round(phase.notes["cpu_seconds"] + phase.notes["cpu_seconds_processes"], 2)
    peaks = phase.notes.pop("peak_by_child_mb", {})
    phase.notes["peak_mb_by_process"] = {name: peaks.get(processes[name][0].pid, 0) for name in processes}
    for name, (status, _, payload) in reports.items():
        if status == "done":
            payload["peak_mb"] = peaks.get(processes[name][0].pid, 0)
    for process, receiver, _ in processes.values():
        process.join()
        receiver.close()
    return reports


def _train_segmentation(settings, segment_customers, step, trained) -> None:
    features = _read(settings, "marts.customer_features")
    result = segment_customers(features)
    trained["segment_model"] = result.model
    trained["frames"]["customer_segments"] = (result.assignments, ["customer_id"])
    profiles = result.profiles.copy()
    trained["frames"]["segment_profiles"] = (_publishable(profiles), ["segment_id"])
    step.rows = len(features)
    step.notes.update(champion=result.champion, candidates=len(result.candidates))


def _train_value(settings, fit_value, step, trained) -> None:
    from ml.value import fit_churn, prepare_training, read_value_marts, score_customers

    with connect(settings) as conn:
        training, scoring = read_value_marts(conn)  # the task's own reader (and its memory hand-backs)
    training_rows = len(training)
    prepared = prepare_training(training)  # the per-snapshot BTYD fits once for both families, as train_value
    del training  # as train_value: the fits use the prepared copy
    value = fit_value(prepared)
    churn = fit_churn(prepared)
    del prepared
    scores = score_customers(scoring, value.model, churn.model)
    trained["value_model"], trained["churn_model"] = value.model, churn.model
    trained["frames"]["customer_scores"] = (scores, ["customer_id"])
    step.rows = training_rows + len(scoring)
    step.notes.update(value_champion=value.champion, churn_champion=churn.champion,
                      training_rows=training_rows, scoring_rows=len(scoring))


def _baskets_input(settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The lines and products exactly as the nightly's train_baskets reads them (``read_basket_marts``: the
    columns it uses, products only, ordered by basket and product). Read in the table's physical order, which
    changes with how dbt built it, the recommender's fit and top-10 took 269.8 CPU s at 1M against 201.6 s
    for the same rows one build earlier."""
    from ml.train_baskets import read_basket_marts

    return read_basket_marts(settings, _as_of(settings))


def _train_baskets(settings, mine_rules, step, trained) -> None:
    lines, products = _baskets_input(settings)
    rules = mine_rules(lines, min_support=RULES_MIN_SUPPORT)
    trained["frames"]["association_rules"] = (_rules_for_publish(rules), ["antecedent_key", "consequent_key"])
    trained["basket_lines"], trained["basket_products"] = lines, products
    step.rows = len(lines)
    step.notes.update(rules=len(rules), min_support=RULES_MIN_SUPPORT)


def _train_recommend(settings, hybrid_class, step, trained) -> None:
    from ml.memory import release_freed_memory
    from ml.train_baskets import recommendation_frame

    lines, products = trained.get("basket_lines"), trained.get("basket_products")
    if lines is None:
        lines, products = _baskets_input(settings)
    model = hybrid_class().fit(lines, products)
    # what the training night publishes: the fitted model scoring every customer's lines, with the inputs'
    # fingerprints (so that the incremental night can carry unchanged customers, as in production)
    recs = recommendation_frame(settings, model, "hybrid", lines, as_of=_as_of(settings), run_id=RUN_ID)
    step.rows = len(lines)
    # as the nightly task: the lines are let go before the publish (1.6 GB at 1M customers)
    del lines
    trained.pop("basket_lines", None)
    release_freed_memory()
    trained["recommender"] = model
    trained["frames"]["product_recommendations"] = (recs, ["customer_id", "rank"])
    step.notes.update(customers=int(recs["customer_id"].nunique()), recommendations=len(recs),
                      weights=getattr(model, "weights_", None))


_TRAINERS = {
    TRAIN_SEGMENTATION: _train_segmentation,
    TRAIN_VALUE: _train_value,
    TRAIN_BASKETS: _train_baskets,
    TRAIN_RECOMMEND: _train_recommend,
}


def _publishable(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns holding lists/tuples/dicts as text (publish stores numbers, text, dates)."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object:
            sample = out[column].dropna().head(1).tolist()
            if sample and isinstance(sample[0], (list, tuple, dict, np.ndarray)):
                out[column] = out[column].map(lambda v: None if v is None else ", ".join(map(str, v))
                                              if not isinstance(v, dict) else str(v))
            elif sample and not isinstance(sample[0], str):
                out[column] = out[column].astype(str)
    return out


def _rules_for_publish(rules: pd.DataFrame) -> pd.DataFrame:
    out = rules.copy()
    out["antecedent_key"] = out["antecedent"].map(lambda items: "|".join(map(str, items)))
    out["consequent_key"] = out["consequent"].map(lambda items: "|".join(map(str, items)))
    return _publishable(out.drop(columns=["antecedent", "consequent"]))


# The registered model each published table comes from (the nightly's names), so that the incremental
# night's scoring path finds the full night's tables published by its champions.
PUBLISHED_MODEL = {"customer_segments": "crm_segmentation", "segment_profiles": "crm_segmentation",
                   "customer_scores": "crm_clv", "product_recommendations": "crm_recommender"}


def publish_all(bench: Bench, settings: Settings, frames: dict, as_of: dt.date, name: str = PUBLISH) -> None:
    from ml.publish import publish

    with bench.step(name) as step:
        rows = 0
        per_table = {}
        for table, (frame, keys) in frames.items():
            try:
                report = publish(settings, table, frame, as_of=as_of, run_id=RUN_ID,
                                 model_name=PUBLISHED_MODEL.get(table, table), model_version=1, key_columns=keys)
            except Exception as err:  # a frame publish refuses: name it, publish the others
                step.notes.setdefault("error", {})[table] = f"{type(err).__name__}: {str(err)[:300]}"
                log(f"ERROR  publish {table}: {step.notes['error'][table]}")
                continue
            rows += report.rows
            per_table[table] = report.rows
        step.rows = rows
        step.notes.update(as_of=as_of.isoformat(), tables=per_table)


# ---------------------------------------------------------------------------------------------------------
# The incremental night
# ---------------------------------------------------------------------------------------------------------
def one_new_day(settings: Settings, end_date: dt.date) -> dict[str, int]:
    """Load the next day after ``end_date`` as the generator's continuation (``append_days``): one new batch
    with that day's orders of the same customers (still-alive ones buying, new ones signing up), on top of
    an unchanged window. The generator's parameters are read back from its planted truth, so this works on
    any warehouse the generator filled; a day already appended is kept and the next one is added.
    """
    from dataclasses import fields, replace

    from ml.ingest.generator import GeneratorParams, generate

    with connect(settings) as conn:
        row = conn.execute(
            "select t.value from audit.planted_truth t join audit.load_batches b using (batch_id) "
            "where b.status = 'loaded' and b.source = 'generator' and t.key = 'params' "
            "order by b.batch_id desc limit 1").fetchone()
        if row is None:
            raise RuntimeError("no generated window in this warehouse: one_new_day continues the generator's")
        names = {f.name for f in fields(GeneratorParams)}
        values = {k: v for k, v in row[0].items() if k in names}
        params = GeneratorParams(**{**values, "end_date": dt.date.fromisoformat(values["end_date"])})
        if params.n_products == replace(params, n_products=None).product_count:
            params = replace(params, n_products=None)  # the default, resolved in the truth: keep it implicit
        # Batches already loaded are skipped, so the first call that loads something added the new day.
        days = max(1, (end_date - params.resolved_end_date).days + 1)
        report = generate(conn, replace(params, append_days=days))
        while report.skipped:
            days += 1
            report = generate(conn, replace(params, append_days=days))
    return report.rows_loaded


def replay_web_events(settings: Settings) -> int:
    """The newest day of browsing again one day later, in the newest batch: a real night brings browsing
    too. Each call moves one day on (the first night replays the history's last day, the next one that
    replay), so every night's events are new keys, as the orders of :func:`one_new_day` are. Without it
    the web events' watermark stays on the history batch, and every night re-stages all web events and
    recomputes the features of every customer who ever browsed: a catch-up, not a night."""
    with connect(settings) as conn:
        cur = conn.execute(
            "with newest as (select max(event_at)::date as day from raw.web_events) "
            "insert into raw.web_events (customer_id, session_id, event_type, product_id, event_at, _batch_id) "
            "select customer_id, 'N' || session_id, event_type, product_id, event_at + interval '1 day', "
            "(select max(batch_id) from audit.load_batches) "
            "from raw.web_events cross join newest "
            "where event_at >= newest.day and event_at < newest.day + 1")
        conn.commit()
        return cur.rowcount


RAW_TABLES = ("customers", "products", "orders", "order_lines", "web_events")


@contextmanager
def loaded_earlier(settings: Settings, *, hours: int) -> Iterator[None]:
    """Loads inside this block are stamped ``hours`` before now, as if the history had been loaded on an earlier
    night: the raw tables' ``_loaded_at`` default moves back meanwhile (a catalog change, nothing rewritten).

    The generator loads the whole history minutes before the benchmark's builds, so all of it would sit
    inside the incremental look-back (6 h before the newest load processed), and the staged copies of those
    load times too: the incremental night would re-process every order whose customer row was "just"
    staged, a catch-up rather than a night. Ageing raw afterwards (:func:`age_history`) leaves the staged
    load times new; stamping the history old at load time keeps every layer consistent, at no cost.
    """
    def set_default(expression: str) -> None:
        with connect(settings) as conn:
            for table in RAW_TABLES:
                conn.execute(f"alter table raw.{table} alter column _loaded_at set default {expression}")  # noqa: S608 (fixed names)
            conn.commit()

    set_default(f"now() - interval '{int(hours)} hours'")
    try:
        yield
    finally:
        set_default("now()")


def previous_night(bench: Bench, settings: Settings, end_date: dt.date) -> None:
    """The day after the history, loaded as the night before tonight's would have (stamped 24 h ago, the
    history 48 h ago), before the full build and outside the night's timing.

    The incremental models look back 6 h before the newest load they processed, and a history loaded in one
    batch is all "newest": the first incremental night after it re-processes everything (a catch-up, once
    in production). With the history older than the look-back and one day's batch after it, tonight's
    incremental night re-processes that day's batch and loads the new one: a steady night, as production's.
    """
    started = time.perf_counter()
    with loaded_earlier(settings, hours=24):
        one_new_day(settings, end_date)
        replay_web_events(settings)
    bench.night_started += time.perf_counter() - started


def age_history(settings: Settings, *, hours: int) -> None:
    """Move every raw row's load time ``hours`` back, as if the history had been loaded on an earlier night.

    The generator loads the whole history minutes before the benchmark's builds, so all of it sits inside the
    incremental look-back (6 h before the newest load processed) and the first incremental build would
    re-process it: a catch-up, not a night. In production the history was loaded nights ago.
    """
    with connect(settings) as conn:
        for table in ("customers", "products", "orders", "order_lines", "web_events"):
            conn.execute(f"update raw.{table} set _loaded_at = _loaded_at - make_interval(hours => %s)",  # noqa: S608 (fixed names)
                         (hours,))
        conn.commit()


def incremental_night(bench: Bench, settings: Settings, end_date: dt.date, trained: dict) -> None:
    from ml.dbt import dbt_build
    from ml.nightly import data_test_scope, record_data_tests, validate, value_training_needed

    # The full night's models as registered champions (training ran without MLflow): not timed, it is
    # what the full night's training runs leave behind in production.
    register_champions(settings, trained, _as_of(settings))
    # The history was loaded two days ago and the previous night's batch one day ago (previous_night), both
    # staged by the full build: tonight's look-back holds that batch and the new day, as in production.
    with bench.step(NEW_DAY) as step:
        loaded = one_new_day(settings, end_date)
        # a real night brings browsing too (the generator's continuation has orders only)
        loaded["raw.web_events"] = replay_web_events(settings)
        step.rows = loaded.get("raw.order_lines", 0)
        step.notes.update(rows_by_table=loaded)
    with bench.step(DBT_INCREMENTAL, reference=DBT_FULL) as step:
        # as the DAG builds them: the marts, their data tests over the rows loaded since the last passing
        # night's (load_raw decides), then the value family's training marts only if it retrains
        with connect(settings) as conn:
            tests = data_test_scope(conn, validate({}))
        step.notes.update(data_tests=tests["reason"])
        result = dbt_build(settings, exclude=DBT_TRAINING_SELECTOR, tested_through=tests["tested_through"],
                           **DBT_VARS)
        _keep_run_results(result, "incremental")
        # no rows: its work is the whole graph's tables and tests, not the new lines (those are in notes)
        step.notes.update(nodes=result.status_counts(), slowest=_slowest(result),
                          new_order_lines=loaded.get("raw.order_lines", 0))
        if value_training_needed(settings, validate({}), {"as_of": _as_of(settings).isoformat()}):
            training = dbt_build(settings, select=DBT_TRAINING_SELECTOR, tested_through=tests["tested_through"],
                                 **DBT_VARS)
            _keep_run_results(training, "incremental.training")
            step.notes.update(training_marts=training.status_counts(), training_slowest=_slowest(training))
        else:
            step.notes.update(training_marts="not built: the value family only scores tonight")
        with connect(settings) as conn:
            record_data_tests(conn, _as_of(settings), tests["scope"])
    rescore(bench, settings, trained)


def register_champions(settings: Settings, trained: dict, as_of: dt.date) -> dict[str, str]:
    """Log and register the full night's fitted models as version-1 champions in the benchmark's own MLflow
    store, tagged with the night's as_of and customer count like the nightly's training runs, so the
    retrain policy sees day-old champions tomorrow. Returns model name -> version."""
    import mlflow
    from mlflow import MlflowClient

    from ml import registry
    from ml.nightly import N_CUSTOMERS_METRIC, current_customers

    registry.configure(settings)
    client, versions = MlflowClient(), {}
    n_customers = float(current_customers(settings))

    def register(experiment: str, name: str, log_model) -> None:
        with registry.parent_run(experiment, as_of=as_of, run_name=f"bench {name} {as_of}"):
            mlflow.log_metric(N_CUSTOMERS_METRIC, n_customers)
            info = log_model(name)
        versions[name] = str(info.registered_model_version)
        client.set_registered_model_alias(name, registry.CHAMPION_ALIAS, versions[name])

    if "segment_model" in trained:
        from ml import segmentation

        example = _read(settings, "marts.customer_features").head(5)
        model = trained["segment_model"]
        register(segmentation.EXPERIMENT, segmentation.MODEL_NAME, lambda name: registry.log_pyfunc_model(
            segmentation._pyfunc(model), input_example=example[model.input_columns], registered_model_name=name))
    if "value_model" in trained:
        from ml import value

        example = _read(settings, "marts.clv_scoring_set").head(5)
        for name, model in ((value.CLV_MODEL_NAME, trained["value_model"]),
                            (value.CHURN_MODEL_NAME, trained["churn_model"])):
            register(value.EXPERIMENT, name, lambda name, model=model: registry.log_pyfunc_model(
                value._value_pyfunc(model), input_example=example, name=name, registered_model_name=name))
    if "recommender" in trained:
        from ml import train_baskets
        from ml.recommender_model import log_recommender

        model = trained["recommender"]
        register(train_baskets.EXPERIMENT, train_baskets.MODEL_NAME, lambda name: log_recommender(
            model, recommender_name="hybrid", registered_model_name=name,
            example_customer=str(model.customers_[0]), example_basket=[str(model.items_[0])]))
    log(f"note   registered the full night's models as champions: {versions}")
    return versions


# The incremental night's scoring tasks: the DAG's training tasks again (retrain=auto keeps the champions).
RESCORE_TASKS = {"train_segments": "segment_model", "train_value": "value_model", "train_baskets": "recommender"}


def rescore(bench: Bench, settings: Settings, trained: dict) -> None:
    """The nightly's scoring path on the rebuilt marts, as the DAG runs it: its three training tasks at
    once, each in its own process (``ml.nightly.train_segments`` / ``train_value`` / ``train_baskets``:
    the retrain decision, ``retrain=auto`` keeping the day-old champions, and the score function publishing
    through ``ml.publish``). Segments and values are re-scored for every customer (they depend on as_of);
    recommendations only for customers whose basket lines changed, the rest carried forward
    (``ml.train_baskets.score_baskets``)."""
    as_of = _as_of(settings)
    jobs = {task: ("_rescore_job", {"task": task, "settings": settings, "as_of": as_of.isoformat()})
            for task, key in RESCORE_TASKS.items() if key in trained}
    reports = run_processes(bench, RESCORE, jobs)
    rows, per_task = 0, {}
    for task, (status, seconds, payload) in reports.items():
        if status != "done":
            per_task[task] = {"error": payload}
            log(f"ERROR  rescore {task}: {payload}")
            continue
        rows += sum(payload["published"].values())
        per_task[task] = {**payload, "seconds": round(seconds, 2)}
        log(f"       {task}: {per_task[task]}")
    step = bench.get(RESCORE)
    step.rows = rows
    step.notes.update(as_of=as_of.isoformat(), tasks=per_task)


def _rescore_job(*, done: Callable[[dict], None], task: str, settings: Settings, as_of: str) -> None:
    """One DAG training task on a scoring night, in its own process."""
    from ml import nightly

    result = getattr(nightly, task)(settings, nightly.validate({}), {"as_of": as_of}, orchestrator_run_id="bench")
    done({"action": result.get("action"), "reason": result.get("action_reason"),
          "published": result.get("published", {}), "carried": result.get("carried", {}),
          "cpu_seconds": round(_cpu_seconds(), 2)})


def add_totals(bench: Bench) -> None:
    """The nightly figures. The full night: its real wall time, from the start of the load to the last
    training task's publish (the tasks run at once), and the largest summed PSS of python + server seen at
    one instant in any of its steps. The incremental night: the sum of its steps (upper-bound peak: the
    largest python peak plus the largest server peak)."""
    def total(name: str, parts: list[str], reference: str | None = None, seconds: float | None = None) -> None:
        steps = [bench.get(p) for p in parts if bench.get(p) is not None]
        if not steps:
            return
        bench.add(StepResult(
            step=name, seconds=sum(s.seconds for s in steps) if seconds is None else seconds, rows=steps[0].rows,
            reference=reference,
            peak_rss_python_mb=max(s.peak_rss_python_mb for s in steps),
            peak_rss_server_mb=max(s.peak_rss_server_mb for s in steps),
            peak_total_mb=max(s.peak_total_mb or s.peak_rss_python_mb + s.peak_rss_server_mb for s in steps),
            notes={"kind": "total", "steps": [s.step for s in steps],
                   "seconds": "real wall time" if seconds is not None else "sum of the steps"}))

    wall = (bench.night_ended - bench.night_started) if bench.night_started and bench.night_ended else None
    total(NIGHTLY_FULL, [LOAD, DBT_FULL, TRAIN_PUBLISH], seconds=wall)
    total(NIGHTLY_INCREMENTAL, [NEW_DAY, DBT_INCREMENTAL, RESCORE], reference=NIGHTLY_FULL)


def server_pid(settings: Settings) -> int | None:
    return postmaster_pid(settings.pgdata) if settings.embedded else None


if __name__ == "__main__":  # pragma: no cover - the entry point is python -m bench
    sys.exit("run the benchmark with: python -m bench --customers 10000")
