"""Run the dbt project (``dbt_project/``) against the warehouse: build, parse (for Cosmos) and docs.

dbt runs as a subprocess of the venv's ``dbt`` executable rather than in-process through ``dbtRunner``:
the profile reads its connection from ``CRM_DBT_*`` environment variables, and a subprocess gets its own
environment without touching this process's ``os.environ`` (which Airflow workers and parallel tests
share). Each warehouse database gets its own target and log folders under the state dir, so parallel runs
against different databases never overwrite each other's ``run_results.json`` or partial-parse state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from ml.config import Settings
from ml.errors import CrmError

# Statuses dbt writes into run_results.json that mean "this node did not do its job".
FAILED_STATUSES = ("error", "fail", "runtime error")


class DbtBuildFailed(CrmError):
    """dbt ran, and some models, tests or unit tests failed. ``result`` holds every node's status."""

    def __init__(self, message: str, result: DbtRunResult):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class NodeResult:
    """One node of a dbt run: a model, data test, unit test, seed or snapshot."""

    unique_id: str
    status: str  # success | error | pass | fail | warn | skipped
    failures: int | None  # failing rows of a test
    message: str | None
    execution_time: float

    @property
    def resource_type(self) -> str:
        return self.unique_id.split(".", 1)[0]

    @property
    def name(self) -> str:
        # model.crm.fct_orders -> fct_orders; unit_test.crm.int_customer_rfm.scores -> int_customer_rfm.scores
        return self.unique_id.split(".", 2)[-1]

    @property
    def failed(self) -> bool:
        return self.status in FAILED_STATUSES

    def describe(self) -> str:
        rows = f", {self.failures} failing rows" if self.failures else ""
        text = f"{self.resource_type} {self.name}: {self.status}{rows}"
        if self.message and self.failed:
            text += f" ({_reason(self.message)})"
        return text


@dataclass
class DbtRunResult:
    """What a dbt invocation did: its arguments, exit code, per-node results and where its files are."""

    args: list[str]
    returncode: int
    nodes: list[NodeResult]
    target_path: Path
    log_path: Path
    output: str
    elapsed_seconds: float
    vars: dict = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return self.returncode == 0 and not self.failed_nodes

    @property
    def failed_nodes(self) -> list[NodeResult]:
        return [n for n in self.nodes if n.failed]

    @property
    def warned_nodes(self) -> list[NodeResult]:
        return [n for n in self.nodes if n.status == "warn"]

    def node(self, name: str) -> NodeResult:
        """The result of one node, by name (``fct_orders``) or unique id."""
        for n in self.nodes:
            if name in (n.unique_id, n.name):
                return n
        raise KeyError(f"no node {name!r} in this dbt run")

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.status] = counts.get(n.status, 0) + 1
        return counts

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.status_counts().items()))
        head = f"dbt {' '.join(self.args[:1])}: {counts or 'no nodes'} in {self.elapsed_seconds:.1f} s"
        problems = [n.describe() for n in self.failed_nodes + self.warned_nodes]
        return "\n".join([head, *("  " + p for p in problems)])


def dbt_executable() -> str:
    """The ``dbt`` of this Python environment (the venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "dbt"
    if beside.exists():
        return str(beside)
    found = shutil.which("dbt")
    if found is None:
        raise CrmError("dbt is not installed in this environment (pip install 'dbt-postgres~=1.10')")
    return found


def dbt_env(settings: Settings, *, target: str | None = None) -> dict[str, str]:
    """The environment a dbt process needs: the profile's CRM_DBT_* variables and offline flags."""
    address = settings.warehouse
    env = dict(os.environ)
    env.update(
        CRM_DBT_TARGET=target or ("embedded" if settings.embedded else "external"),
        CRM_DBT_HOST=address.host,
        CRM_DBT_PORT=str(address.port),
        CRM_DBT_USER=address.user,
        CRM_DBT_PASSWORD=address.password,
        CRM_DBT_DBNAME=address.database,
        # Offline: no usage statistics, no version check against PyPI.
        DBT_SEND_ANONYMOUS_USAGE_STATS="false",
        DBT_VERSION_CHECK="false",
        DBT_USE_COLORS="false",
    )
    env.setdefault("CRM_DBT_THREADS", "4")
    return env


def run_paths(settings: Settings) -> tuple[Path, Path]:
    """Target and log folders of runs against this settings' database (one pair per database)."""
    base = settings.state_dir / "dbt" / settings.warehouse.database
    return base / "target", base / "logs"


