"""MLflow helpers shared by every training family: tracking set-up, runs, datasets, plots, models, champion.

Usage, in a training module::

    registry.configure(settings)                      # fails with TrackingUnavailable if the store is down
    with registry.parent_run("segmentation", as_of=as_of, run_name=f"segmentation {as_of}",
                             orchestrator_run_id=dag_run_id) as parent:
        registry.log_dataset(features, "marts.customer_features", as_of)
        for candidate in candidates:
            with registry.child_run(candidate.name):
                ...  mlflow.log_metrics(...)
        info = registry.log_sklearn_model(best, input_example=features.head(5),
                                          registered_model_name="crm_segmentation")
        decision = registry.decide_promotion("crm_segmentation", info.registered_model_version,
                                             challenger_score=..., score_fn=rescore_on_todays_holdout,
                                             greater_is_better=True)
        publish(settings, "customer_segments", frame, as_of=as_of, run_id=parent.info.run_id, ...)

Everything talks to the store configured by :func:`configure` (``settings.mlflow_tracking_uri``; the
default is a local SQLite file under the state folder, artifacts under ``settings.mlflow_artifact_root``).
The registry uses aliases (``@champion``), never the deprecated stages.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import math
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mlflow
import mlflow.data.pandas_dataset
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ml.config import PROJECT_ROOT, Settings
from ml.errors import CrmError

CHAMPION_ALIAS = "champion"
POLICIES = ("auto", "never", "force")
# Run tags every run carries, so the UI can filter by them (``tags.as_of = '2024-06-30'``).
TAG_AS_OF = "as_of"
TAG_ORCHESTRATOR_RUN = "orchestrator_run_id"
TAG_GIT_COMMIT = "git_commit"
_INHERITED_TAGS = (TAG_AS_OF, TAG_ORCHESTRATOR_RUN, TAG_GIT_COMMIT)


class TrackingUnavailable(CrmError):
    """The MLflow tracking store cannot be reached or used."""


class RegistryError(CrmError):
    """A registry operation was asked something impossible (unknown model, version, policy)."""


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Config:
    tracking_uri: str
    artifact_root: Path | None  # None: a remote server decides where artifacts go


_config: _Config | None = None


def configure(settings: Settings, *, probe_timeout: float = 5.0) -> str:
    """Point MLflow (tracking and registry) at ``settings.mlflow_tracking_uri`` and check it answers.

    Raises :class:`TrackingUnavailable` (a :class:`CrmError`) with the URI and the cause when the store
    is unreachable, so a training task fails before it trains or publishes anything. Returns the URI.
    """
    global _config
    _config = None  # a failed configure must not leave the previous store in use
    uri = settings.mlflow_tracking_uri
    scheme = urlsplit(uri).scheme
    local = scheme in ("sqlite", "file", "")
    if scheme == "sqlite":
        # SQLAlchemy does not create the folder of a SQLite file.
        path = uri.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if scheme in ("http", "https"):
        _probe_http(uri, probe_timeout)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    _config = _Config(tracking_uri=uri, artifact_root=Path(settings.mlflow_artifact_root) if local else None)
    try:
        MlflowClient().search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any failure here means "the store is not usable"
        _config = None
        raise TrackingUnavailable(f"the MLflow tracking store at {_redact(uri)} is not usable: {_first_line(err)}") from None
    return uri


def _probe_http(uri: str, timeout: float) -> None:
    """One quick request before MLflow's own client, which retries with back-off for minutes."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 - the configured tracking server
            return
    except urllib.error.HTTPError:
        return  # the server answered (maybe without /health): reachable
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingUnavailable(
            f"cannot reach the MLflow tracking server at {_redact(uri)}: {reason} "
            "(start it, or unset MLFLOW_TRACKING_URI to use the local store)"
        ) from None


