"""The local Airflow installation this project runs in: its home, its configuration, its commands.

Airflow keeps its state (metadata database, logs, generated config and passwords) under
``<state_dir>/airflow``, beside the embedded warehouse and the MLflow store, so one folder holds a
user's whole local platform. Everything is configured by environment variables computed here and passed
to ``airflow`` child processes; nothing in this module imports Airflow (importing it would freeze its
configuration in the calling process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ml.config import PROJECT_ROOT, Settings
from ml.dbt import dbt_env
from ml.errors import CrmError

DAG_ID = "crm_nightly"
DAGS_FOLDER = PROJECT_ROOT / "dags"
ADMIN_USER = "admin"


@dataclass(frozen=True)
class AirflowHome:
    """Paths of one local Airflow installation."""

    root: Path

    @property
    def database(self) -> Path:
        return self.root / "airflow.db"

    @property
    def passwords_file(self) -> Path:
        return self.root / "simple_auth_manager_passwords.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


def airflow_home(settings: Settings) -> AirflowHome:
    return AirflowHome(settings.state_dir / "airflow")


def airflow_bin() -> str:
    """The ``airflow`` executable of this interpreter's environment (the venv), not whatever is on PATH."""
    candidate = Path(sys.executable).with_name("airflow")
    return str(candidate) if candidate.exists() else "airflow"


def airflow_env(
    settings: Settings,
    *,
    api_port: int = 8080,
    base: Mapping[str, str] | None = None,
    home: AirflowHome | None = None,
) -> dict[str, str]:
    """Environment for every ``airflow`` process (api-server, scheduler, dag-processor, triggerer,
    ``dags test``) and for the tasks they run.

    The tasks run ``ml`` code that reads :class:`Settings` from the environment, so the settings of the
    caller are exported explicitly: a task must use the same warehouse, MLflow store and timezone as the
    command that started Airflow.
    """
    home = home or airflow_home(settings)
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "AIRFLOW_HOME": str(home.root),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            # SQLite is enough for one user on one machine; docker-compose uses PostgreSQL instead.
            # (timeout: wait up to 30 s for SQLite's write lock instead of failing an API call with "database
            # is locked" while the scheduler writes)
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home.database}?timeout=30",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            # Two cores: the three trainings in parallel plus one spare slot.
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "4",
            "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "60",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home.passwords_file),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
            # Task workers report to the API server's execution API; it must be the port we chose.
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home.logs),
            # Find new DAG files quickly on a laptop; the default 5 minutes is meant for big deployments.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
            # No outbound calls: Cosmos telemetry off (both its own switch and the common conventions).
            "AIRFLOW__COSMOS__ENABLE_TELEMETRY": "False",
            "DO_NOT_TRACK": "1",
            "SCARF_NO_ANALYTICS": "true",
            "AIRFLOW__COSMOS__CACHE_DIR": str(home.root / "cosmos_cache"),
            "AIRFLOW__OPENLINEAGE__DISABLED": "True",
            # The project's settings, so tasks use the caller's warehouse and MLflow store.
            "CRM_STATE_DIR": str(settings.state_dir),
            "CRM_PG_PORT": str(settings.embedded_port),
            "CRM_TIMEZONE": settings.timezone,
            "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
            "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p),
        }
    )
    # The dbt profile (dbt_project/profiles.yml) reads CRM_DBT_*; dbt's own offline switches come along.
    env.update({k: v for k, v in dbt_env(settings).items() if k.startswith(("CRM_DBT_", "DBT_"))})
    # Only an explicit database or server is exported: the embedded default stays "embedded" in tasks.
    default_embedded = Settings.from_env({"CRM_STATE_DIR": str(settings.state_dir),
                                          "CRM_PG_PORT": str(settings.embedded_port)})
    if settings.warehouse_url != default_embedded.warehouse_url:
        env["WAREHOUSE_URL"] = settings.warehouse_url
    else:
        env.pop("WAREHOUSE_URL", None)
    return env


def admin_password(home: AirflowHome) -> str:
    """The admin password of the local Airflow: generated once, kept in the (git-ignored) state folder."""
    import secrets

    home.root.mkdir(parents=True, exist_ok=True)
    if home.passwords_file.exists():
        stored = json.loads(home.passwords_file.read_text())
        if stored.get(ADMIN_USER):
            return stored[ADMIN_USER]
    password = secrets.token_urlsafe(12)
    home.passwords_file.write_text(json.dumps({ADMIN_USER: password}))
    home.passwords_file.chmod(0o600)
    return password


