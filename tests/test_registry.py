"""MLflow helpers against a real SQLite tracking store: runs, tags, datasets, models, champion/challenger."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from sklearn.linear_model import LinearRegression  # noqa: E402

from ml import registry  # noqa: E402
from ml.config import Settings  # noqa: E402
from ml.errors import CrmError  # noqa: E402
from ml.publish import publish  # noqa: E402
from ml.warehouse import connect  # noqa: E402

AS_OF = dt.date(2024, 6, 30)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Settings:
    """One real SQLite MLflow store for the module (its schema migration takes seconds); each test uses
    its own experiment and model names."""
    root = tmp_path_factory.mktemp("mlflow")
    settings = Settings.from_env({"CRM_STATE_DIR": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"})
    registry.configure(settings)
    return settings


@pytest.fixture
def configured(store) -> Settings:
    registry.configure(store)
    yield store
    while mlflow.active_run() is not None:
        mlflow.end_run("FAILED")


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _fit(seed: int, noise: float = 0.0):
    rng = np.random.default_rng(seed)
    x = pd.DataFrame({"recency_days": rng.random(60), "n_orders": rng.random(60)})
    y = 3 * x["recency_days"] - 2 * x["n_orders"] + noise * rng.normal(size=60)
    return LinearRegression().fit(x, y), x


def test_parent_and_child_runs_carry_tags_dataset_and_figure(configured, tmp_path):
    exp = _name("exp")
    frame = pd.DataFrame({"customer_id": ["a", "b"], "spend": [1.0, 2.0]})
    with registry.parent_run(exp, as_of=AS_OF, run_name="nightly", orchestrator_run_id="manual__1",
                             tags={"family": "test"}) as parent:
        registry.log_dataset(frame, "marts.customer_features", AS_OF)
        with registry.child_run("kmeans_k4") as child:
            mlflow.log_metric("silhouette", 0.5)
        fig, ax = plt.subplots()
        ax.plot([1, 2, 3])
        registry.log_figure_png(fig, "plots/k_selection.png")
        png = tmp_path / "profile.png"
        fig2, _ = plt.subplots()
        fig2.savefig(png)
        registry.log_figure_png(png, "plots/segment_profiles.png")
    client = MlflowClient()
    run = client.get_run(parent.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["as_of"] == "2024-06-30"
    assert run.data.tags["orchestrator_run_id"] == "manual__1"
    assert run.data.tags["family"] == "test"
    assert len(run.data.tags.get("git_commit", "x" * 40)) == 40
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "marts.customer_features@2024-06-30"
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"
    kid = client.get_run(child.info.run_id)
    assert kid.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert kid.data.tags["as_of"] == "2024-06-30" and kid.data.metrics["silhouette"] == 0.5
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert artifacts == {"plots/k_selection.png", "plots/segment_profiles.png"}
    location = client.get_experiment(run.info.experiment_id).artifact_location
    assert location.startswith(configured.mlflow_artifact_root.resolve().as_uri())


def test_failed_block_marks_run_failed(configured):
    with pytest.raises(ValueError, match="boom"):
        with registry.parent_run(_name("exp"), as_of=AS_OF, run_name="x") as run:
            raise ValueError("boom")
    assert MlflowClient().get_run(run.info.run_id).info.status == "FAILED"


def test_child_run_needs_parent(configured):
    with pytest.raises(CrmError, match="active parent run"):
        with registry.child_run("orphan"):
            pass


def _register(model_name: str, seed: int, noise: float = 0.0) -> str:
    model, x = _fit(seed, noise)
    with registry.parent_run(_name("exp"), as_of=AS_OF, run_name="train"):
        info = registry.log_sklearn_model(model, input_example=x.head(3), registered_model_name=model_name)
    assert info.signature is not None
    return str(info.registered_model_version)


def test_first_model_becomes_champion_worse_is_not_promoted_better_is(configured):
    name = _name("clv")
    v1 = _register(name, seed=1)
    first = registry.decide_promotion(name, v1, challenger_score=10.0, greater_is_better=False)
    assert first.promoted and first.champion_version_after == v1
    assert registry.champion_version(name) == v1
    loaded = mlflow.pyfunc.load_model(registry.champion_uri(name))
    assert loaded.predict(pd.DataFrame({"recency_days": [1.0], "n_orders": [0.0]})).shape == (1,)

    rescored = []

    def score_fn(uri: str) -> float:
        rescored.append(uri)
        return 10.0

    v2 = _register(name, seed=2)
    worse = registry.decide_promotion(name, v2, challenger_score=10.5, score_fn=score_fn,
                                      greater_is_better=False, margin=0.1)
    assert not worse.promoted and registry.champion_version(name) == v1
    assert rescored == [f"models:/{name}@champion"]
    assert worse.champion_score == 10.0 and worse.challenger_score == 10.5

    # Better, but not by the margin: kept.
    v3 = _register(name, seed=3)
    close = registry.decide_promotion(name, v3, challenger_score=9.95, score_fn=score_fn,
                                      greater_is_better=False, margin=0.1)
    assert not close.promoted and registry.champion_version(name) == v1

    v4 = _register(name, seed=4)
    better = registry.decide_promotion(name, v4, challenger_score=9.0, score_fn=score_fn,
                                       greater_is_better=False, margin=0.1)
    assert better.promoted and better.champion_version_before == v1 and better.champion_version_after == v4
    assert registry.champion_version(name) == v4

    client = MlflowClient()
    tags = client.get_model_version(name, v2).tags
    assert tags["promotion.decision"] == "not_promoted"
    assert float(tags["promotion.champion_score"]) == 10.0 and float(tags["promotion.challenger_score"]) == 10.5
    run_tags = client.get_run(client.get_model_version(name, v4).run_id).data.tags
    assert run_tags["promotion.decision"] == "promoted" and run_tags["promotion.champion_version_before"] == v1


def test_policies_never_and_force(configured):
    name = _name("churn")
    v1 = _register(name, seed=1)
    never = registry.decide_promotion(name, v1, challenger_score=0.9, greater_is_better=True, policy="never")
    assert not never.promoted and registry.champion_version(name) is None
    registry.decide_promotion(name, v1, challenger_score=0.9, greater_is_better=True)
    v2 = _register(name, seed=2)
    forced = registry.decide_promotion(name, v2, challenger_score=0.1, score_fn=lambda uri: 0.9,
                                       greater_is_better=True, policy="force")
    assert forced.promoted and registry.champion_version(name) == v2 and forced.champion_score == 0.9
    v3 = _register(name, seed=3)
    kept = registry.decide_promotion(name, v3, challenger_score=0.99, score_fn=lambda uri: 0.1,
                                     greater_is_better=True, policy="never")
    assert not kept.promoted and registry.champion_version(name) == v2
    with pytest.raises(CrmError, match="policy"):
        registry.decide_promotion(name, v3, challenger_score=1.0, greater_is_better=True, policy="sometimes")
    with pytest.raises(CrmError, match="score_fn"):
        registry.decide_promotion(name, v3, challenger_score=1.0, greater_is_better=True)


def test_published_rows_carry_a_run_id_that_exists_in_mlflow(configured, warehouse):
    name = _name("seg")
    frame = pd.DataFrame({"customer_id": ["a", "b", "c"], "segment_id": [0, 1, 1]})
    with registry.parent_run(_name("exp"), as_of=AS_OF, run_name="seg") as run:
        version = _register_inside(name)
        report = publish(warehouse, "customer_segments", frame, as_of=AS_OF, run_id=run.info.run_id,
                         model_name=name, model_version=version, key_columns=["customer_id"])
    with connect(warehouse) as conn:
        (run_id,) = conn.execute("select distinct mlflow_run_id from ml.customer_segments").fetchone()
    assert run_id == report.run_id
    registry.require_run(run_id)
    assert MlflowClient().get_run(run_id).data.tags["as_of"] == "2024-06-30"
    with pytest.raises(CrmError, match="cannot be found"):
        registry.require_run("0" * 32)


def _register_inside(name: str) -> str:
    model, x = _fit(5)
    info = registry.log_sklearn_model(model, input_example=x.head(2), registered_model_name=name)
    return str(info.registered_model_version)


def test_unreachable_tracking_server_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    settings = Settings.from_env({"CRM_STATE_DIR": str(tmp_path), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    with pytest.raises(registry.TrackingUnavailable, match=r"http://127\.0\.0\.1:9"):
        registry.configure(settings, probe_timeout=2)
    with pytest.raises(CrmError, match="not configured"):
        registry.experiment("anything")


def test_a_logged_mart_has_the_schema_mlflow_infers_itself(configured):
    # log_dataset types a sample and checks nulls in bulk (MLflow's own inference walks every value in
    # Python): the logged schema must be exactly MLflow's, nulls far past the sample included
    n = 5_000
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({
        "customer_id": pd.Series([f"c{i}" for i in range(n)], dtype="str"),
        "late_null_text": pd.Series([f"t{i}" if i != n - 7 else None for i in range(n)], dtype="str"),
        "spend": rng.random(n),
        "late_nan": np.where(np.arange(n) == n - 3, np.nan, 1.0),
        "n_orders": rng.integers(0, 9, n),
        "flag": rng.random(n) > 0.5,
        "mostly_null": pd.Series([None] * (n - 1) + ["x"], dtype="str"),
        "object_text": pd.Series(["a"] * (n - 1) + [None], dtype=object),
        "object_all_text": pd.Series(["b"] * n, dtype=object),
        "day": pd.to_datetime("2024-01-01") + pd.to_timedelta(rng.integers(0, 300, n), unit="D"),
    })
    with registry.parent_run(_name("exp"), as_of=AS_OF, run_name="schema") as run:
        logged = registry.log_dataset(frame, "marts.clv_training_set", AS_OF, targets="spend")
    expected = mlflow.data.from_pandas(frame, name="x", targets="spend")
    assert logged.schema.to_dict() == expected.schema.to_dict()
    assert not {spec.name: spec.required for spec in logged.schema.inputs}["late_null_text"]
    assert logged.digest == expected.digest and logged.profile == expected.profile
    (dataset_input,) = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert json.loads(dataset_input.dataset.schema) == {"mlflow_colspec": expected.schema.to_dict()}
