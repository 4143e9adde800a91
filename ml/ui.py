"""``crm ui``: the local Airflow (api-server, scheduler, dag-processor, triggerer) and the MLflow UI, on
127.0.0.1, over the same local stores the pipeline uses. Ctrl-C stops everything it started.

The same :func:`start_airflow` serves the REST-API test, so the test drives exactly what a user gets.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ml.airflow_env import ADMIN_USER, AirflowHome, admin_password, airflow_bin, airflow_home, prepare
from ml.config import Settings
from ml.errors import CrmError

AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Services:
    """Processes started by this module; :meth:`stop` ends exactly these (their process groups)."""

    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    log_dir: Path | None = None

    def stop(self, timeout: float = 30) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.processes.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(10)

    def check_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}
        if dead:
            where = f" (logs in {self.log_dir})" if self.log_dir else ""
            raise CrmError(f"stopped unexpectedly: {', '.join(f'{n} (exit {c})' for n, c in dead.items())}{where}")


@dataclass
class AirflowServices(Services):
    url: str = ""
    user: str = ADMIN_USER
    password: str = ""

    def token(self) -> str:
        """A JWT for the REST API (SimpleAuthManager: POST /auth/token with the user and password)."""
        body = json.dumps({"username": self.user, "password": self.password}).encode()
        request = urllib.request.Request(f"{self.url}/auth/token", data=body,  # noqa: S310 - local server
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - our local server
            return json.loads(response.read())["access_token"]


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group we created with start_new_session: only our processes
    except ProcessLookupError:
        pass


def _spawn(name: str, args: list[str], env: dict[str, str], log_dir: Path) -> subprocess.Popen:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it for its lifetime
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _get_json(url: str, timeout: float = 5) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - our local server
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def start_airflow(
    settings: Settings,
    *,
    port: int | None = None,
    home: AirflowHome | None = None,
    components: tuple[str, ...] = AIRFLOW_COMPONENTS,
    ready_timeout: float = 240,
) -> AirflowServices:
    """Prepare (metadata DB, password, dbt manifest) and start Airflow; return once every component
    reports healthy on ``/api/v2/monitor/health``."""
    port = port or free_port()
    home = home or airflow_home(settings)
    env = prepare(settings, api_port=port, home=home)
    # The scheduler and triggerer serve task logs on fixed ports by default (8793/8794): two local
    # Airflows (a user's `crm ui` and a test) would fight over them.
    env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] = str(free_port())
    env["AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT"] = str(free_port())
    services = AirflowServices(log_dir=home.logs / "services", url=f"http://127.0.0.1:{port}",
                               password=admin_password(home))
    try:
        for name in components:
            services.processes[name] = _spawn(name, [airflow_bin(), name], env, services.log_dir)
        _wait_healthy(services, components, ready_timeout)
    except BaseException:
        services.stop()
        raise
    return services


def _wait_healthy(services: AirflowServices, components: tuple[str, ...], timeout: float) -> None:
    wanted = {c.replace("-", "_") for c in components} - {"api_server"}
    deadline = time.monotonic() + timeout
    health: dict | None = None
    while time.monotonic() < deadline:
        services.check_alive()
        health = _get_json(f"{services.url}/api/v2/monitor/health")
        if health and all((health.get(c) or {}).get("status") == "healthy" for c in wanted):
            return
        time.sleep(1)
    raise CrmError(f"Airflow did not become healthy in {timeout:.0f} s: {health} (logs in {services.log_dir})")


def start_mlflow(settings: Settings, *, port: int | None = None, ready_timeout: float = 120) -> tuple[Services, str]:
    """The MLflow UI over the project's tracking store. A remote tracking server needs nothing started."""
    if settings.mlflow_tracking_uri.startswith(("http://", "https://")):
        return Services(), settings.mlflow_tracking_uri
    port = port or free_port()
    settings.mlflow_artifact_root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    log_dir = settings.state_dir / "mlflow_ui"
    services = Services(log_dir=log_dir)
    services.processes["mlflow"] = _spawn(
        "mlflow",
        [mlflow, "server", "--backend-store-uri", settings.mlflow_tracking_uri,
         "--default-artifact-root", settings.mlflow_artifact_root.as_uri(),
         "--host", "127.0.0.1", "--port", str(port)],
        env, log_dir,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        services.check_alive()
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:  # noqa: S310
                if response.status == 200:
                    return services, url
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    services.stop()
    raise CrmError(f"the MLflow UI did not start in {ready_timeout:.0f} s (log in {log_dir})")


def run_ui(settings: Settings, *, airflow_port: int = 8080, mlflow_port: int = 5000) -> int:
    """``crm ui``: start both UIs, print where they are, wait for Ctrl-C, stop them."""
    from ml.warehouse import ensure_warehouse

    ensure_warehouse(settings)
    print("starting Airflow (api-server, scheduler, dag-processor, triggerer) ...", flush=True)
    airflow = start_airflow(settings, port=airflow_port)
    try:
        print("starting the MLflow UI ...", flush=True)
        mlflow, mlflow_url = start_mlflow(settings, port=mlflow_port)
    except BaseException:
        airflow.stop()
        raise
    print(
        f"\n  Airflow  {airflow.url}   login: {airflow.user} / {airflow.password}\n"
        f"           DAG crm_nightly (paused until you unpause it; 'Trigger' opens the parameter form)\n"
        f"  MLflow   {mlflow_url}\n"
        f"  logs     {airflow.log_dir}\n\nCtrl-C stops both.",
        flush=True,
    )
    try:
        while True:
            airflow.check_alive()
            mlflow.check_alive()
            time.sleep(2)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        mlflow.stop()
        airflow.stop()
    return 0