def run_airflow(env: Mapping[str, str], *args: str, timeout: float = 900, check: bool = True,
                capture: bool = True) -> subprocess.CompletedProcess:
    """Run one ``airflow`` command with the project's environment."""
    done = subprocess.run(
        [airflow_bin(), *args],
        env=dict(env),
        cwd=PROJECT_ROOT,
        capture_output=capture,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        tail = "\n".join(((done.stdout or "") + (done.stderr or "")).strip().splitlines()[-30:])
        raise CrmError(f"`airflow {' '.join(args[:3])}` failed (exit {done.returncode}):\n{tail}")
    return done


def migrate(env: Mapping[str, str]) -> None:
    """Create or upgrade the Airflow metadata database (idempotent; quick when already current)."""
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    run_airflow(env, "db", "migrate", timeout=600)


def prepare(settings: Settings, *, api_port: int = 8080, home: AirflowHome | None = None) -> dict[str, str]:
    """Everything Airflow needs before it starts: home, password, metadata DB, the dbt manifest.

    The DAG loads the dbt graph from ``dbt_project/target/manifest.json`` and never runs dbt at parse
    time, so the manifest is produced here (``dbt parse``) whenever the dbt project exists.
    """
    home = home or airflow_home(settings)
    env = airflow_env(settings, api_port=api_port, home=home)
    admin_password(home)
    migrate(env)
    ensure_dbt_manifest(settings)
    return env


def ensure_dbt_manifest(settings: Settings) -> Path | None:
    """Produce the dbt manifest the DAG reads (``dbt parse``); None when there is no dbt project yet."""
    if not (settings.dbt_project_dir / "dbt_project.yml").exists():
        return None
    from ml.dbt import dbt_parse

    return dbt_parse(settings)


def dags_test(settings: Settings, conf: Mapping | None = None, *, logical_date: str | None = None,
              env: Mapping[str, str] | None = None, timeout: float = 3600) -> subprocess.CompletedProcess:
    """Run the nightly DAG once, in one process, without a scheduler (``airflow dags test``).

    Returns the completed process (its output holds every task's log, also written to
    ``<airflow home>/logs/dags_test.log``); raises CrmError when the run fails, with the output's tail.
    """
    env = env or prepare(settings)
    args = ["dags", "test", DAG_ID]
    if logical_date:
        args.append(logical_date)
    if conf:
        args += ["--conf", json.dumps(dict(conf))]
    done = run_airflow(env, *args, timeout=timeout, capture=True, check=False)
    log_file = Path(env["AIRFLOW_HOME"]) / "logs" / "dags_test.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text((done.stdout or "") + (done.stderr or ""))
    if done.returncode != 0:
        raise CrmError(f"the {DAG_ID} run failed: {failure_summary(log_file.read_text())}\nfull log: {log_file}")
    return done


def failure_summary(output: str) -> str:
    """The lines of an ``airflow dags test`` output that say what failed (our errors' messages)."""
    lines = output.splitlines()
    keep: list[str] = []
    for i, line in enumerate(lines):
        # An exception's message line ("ml.params.InvalidParams: ...") and its indented continuation.
        if line and not line[0].isspace() and ("Error: " in line or "Invalid" in line or "Failed: " in line) \
                and ":" in line and not line.startswith("20"):
            keep.append(line)
            keep += [ln for ln in lines[i + 1:i + 12] if ln.startswith("  ")]
    failed = [ln.split("[DAG TEST]")[-1].strip() for ln in lines if "Marking task as FAILED" in ln]
    return "\n".join(dict.fromkeys(keep + failed)) or "see the log"


def dag_runs(env: Mapping[str, str]) -> list[dict]:
    """The nightly DAG's runs, newest first (``airflow dags list-runs``)."""
    done = run_airflow(env, "dags", "list-runs", DAG_ID, "-o", "json", timeout=120)
    runs = json.loads(_json_part(done.stdout) or "[]")
    return sorted(runs, key=lambda r: r.get("run_after") or "", reverse=True)


def task_states(env: Mapping[str, str], run_id: str) -> dict[str, str | None]:
    """``task_id -> state`` of one run (``None``: the task never ran)."""
    done = run_airflow(env, "tasks", "states-for-dag-run", DAG_ID, run_id, "-o", "json", timeout=120)
    return {row["task_id"]: row.get("state") or None for row in json.loads(_json_part(done.stdout) or "[]")}


def _json_part(stdout: str) -> str:
    """The JSON line of a CLI output that also holds log lines (which start with ``[info`` or a date)."""
    for line in stdout.splitlines():
        if line.startswith(("[{", "[]", "{")):
            return line
    return ""