def _redact(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.password:
        return uri.replace(f":{parts.password}@", ":***@")
    return uri


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _require_config() -> _Config:
    if _config is None:
        raise TrackingUnavailable("MLflow is not configured: call ml.registry.configure(settings) first")
    return _config


# ---------------------------------------------------------------------------------------------------------
# Experiments and runs
# ---------------------------------------------------------------------------------------------------------
def experiment(name: str) -> str:
    """The id of experiment ``name``, created on first use (artifacts under the artifact root)."""
    config = _require_config()
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    location = None
    if config.artifact_root is not None:
        folder = config.artifact_root / _safe_folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        location = folder.resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        # Another process created it between our lookup and create.
        again = client.get_experiment_by_name(name)
        if again is None:
            raise
        return again.experiment_id


def _safe_folder(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "experiment"


def git_commit() -> str | None:
    """The checkout's commit (``git rev-parse HEAD``), or None when there is no git or no repository."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


@contextlib.contextmanager
def parent_run(
    experiment_name: str,
    *,
    as_of: dt.date,
    run_name: str,
    orchestrator_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """A top-level run tagged with ``as_of``, the orchestrator's run id and the git commit.

    The run ends FINISHED, or FAILED when the block raises (the exception propagates).
    """
    exp_id = experiment(experiment_name)
    all_tags = {TAG_AS_OF: _iso(as_of)}
    if orchestrator_run_id:
        all_tags[TAG_ORCHESTRATOR_RUN] = str(orchestrator_run_id)
    commit = git_commit()
    if commit:
        all_tags[TAG_GIT_COMMIT] = commit
        all_tags["mlflow.source.git.commit"] = commit
    all_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
    if mlflow.active_run() is not None:
        raise RegistryError(
            f"a run is already active ({mlflow.active_run().info.run_id}); parent_run starts a top-level run"
        )
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=all_tags) as run:
        yield run


@contextlib.contextmanager
def child_run(name: str, *, tags: Mapping[str, Any] | None = None) -> Iterator[mlflow.ActiveRun]:
    """A nested run under the active run; it inherits the parent's as_of / orchestrator / git tags."""
    parent = mlflow.active_run()
    if parent is None:
        raise RegistryError("child_run needs an active parent run (use registry.parent_run first)")
    parent_tags = MlflowClient().get_run(parent.info.run_id).data.tags
    all_tags = {k: parent_tags[k] for k in _INHERITED_TAGS if k in parent_tags}
    all_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
    # Without the parent's experiment id MLflow files a nested run under the active (often Default) experiment.
    with mlflow.start_run(
        experiment_id=parent.info.experiment_id, run_name=name, nested=True, tags=all_tags
    ) as run:
        yield run


def _iso(as_of: dt.date | str) -> str:
    return as_of.isoformat() if isinstance(as_of, dt.date) else str(as_of)


# ---------------------------------------------------------------------------------------------------------
# Inputs, figures
# ---------------------------------------------------------------------------------------------------------
def log_dataset(
    df: pd.DataFrame,
    mart_name: str,
    as_of: dt.date,
    context: str = "training",
    *,
    targets: str | None = None,
) -> mlflow.data.pandas_dataset.PandasDataset:
    """Log ``df`` as the active run's input dataset, named ``<mart_name>@<as_of>``.

    MLflow stores the schema, a content digest and the row count, not the rows.
    """
    if mlflow.active_run() is None:
        raise RegistryError("log_dataset needs an active run")
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.tracking.context import registry as context_registry

    # the source from_pandas gives a frame without one: the code that logged it
    source = CodeDatasetSource(tags=context_registry.resolve_tags())
    dataset = _MartDataset(df, source=source, name=f"{mart_name}@{_iso(as_of)}", targets=targets,
                           digest=_pandas_digest(df))
    mlflow.log_input(dataset, context=context, tags={"mart": mart_name, TAG_AS_OF: _iso(as_of)})
    return dataset


def _pandas_digest(df: pd.DataFrame) -> str:
    """MLflow's digest of a frame (``compute_pandas_digest``: the first rows' string and number columns, the
    row count, the column names), with its one whole-frame step vectorised: it keeps the columns whose every
    value is a ``str`` by calling ``type`` on every value of the frame (4 s for a 947k-row mart)."""
    from mlflow.data.digest_utils import MAX_ROWS, get_normalized_md5_digest

    def only_str(column: pd.Series) -> bool:
        if column.dtype == object:
            return bool(column.map(type).eq(str).all())
        # pandas' string dtype: every value is a str unless it is missing
        return pd.api.types.is_string_dtype(column.dtype) and bool(column.notna().all())

    trimmed = df.head(MAX_ROWS)
    string_columns = trimmed.columns[[only_str(df[name]) for name in df.columns]]
    kept = trimmed[string_columns.union(trimmed.select_dtypes(include=[np.number]).columns)]
    return get_normalized_md5_digest(
        [pd.util.hash_pandas_object(kept).values, np.int64(len(df))] + [str(x).encode() for x in df.columns]
    )


# Rows per column the schema's types are inferred from (the first non-null ones of each column).
SCHEMA_SAMPLE_ROWS = 1_000


class _MartDataset(mlflow.data.pandas_dataset.PandasDataset):
    """MLflow's pandas dataset with the same schema, inferred in bulk.

    MLflow infers a column's type and whether it is required value by value in Python: 160 s of a 205 s
    scoring task for a 947k-row mart at 1M customers, and minutes for the 9.7M basket lines. Here the types are
    MLflow's own inference over a sample holding the first non-null values of every column (a column's values
    share its dtype), and "required" is an exact, vectorised null check over every row.
    """

    @functools.cached_property
    def schema(self):
        from mlflow.types import ColSpec, Schema

        df = self._df
        present = {name: df[name].notna().to_numpy() for name in df.columns}
        rows = np.unique(np.concatenate(
            [np.flatnonzero(mask)[:SCHEMA_SAMPLE_ROWS] for mask in present.values()] + [np.arange(min(len(df), 1))]
        ))
        sampled = mlflow.data.pandas_dataset.PandasDataset(df.iloc[rows], source=self.source, digest="sample").schema
        if sampled is None or [spec.name for spec in sampled.inputs] != [str(c) for c in df.columns]:
            return super().schema  # a frame MLflow cannot type from a sample: its own inference, whole
        return Schema([ColSpec(spec.type, spec.name, required=bool(present[name].all()))
                       for spec, name in zip(sampled.inputs, df.columns, strict=True)])


def log_figure_png(fig_or_path: Any, artifact_path: str) -> str:
    """Log a matplotlib figure or an existing PNG file as the artifact ``artifact_path`` (``plots/x.png``).

    Returns the artifact path. Figures are closed after saving so long training loops do not leak memory.
    """
    if mlflow.active_run() is None:
        raise RegistryError("log_figure_png needs an active run")
    if not artifact_path.endswith(".png"):
        artifact_path += ".png"
    if isinstance(fig_or_path, (str, os.PathLike)):
        source = Path(fig_or_path)
        if not source.is_file():
            raise CrmError(f"figure file {source} does not exist")
        folder, _, filename = artifact_path.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / filename
            shutil.copyfile(source, target)
            mlflow.log_artifact(str(target), artifact_path=folder or None)
        return artifact_path
    mlflow.log_figure(fig_or_path, artifact_path)
    with contextlib.suppress(Exception):
        import matplotlib.pyplot as plt

        plt.close(fig_or_path)
    return artifact_path


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------
def default_pip_requirements() -> list[str]:
    """Pinned requirements of our models. Passing them skips MLflow's requirement inference, which
    re-imports the model in a subprocess (seconds per model) and can need the network."""
    from importlib.metadata import version

    packages = ["mlflow", "scikit-learn", "pandas", "numpy", "pyarrow", "scipy"]
    return [f"{p}=={version(p)}" for p in packages]


def log_sklearn_model(
    model: Any,
    *,
    input_example: pd.DataFrame,
    name: str = "model",
    registered_model_name: str | None = None,
    signature: Any = None,
    predict_fn: str = "predict",
) -> mlflow.models.model.ModelInfo:
    """Log a fitted scikit-learn estimator/pipeline with signature and input example; register it when
    ``registered_model_name`` is given (``info.registered_model_version`` is then the new version)."""
    from mlflow.models import infer_signature

    if mlflow.active_run() is None:
        raise RegistryError("log_sklearn_model needs an active run")
    if signature is None:
        signature = infer_signature(input_example, getattr(model, predict_fn)(input_example))
    return mlflow.sklearn.log_model(
        model,
        name=name,
        signature=signature,
        input_example=input_example,
        registered_model_name=registered_model_name,
        pyfunc_predict_fn=predict_fn,
        pip_requirements=default_pip_requirements(),
    )


def log_pyfunc_model(
    python_model: Any,
    *,
    input_example: Any,
    name: str = "model",
    registered_model_name: str | None = None,
    signature: Any = None,
    artifacts: Mapping[str, str] | None = None,
    code_paths: list[str] | None = None,
) -> mlflow.models.model.ModelInfo:
    """Log an ``mlflow.pyfunc.PythonModel`` (e.g. a recommender with reasons) and optionally register it.

    The model's class must be importable where it is loaded (our ``ml`` package is installed), or its
    source passed in ``code_paths``.
    """
    if mlflow.active_run() is None:
        raise RegistryError("log_pyfunc_model needs an active run")
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=python_model,
        input_example=input_example,
        signature=signature,
        artifacts=dict(artifacts) if artifacts else None,
        code_paths=code_paths,
        registered_model_name=registered_model_name,
        pip_requirements=default_pip_requirements(),
    )


def register_model(model_uri: str, model_name: str) -> str:
    """Register an already logged model (``runs:/…`` or ``models:/…``); returns the new version."""
    return str(mlflow.register_model(model_uri, model_name).version)


def champion_uri(model_name: str) -> str:
    """``models:/<name>@champion``, loadable with ``mlflow.pyfunc.load_model``."""
    return f"models:/{model_name}@{CHAMPION_ALIAS}"


def champion_version(model_name: str) -> str | None:
    """The version behind the ``champion`` alias, or None when the family has no champion yet."""
    _require_config()
    try:
        return str(MlflowClient().get_model_version_by_alias(model_name, CHAMPION_ALIAS).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def require_run(run_id: str) -> None:
    """Raise unless ``run_id`` is a run in the store: call before publishing rows that cite it."""
    _require_config()
    try:
        MlflowClient().get_run(run_id)
    except MlflowException as err:
        raise TrackingUnavailable(f"MLflow run {run_id!r} cannot be found: {_first_line(err)}") from None


# ---------------------------------------------------------------------------------------------------------
# Champion / challenger
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    reason: str
    challenger_version: str
    challenger_score: float
    champion_score: float | None
    champion_version_before: str | None
    champion_version_after: str | None
    policy: str


def decide_promotion(
    model_name: str,
    challenger_version: str | int,
    *,
    challenger_score: float,
    score_fn: Callable[[str], float] | None = None,
    champion_score: float | None = None,
    greater_is_better: bool,
    margin: float = 0.0,
    policy: str = "auto",
    metric_name: str = "score",
) -> PromotionDecision:
    """Make ``challenger_version`` the ``champion`` only if it beats the current champion.

    The champion is re-scored on today's holdout by ``score_fn(champion_uri)`` (the caller's function,
    so both models are judged on the same data), or its score is given as ``champion_score``. The
    comparison is MLflow's own model validation (``MetricThreshold`` with ``min_absolute_change``):
    the challenger must be better by more than ``margin``. ``policy``: ``auto`` (compare), ``never``
    (record the scores, never move the alias), ``force`` (always promote). The first version of a
    family becomes champion under ``auto`` and ``force``. A champion that cannot be re-scored (its
    loading or scoring raises) loses to a challenger with a finite score: it could not serve today.

    The decision, reason and both scores are set as tags on the challenger's run and model version.
    """
    _require_config()
    if policy not in POLICIES:
        raise RegistryError(f"policy must be one of {POLICIES}, got {policy!r}")
    if margin < 0 or not math.isfinite(margin):
        raise RegistryError(f"margin must be a finite number >= 0, got {margin!r}")
    client = MlflowClient()
    challenger_version = str(challenger_version)
    try:
        version = client.get_model_version(model_name, challenger_version)
    except MlflowException as err:
        raise RegistryError(f"model {model_name!r} has no version {challenger_version}: {_first_line(err)}") from None
    before = champion_version(model_name)
    challenger_score = float(challenger_score)

    # The champion is re-scored under every policy when possible, so the record always has both scores.
    if before is not None and before != challenger_version and champion_score is None and score_fn is not None:
        try:
            champion_score = float(score_fn(champion_uri(model_name)))
        except Exception as err:  # noqa: BLE001 - any failure to score the champion is reported in the reason
            champion_score = math.nan
            scoring_error = _first_line(err)
        else:
            scoring_error = None
    else:
        if before is not None and before != challenger_version and champion_score is None and policy == "auto":
            raise RegistryError(
                "a champion exists: pass score_fn (re-scores it on today's holdout) or champion_score"
            )
        scoring_error = None
        champion_score = None if champion_score is None else float(champion_score)

    promoted, reason = _judge(
        policy=policy,
        before=before,
        challenger_version=challenger_version,
        challenger_score=challenger_score,
        champion_score=champion_score,
        greater_is_better=greater_is_better,
        margin=margin,
        metric_name=metric_name,
        scoring_error=scoring_error,
    )
    if promoted and before != challenger_version:
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, challenger_version)
    after = challenger_version if promoted else before
    decision = PromotionDecision(
        promoted=promoted,
        reason=reason,
        challenger_version=challenger_version,
        challenger_score=challenger_score,
        champion_score=champion_score,
        champion_version_before=before,
        champion_version_after=after,
        policy=policy,
    )
    _record(client, model_name, version, decision, metric_name, margin, greater_is_better)
    return decision


def _judge(
    *,
    policy: str,
    before: str | None,
    challenger_version: str,
    challenger_score: float,
    champion_score: float | None,
    greater_is_better: bool,
    margin: float,
    metric_name: str,
    scoring_error: str | None,
) -> tuple[bool, str]:
    if policy == "force":
        return True, "policy=force: promoted without comparison"
    if policy == "never":
        return False, "policy=never: the champion alias is not moved"
    if before is None:
        if not math.isfinite(challenger_score):
            return False, f"first model of the family but its {metric_name} is not finite ({challenger_score})"
        return True, "first model of the family: becomes champion"
    if before == challenger_version:
        return True, f"version {challenger_version} is already the champion"
    if not math.isfinite(challenger_score):
        return False, f"challenger {metric_name} is not finite ({challenger_score}); champion kept"
    if scoring_error is not None or champion_score is None or not math.isfinite(champion_score):
        why = scoring_error or f"score {champion_score}"
        return True, f"the champion (version {before}) could not be re-scored on today's holdout ({why})"

    from mlflow.models import MetricThreshold
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    # min_absolute_change must be positive: margin 0 means "strictly better" (MLflow's own 1e-10 rule).
    threshold = MetricThreshold(min_absolute_change=margin if margin > 0 else 1e-10,
                                greater_is_better=greater_is_better)
    try:
        mlflow.validate_evaluation_results(
            {metric_name: threshold},
            EvaluationResult(metrics={metric_name: challenger_score}, artifacts={}),
            EvaluationResult(metrics={metric_name: champion_score}, artifacts={}),
        )
    except ModelValidationFailedException:
        direction = "higher" if greater_is_better else "lower"
        return False, (
            f"challenger {metric_name} {challenger_score:.6g} does not beat champion v{before} "
            f"{champion_score:.6g} by the margin {margin:g} ({direction} is better); champion kept"
        )
    return True, (
        f"challenger {metric_name} {challenger_score:.6g} beats champion v{before} {champion_score:.6g} "
        f"by more than the margin {margin:g}"
    )


def _record(client, model_name, version, decision: PromotionDecision, metric_name, margin, greater_is_better):
    tags = {
        "promotion.decision": "promoted" if decision.promoted else "not_promoted",
        "promotion.reason": decision.reason[:5000],
        "promotion.policy": decision.policy,
        "promotion.metric": metric_name,
        "promotion.greater_is_better": str(bool(greater_is_better)).lower(),
        "promotion.margin": repr(float(margin)),
        "promotion.challenger_score": repr(decision.challenger_score),
        "promotion.champion_score": "" if decision.champion_score is None else repr(decision.champion_score),
        "promotion.champion_version_before": decision.champion_version_before or "",
        "promotion.champion_version_after": decision.champion_version_after or "",
        "promotion.challenger_version": decision.challenger_version,
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, decision.challenger_version, key, value)
    run_ids = {version.run_id} if version.run_id else set()
    active = mlflow.active_run()
    if active is not None:
        run_ids.add(active.info.run_id)
    from mlflow.entities import RunTag

    for run_id in run_ids:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
