"""The champion recommender at request time: loaded from the registry, and served over HTTP by MLflow.

A small generated warehouse is trained once (generate -> dbt -> train_baskets) into a real SQLite MLflow
store; the tests load ``models:/<name>@champion`` in-process and through ``mlflow models serve``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from helpers_warehouse import generated_warehouse

from ml import registry
from ml.ingest.generator import GeneratorParams
from ml.train_baskets import MODEL_NAME, build_basket_marts, train_baskets
from ml.warehouse import connect, read_table

GENERATED = GeneratorParams(customers=1500, days=730, seed=11)
AS_OF = GENERATED.resolved_end_date
MODEL = f"{MODEL_NAME}_{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def champion(server_settings, tmp_path_factory):
    """A trained warehouse whose recommender is registered and is @champion; yields settings and facts."""
    root = tmp_path_factory.mktemp("serving_mlflow")
    with generated_warehouse(server_settings, root, GENERATED) as settings:
        build_basket_marts(settings, AS_OF)
        result = train_baskets(settings, as_of=AS_OF, model_name=MODEL, min_support=0.0005,
                               category_min_support=0.01, min_confidence=0.1, rule_recommender_min_support=0.001)
        with connect(settings) as conn:
            lines = read_table(conn, "marts.basket_lines")
            bundles = [ids for (ids,) in conn.execute(
                "select product_ids from audit.planted_bundles order by support desc")]
        yield settings, result, lines, bundles


def _check_answer(out: pd.DataFrame, request: int, n: int = 10) -> pd.DataFrame:
    rows = out[out["request"] == request]
    assert list(rows["rank"]) == list(range(1, n + 1))
    assert rows["product_id"].is_unique
    assert rows["reason"].str.len().gt(0).all()
    assert (rows["score"].diff().dropna() <= 1e-12).all()  # ranked best first
    return rows


def test_champion_loads_from_the_registry_and_answers_customers_baskets_and_strangers(champion):
    settings, result, lines, bundles = champion
    registry.configure(settings)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    customer = str(lines["customer_id"].dropna().iloc[0])
    first, *companions = bundles[0]  # the most frequent planted bundle
    requests = pd.DataFrame({
        "customer_id": [customer, None, None, "C_NEVER_SEEN", "C_NEVER_SEEN"],
        "basket": [None, [first], f"{first} {companions[0]}", None, [first]],
    })
    out = model.predict(requests)

    known = _check_answer(out, 0)
    bought = set(lines.loc[lines["customer_id"] == customer, "product_id"])
    assert not bought & set(known["product_id"])  # nothing the customer already has
    assert not known["reason"].str.startswith("new customer").any()

    basket = _check_answer(out, 1)
    assert first not in set(basket["product_id"])
    assert set(companions) & set(basket["product_id"]), "the planted companion should go with its first item"
    as_text = _check_answer(out, 2)  # a space-separated string is a basket too
    assert not {first, companions[0]} & set(as_text["product_id"])
    assert not as_text["reason"].str.startswith("new customer").any()  # anonymous, not a stranger

    stranger = _check_answer(out, 3)
    assert stranger["reason"].str.startswith("new customer (no purchase history): popular item").all()
    assert (stranger["method"] == "popularity").all()
    stranger_with_basket = _check_answer(out, 4)
    assert stranger_with_basket["reason"].str.startswith("new customer").all()
    assert set(companions) & set(stranger_with_basket["product_id"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, payload: dict, timeout: float = 30) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - our local server
        return json.loads(response.read())


def test_champion_is_served_over_http_by_mlflow_models_serve(champion, tmp_path):
    settings, result, lines, bundles = champion
    port = _free_port()
    venv_bin = Path(sys.executable).parent  # the scoring server runs `uvicorn` from PATH: as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
           "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    mlflow_cli = venv_bin / "mlflow"
    log_file = tmp_path / "serve.log"
    with open(log_file, "w") as log:
        server = subprocess.Popen(
            [str(mlflow_cli), "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):  # noqa: S310
                    break
            except (urllib.error.URLError, OSError):
                assert server.poll() is None, f"mlflow models serve exited: {log_file.read_text()[-2000:]}"
                assert time.monotonic() < deadline, f"server not up in time: {log_file.read_text()[-2000:]}"
                time.sleep(1)
        first, *companions = bundles[0]
        # a known customer who has bought none of the bundle (bought items are never offered again), chosen
        # by id: the table's physical order is not stable between builds
        bundle_buyers = set(lines.loc[lines["product_id"].isin(bundles[0]), "customer_id"].dropna())
        customer = min(set(lines["customer_id"].dropna()) - bundle_buyers)
        answer = _post(f"http://127.0.0.1:{port}/invocations", {"dataframe_records": [
            {"customer_id": customer, "basket": [first]},
            {"customer_id": "C_NEVER_SEEN"},
        ]})
        out = pd.DataFrame(answer["predictions"])
        with_basket = _check_answer(out, 0)
        assert set(with_basket["customer_id"]) == {customer}
        assert set(companions) & set(with_basket["product_id"])
        stranger = _check_answer(out, 1)
        assert stranger["reason"].str.startswith("new customer").all()
        # a bad request is refused with a message, not a crash
        with pytest.raises(urllib.error.HTTPError) as refused:
            _post(f"http://127.0.0.1:{port}/invocations", {"dataframe_records": [{"n": 5}]})
        assert refused.value.code in (400, 500)
        assert server.poll() is None
    finally:
        os.killpg(server.pid, 15)  # the server and its worker: the process group this test started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait(timeout=10)
