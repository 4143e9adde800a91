"""DAG parse time of ``dags/`` (target ≤ 1 s): what the dag-processor pays for our file on every parse loop.

    .venv/bin/python bench/bench_dag_parse.py [--repeat 5] [--report]

Each repetition is a fresh interpreter (as a dag-processor child is): Airflow is imported first and timed
apart, then ``DagBag(dags/)`` is timed, split into the import of Cosmos and the rest (manifest load and
task creation). ``--report`` also runs ``airflow dags report`` (Airflow's own per-file figure). No database
and no dbt are touched; the dbt manifest is produced first if missing (``dbt parse``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml.airflow_env import (  # noqa: E402
    DAGS_FOLDER,
    AirflowHome,
    airflow_env,
    ensure_dbt_manifest,
    migrate,
    run_airflow,
)
from ml.config import Settings  # noqa: E402

_CHILD = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    from airflow.dag_processing.dagbag import DagBag
    t1 = time.perf_counter()
    import cosmos  # what our DAG file adds on top of Airflow
    t2 = time.perf_counter()
    bag = DagBag(dag_folder=sys.argv[1])
    t3 = time.perf_counter()
    print(json.dumps({"import_airflow_s": t1 - t0, "import_cosmos_s": t2 - t1, "dagbag_after_cosmos_s": t3 - t2,
                      "tasks": sum(len(d.tasks) for d in bag.dags.values()),
                      "errors": {k: str(v)[:300] for k, v in bag.import_errors.items()}}))
""")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--report", action="store_true", help="also run `airflow dags report`")
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    if not (settings.dbt_project_dir / "target" / "manifest.json").exists():
        ensure_dbt_manifest(settings)
    with tempfile.TemporaryDirectory() as tmp:
        env = airflow_env(settings, home=AirflowHome(Path(tmp)))
        runs = []
        for _ in range(args.repeat):
            done = subprocess.run([sys.executable, "-c", _CHILD, str(DAGS_FOLDER)], env=env,
                                  capture_output=True, text=True, timeout=300, check=False)
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if runs[0]["errors"]:
            print(f"import errors: {runs[0]['errors']}", file=sys.stderr)
            return 1
        cosmos = [r["import_cosmos_s"] for r in runs]
        rest = [r["dagbag_after_cosmos_s"] for r in runs]
        total = [c + r for c, r in zip(cosmos, rest, strict=True)]
        print(f"DAG parse of {DAGS_FOLDER} ({runs[0]['tasks']} tasks), {args.repeat} fresh interpreters, median:")
        print(f"  import airflow (paid once by the dag-processor, not per file) {statistics.median(r['import_airflow_s'] for r in runs):6.3f} s")
        # (0 when Airflow's provider discovery already imported Cosmos, which is then part of the line above)
        print(f"  import cosmos                                                 {statistics.median(cosmos):6.3f} s")
        print(f"  DagBag: manifest load + task creation                         {statistics.median(rest):6.3f} s")
        print(f"  parse of our file (cosmos + DagBag), target <= 1 s            {statistics.median(total):6.3f} s"
              f"  (min {min(total):.3f}, max {max(total):.3f})")
        if args.report:
            migrate(env)  # `dags report` needs a metadata database (a throw-away SQLite one here)
            report = run_airflow(env, "dags", "report", "-o", "json", timeout=300)
            line = next((ln for ln in report.stdout.splitlines() if ln.startswith("[")), "[]")
            for row in json.loads(line):
                print(f"  airflow dags report: {row.get('file')} {row.get('duration')} ({row.get('task_num')} tasks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
