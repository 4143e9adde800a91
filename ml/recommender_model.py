"""The request-time recommender: an MLflow ``pyfunc`` model around a fitted recommender of ``ml.recommend``.

Logged by ``ml.train_baskets`` and registered as ``crm_recommender``; the champion loads with
``mlflow.pyfunc.load_model("models:/crm_recommender@champion")`` and serves over HTTP with
``mlflow models serve -m models:/crm_recommender@champion --env-manager local``.

Input: a DataFrame, one row per request, with ``customer_id`` and/or ``basket`` (a list of product ids, or
one string of ids separated by spaces or commas), and optionally ``n`` (how many items; default 10).
Output: one row per recommended item: ``request`` (the input row's position), ``customer_id``, ``rank``,
``product_id``, ``product_name``, ``score``, ``method`` and ``reason``.

- known customer, no basket: their personalised top-n (nothing they bought before);
- a basket (customer known or not): what goes with the basket (plus the customer's history if known);
- unknown customer without a usable basket: popular items, and the reason says the customer is new.

The fitted recommender travels as a joblib artifact (not inside the pickled ``PythonModel``), so the
model's class is plain code imported from the installed ``ml`` package when it is loaded.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from ml.errors import CrmError

ARTIFACT_KEY = "recommender"
OUTPUT_COLUMNS = ["request", "customer_id", "rank", "product_id", "product_name", "score", "method", "reason"]
DEFAULT_N = 10
MAX_N = 100
_SPLIT = re.compile(r"[\s,;]+")


class RecommenderRequestError(CrmError):
    """A request the recommender cannot answer (no customer and no basket, bad n)."""


def parse_basket(value: Any) -> list[str]:
    """A basket cell as a list of product ids: list/tuple/array, or one string of space/comma-separated ids."""
    if value is None:
        return []
    if isinstance(value, str):
        return [item for item in _SPLIT.split(value.strip()) if item]
    if isinstance(value, (list, tuple, np.ndarray, pd.Series)):
        return [str(item).strip() for item in value if item is not None and str(item).strip()]
    if isinstance(value, float) and np.isnan(value):
        return []
    return [str(value)]


def _customer(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    text = str(value).strip()
    return text or None


def _requests(model_input: Any) -> pd.DataFrame:
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    if "customer_id" not in frame.columns and "basket" not in frame.columns:
        raise RecommenderRequestError(
            f"a request needs a 'customer_id' and/or a 'basket' column; got columns {list(frame.columns)}"
        )
    return frame.reset_index(drop=True)


def recommend_requests(recommender, model_input: Any, default_n: int = DEFAULT_N) -> pd.DataFrame:
    """Answer request rows with a fitted recommender (the logic of :meth:`RecommenderModel.predict`)."""
    frame = _requests(model_input)
    n_rows = len(frame)
    customers = [_customer(v) for v in frame["customer_id"]] if "customer_id" in frame.columns else [None] * n_rows
    baskets = [parse_basket(v) for v in frame["basket"]] if "basket" in frame.columns else [[]] * n_rows
    if "n" in frame.columns:
        ns = [default_n if pd.isna(v) else int(v) for v in frame["n"]]
    else:
        ns = [default_n] * n_rows
    bad = [n for n in ns if not 1 <= n <= MAX_N]
    if bad:
        raise RecommenderRequestError(f"n must be between 1 and {MAX_N}, got {bad[0]}")
    asked = pd.Index([c for c in customers if c is not None], dtype="str")
    known = set(asked[recommender.customers_.get_indexer(asked) >= 0])

    frames = []
    # customers without a basket: one vectorised recommend() call per distinct n (the nightly path)
    plain = [i for i in range(n_rows) if not baskets[i]]
    for n in sorted({ns[i] for i in plain}):
        rows = [i for i in plain if ns[i] == n]
        ids = [customers[i] or "(anonymous)" for i in rows]
        recs = recommender.recommend(pd.Index(ids).unique(), n=n)
        by_id = {cid: part for cid, part in recs.groupby("customer_id", sort=False)}
        for i, cid in zip(rows, ids, strict=True):
            frames.append(by_id[cid].assign(request=i))
    # a basket is a request-time question about one basket: answered one by one (each is milliseconds)
    for i in range(n_rows):
        if baskets[i]:
            out = recommender.recommend_for_basket(baskets[i], customer_id=customers[i], n=ns[i])
            frames.append(out.assign(request=i))
    if not frames:
        return pd.DataFrame(columns=OUTPUT_COLUMNS)
    out = pd.concat(frames, ignore_index=True)
    request = out["request"].to_numpy()
    out["customer_id"] = [customers[i] for i in request]
    # from the request list, not the column: pandas turns an anonymous None into NaN there
    is_new = np.array([c is not None and c not in known for c in customers], dtype=bool)
    new = is_new[request] if n_rows else np.zeros(0, dtype=bool)
    if new.any():
        # say why a stranger gets generic items: no history to personalise from
        out.loc[new, "reason"] = ("new customer (no purchase history): " + out.loc[new, "reason"].astype(str))
    names = pd.Series(recommender.names_, index=recommender.items_)
    out["product_name"] = names.reindex(out["product_id"].astype(str)).to_numpy()
    out["rank"] = out["rank"].astype(np.int64)
    out["score"] = out["score"].astype(np.float64)
    return out.sort_values(["request", "rank"], kind="stable")[OUTPUT_COLUMNS].reset_index(drop=True)


class RecommenderModel(mlflow.pyfunc.PythonModel):
    """``pyfunc`` wrapper: loads the fitted recommender artifact, answers request rows with reasons."""

    def __init__(self, default_n: int = DEFAULT_N, recommender_name: str = ""):
        self.default_n = default_n
        self.recommender_name = recommender_name

    def load_context(self, context) -> None:
        import joblib

        self.recommender_ = joblib.load(context.artifacts[ARTIFACT_KEY])

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        return recommend_requests(self.recommender_, model_input, self.default_n)


def signature():
    """Input: optional ``customer_id`` (string), ``basket`` (any: list or string), ``n`` (integer).

    ``basket`` is ``Any`` on purpose: a list and a space-separated string are both valid requests, and a
    typed column would make MLflow's schema enforcement reject one of them.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    inputs = Schema([
        ColSpec("string", "customer_id", required=False),
        ColSpec(AnyType(), "basket", required=False),
        ColSpec("long", "n", required=False),
    ])
    outputs = Schema([
        ColSpec("long", "request"), ColSpec("string", "customer_id", required=False), ColSpec("long", "rank"),
        ColSpec("string", "product_id"), ColSpec("string", "product_name"), ColSpec("double", "score"),
        ColSpec("string", "method"), ColSpec("string", "reason"),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_recommender(recommender, *, recommender_name: str, registered_model_name: str | None,
                    example_customer: str | None = None, example_basket: list[str] | None = None):
    """Log ``recommender`` (fitted) as a pyfunc model in the active run; register it when a name is given."""
    import joblib

    from ml import registry

    example = pd.DataFrame({
        "customer_id": [example_customer],
        "basket": [list(example_basket or [])],
    })
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recommender.joblib"
        joblib.dump(recommender, path)
        return registry.log_pyfunc_model(
            RecommenderModel(recommender_name=recommender_name),
            input_example=example,
            signature=signature(),
            artifacts={ARTIFACT_KEY: str(path)},
            registered_model_name=registered_model_name,
        )


def fitted_recommender(pyfunc_model) -> Any:
    """The fitted ``ml.recommend`` estimator inside a loaded pyfunc model."""
    python_model = pyfunc_model.unwrap_python_model()
    if not hasattr(python_model, "recommender_"):
        raise CrmError(f"{pyfunc_model.metadata.model_uri if pyfunc_model.metadata else 'the model'} is not a "
                       "crm recommender model")
    return python_model.recommender_
