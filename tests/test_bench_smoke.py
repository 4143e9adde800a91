"""Smoke test of the benchmark: ``python -m bench`` at a small scale runs every step end to end.

Runs the real thing as a subprocess (its own embedded PostgreSQL on a free port, dbt, the model families,
publish, the incremental night, the references) with 2,000 customers and a slice of the FIMI file, then checks
that the printed table and the appended JSON line name every step, with rows where rows are expected and no
step error. No timing assertions: the benchmark's figures are read by people, not by tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ml.config import PROJECT_ROOT

# bench/ is a folder of scripts beside the package, not installed with it: import it from the checkout
sys.path.insert(0, str(PROJECT_ROOT))
from bench import pipeline, reference  # noqa: E402

PIPELINE_STEPS = [
    pipeline.LOAD, pipeline.DBT_FULL, pipeline.TRAIN_SEGMENTATION, pipeline.TRAIN_VALUE, pipeline.TRAIN_BASKETS,
    pipeline.TRAIN_RECOMMEND, pipeline.PUBLISH, pipeline.NEW_DAY, pipeline.DBT_INCREMENTAL, pipeline.RESCORE,
    pipeline.NIGHTLY_FULL, pipeline.NIGHTLY_INCREMENTAL,
]
ROWS_EXPECTED = [pipeline.LOAD, pipeline.DBT_FULL, pipeline.PUBLISH, pipeline.NEW_DAY, pipeline.RESCORE,
                 reference.FLOOR_COPY_IN, reference.FLOOR_COPY_OUT, reference.PUBLISH_ALONE,
                 reference.FLOOR_PUBLISH]


def test_bench_runs_every_step_at_small_scale(tmp_path):
    results = tmp_path / "results.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("WAREHOUSE_URL", "CRM_STATE_DIR", "CRM_PG_PORT")}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--customers", "2000", "--results", str(results),
         "--fimi-baskets", "5000", "--mining-timeout", "300"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    expected = PIPELINE_STEPS + reference.step_names()

    table = done.stdout[done.stdout.index("\nbenchmark: 2,000 customers"):]
    table_steps = {line[:44].strip() for line in table.splitlines()}
    missing_in_table = [s for s in expected if s not in table_steps]
    assert not missing_in_table, f"steps missing from the printed table: {missing_in_table}\n{table}"
    assert "skipped:" not in table, table  # every family's entry point exists: none may be skipped

    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(records) == 1
    record = records[0]
    assert record["customers"] == 2000 and record["commit"] and record["cores"] >= 1
    steps = {s["step"]: s for s in record["steps"]}
    missing_in_json = [s for s in expected if s not in steps]
    assert not missing_in_json, f"steps missing from the JSON line: {missing_in_json}"

    errors = {name: s["notes"]["error"] for name, s in steps.items() if "error" in s["notes"]}
    assert not errors, errors
    for name in ROWS_EXPECTED:
        assert steps[name]["rows"] and steps[name]["rows"] > 0, (name, steps[name])
    for name in (pipeline.LOAD, pipeline.DBT_FULL):
        assert steps[name]["peak_rss_python_mb"] > 0 and steps[name]["peak_rss_server_mb"] > 0, steps[name]
    # The incremental night loads exactly one more day: far fewer order lines than the whole history.
    assert 0 < steps[pipeline.NEW_DAY]["rows"] < steps[pipeline.LOAD]["rows"] / 50
    # Every miner found the same itemsets on the same slice at each support (where none timed out).
    for support in reference.SUPPORTS:
        counts = {steps[reference.mining_step(m, support)]["rows"] for m in reference.MINERS
                  if "timeout" not in steps[reference.mining_step(m, support)]["notes"]}
        assert len(counts) == 1, (support, counts)
    assert steps[reference.DAG_PARSE]["notes"]["dags"] == ["crm_nightly"]
    assert not steps[reference.DAG_PARSE]["notes"]["errors"]
