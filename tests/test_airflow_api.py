"""The UI's trigger button, through Airflow's REST API: start the real services (api-server, scheduler,
dag-processor, triggerer, as ``crm ui`` does), log in with the simple auth manager, trigger the nightly DAG
with a params ``conf`` and wait for the run to succeed; a conf the form would refuse is refused here too."""

from __future__ import annotations

import ast
import json
import time
import urllib.error
import urllib.request
from urllib.parse import quote

import pytest

from ml.airflow_env import AirflowHome
from ml.config import Settings
from ml.ingest.generator import GeneratorParams, generate
from ml.ui import start_airflow
from ml.warehouse import connect

DAG = "crm_nightly"


class Api:
    def __init__(self, base: str, token: str):
        self.base, self.token = base, token

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        # A local Airflow on SQLite can answer 500 "Database error" when its single writer lock is busy
        # (the transaction is rolled back); the call is repeated then, as a user would press again.
        for _ in range(5):
            status, body_out = self._call(method, path, body)
            if status != 500:
                break
            time.sleep(2)
        return status, body_out

    def _call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"{self.base}/api/v2{path}",
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
            method=method,
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")


def _wait(predicate, timeout: float, what: str, services, poll: float = 3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        services.check_alive()
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (logs in {services.log_dir})")


@pytest.fixture
def small_warehouse(warehouse: Settings) -> Settings:
    """A small generated CRM already in raw, so the run's load step has nothing to generate."""
    with connect(warehouse) as conn:
        generate(conn, GeneratorParams(customers=1500, days=730, seed=11))
    return warehouse


def test_trigger_with_params_through_the_rest_api(small_warehouse, tmp_path):
    services = start_airflow(small_warehouse, home=AirflowHome(tmp_path / "airflow"))
    try:
        api = Api(services.url, services.token())

        # The dag-processor parses dags/ and the DAG appears (paused, as new DAGs are).
        _wait(lambda: api.call("GET", f"/dags/{DAG}")[0] == 200, 300, "the DAG to be parsed", services)
        status, dag = api.call("PATCH", f"/dags/{DAG}", {"is_paused": False})
        assert status == 200 and dag["is_paused"] is False

        # Unpausing makes the scheduler create the latest 02:00 run (catchup=False keeps only that one),
        # which would hold the single active-run slot; this test is about the trigger path, so that run is
        # marked failed, as an operator would in the UI.
        def scheduled_run():
            runs = api.call("GET", f"/dags/{DAG}/dagRuns?run_type=scheduled")[1].get("dag_runs", [])
            return runs[0]["dag_run_id"] if runs else None

        scheduled = _wait(scheduled_run, 120, "the catch-up run of the latest 02:00", services, poll=1)
        status, body = api.call("PATCH", f"/dags/{DAG}/dagRuns/{quote(scheduled, safe='')}", {"state": "failed"})
        assert status == 200, body

        # A value the form refuses is refused by the API before any run exists.
        status, body = api.call("POST", f"/dags/{DAG}/dagRuns", {"logical_date": None, "conf": {"min_support": 2}})
        assert status == 400, body
        assert "min_support" in json.dumps(body)

        conf = {"max_len": 2, "min_support": 0.002, "promotion_policy": "force", "horizon_days": 60}
        status, run = api.call("POST", f"/dags/{DAG}/dagRuns", {"logical_date": None, "conf": conf})
        assert status == 200, run
        run_id = quote(run["dag_run_id"], safe="")

        def finished():
            state = api.call("GET", f"/dags/{DAG}/dagRuns/{run_id}")[1].get("state")
            return state if state in ("success", "failed") else None

        state = _wait(finished, 2400, "the triggered run to finish", services, poll=5)
        if state != "success":
            _, tis = api.call("GET", f"/dags/{DAG}/dagRuns/{run_id}/taskInstances?limit=200")
            failed = [t["task_id"] for t in tis.get("task_instances", []) if t["state"] != "success"]
            pytest.fail(f"run {state}; tasks not successful: {failed} (logs in {services.log_dir})")

        # The conf reached the tasks: the validated parameters carry it.
        status, xcom = api.call(
            "GET", f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/validate_params/xcomEntries/return_value"
        )
        assert status == 200, xcom
        value = xcom["value"]
        if isinstance(value, str):
            value = ast.literal_eval(value)
        assert {k: value[k] for k in conf} == conf
    finally:
        services.stop()
