"""docker-compose.yml, checked without a Docker engine: it parses, runs the services the deployment needs with
the commands Airflow has, mounts the code where the code looks for it, configures it through the variables
the code reads, has health checks, and holds no secret (every secret is a ${VAR} from .env)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ml.config import PROJECT_ROOT, Settings

COMPOSE = PROJECT_ROOT / "docker-compose.yml"
ENV_EXAMPLE = PROJECT_ROOT / ".env.example"
AIRFLOW_SERVICES = {
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
}
# ${VAR}, ${VAR:-default}, ${VAR:?message}; not $${VAR}, which compose passes on for the container's shell.
_VAR = re.compile(r"(?<!\$)\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_services_of_a_real_deployment(compose):
    services = compose["services"]
    for name in ("postgres", "mlflow", "airflow-init", *AIRFLOW_SERVICES):
        assert name in services, name


def test_airflow_services_run_airflow_components(compose):
    from ml.ui import AIRFLOW_COMPONENTS

    services = compose["services"]
    for name, component in AIRFLOW_SERVICES.items():
        assert services[name]["command"] == [component]
        assert component in AIRFLOW_COMPONENTS
        assert services[name]["image"].startswith("apache/airflow:3.")


def test_code_is_mounted_where_the_code_looks_for_it(compose):
    for name in ("airflow-init", *AIRFLOW_SERVICES):
        service = compose["services"][name]
        mounts = {}
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            mounts[source] = target
        env = _env(service)
        root = Path(env["PYTHONPATH"])
        # ml/config.py: PROJECT_ROOT is the folder holding ml/; the dbt project and the DAGs are beside it.
        assert mounts["./ml"] == str(root / "ml")
        assert mounts["./dbt_project"] == str(root / Settings.from_env({}).dbt_project_dir.name)
        assert mounts["./dags"] == str(root / "dags") == env["AIRFLOW__CORE__DAGS_FOLDER"]
        for source in ("./ml", "./dbt_project", "./dags"):
            assert (PROJECT_ROOT / source).is_dir(), source


def _names_read_by_the_code() -> set[str]:
    """Environment variable names ml/ reads (env.get("X"), os.environ["X"], env_var('X') in dbt)."""
    names: set[str] = set()
    for path in [*(PROJECT_ROOT / "ml").rglob("*.py"), PROJECT_ROOT / "dbt_project" / "profiles.yml"]:
        text = path.read_text()
        names |= set(re.findall(r"""env(?:iron)?\.get\(\s*["']([A-Z0-9_]+)["']""", text))
        names |= set(re.findall(r"""environ\[\s*["']([A-Z0-9_]+)["']\s*\]""", text))
        names |= set(re.findall(r"""env_var\(\s*['"]([A-Z0-9_]+)['"]""", text))
    return names


def test_environment_names_match_what_the_code_reads(compose):
    read = _names_read_by_the_code()
    assert {"WAREHOUSE_URL", "MLFLOW_TRACKING_URI", "CRM_STATE_DIR", "CRM_TIMEZONE"} <= read
    for name in AIRFLOW_SERVICES:
        env = _env(compose["services"][name])
        assert env["WAREHOUSE_URL"].startswith("postgresql://")
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        for key in env:
            if key.startswith("CRM_"):
                assert key in read, f"{name} sets {key}, which no code reads"


def test_mlflow_uses_postgres_and_an_artifact_volume(compose):
    mlflow = compose["services"]["mlflow"]
    assert _env(mlflow)["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    command = " ".join(mlflow["command"])
    assert "--artifacts-destination /mlartifacts" in command
    assert any(v.startswith("mlartifacts:/mlartifacts") for v in mlflow["volumes"])
    # the airflow side reaches it by the service name and port
    assert "5000" in command


def test_long_running_services_have_health_checks(compose):
    for name, service in compose["services"].items():
        if name == "airflow-init":
            continue
        assert "healthcheck" in service and service["healthcheck"]["test"], name


def test_no_secret_is_committed(compose):
    text = COMPOSE.read_text()
    for name, service in compose["services"].items():
        for key, value in _env(service).items():
            if re.search(r"PASSWORD$|SECRET$|SECRET_KEY$", key):
                assert value.startswith("${") and value.endswith("}"), f"{name}.{key} is a literal"
        for key, value in _env(service).items():
            # credentials inside URLs are ${VAR}s too
            for match in re.finditer(r"://([^:/@]+):([^@]+)@", _VAR.sub("VAR", value)):
                assert match.group(2) == "VAR", f"{name}.{key} has a literal password"
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    used = set(_VAR.findall(code))
    example = {line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines()
               if line and not line.startswith("#")}
    assert used <= example, f".env.example misses {sorted(used - example)}"
    for line in ENV_EXAMPLE.read_text().splitlines():
        if re.match(r"[A-Z_]*(PASSWORD|SECRET)[A-Z_]*=", line):
            assert line.endswith("="), f".env.example holds a value: {line}"