def run_dbt(
    settings: Settings,
    args: list[str],
    *,
    vars: dict | None = None,
    target: str | None = None,
    target_path: Path | None = None,
    check: bool = True,
) -> DbtRunResult:
    """Run ``dbt <args>`` on the project against the settings' warehouse.

    Raises :class:`DbtBuildFailed` (a ``CrmError``) naming the failed models and tests and their failing row
    counts when ``check`` is true and anything failed; the result stays available as ``err.result``.
    """
    default_target, log_path = run_paths(settings)
    target_path = Path(target_path) if target_path is not None else default_target
    target_path.mkdir(parents=True, exist_ok=True)
    log_path.mkdir(parents=True, exist_ok=True)
    results_file = target_path / "run_results.json"
    results_file.unlink(missing_ok=True)  # never report the previous run's results as this one's

    env = dbt_env(settings, target=target)
    env["DBT_TARGET_PATH"] = str(target_path)
    env["DBT_LOG_PATH"] = str(log_path)
    command = [
        dbt_executable(),
        *args,
        "--project-dir", str(settings.dbt_project_dir),
        "--profiles-dir", str(settings.dbt_project_dir),
    ]
    clean_vars = {k: _yaml_value(v) for k, v in (vars or {}).items() if v is not None}
    if clean_vars:
        command += ["--vars", json.dumps(clean_vars)]

    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    output = done.stdout + done.stderr
    result = DbtRunResult(
        args=list(args),
        returncode=done.returncode,
        nodes=_read_results(results_file),
        target_path=target_path,
        log_path=log_path,
        output=output,
        elapsed_seconds=elapsed,
        vars=clean_vars,
    )
    if check and not result.success:
        raise DbtBuildFailed(_failure_message(settings, result), result)
    return result


def dbt_build(
    settings: Settings,
    *,
    as_of: date | str | None = None,
    horizon_days: int = 90,
    training_snapshots: int = 1,
    full_refresh: bool = False,
    select: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    tested_through: str | None = None,
    check: bool = True,
) -> DbtRunResult:
    """``dbt build`` (models, data tests and unit tests in DAG order) with the point-in-time vars.

    ``tested_through``: the data tests of tables with a load time read only the rows loaded after it (less the
    incremental look-back; ``ml.nightly.data_test_scope`` says when); None: every row.
    """
    args = ["build"]
    if full_refresh:
        args.append("--full-refresh")
    if select:
        args += ["--select", *([select] if isinstance(select, str) else select)]
    if exclude:
        args += ["--exclude", *([exclude] if isinstance(exclude, str) else exclude)]
    variables = {"as_of": as_of, "horizon_days": horizon_days, "training_snapshots": training_snapshots,
                 "tested_through": tested_through}
    return run_dbt(settings, args, vars=variables, check=check)


def dbt_parse(settings: Settings, *, target_path: Path | None = None) -> Path:
    """Write ``manifest.json`` (for Cosmos' manifest load mode) and return its path.

    Default location: ``<dbt_project_dir>/target/manifest.json``, where Cosmos looks for it.
    """
    target_path = Path(target_path) if target_path is not None else settings.dbt_project_dir / "target"
    run_dbt(settings, ["parse"], target_path=target_path)
    manifest = target_path / "manifest.json"
    if not manifest.exists():
        raise CrmError(f"dbt parse did not write {manifest}")
    return manifest


def dbt_docs_generate(settings: Settings, *, target_path: Path | None = None, compile: bool = True) -> Path:
    """Generate the documentation site (manifest, catalog, index.html) and return its folder.

    ``compile=False`` skips rendering every node's SQL (the site then lacks the compiled-code tab): a
    third of the time.

    Look at it with ``dbt docs serve --project-dir dbt_project --profiles-dir dbt_project
    --target-path <folder>`` or open ``<folder>/index.html`` through any static file server.
    """
    default_target, _ = run_paths(settings)
    target_path = Path(target_path) if target_path is not None else default_target
    args = ["docs", "generate"] + ([] if compile else ["--no-compile"])
    run_dbt(settings, args, target_path=target_path)
    return target_path


def _read_results(results_file: Path) -> list[NodeResult]:
    if not results_file.exists():
        return []
    data = json.loads(results_file.read_text())
    return [
        NodeResult(
            unique_id=r["unique_id"],
            status=str(r.get("status")),
            failures=r.get("failures"),
            message=r.get("message"),
            execution_time=float(r.get("execution_time") or 0.0),
        )
        for r in data.get("results", [])
    ]


def _failure_message(settings: Settings, result: DbtRunResult) -> str:
    where = settings.warehouse.redacted()
    failed = result.failed_nodes
    if failed:
        skipped = sum(1 for n in result.nodes if n.status == "skipped")
        lines = [f"dbt {result.args[0]} failed on {where}: {len(failed)} node(s) failed, {skipped} skipped"]
        lines += ["  " + n.describe() for n in failed]
        return "\n".join(lines)
    # dbt stopped before running nodes (compile error, unreachable database, bad vars): show its error text,
    # from the first line that names an error on (the reason follows it), without dbt's timestamps.
    lines = [re.sub(r"^\d\d:\d\d:\d\d\s+", "", ln).strip() for ln in result.output.splitlines()]
    lines = [ln for ln in lines if ln]
    first = next((i for i, ln in enumerate(lines) if "error" in ln.lower()), max(len(lines) - 8, 0))
    tail = "\n  ".join(lines[first : first + 8])
    return f"dbt {' '.join(result.args)} failed on {where} (exit {result.returncode}):\n  {tail}"


def _yaml_value(value):
    return value.isoformat() if isinstance(value, date) else value


def _reason(text: str) -> str:
    """dbt's error message in one line: its headline and the database's cause after it (e.g. "Database Error
    in model fct_orders ... | integer out of range"), without the pointer to the compiled SQL file."""
    lines = [ln.strip() for ln in text.strip().splitlines()]
    lines = [ln for ln in lines if ln and not ln.lower().startswith("compiled code at")]
    return " | ".join(lines[:3])[:400]
